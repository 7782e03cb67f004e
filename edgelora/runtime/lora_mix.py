"""A request that mixes adapters with weights: ``{"a": 0.7, "b": -0.3}``.

The row's update is the sum of each member's own update times its weight, Σᵢ wᵢ·sᵢ·BᵢAᵢ, each
adapter at its own scaling (llama.cpp's per-request ``lora`` scales, LoRAX's linear merge). One
type checks a mix wherever it comes from (the OpenAI body, infer's input rows, the Python API).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from edgelora.errors import UserInputError

LoraMix = tuple[tuple[str, float], ...]  # (adapter name, weight) pairs, in the order given
MIX_LABEL = "mix"  # what metrics call a mixed request


def check_mix(value, where: str, max_loras: int) -> LoraMix:
    """A mix given as a mapping or as (name, weight) pairs; refuse what cannot be served, naming it."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise UserInputError(f"{where}: lora_mix must map adapter names to weights")
    if not pairs:
        raise UserInputError(f"{where}: lora_mix is empty; name at least one adapter")
    seen: set[str] = set()
    mix = []
    for name, weight in pairs:
        if not isinstance(name, str) or not name:
            raise UserInputError(f"{where}: lora_mix names must be adapter names, got {name!r}")
        if name in seen:
            raise UserInputError(f"{where}: lora_mix names {name!r} twice")
        seen.add(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserInputError(f"{where}: lora_mix weight of {name!r} must be a finite number, got {weight!r}")
        mix.append((name, float(weight)))
    if len(mix) > max_loras:
        raise UserInputError(f"{where}: lora_mix has {len(mix)} adapters but at most {max_loras} run in one step "
                             f"(max_loras)")
    return tuple(mix)


def duplicate_mix_names(pairs: list[tuple[str, object]]) -> dict:
    """``json`` object hook: keep the pairs of any object (a ``lora_mix`` may not name an adapter twice).

    ``json.loads(text, object_pairs_hook=duplicate_mix_names)`` returns dicts whose repeated keys
    are kept as a ``RepeatedKeys`` list, so ``check_mix`` can refuse them instead of keeping the last.
    """
    names = [name for name, _ in pairs]
    return RepeatedKeys(pairs) if len(set(names)) != len(names) else dict(pairs)


class RepeatedKeys(list):
    """A JSON object that repeats a key, as its (key, value) pairs."""
