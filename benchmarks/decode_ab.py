"""Decode step time of two or more exports of one model, alternating in blocks of steps (an A/B).

Separate runs on a shared machine drift by more than the few percent a graph change makes, so the
exports take turns: each runs ``--block`` decode steps on rows whose caches hold ``context``
random positions, the first ``--skip`` of each block untimed (the other session's threads wind
down), until ``--steps``; medians per export. Rows: ``-`` a base row, a name an adapter.

    python benchmarks/decode_ab.py --onnx-dirs bench_out/int4_old,bench_out/int4 \\
        --adapter d1=bench_out/onnx/lora_weights/d1 --config=-:64 --config d1:64 --config=-,-,-,-:64 \\
        --config d1,d1,d1,d1:64 --config d1,d1,d1,d1:2048 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgelora.runtime.config import EngineConfig
from edgelora.runtime.engine import Engine, StepPlan


def _parse_config(text: str) -> tuple[list[str | None], int]:
    rows, _, context = text.rpartition(":")
    return [None if row == "-" else row for row in rows.split(",")], int(context)


def _prepare(engine: Engine, rows: list[str | None], context: int, steps: int) -> list[int]:
    """Acquire the rows' adapters and fill a cache of ``context`` positions with random keys/values."""
    names = [name for name in rows if name]
    slot_of = engine.adapters.acquire(names) if names else {}
    cache = engine.open_rows(len(rows), context + steps + 1)
    rng = np.random.default_rng(0)
    for buffer in cache.host_buffers():
        buffer[...] = rng.standard_normal(buffer.shape, dtype=np.float32).astype(buffer.dtype)
    cache.note_written(0, np.full(len(rows), cache.length))
    return [slot_of[name] if name else 0 for name in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dirs", required=True, help="comma-separated export folders (lora_model.onnx)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a processed adapter")
    parser.add_argument("--config", action="append", default=[], metavar="ROWS:CONTEXT",
                        help="rows (adapter names or -) and the context, e.g. d1,d1,-,-:128 (repeatable; "
                             "write --config=-:64 when it starts with -)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.skip >= args.block:
        parser.error("--skip must be below --block")
    dirs = [Path(d) for d in args.onnx_dirs.split(",")]
    adapters = dict(item.split("=", 1) for item in args.adapter)
    configs = [_parse_config(text) for text in args.config or ["-:64"]]
    engines = []
    for folder in dirs:
        engine = Engine(folder, EngineConfig(max_loras=max(1, len(adapters)), num_threads=args.threads))
        for name, path in adapters.items():
            engine.adapters.add(name, Path(path))
        engines.append(engine)
    results = []
    for rows, context in configs:
        slots = [_prepare(engine, rows, context, args.steps) for engine in engines]
        samples: list[list[float]] = [[] for _ in engines]
        for block in range(0, args.steps, args.block):
            for index, engine in enumerate(engines):
                for step in range(block, min(block + args.block, args.steps)):
                    plan = StepPlan(0, [[5]] * len(rows), [context + step] * len(rows), slots[index])
                    started = time.perf_counter()
                    engine.step(plan)
                    if step - block >= args.skip:
                        samples[index].append(time.perf_counter() - started)
        for engine in engines:
            engine.adapters.release([name for name in rows if name])
        medians = [statistics.median(values) * 1e3 for values in samples]
        label = ",".join(row or "-" for row in rows)
        print(f"{label}:{context}  " + "  ".join(f"{folder.name} {ms:6.2f} ms" for folder, ms in zip(dirs, medians))
              + "  speed vs first: " + " ".join(f"{medians[0] / ms:.3f}" for ms in medians[1:]), flush=True)
        results.append({"rows": label, "context": context, "median_ms": medians,
                        "onnx_dirs": [str(folder) for folder in dirs]})
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "block": args.block, "configs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
