"""The runtime: ORT session over lora_model.onnx, native adapter slots and sampler, KV cache."""

from edgelora.runtime.engine import BatchTimings, Engine, EngineConfig, RowRequest, RowResult

__all__ = ["BatchTimings", "Engine", "EngineConfig", "RowRequest", "RowResult"]
