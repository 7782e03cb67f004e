"""Rotary embeddings as ONNX Runtime's ``com.microsoft.RotaryEmbedding``: two nodes a layer instead of a dozen.

transformers applies rope with ``q * cos + rotate_half(q) * sin``; traced, that is two Slices,
a Neg, a Concat, two Muls and an Add for each of q and k in every layer, each paying a kernel
dispatch on every decode step. While tracing, the modeling module's ``apply_rotary_pos_emb`` is
replaced by a function that computes the same numbers in torch and exports as one contrib node.

The node reads cos/sin from a cache indexed by position ids. transformers has already computed
``cos``/``sin`` [b, s, d] for this call (any rope scaling included) and their two halves are equal,
so the cache is their first half flattened to [b*s, d/2] and the "positions" are 0..b*s-1:
the same values, nothing recomputed from the config. Layers share these few nodes (ONNX
Runtime's common-subexpression pass merges the copies).
"""

from __future__ import annotations

import contextlib
import sys

import torch


class _RotaryEmbedding(torch.autograd.Function):
    """x [b, h, s, d] rotated by cache rows ``positions`` [b, s] of ``cos``/``sin`` caches [n, d/2]."""

    @staticmethod
    def forward(ctx, x, positions, cos_cache, sin_cache):
        cos = cos_cache[positions]  # [b, s, d/2]
        sin = sin_cache[positions]
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    @staticmethod
    def symbolic(g, x, positions, cos_cache, sin_cache):
        out = g.op("com.microsoft::RotaryEmbedding", x, positions, cos_cache, sin_cache, interleaved_i=0)
        out.setType(x.type())
        return out


def understood(q, cos, unsqueeze_dim) -> bool:
    """Full-width rope on [b, h, s, d] heads with cos/sin [b, s, d]: what the contrib op computes."""
    return unsqueeze_dim == 1 and q.dim() == 4 and cos.dim() == 3 and cos.shape[-1] == q.shape[-1]


def apply_rotary_pos_emb(q, k, cos, sin):
    """transformers' rope (cos/sin already computed for this call), exported as RotaryEmbedding."""
    batch, seq, dim = cos.shape
    half = dim // 2
    cos_cache = cos[..., :half].reshape(-1, half)
    sin_cache = sin[..., :half].reshape(-1, half)
    # Row r*seq + t of the cache holds (row r, position t): built by broadcasting, not a reshape of
    # two symbolic sizes, so every other shape in the layer still folds to a constant.
    positions = (torch.arange(batch, dtype=torch.int64).unsqueeze(1) * seq
                 + torch.arange(seq, dtype=torch.int64).unsqueeze(0))
    return (_RotaryEmbedding.apply(q, positions, cos_cache, sin_cache),
            _RotaryEmbedding.apply(k, positions, cos_cache, sin_cache))


@contextlib.contextmanager
def fused_rotary(model: torch.nn.Module):
    """Swap the attention module's ``apply_rotary_pos_emb`` for the contrib-op version while tracing."""
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:  # a family without the standard function: leave rope as traced
        yield False
        return
    def patched(q, k, cos, sin, *args, **kwargs):
        if args or set(kwargs) - {"unsqueeze_dim"} or not understood(q, cos, kwargs.get("unsqueeze_dim", 1)):
            return original(q, k, cos, sin, *args, **kwargs)  # e.g. partial rotary: as transformers does it
        return apply_rotary_pos_emb(q, k, cos, sin)

    module.apply_rotary_pos_emb = patched
    try:
        yield True
    finally:
        module.apply_rotary_pos_emb = original
