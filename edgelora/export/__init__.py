"""HF model folder -> model.onnx + config.json (needs torch + transformers).

The exporter is imported on first use, so the graph helpers here (``branches``) that later
stages share stay importable from the base install, without torch.
"""

from __future__ import annotations

__all__ = ["ExportOptions", "export_model"]


def __getattr__(name: str):
    if name in __all__:
        from edgelora.export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'edgelora.export' has no attribute {name!r}")
