"""Prefill time and peak memory with logits at every prompt position against at the last one only.

``lora_model.onnx`` takes ``logits_positions`` [batch, kept]: the runtime keeps each row's last
position (what it samples from); "every" binds all prompt positions, which is what the runtime
did before (logits [batch, prompt, vocab]). Each configuration runs in a fresh process so its peak
resident memory is its own; rounds interleave the two.

    python samples/make_sample.py --output-dir bench_out/sample_v152k --size bench --vocab 151936 --no-adapters
    edgelora export --model-dir bench_out/sample_v152k/model --output-dir bench_out/onnx_v152k
    edgelora insert-lora --onnx-dir bench_out/onnx_v152k
    python benchmarks/prefill_logits.py --onnx-dir bench_out/onnx_v152k --batch 4 --prompt-len 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("every", "last")


def _trial(onnx_dir: Path, mode: str, batch: int, prompt_len: int, repeats: int, threads: int) -> dict:
    from edgelora.runtime.config import EngineConfig
    from edgelora.runtime.engine import Engine, StepPlan

    engine = Engine(onnx_dir, EngineConfig(max_loras=1, max_cpu_loras=1, num_threads=threads))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, engine.spec.vocab_size, (batch, prompt_len)).tolist()
    plan = StepPlan(0, prompts, [0] * batch, [0] * batch, every_position=mode == "every")
    durations = []
    for _ in range(repeats):
        engine.open_rows(batch, prompt_len + 1)
        started = time.perf_counter()
        logits = engine.step(plan)
        durations.append(time.perf_counter() - started)
    return {"prefill_ms": statistics.median(durations) * 1e3, "logits_bytes": int(logits.nbytes),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_load_bytes": rss_loaded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", "--onnxDir", dest="onnx_dir", type=Path, required=True,
                        help="folder with lora_model.onnx")
    parser.add_argument("--batch", type=int, default=4, help="rows per prefill")
    parser.add_argument("--prompt-len", dest="prompt_len", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="prefills timed per process (median)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per mode, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--trial", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        print(json.dumps(_trial(args.onnx_dir, args.trial, args.batch, args.prompt_len, args.repeats, args.threads)))
        return 0
    samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            command = [sys.executable, __file__, "--trial", mode, "--onnx-dir", str(args.onnx_dir), "--batch",
                       str(args.batch), "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            samples[mode].append(json.loads(result.stdout.strip().splitlines()[-1]))
    summary = {}
    print(f"batch {args.batch} x {args.prompt_len} tokens, {args.threads} threads, medians of {args.rounds} processes")
    print(f"{'logits at':<10} {'prefill ms':>11} {'logits MB':>10} {'peak RSS MB':>12} {'RSS after load MB':>18}")
    for mode, trials in samples.items():
        figures = {key: statistics.median(t[key] for t in trials) for key in trials[0]}
        summary[mode] = figures
        print(f"{mode:<10} {figures['prefill_ms']:11.1f} {figures['logits_bytes'] / 1e6:10.1f} "
              f"{figures['peak_rss_bytes'] / 1e6:12.1f} {figures['rss_after_load_bytes'] / 1e6:18.1f}")
    print(f"last/every: prefill time {summary['last']['prefill_ms'] / summary['every']['prefill_ms']:.3f}, "
          f"peak RSS {summary['last']['peak_rss_bytes'] / summary['every']['peak_rss_bytes']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
