"""The runtime: ORT session over lora_model.onnx, native adapter slots and sampler, KV cache, step scheduler."""

from edgelora.runtime.engine import Engine, EngineConfig
from edgelora.runtime.scheduler import GenerationRequest, Scheduler, SchedulerConfig, SequenceUpdate

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "Scheduler", "SchedulerConfig", "SequenceUpdate"]
