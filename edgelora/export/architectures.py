"""Supported decoder families, as data: what differs between them is a row here, not a branch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How a transformers model family maps onto our graph."""

    model_type: str  # config.json "model_type"
    display_name: str


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("qwen2", "Qwen2 / Qwen2.5"),
        Family("llama", "Llama (2, 3.x)"),
        Family("mistral", "Mistral"),
        Family("qwen3", "Qwen3"),
    )
}


def supported_list() -> str:
    return ", ".join(f"{f.display_name} ({f.model_type})" for f in FAMILIES.values())
