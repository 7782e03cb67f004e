"""The runtime: ORT session over lora_model.onnx, native adapter slots and sampler, KV cache, step scheduler.

Names load lazily, so ``edgelora.runtime.config`` (the settings, for the CLI's flags) costs no
numpy and no ONNX Runtime.
"""

from importlib import import_module

_HOMES = {"Engine": "engine", "EngineConfig": "config", "GenerationRequest": "scheduler", "Scheduler": "scheduler",
          "SchedulerConfig": "config", "SequenceUpdate": "scheduler"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"edgelora.runtime.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'edgelora.runtime' has no attribute {name!r}")
