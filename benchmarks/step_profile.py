"""Where a step's time goes: ONNX Runtime's profiler over decode steps or a chunked prefill, by operator.

Decode: rows on a cache of ``--context`` random positions (``-`` a base row, a name an adapter);
prefill: one prompt of ``--prompt-len`` tokens in chunks of ``--chunk``. Kernel time is summed per
operator type and per group (attention, LoRA, projections, the rest); nodes inside an ``If`` count
under their own type, not under ``If``.

    python benchmarks/step_profile.py --onnx-dir bench_out/int4 --rows=- --context 64 --steps 50
    python benchmarks/step_profile.py --onnx-dir bench_out/int4 --prefill --prompt-len 1678 --chunk 256
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.runtime.config import EngineConfig
from edgelora.runtime.engine import Engine, StepPlan


def _group(name: str, op: str) -> str:
    if op == "MatMulNBits" or name.endswith("_proj/MatMul") or "/fused/" in name or "lm_head" in name:
        return "projections"
    if "/lora/" in name:
        return "lora"
    if "self_attn" in name:
        return "attention"
    return "other"


def profile(onnx_dir: Path, args) -> dict:
    folder = tempfile.mkdtemp(prefix="edgelora-profile-")

    class Profiled(ort.SessionOptions):  # the engine makes its own options: switch profiling on in them
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = f"{folder}/step"

    plain, ort.SessionOptions = ort.SessionOptions, Profiled
    try:
        engine = Engine(onnx_dir, EngineConfig(max_loras=max(1, len(args.adapter)), num_threads=args.threads))
    finally:
        ort.SessionOptions = plain
    for item in args.adapter:
        name, path = item.split("=", 1)
        engine.adapters.add(name, Path(path))
    if args.prefill:
        engine.open_rows(1, args.prompt_len + 1)
        prompt = np.random.default_rng(0).integers(3, engine.spec.vocab_size, args.prompt_len).tolist()
        for start in range(0, args.prompt_len, args.chunk):
            engine.step(StepPlan(0, [prompt[start:start + args.chunk]], [start], [0]))
        steps = -(-args.prompt_len // args.chunk)
    else:
        rows = [None if row == "-" else row for row in args.rows.split(",")]
        names = [row for row in rows if row]
        slot_of = engine.adapters.acquire(names) if names else {}
        cache = engine.open_rows(len(rows), args.context + args.steps + 1)
        cache.note_written(0, np.full(len(rows), cache.length))
        slots = [slot_of[row] if row else 0 for row in rows]
        for step in range(args.steps):
            engine.step(StepPlan(0, [[5]] * len(rows), [args.context + step] * len(rows), slots))
        steps = args.steps
    events = json.loads(Path(engine.session.end_profiling()).read_text())
    runs = [event["dur"] for event in events if event.get("cat") == "Session" and event["name"] == "model_run"]
    by_op, by_group, nodes = collections.Counter(), collections.Counter(), 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["args"]["op_name"] != "If":
            op, name = event["args"]["op_name"], event["name"][: -len("_kernel_time")]
            by_op[op] += event["dur"]
            by_group[_group(name, op)] += event["dur"]
            nodes += 1
    return {"steps": steps, "run_ms_per_step": sum(runs) / 1e3 / max(1, len(runs)),
            "kernel_ms_per_step": sum(by_op.values()) / 1e3 / steps, "nodes_per_step": nodes / max(1, len(runs)),
            "by_group_ms_per_step": {k: v / 1e3 / steps for k, v in by_group.most_common()},
            "by_op_ms_per_step": {k: v / 1e3 / steps for k, v in by_op.most_common(args.top)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--rows", default="-", help="decode rows, e.g. d1,d1,-,- (write --rows=- for one base row)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prefill", action="store_true", help="profile a chunked prefill instead of decode")
    parser.add_argument("--prompt-len", type=int, default=1678)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = profile(args.onnx_dir, args)
    print(f"{result['steps']} steps: {result['run_ms_per_step']:.2f} ms a run, {result['kernel_ms_per_step']:.2f} ms "
          f"in kernels a step, {result['nodes_per_step']:.0f} kernels a run")
    for title, key in (("by group", "by_group_ms_per_step"), ("by operator", "by_op_ms_per_step")):
        print(f"  {title}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in result[key].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
