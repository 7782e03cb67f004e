"""Moved to ``edgelora.entrypoints.ray``; re-exported here so Serve config files written with
``import_path: edgelora.ray:app_builder`` keep working."""

from edgelora.entrypoints.ray import RayOptions, app_builder, build_app, run  # noqa: F401
