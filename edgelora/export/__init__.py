"""HF model folder -> model.onnx + config.json (needs torch + transformers)."""

from edgelora.export.exporter import ExportOptions, export_model

__all__ = ["ExportOptions", "export_model"]
