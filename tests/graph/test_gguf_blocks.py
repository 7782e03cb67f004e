"""quantize --gguf-file: a GGUF's own blocks re-packed as MatMulNBits (exact for Q8_0 / Q4_0), checked in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from onnx import TensorProto, helper, numpy_helper

from edgelora.errors import UserInputError
from edgelora.graph.gguf_blocks import _llama_rows, map_tensor

K, N = 96, 16  # three blocks of 32 per row: an odd count exercises the zero-point padding


def _gguf(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw GGUF rows [N, ...] and the float weight [K, N] transformers would dequantize them to."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((N, K)).astype(np.float32)
    weight[0, :32] = np.abs(weight[0, :32]) + 0.5  # a block of one sign: -m/d outside 0..15 for Q4_1
    raw = quantize(weight, GGMLQuantizationType[kind])
    return raw, dequantize(raw, GGMLQuantizationType[kind]).T.astype(np.float32)


def _matmul_nbits(mapped, x: np.ndarray) -> np.ndarray:
    inits = [numpy_helper.from_array(mapped.packed, "B"), numpy_helper.from_array(mapped.scales, "S")]
    if mapped.zero_points is not None:
        inits.append(numpy_helper.from_array(mapped.zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ["x", *[i.name for i in inits]], ["y"], domain="com.microsoft", K=K, N=N,
                            bits=mapped.bits, block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_run_in_matmulnbits_as_the_gguf_values(kind):
    raw, weight = _gguf(kind)
    mapped = map_tensor(raw, kind, weight, None)
    assert mapped.bits == (8 if kind == "Q8_0" else 4)
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    got = _matmul_nbits(mapped, x)
    if kind == "Q4_1":  # integer zero points: each block's offset moves by at most half a step
        step = np.abs(np.diff(np.sort(weight, axis=0), axis=0)).max()
        assert 0 < mapped.max_abs_error <= step
        assert np.abs(got - x @ weight).max() <= np.abs(x).sum(1).max() * mapped.max_abs_error + 1e-4
    else:  # exact re-packing: only float summation order differs
        assert mapped.max_abs_error == 0
        np.testing.assert_allclose(got, x @ weight, rtol=1e-5, atol=1e-4)


def test_llama_rope_row_order_is_recovered_and_a_foreign_tensor_refused():
    raw, weight = _gguf("Q8_0")
    heads = 4
    order = _llama_rows(N, heads)  # transformers' rows = GGUF rows[order]
    gguf_rows = raw[np.argsort(order)]  # what llama.cpp's converter writes for q/k
    mapped = map_tensor(gguf_rows, "Q8_0", weight, heads)
    assert mapped.max_abs_error == 0
    with pytest.raises(UserInputError, match="does not match"):
        map_tensor(gguf_rows, "Q8_0", weight, None)  # not q/k: no permutation is tried
    with pytest.raises(UserInputError, match="does not match"):
        map_tensor(raw, "Q8_0", _gguf("Q8_0", seed=5)[1], None)
