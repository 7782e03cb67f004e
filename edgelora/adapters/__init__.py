"""PEFT adapters: read, process for the runtime, merge into the base model."""

from edgelora.adapters.peft import PeftAdapter, PeftAdapterConfig, read_peft_adapter
from edgelora.adapters.process import ProcessedAdapterConfig, process_adapter

__all__ = ["PeftAdapter", "PeftAdapterConfig", "ProcessedAdapterConfig", "process_adapter", "read_peft_adapter"]
