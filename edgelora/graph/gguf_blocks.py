"""A GGUF's own quantized blocks as ``MatMulNBits`` weights, instead of quantizing its dequantized copy again.

``quantize --gguf-file`` uses this for an export made from a GGUF. Each projection (and the
lm_head: ``output.weight``, or ``token_embd.weight`` when tied) whose GGUF tensor is in a
32-element block type is re-packed, not re-quantized:

* ``Q8_0`` (x = d·q, q int8) -> 8-bit MatMulNBits, q + 128 with the default zero point 128: exact;
* ``Q4_0`` (x = d·(q − 8)) -> 4-bit MatMulNBits with the default zero point 8: exact;
* ``Q4_1`` (x = d·q + m) -> 4-bit with the zero point round(−m/d) (ONNX Runtime's fast kernels take
  integer zero points; a float zero point makes a projection about 40× slower here). The block's
  offset moves by at most d/2: not exact, and reported as such. A block whose −m/d falls outside
  0..15 (all its values of one sign) cannot keep its q; it is quantized afresh from its values.

Other tensor types (K-quants, F16, F32) are left to ONNX Runtime's quantizer. Every mapped tensor
is checked against the export's float weight (the same GGUF dequantized by transformers), rows
permuted as transformers un-permutes llama's q/k, so a layout mistake is an error, not a bad model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.errors import UserInputError
from edgelora.formats import contract
from edgelora.formats.model_spec import ModelSpec

BLOCK = 32
GGUF_MODULES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
                "down": "ffn_down"}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass
class MappedWeight:
    """MatMulNBits inputs for one projection, rows in the export's output order."""

    bits: int
    packed: np.ndarray  # uint8 [N, blocks, BLOCK * bits / 8]
    scales: np.ndarray  # float32 [N * blocks]
    zero_points: np.ndarray | None  # uint8 packed 4-bit [N * ceil(blocks / 2)], None = the default
    max_abs_error: float  # against the export's float weight
    gguf_type: str


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 4-bit block bytes [..., 16] -> values [..., 32] (element j low nibble of byte j, j+16 its high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack4(values: np.ndarray) -> np.ndarray:
    """Values [..., 2n] in 0..15 -> MatMulNBits bytes [..., n] (element 2i low nibble, 2i+1 high)."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _decode(raw: np.ndarray, kind: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """[N, blocks*bytes] GGUF rows -> (bits, q values [N, blocks, 32] uint8, scales [N, blocks], zero points)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_BYTES[kind])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
        return 8, q.astype(np.uint8), d, None
    if kind == "Q4_0":
        return 4, _nibbles(blocks[..., 2:]), d, None
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    q = _nibbles(blocks[..., 4:])
    values = q.astype(np.float32) * d[..., None] + m[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ideal = np.where(d != 0, -m / d, np.nan)
    keep = (ideal >= -0.5) & (ideal <= 15.5)  # the GGUF's q and d, the zero point rounded (error <= d/2)
    zero = np.where(keep, np.clip(np.rint(np.nan_to_num(ideal)), 0, 15), 0).astype(np.uint8)
    # Other blocks (0 outside their range, or d = 0) are quantized afresh from their GGUF values over a
    # range that holds 0, as ONNX Runtime's asymmetric quantizer would.
    low, high = np.minimum(values.min(-1), 0), np.maximum(values.max(-1), 0)
    scale = (high - low) / 15
    safe = np.where(scale > 0, scale, 1)
    fresh_zero = np.clip(np.rint(-low / safe), 0, 15)
    fresh_q = np.clip(np.rint(values / safe[..., None]) + fresh_zero[..., None], 0, 15).astype(np.uint8)
    q = np.where(keep[..., None], q, fresh_q).astype(np.uint8)
    d = np.where(keep, d, scale).astype(np.float32)
    zero = np.where(keep, zero, fresh_zero).astype(np.uint8)
    return 4, q, d, zero


def _dequantize(bits: int, q: np.ndarray, scales: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    default = 1 << (bits - 1)
    zp = zero.astype(np.float32) if zero is not None else np.float32(default)
    values = (q.astype(np.float32) - (zp[..., None] if zero is not None else zp)) * scales[..., None]
    return values.reshape(q.shape[0], -1)


def _llama_rows(rows: int, heads: int) -> np.ndarray:
    """The row order transformers gives llama's q/k after undoing llama.cpp's rope permutation."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def map_tensor(raw: np.ndarray, kind: str, weight: np.ndarray, heads: int | None) -> MappedWeight:
    """One GGUF tensor [N, K] onto the export's float weight [K, N]; rows permuted when llama's q/k need it."""
    bits, q, scales, zero = _decode(raw, kind)
    target = weight.T
    exact = _dequantize(bits, q, scales, None if kind == "Q4_1" else zero)
    if kind == "Q4_1":  # the GGUF's own values, to find the row order
        blocks = raw.reshape(raw.shape[0], -1, BLOCK_BYTES[kind])
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        exact = (_nibbles(blocks[..., 4:]).astype(np.float32) * d[..., None] + m[..., None]).reshape(raw.shape[0], -1)
    candidates = [np.arange(target.shape[0])] + ([_llama_rows(target.shape[0], heads)] if heads else [])
    tolerance = 1e-5 * max(float(np.abs(target).max()), 1e-6)
    order = next((rows for rows in candidates if np.abs(exact[rows] - target).max() <= tolerance), None)
    if order is None:
        raise UserInputError(f"a {kind} GGUF tensor does not match the export's weight {list(weight.shape)}: "
                             "is --gguf-file the file this export was made from?")
    q, scales = q[order], scales[order]
    zero = zero[order] if zero is not None else None
    error = float(np.abs(_dequantize(bits, q, scales, zero) - target).max())
    packed = _pack4(q) if bits == 4 else q
    zero_packed = None
    if zero is not None:
        if zero.shape[1] % 2:
            zero = np.pad(zero, ((0, 0), (0, 1)))
        zero_packed = _pack4(zero).reshape(-1)
    return MappedWeight(bits, packed, scales.reshape(-1).astype(np.float32), zero_packed, error, kind)


def gguf_tensors(path: Path, spec: ModelSpec) -> dict[str, tuple[str, np.ndarray]]:
    """Projection node name (contract) or "lm_head" -> (GGUF type name, raw block bytes [N, ...])."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"--gguf-file {path}: not a readable GGUF file ({exc})") from exc
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    found: dict[str, tuple[str, np.ndarray]] = {}
    for layer in range(spec.num_layers):
        for module, gguf_name in GGUF_MODULES.items():
            tensor = tensors.get(f"blk.{layer}.{gguf_name}.weight")
            if tensor is not None and tensor.tensor_type.name in BLOCK_BYTES:
                found[contract.projection_node_name(layer, module)] = (tensor.tensor_type.name, np.asarray(tensor.data))
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if head is not None and head.tensor_type.name in BLOCK_BYTES:
        found["lm_head"] = (head.tensor_type.name, np.asarray(head.data))
    if not found:
        raise UserInputError(f"--gguf-file {path}: no projection in Q4_0, Q4_1 or Q8_0 blocks; quantize without it")
    return found


def heads_for(node_name: str, spec: ModelSpec) -> int | None:
    """Head count for the rope-permuted row order a q/k tensor may have (llama.cpp permutes llama's)."""
    for layer in range(spec.num_layers):
        if node_name == contract.projection_node_name(layer, "q"):
            return spec.num_heads
        if node_name == contract.projection_node_name(layer, "k"):
            return spec.num_kv_heads
    return None
