"""What one sampling step costs in the C++ sampler: greedy, top-k and top-p over a full vocabulary.

Rows are random normal logits at three spreads: ``peaked`` (scale 4: the top token holds about
60% of the mass at temperature 0.8 and the 0.9 nucleus is ~100 tokens, like an LLM's confident
step), ``broad`` (scale 2: a nucleus of ~17k tokens) and ``flat`` (scale 0.1: nearly uniform, the
nucleus is most of the vocabulary). Each call is timed alone; rounds interleave the settings and
medians are reported (machines here are shared and noisy: compare ratios).

    python benchmarks/sampler_cost.py
    python benchmarks/sampler_cost.py --module-dir /tmp/sampler_before   # another build of _runtime

``--module-dir`` imports ``_runtime`` from that folder instead of edgelora's build, so two builds
of runtime/sampler.cpp can be compared with the same script.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SPREADS = {"peaked": 4.0, "broad": 2.0, "flat": 0.1}


def load_runtime(module_dir: Path | None):
    """edgelora's native runtime, or the ``_runtime`` extension built into ``module_dir``."""
    if module_dir is None:
        from edgelora.runtime import native

        return native
    sys.path.insert(0, str(module_dir.resolve()))
    return importlib.import_module("_runtime")


def nucleus_size(logits: np.ndarray, temperature: float, top_p: float) -> int:
    """How many tokens the top-p cut keeps on this row (for the table, not timed)."""
    weights = np.sort(np.exp((logits.astype(np.float64) - logits.max()) / temperature))[::-1]
    mass = np.cumsum(weights)
    return int(np.argmax(mass >= top_p * mass[-1])) + 1


def time_row(runtime, logits: np.ndarray, temperature: float, top_k: int, top_p: float, steps: int) -> list[float]:
    """Microseconds of each of ``steps`` sample_row calls."""
    sampler = runtime.Sampler(0)
    costs = []
    for _ in range(steps):
        start = time.perf_counter_ns()
        runtime.sample_row(logits, sampler, temperature, top_k, top_p)
        costs.append((time.perf_counter_ns() - start) / 1e3)
    return costs


def time_batch(runtime, logits: np.ndarray, temperature: float, top_k: int, top_p: float, steps: int) -> list[float]:
    """Microseconds per row of each of ``steps`` sample_batch calls over logits [batch, vocab]."""
    batch = logits.shape[0]
    samplers = [runtime.Sampler(row) for row in range(batch)]
    costs = []
    for _ in range(steps):
        start = time.perf_counter_ns()
        runtime.sample_batch(logits, samplers, [temperature] * batch, [top_k] * batch, [top_p] * batch)
        costs.append((time.perf_counter_ns() - start) / 1e3 / batch)
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size (default 151936, Qwen's)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus for the top-p setting (default 0.9)")
    parser.add_argument("--temperature", type=float, default=0.8, help="temperature when sampling (default 0.8)")
    parser.add_argument("--batch", type=int, default=4, help="rows per sample_batch call (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="calls timed per setting and round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--spreads", default=",".join(SPREADS),
                        help=f"logit spreads to time, of {','.join(SPREADS)} (default all)")
    parser.add_argument("--module-dir", type=Path, help="import _runtime from this folder instead of edgelora's")
    parser.add_argument("--json", type=Path, help="also write the medians to this file")
    args = parser.parse_args(argv)

    runtime = load_runtime(args.module_dir)
    settings = {"greedy": (0.0, 0, 1.0), "top_k 50": (args.temperature, 50, 1.0),
                f"top_p {args.top_p:g}": (args.temperature, 0, args.top_p)}
    rng = np.random.default_rng(0)
    rows = {spread: (rng.standard_normal((args.batch, args.vocab)) * SPREADS[spread]).astype(np.float32)
            for spread in args.spreads.split(",")}
    costs: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for spread, logits in rows.items():
            for name, (temperature, top_k, top_p) in settings.items():
                costs.setdefault((spread, "row", name), []).extend(
                    time_row(runtime, logits[0], temperature, top_k, top_p, args.steps))
                costs.setdefault((spread, "batch", name), []).extend(
                    time_batch(runtime, logits, temperature, top_k, top_p, args.steps))

    source = args.module_dir or "edgelora"
    print(f"_runtime from {source}: vocab {args.vocab}, temperature {args.temperature:g}, "
          f"{args.steps} steps x {args.rounds} rounds; median us per step (batch: per row of {args.batch})")
    print(f"{'spread':8s}{'nucleus':>9s}{'call':>7s}" + "".join(f"{name:>12s}" for name in settings))
    medians = {}
    for spread, logits in rows.items():
        kept = nucleus_size(logits[0], args.temperature, args.top_p)
        for call in ("row", "batch"):
            values = [statistics.median(costs[(spread, call, name)]) for name in settings]
            medians[f"{spread}/{call}"] = dict(zip(settings, values))
            print(f"{spread:8s}{kept:9d}{call:>7s}" + "".join(f"{value:12.1f}" for value in values))
    if args.json:
        args.json.write_text(json.dumps({"source": str(source), "vocab": args.vocab, "median_us": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
