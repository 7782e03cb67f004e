"""Write a copy of an insert-lora folder whose lora_model.onnx has no LoRA branches: the baseline for
"base-only batches cost what a graph without LoRA costs".

Every node under ``/lora/`` except the logits-positions gather is removed and each projection's
output is its base product again; the LoRA graph inputs stay (unused), so the runtime binds and
runs the copy exactly as it runs the original. Weight files are hard-linked, not copied.

    python benchmarks/strip_lora_branches.py --onnx-dir bench_out/int4 --output-dir bench_out/int4_nolora
    edgelora bench --onnx-dir bench_out/int4_nolora --adapters bench_out/onnx/lora_weights/d1 --rows=- ...
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from edgelora.formats import contract


def strip(source: Path, target: Path) -> int:
    """Link source's files into target and write the stripped graph; returns the nodes removed."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name != contract.LORA_MODEL_ONNX:
            destination = target / item.name
            destination.unlink(missing_ok=True)
            os.link(item, destination)
    model = onnx.load(str(source / contract.LORA_MODEL_ONNX), load_external_data=False)
    initializers = list(model.graph.initializer)
    del model.graph.initializer[:]
    graph = gs.import_onnx(model)
    removed = 0
    for node in graph.nodes:
        if node.name.startswith("/lora/layers.") and node.name.endswith("/Add"):
            base, out = node.inputs[0], node.outputs[0]
            for consumer in list(out.outputs):
                consumer.inputs[consumer.inputs.index(out)] = base
            for graph_output_index, graph_output in enumerate(graph.outputs):
                if graph_output is out:
                    graph.outputs[graph_output_index] = base
            node.outputs.clear()
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    removed = before - len(graph.nodes)
    stripped = gs.export_onnx(graph)
    stripped.graph.initializer.extend(initializers)
    stripped.ir_version = model.ir_version
    del stripped.opset_import[:]
    stripped.opset_import.extend(model.opset_import)
    del stripped.metadata_props[:]
    stripped.metadata_props.extend(model.metadata_props)
    onnx.save_model(stripped, str(target / contract.LORA_MODEL_ONNX))
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx-dir", type=Path, required=True, help="an insert-lora folder")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.output_dir.resolve() == args.onnx_dir.resolve():
        raise SystemExit("--output-dir must differ from --onnx-dir")
    print(f"removed {strip(args.onnx_dir, args.output_dir)} LoRA nodes -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
