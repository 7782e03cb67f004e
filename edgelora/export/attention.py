"""GroupQueryAttention in the exported graph: an in-place KV cache instead of a concatenation.

Transformers computes q/k/v, rotary embeddings and norms with its own code; we only replace the
attention core with ONNX Runtime's ``com.microsoft.GroupQueryAttention``, whose past and present
cache buffers may be the same memory, so a decode step writes one new position per row instead
of copying the whole cache::

    q [b,s,h*d]  k [b,s,kv*d]  v [b,s,kv*d]  past_k/v [b,kv,max,d]  seqlens_k [b]  total_len []
        \\___________________________________|___________________________/
                                GroupQueryAttention
                                /       |        \\
                     out [b,s,h*d]  present_k  present_v   (same shape as past; may alias it)

The torch side is a traced stand-in (an autograd Function with an ONNX ``symbolic``); it is
never used to compute numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ATTENTION_IMPLEMENTATION = "edgelora_gqa"


class _GroupQueryAttention(torch.autograd.Function):
    """Placeholder whose only job is to emit the ONNX node while tracing."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_len, num_heads, kv_heads, scale, window):  # noqa: ARG004
        return torch.zeros_like(query), past_key.clone(), past_value.clone()

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_len, num_heads, kv_heads, scale, window):
        return g.op(
            "com.microsoft::GroupQueryAttention",
            query, key, value, past_key, past_value, seqlens_k, total_len,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, local_window_size_i=window,
            outputs=3,
        )


@dataclass
class KVState:
    """Per-call cache tensors handed to every attention layer through transformers' kwargs."""

    past: list[torch.Tensor]  # flat: layer 0 key, layer 0 value, layer 1 key, ...
    seqlens_k: torch.Tensor  # int32 [batch]: each row's total length - 1
    total_len: torch.Tensor  # int32 scalar: the longest row's total length
    present: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                  edgelora_kv: KVState | None = None, **kwargs):  # noqa: ARG001
    """Transformers attention interface: query [b,h,s,d], key/value [b,kv,s,d] with rope applied."""
    layer = module.layer_idx
    num_heads, kv_heads = int(query.shape[1]), int(key.shape[1])
    # Checked against transformers' Mistral: GQA's local_window_size equals HF's sliding_window.
    window = int(sliding_window) if sliding_window else -1
    out, present_key, present_value = _GroupQueryAttention.apply(
        query.transpose(1, 2).flatten(2),
        key.transpose(1, 2).flatten(2),
        value.transpose(1, 2).flatten(2),
        edgelora_kv.past[2 * layer],
        edgelora_kv.past[2 * layer + 1],
        edgelora_kv.seqlens_k,
        edgelora_kv.total_len,
        num_heads, kv_heads, float(scaling), int(window),
    )
    edgelora_kv.present[layer] = (present_key, present_value)
    return out.unflatten(2, (num_heads, -1)), None


def register() -> None:
    """Make the attention function known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, gqa_attention)
