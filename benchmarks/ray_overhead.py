"""What the Ray Serve path costs per request: ``edgelora serve`` vs ``edgelora serve --ray --replicas 1``.

Same model, same threads, same adapters, one engine either way. The only difference is the
path a request takes: uvicorn + the engine thread, or Serve's proxy -> the ingress -> a
streaming call to the replica. Rounds alternate the two servers (ABAB...) and each round runs
``bench-serve``'s measurement (streaming, ignore_eos) at every concurrency level; medians over
rounds are reported, with the ratio Ray / plain.

    python benchmarks/ray_overhead.py --onnx-dir bench_out/onnx_new \\
        --lora-modules b1=bench_out/onnx_new/lora_weights/b1 b2=bench_out/onnx_new/lora_weights/b2 \\
        --threads 2 --rounds 2 --markdown benchmarks/results/2026-12-01-ray-overhead.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgelora.entrypoints.lora_modules import parse_lora_modules
from edgelora.tools.bench_serve import BenchServeOptions, run_bench_serve
from edgelora.tools.serve_process import running_server

FIGURES = ("output_tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--lora-modules", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    modules = parse_lora_modules(args.lora_modules)
    levels = [int(level) for level in args.concurrency.split(",")]
    common = ["--onnx-dir", str(args.onnx_dir), "--threads", str(args.threads), "--max-num-seqs", str(max(levels)),
              "--served-model-name", "base", "--lora-modules", *[f"{n}={p}" for n, p in modules.items()]]
    modes = {"plain": [], "ray": ["--ray", "--replicas", "1"]}
    samples: dict[str, dict[int, dict[str, list[float]]]] = {
        mode: {level: {figure: [] for figure in FIGURES} for level in levels} for mode in modes}
    for _ in range(args.rounds):
        for mode, extra in modes.items():
            with running_server(*extra, *common, timeout_s=600) as (url, _):
                report = run_bench_serve(BenchServeOptions(adapters=list(modules), url=url, concurrency=levels,
                                                           requests=args.requests, max_tokens=args.max_tokens))
            for level in report["levels"]:
                for figure in FIGURES:
                    samples[mode][level["concurrency"]][figure].append(level[figure])
    medians = {mode: {level: {figure: statistics.median(values) for figure, values in figures.items()}
                      for level, figures in by_level.items()} for mode, by_level in samples.items()}
    print(json.dumps(medians, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "samples": samples}, indent=2))
    if args.markdown:
        rows = []
        for level in levels:
            plain, ray = medians["plain"][level], medians["ray"][level]
            rows.append(f"| {level} | {plain['output_tokens_per_s']:.1f} | {ray['output_tokens_per_s']:.1f} | "
                        f"{ray['output_tokens_per_s'] / plain['output_tokens_per_s']:.2f} | "
                        f"{plain['ttft_p50_ms']:.0f} / {ray['ttft_p50_ms']:.0f} | "
                        f"{plain['itl_p50_ms']:.1f} / {ray['itl_p50_ms']:.1f} | "
                        f"{plain['itl_p99_ms']:.1f} / {ray['itl_p99_ms']:.1f} |")
        args.markdown.write_text(
            f"# The Ray Serve path against the plain server ({time.strftime('%Y-%m-%d')})\n\n"
            f"`python benchmarks/ray_overhead.py --onnx-dir {args.onnx_dir} --lora-modules ... --threads "
            f"{args.threads} --concurrency {args.concurrency} --requests {args.requests} --max-tokens "
            f"{args.max_tokens} --rounds {args.rounds}`: one engine either way, rounds alternating; "
            f"medians of {args.rounds} rounds.\n\n"
            "| concurrency | plain tok/s | ray tok/s | ray / plain | TTFT p50 ms (plain / ray) | "
            "ITL p50 ms (plain / ray) | ITL p99 ms (plain / ray) |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
