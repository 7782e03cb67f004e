"""Attention in the exported graph: an in-place KV cache and one GEMM per KV head group.

Transformers computes q/k/v, rotary embeddings and norms with its own code; we replace only the
attention core. Each layer's cache is a buffer ``[batch, kv_heads, capacity, head_dim]`` with room
for every position the run writes:

* the new keys/values go into the buffer with ``ScatterElements`` at each row's own positions
  (``position_ids``). When the caller binds ``past`` and ``present`` to the same memory, ONNX
  Runtime's kernel sees input == output and writes only the new positions: no step copies the
  cache, and rows of different lengths share a batch;
* the query heads that share a KV head are folded into one matrix, so a decode step runs one
  ``K [capacity, d] x q^T [d, group]`` GEMM per (row, KV head) instead of one per query head.
  ONNX Runtime's CPU GroupQueryAttention runs one GEMM per query head and re-reads the whole
  history for each (2x slower at a 2k context with 7 query heads per KV head).

::

    q [b,h,s,d] -> [b,kv,g*s,d]          K' = scatter(past_k, pos, k)   V' = scatter(past_v, pos, v)
    scores^T = K' @ q^T  [b,kv,T,g*s] -> transpose -> + bias [b,1,g*s,T] -> softmax -> @ V'

``bias`` is 0 where key position t is real (``attention_mask``), not after the query's position,
and inside the sliding window if the layer has one; the most negative float elsewhere.

That form suits decode: a few queries, a buffer read once. A step of several tokens per row (a
prompt, or a chunk of one) has thousands of query rows; there the form above pays for scoring the
whole buffer and for transposing a [T, g*s] score matrix. Such steps instead slice the buffer to
the mask's width W (a copy of W positions, small beside the scores) and score ``q @ K^T``
directly: about half the time for a 256-token chunk at a 1.4k context (``benchmarks/results``).
The trace computes both forms and picks with ``Where(several_tokens, ...)``; ``branches.py`` turns
every such ``Where`` into an ``If``, so a step runs only its own form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ATTENTION_IMPLEMENTATION = "edgelora_kv"


@dataclass
class KVState:
    """Per-call cache tensors handed to every attention layer through transformers' kwargs."""

    past: list[torch.Tensor]  # flat: layer 0 key, layer 0 value, layer 1 key, ... [b, kv, T, d]
    attention_mask: torch.Tensor  # int64 [b, width]: 1 for real key positions 0..width-1
    position_ids: torch.Tensor  # int64 [b, s]: where this call's tokens sit (and are written)
    present: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _bias: dict[tuple | str, torch.Tensor] = field(default_factory=dict)

    @property
    def several_tokens(self) -> torch.Tensor:
        """0-d bool: this call feeds more than one token per row (a prompt or a chunk, not decode)."""
        if "several" not in self._bias:
            self._bias["several"] = torch._shape_as_tensor(self.position_ids)[1] > 1
        return self._bias["several"]

    def bias(self, group: int, window: int | None, dtype: torch.dtype, full: bool = True) -> torch.Tensor:
        """Additive mask [b, 1, group*s, T] (``full``: T = buffer capacity, else the mask's width),
        built once per (group, window, width) and shared by layers."""
        key = (group, window, dtype, full)
        if key not in self._bias:
            width = self.attention_mask.shape[1]
            capacity = self.past[0].shape[2] if full else width
            keys = torch.arange(capacity, dtype=torch.int64)
            real = torch.nn.functional.pad(self.attention_mask, (0, capacity - width)) > 0 if full else self.attention_mask > 0
            positions = self.position_ids.unsqueeze(-1)  # [b, s, 1]
            allowed = real.unsqueeze(1) & (keys <= positions)  # [b, s, T]
            if window:
                allowed = allowed & (positions - keys < window)
            bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            batch, seq = self.position_ids.shape
            bias = bias.unsqueeze(1).expand(batch, group, seq, capacity).reshape(batch, 1, group * seq, capacity)
            self._bias[key] = bias
        return self._bias[key]


def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                 edgelora_kv: KVState | None = None, **kwargs):
    """Transformers attention interface: query [b,h,s,d], key/value [b,kv,s,d] with rope applied."""
    layer = module.layer_idx
    num_heads, kv_heads, head_dim = int(query.shape[1]), int(key.shape[1]), int(query.shape[3])
    group = num_heads // kv_heads
    state = edgelora_kv
    index = state.position_ids[:, None, :, None].expand(-1, kv_heads, -1, head_dim)
    keys = state.past[2 * layer].scatter(2, index, key)
    values = state.past[2 * layer + 1].scatter(2, index, value)
    state.present[layer] = (keys, values)

    batch = query.shape[0]
    scaling = scaling if scaling is not None else head_dim**-0.5
    folded = (query * scaling).reshape(batch, kv_heads, -1, head_dim)  # [b, kv, g*s, d]: head = kv*g + j
    window = int(sliding_window) if sliding_window else None
    softmax_dtype = torch.float32 if query.dtype != torch.float32 else query.dtype

    def core(scores: torch.Tensor, bias: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.to(softmax_dtype) + bias, dim=-1).to(values.dtype)
        return torch.matmul(probs, values)  # [b, kv, g*s, d]

    # Decode: K [T, d] @ q^T per (row, KV head) over the whole buffer.
    one = core(torch.matmul(keys, folded.transpose(2, 3)).transpose(2, 3), state.bias(group, window, softmax_dtype),
               values)
    # Several tokens: the buffer sliced to the mask's width, q @ K^T.
    width = state.attention_mask.shape[1]
    keys_w, values_w = keys[:, :, :width], values[:, :, :width]
    several = core(torch.matmul(folded, keys_w.transpose(2, 3)), state.bias(group, window, softmax_dtype, full=False),
                   values_w)
    out = torch.where(state.several_tokens, several, one)
    return out.reshape(batch, num_heads, -1, head_dim).transpose(1, 2), None  # [b, s, h, d]


def register() -> None:
    """Make the attention function known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, kv_attention)
