"""How to pick tokens and when to stop: one type, one validation, for every entry point.

The Python API (``LLM.generate``), the server's request models (``SamplingFields.sampling_params``),
``infer``'s input rows, ``chat`` and ``bench`` all build a ``SamplingParams``; the scheduler runs
what it holds. Each entry point keeps its own documented defaults by building it with them
(``infer``: top_k 50; ``chat``: temperature 0.7, top_p 0.9; the server: the rest of the context);
the dataclass's own defaults are the Python API's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgelora.errors import UserInputError
from edgelora.runtime.grammar import GrammarSpec

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 or top_k 1 is greedy; top_k 0 and top_p 1 switch those filters off.

    ``max_tokens=None`` generates up to the rest of the context; ``stop`` strings end the text
    (they are not part of it); ``min_tokens`` and ``ignore_eos`` are vLLM's extensions.

    Logit adjustments, applied to the model's logits before temperature and the filters, in this
    order: ``logit_bias`` (OpenAI: token id -> added to its logit, -100..100; -100 bans it),
    ``repetition_penalty`` (vLLM / transformers: every token of the prompt and the output so far has
    its logit divided by it when positive, multiplied when negative; 1 = off), ``frequency_penalty``
    and ``presence_penalty`` (OpenAI, -2..2: subtract penalty x count, and penalty once, for each
    token already generated).
    """

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Log-probabilities: of each sampled token with its ``logprobs`` most likely alternatives (0: the token's
    # own only), and of every prompt token with ``prompt_logprobs`` alternatives (OpenAI's echo). None: not
    # computed. Values are the log-softmax of the model's float logits, before logit_bias, penalties,
    # temperature and the top-k / top-p filters. At most MAX_LOGPROBS alternatives.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Structured output (runtime/grammar.py): the answer must match this JSON schema / JSON object / regex /
    # choice; masked token by token. When max_tokens ends the answer first, it stops there ("length").
    grammar: GrammarSpec | None = None

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0 \
            or self.repetition_penalty != 1

    def problems(self) -> list[str]:
        """What is wrong with these values by themselves (lengths against the model are the scheduler's check)."""
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        problems = []
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            problems.append(f"max_tokens {self.max_tokens!r} (>= 1)")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            problems.append(f"temperature {self.temperature!r} (>= 0)")
        if not is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k {self.top_k!r} (>= 0)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            problems.append(f"top_p {self.top_p!r} (0 < top_p <= 1)")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            problems.append(f"seed {self.seed!r} (a non-negative integer)")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            problems.append(f"min_tokens {self.min_tokens!r} (>= 0)")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append("stop (a list of non-empty strings)")
        if not isinstance(self.logit_bias, dict) or not all(
                is_int(token) and token >= 0 and isinstance(bias, (int, float)) and not isinstance(bias, bool)
                and -100 <= bias <= 100 for token, bias in self.logit_bias.items()):
            problems.append("logit_bias (token id -> a bias in -100..100)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -2 <= value <= 2:
                problems.append(f"{name} {value!r} (-2..2)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                problems.append(f"{name} {value!r} (0..{MAX_LOGPROBS})")
        if not isinstance(self.repetition_penalty, (int, float)) or isinstance(self.repetition_penalty, bool) \
                or not 0 < self.repetition_penalty <= 10:
            problems.append(f"repetition_penalty {self.repetition_penalty!r} (0 < penalty <= 10; 1 = off)")
        return problems

    def validate(self, where: str = "sampling") -> None:
        problems = self.problems()
        if problems:
            raise UserInputError(f"{where}: invalid " + "; ".join(problems))
