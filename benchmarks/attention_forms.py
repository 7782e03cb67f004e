"""The two attention forms of the exported graph, timed alone on one layer's shapes (ONNX Runtime, CPU).

``decode``: ``K @ qᵀ`` per (row, KV head) over the whole cache buffer, transposed to [queries, T]
(what a decode step runs); ``several``: the buffer sliced to the mask's width, ``q @ Kᵀ`` (what a
prompt or a chunk of one runs); ``gqa``: ``com.microsoft.GroupQueryAttention`` on the same cache
(batch 1 only on CPU once a past exists, and it copies the past into its present here). The export
picks decode/several per step with an ``If`` (``edgelora/export/branches.py``).

    python benchmarks/attention_forms.py --heads 14 --kv-heads 2 --head-dim 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

# (rows, new tokens per row, past positions, buffer capacity)
CASES = [(1, 256, 1422, 2048), (1, 256, 1024, 2048), (1, 256, 256, 512), (1, 256, 0, 256), (8, 32, 0, 256),
         (1, 1, 2047, 2048), (4, 1, 127, 256), (16, 1, 1000, 1024)]


def _eager(form: str, kv: int, d: int):
    """Scores, bias, softmax, values; inputs K/V [b,kv,T,d], q [b,kv,g*s,d], bias [b,1,g*s,W]."""
    nodes = []
    keys, values = "K", "V"
    if form == "several":
        nodes += [helper.make_node("Shape", ["bias"], ["width"], start=3, end=4),
                  helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])),
                  helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("a", TensorProto.INT64, [1], [2])),
                  helper.make_node("Slice", ["K", "zero", "width", "axis"], ["Kw"]),
                  helper.make_node("Slice", ["V", "zero", "width", "axis"], ["Vw"]),
                  helper.make_node("Transpose", ["Kw"], ["KwT"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["q", "KwT"], ["scores"])]
        keys, values = "Kw", "Vw"
    else:
        nodes += [helper.make_node("Transpose", ["q"], ["qT"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [keys, "qT"], ["scoresT"]),
                  helper.make_node("Transpose", ["scoresT"], ["scores"], perm=[0, 1, 3, 2])]
    nodes += [helper.make_node("Add", ["scores", "bias"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", values], ["out"])]
    graph = helper.make_graph(nodes, form, [
        helper.make_tensor_value_info("K", TensorProto.FLOAT, ["b", kv, "t", d]),
        helper.make_tensor_value_info("V", TensorProto.FLOAT, ["b", kv, "t", d]),
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", kv, "gs", d]),
        helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["b", 1, "gs", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gqa(heads: int, kv: int, d: int):
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"],
                            ["o", "ok", "ov"], domain="com.microsoft", num_heads=heads, kv_num_heads=kv)
    graph = helper.make_graph([node], "gqa", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", heads * d]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", "s", kv * d]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "s", kv * d]),
        helper.make_tensor_value_info("pk", TensorProto.FLOAT, ["b", kv, "t", d]),
        helper.make_tensor_value_info("pv", TensorProto.FLOAT, ["b", kv, "t", d]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("o", "ok", "ov")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _median_ms(run, repeats: int) -> float:
    run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--cases", default=None, help="rows:tokens:past:buffer,... (default: a decode/chunk set)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cases = [tuple(int(x) for x in case.split(":")) for case in args.cases.split(",")] if args.cases else CASES
    heads, kv, d = args.heads, args.kv_heads, args.head_dim
    group = heads // kv
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    sessions = {form: ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for form, model in (("decode", _eager("decode", kv, d)), ("several", _eager("several", kv, d)),
                                    ("gqa", _gqa(heads, kv, d)))}
    rng = np.random.default_rng(0)
    results = []
    print(f"ms per call, one layer: {heads} heads / {kv} KV heads, head dim {d}, {args.threads} threads")
    print("rows tokens   past buffer    decode   several       gqa")
    for rows, tokens, past, capacity in cases:
        cache = rng.standard_normal((rows, kv, capacity, d)).astype(np.float32)
        query = rng.standard_normal((rows, kv, group * tokens, d)).astype(np.float32)
        width = past + tokens
        figures = {}
        for form in ("decode", "several"):
            feeds = {"K": cache, "V": cache, "q": query,
                     "bias": np.zeros((rows, 1, group * tokens, capacity if form == "decode" else width), np.float32)}
            figures[form] = _median_ms(lambda form=form, feeds=feeds: sessions[form].run(None, feeds), args.repeats)
        figures["gqa"] = None
        if rows == 1 or past == 0 or tokens == 1:  # the CPU kernel refuses several tokens on a past at batch > 1
            feeds = {"q": rng.standard_normal((rows, tokens, heads * d)).astype(np.float32),
                     "k": rng.standard_normal((rows, tokens, kv * d)).astype(np.float32),
                     "v": rng.standard_normal((rows, tokens, kv * d)).astype(np.float32), "pk": cache, "pv": cache,
                     "seqlens_k": np.full(rows, width - 1, np.int32), "total": np.array(width, np.int32)}
            figures["gqa"] = _median_ms(lambda feeds=feeds: sessions["gqa"].run(None, feeds), args.repeats)
        results.append({"rows": rows, "tokens": tokens, "past": past, "buffer": capacity, "ms": figures})
        gqa = f"{figures['gqa']:9.2f}" if figures["gqa"] is not None else "        -"
        print(f"{rows:4d} {tokens:6d} {past:6d} {capacity:6d} {figures['decode']:9.2f} {figures['several']:9.2f} {gqa}")
    if args.json:
        args.json.write_text(json.dumps({"heads": heads, "kv_heads": kv, "head_dim": d, "threads": args.threads,
                                         "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
