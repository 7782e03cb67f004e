"""First adapter load in a fresh process, against later loads in the same process.

"Cold" here means: the adapter file is in the page cache, the process is new, and this is the
first adapter it loads into a slot. Each trial runs in its own subprocess (so the first load
really is the first), creates the engine, then times:

* ``register``: registering one adapter (median over ``--adapters``): read, version digest, checks;
* ``first``: the first activation (read, validate, convert, copy into slot 1);
* ``second``: activating another adapter into slot 2 (the pool is warm now);
* ``reload``: deactivating and activating the first adapter again, from its file;
* ``touch_fresh_slot_bytes``: writing as many bytes of never-touched memory as one slot holds
  (what first use of any new memory costs on this machine, whoever does it).

    python benchmarks/cold_adapter_load.py --onnx-dir bench_out/onnx \
        --adapters bench_out/onnx/lora_weights/b1 bench_out/onnx/lora_weights/b2 --trials 5

Medians over the trials are printed (and written with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _trial(onnx_dir: str, adapters: list[str], max_loras: int, threads: int) -> dict:
    from edgelora.runtime.config import EngineConfig
    from edgelora.runtime.engine import Engine

    engine = Engine(Path(onnx_dir), EngineConfig(max_loras=max_loras, max_cpu_loras=max_loras, num_threads=threads))
    names = [f"a{index}" for index in range(len(adapters))]
    registers = []
    for name, path in zip(names, adapters):
        started = time.perf_counter()
        engine.adapters.add(name, Path(path))
        registers.append(time.perf_counter() - started)
    timings = {"register": statistics.median(registers)}
    started = time.perf_counter()
    engine.adapters.activate(names[0])
    timings["first"] = time.perf_counter() - started
    if len(names) > 1:
        started = time.perf_counter()
        engine.adapters.activate(names[1])
        timings["second"] = time.perf_counter() - started
    reloads = []
    for _ in range(3):
        engine.adapters.deactivate(names[0])
        if hasattr(engine.adapters, "forget_host_copy"):  # read from the file again, not the host cache
            engine.adapters.forget_host_copy(names[0])
        started = time.perf_counter()
        engine.adapters.activate(names[0])
        reloads.append(time.perf_counter() - started)
    timings["reload"] = statistics.median(reloads)
    # What the machine charges for memory nobody touched yet: one slot's bytes, first written.
    slot_bytes = sum(site.in_features + site.out_features for site in engine.manifest.sites) \
        * engine.pool.rank_capacity * np.dtype(np.float32 if engine.spec.dtype == "float32" else np.float16).itemsize
    fresh = np.empty(slot_bytes, np.uint8)
    started = time.perf_counter()
    fresh.fill(1)
    timings["touch_fresh_slot_bytes"] = time.perf_counter() - started
    return {key: value * 1e3 for key, value in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", "--onnxDir", dest="onnx_dir", required=True, help="folder with lora_model.onnx")
    parser.add_argument("--adapters", nargs="+", required=True, help="processed adapter folders (two or more)")
    parser.add_argument("--trials", type=int, default=5, help="fresh processes")
    parser.add_argument("--max-loras", dest="max_loras", type=int, default=8, help="adapter slots of the pool")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)  # one trial, JSON on stdout
    args = parser.parse_args(argv)
    if args.trial:
        print(json.dumps(_trial(args.onnx_dir, args.adapters, args.max_loras, args.threads)))
        return 0
    samples: dict[str, list[float]] = {}
    for _ in range(args.trials):
        command = [sys.executable, __file__, "--trial", "--onnx-dir", args.onnx_dir, "--adapters", *args.adapters,
                   "--max-loras", str(args.max_loras), "--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        for key, value in json.loads(result.stdout.strip().splitlines()[-1]).items():
            samples.setdefault(key, []).append(value)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    for key, value in medians.items():
        print(f"{key:<22} {value:8.1f} ms median  ({', '.join(f'{v:.1f}' for v in samples[key])})")
    if args.json:
        args.json.write_text(json.dumps({"median_ms": medians, "samples_ms": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
