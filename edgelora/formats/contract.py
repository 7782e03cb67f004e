"""The written contract between stages: file names, graph input/output names, LoRA naming.

Every stage (export, insert-lora, process-lora, the runtime) imports its names from here, so a
naming rule exists exactly once.

LoRA inputs of ``lora_model.onnx`` (one pair per targeted projection and layer)::

    lora.layers.{L}.{m}.A   [n_stack, rank, in_features]     float (model dtype), A transposed
    lora.layers.{L}.{m}.B   [n_stack, rank, out_features]    float, scaling folded in
    lora_tokens             [n_stack, entry_tokens, 2]       int64 (row, position) pairs
    lora_weights            [n_stack, entry_tokens, 1]       float (model dtype)
    lora_back               [batch, seq, members, 2]         int64 (entry, item) pairs

``n_stack`` adapters are bound at once, each padded to ``rank`` (the same for every LoRA input of
one run). Stack entry ``e`` computes ``(w · x) @ A_e^T @ B_e`` for the tokens ``lora_tokens[e]``
lists only, each scaled by its weight in ``lora_weights[e]`` (a mix's weight, else 1; padding
items carry weight 0, so their results are exactly zero). Token (b, s) then adds the results at
``lora_back[b, s, k]`` for k < members: where its own entries put it, or a zero padding item for
a token with fewer members (a base token, or a row with fewer adapters than the widest mix).
Untargeted modules are zero. A processed adapter file stores the same names for one adapter,
untransposed: ``A`` is ``[in, r]`` and ``B`` is ``[r, out]``.

``lora_model.onnx`` also takes ``logits_positions`` (int64 [batch, kept]) and returns logits
[batch, kept, vocab] at those sequence positions only; ``model.onnx`` keeps logits at every position.
"""

from __future__ import annotations

from dataclasses import dataclass

# Files between stages.
MODEL_ONNX = "model.onnx"
MODEL_ONNX_DATA = "model.onnx.data"
LORA_MODEL_ONNX = "lora_model.onnx"
MODEL_CONFIG = "config.json"
LORA_MANIFEST = "lora_manifest.json"
PROCESSED_ADAPTER = "processed_adapter_model.safetensors"
PROCESSED_CONFIG = "config.json"

# PEFT folder files we read.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"

# Largest LoRA rank the toolchain accepts.
MAX_LORA_RANK = 64


@dataclass(frozen=True)
class ProjectionModule:
    """One LoRA-targetable projection of a decoder layer."""

    short: str  # our name: q, k, v, o, gate, up, down
    hf_name: str  # attribute name in HF / PEFT: q_proj, ...
    block: str  # parent module in HF: self_attn or mlp


MODULES: tuple[ProjectionModule, ...] = (
    ProjectionModule("q", "q_proj", "self_attn"),
    ProjectionModule("k", "k_proj", "self_attn"),
    ProjectionModule("v", "v_proj", "self_attn"),
    ProjectionModule("o", "o_proj", "self_attn"),
    ProjectionModule("gate", "gate_proj", "mlp"),
    ProjectionModule("up", "up_proj", "mlp"),
    ProjectionModule("down", "down_proj", "mlp"),
)
MODULE_NAMES: tuple[str, ...] = tuple(m.short for m in MODULES)
MODULES_BY_SHORT = {m.short: m for m in MODULES}
MODULES_BY_HF_NAME = {m.hf_name: m for m in MODULES}

# Graph interface of model.onnx / lora_model.onnx.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
LORA_TOKENS = "lora_tokens"  # int64 [n_stack, entry_tokens, 2]: the (row, position) pairs each entry computes
LORA_WEIGHTS = "lora_weights"  # float [n_stack, entry_tokens, 1]: each pair's weight (0 pads)
LORA_BACK = "lora_back"  # int64 [batch, seq, members, 2]: where each token's results are (entry, item)
LORA_MEMBERS = "lora_members"  # symbolic dim: the most adapters one row of the step uses
LORA_STACK = "lora_stack"  # symbolic dims of the stacked inputs: entries,
LORA_RANK_DIM = "lora_rank"  # the rank every entry is padded to,
LORA_ENTRY_TOKENS = "lora_entry_tokens"  # and the tokens of the longest entry
# int64 [batch, kept]: the sequence positions whose logits lora_model.onnx computes (each row's
# last token when sampling); logits are then [batch, kept, vocab]. model.onnx keeps every position.
LOGITS_POSITIONS = "logits_positions"

# Files a later stage derives from an export; export removes them so none outlives its source.
DERIVED_FROM_EXPORT = (LORA_MODEL_ONNX, LORA_MANIFEST)


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def projection_node_name(layer: int, module: str) -> str:
    """Name of the base MatMul of a projection in model.onnx (the node LoRA attaches to)."""
    info = MODULES_BY_SHORT[module]
    return f"/model/layers.{layer}/{info.block}/{info.hf_name}/MatMul"


# ONNX Runtime's weight-only quantizer renames each MatMul it replaces with MatMulNBits: NAME_Q4 / NAME_Q8.
QUANTIZED_SUFFIXES = ("_Q4", "_Q8")


def projection_node_names(layer: int, module: str) -> tuple[str, ...]:
    """The projection's node in a float export, then its names in a quantized one (edgelora quantize)."""
    base = projection_node_name(layer, module)
    return (base, *(base + suffix for suffix in QUANTIZED_SUFFIXES))


def lora_a_name(layer: int, module: str) -> str:
    """Graph input (stacked) and processed-adapter tensor (single) holding LoRA A."""
    return f"lora.layers.{layer}.{module}.A"


def lora_b_name(layer: int, module: str) -> str:
    """Graph input (stacked) and processed-adapter tensor (single) holding LoRA B (scaled)."""
    return f"lora.layers.{layer}.{module}.B"


def lora_a_shape(n_stack: int, in_features: int, rank: int) -> tuple[int, int, int]:
    """Stacked LoRA A graph input: entry e's A transposed, [rank, in] each.

    Transposed so that a slot's rows are contiguous: the runtime binds the slots a batch uses as one
    block of its pool.
    """
    return (n_stack, rank, in_features)


def lora_b_shape(n_stack: int, rank: int, out_features: int) -> tuple[int, int, int]:
    """Stacked LoRA B graph input (scaling folded in): entry e's B, [rank, out] each."""
    return (n_stack, rank, out_features)


def normalize_module_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Accept our short names or HF names (q or q_proj); return short names in canonical order."""
    wanted = set()
    for name in names:
        if name in MODULES_BY_SHORT:
            wanted.add(name)
        elif name in MODULES_BY_HF_NAME:
            wanted.add(MODULES_BY_HF_NAME[name].short)
        else:
            raise ValueError(name)
    return tuple(m for m in MODULE_NAMES if m in wanted)
