"""edgelora on Ray Serve: K replicas of one engine each, adapter-affinity routing, one ingress.

    edgelora serve --ray --replicas 2 --onnx-dir llm_onnx --lora-modules a=adapters/a ...
    serve run samples/ray_serve.yaml          # Ray's own tooling: import_path edgelora.entrypoints.ray:app_builder

Needs the ``[ray]`` extra (``ray[serve]``); nothing outside this package imports Ray.
See docs/scaling.md.
"""

from edgelora.entrypoints.ray.app import app_builder, build_app, run
from edgelora.entrypoints.ray.options import RayOptions

__all__ = ["RayOptions", "app_builder", "build_app", "run"]
