"""Graph rewrites on the exported ONNX model (onnx + onnx-graphsurgeon)."""

from edgelora.graph.insert_lora import insert_lora

__all__ = ["insert_lora"]
