"""Nodes a decode step runs: ``lora_model.onnx`` after ONNX Runtime's own optimizer, per layer and in all.

    python benchmarks/graph_nodes.py OUT/lora_model.onnx [QOUT/lora_model.onnx ...]

Every node costs a kernel dispatch whatever its size, so at batch 1 on a quantized base the
count matters as much as the bytes of weights. The optimized graph is what the session runs
(``ORT_ENABLE_ALL``, the engine's setting); a node belongs to layer N when its name holds
``layers.N/`` (export, LoRA branches and fused projections all name theirs that way).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def optimized_nodes(path: Path) -> list[onnx.NodeProto]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(out)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return list(onnx.load(str(out), load_external_data=False).graph.node)


def count(path: Path) -> dict:
    nodes = optimized_nodes(path)
    per_layer: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in nodes:
        match = re.search(r"layers\.(\d+)/", node.name)
        if match:
            per_layer[int(match.group(1))][node.op_type] += 1
    middle = per_layer[sorted(per_layer)[len(per_layer) // 2]] if per_layer else collections.Counter()
    return {"total": len(nodes), "layers": len(per_layer), "per_layer": sum(middle.values()),
            "per_layer_ops": dict(middle.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for path in args.graphs:
        figures = count(path)
        ops = ", ".join(f"{op} {n}" for op, n in figures["per_layer_ops"].items())
        print(f"{path}: {figures['total']} nodes, {figures['per_layer']} a layer ({ops})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
