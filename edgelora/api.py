"""Moved to ``edgelora.entrypoints.api``; re-exported here so ``from edgelora.api import LLM`` keeps working."""

from edgelora.entrypoints.api import (  # noqa: F401
    LLM,
    CompletionOutput,
    GenerationStats,
    LoraConfig,
    LoRARequest,
    RequestOutput,
    SamplingParams,
)
