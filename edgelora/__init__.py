"""edgelora: one exported base graph, many LoRA adapters, mixed in one batch, on ONNX Runtime.

The Python API (``LLM``, ``LoraConfig``, ``LoRARequest``, ``SamplingParams``) loads lazily and
never imports torch.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "LoraConfig", "SamplingParams"]


def __getattr__(name: str):
    if name in __all__:
        from edgelora.entrypoints import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgelora' has no attribute {name!r}")
