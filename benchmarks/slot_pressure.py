"""More active adapters than slots: TTFT and inter-token p99 over 64 adapters vs 8 that all fit, same load.

    python benchmarks/slot_pressure.py --onnx-dir bench_out/int4_2 --adapters-dir bench_out/peft_serve \
        --slots 8 --few 8 --many 64 --rate 1.5 --duration 60 --repeats 3 \
        --json benchmarks/results/DATE-slot-pressure.json

One ``edgelora serve`` with ``--max-loras SLOTS --max-lora-rank R`` (room for SLOTS adapters of rank R;
lower ranks share it: at R 64, 8 places hold 32 r16 adapters; R 16 counts one r16 adapter a place) and
every adapter of ``--adapters-dir`` (d1..dN, PEFT or processed), ``--max-cpu-loras`` of ``--host-places``
(default: all of them). The same open-loop
schedule shape (Poisson arrivals at ``--rate``, prompt and output lengths) is sent with its requests
spread uniformly over the first ``--few`` adapters and then over the first ``--many``, alternating
``--repeats`` times (the order turns each round; every run its own seed, the same for both sets).
Reported per set: the medians over runs of TTFT p50/p99 and inter-token p50/p99, and the ratios
many / few. Before the runs, one request per adapter loads each once (as bench-serve's warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from edgelora.tools.open_loop import LoadShape, PlannedRequest, plan, run_schedule, summarize
from edgelora.tools.serve_process import running_server


def adapter_folders(folder: Path, count: int) -> dict[str, Path]:
    names = [f"d{index}" for index in range(1, count + 1)]
    missing = [name for name in names if not (folder / name).is_dir()]
    if missing:
        raise SystemExit(f"{folder}: no adapter folders {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return {name: folder / name for name in names}


def run_set(url: str, names: list[str], args: argparse.Namespace, seed: int, vocab: int) -> dict:
    shape = LoadShape(adapters=names, duration_s=args.duration, zipf_alpha=0.0, prompt_len=args.prompt_len,
                      output_len=args.max_tokens, spread=0.25, vocab=vocab, seed=seed)
    schedule = plan(args.rate, shape)
    models = {name: name for name in names}
    outcomes = asyncio.run(run_schedule(f"{url}/v1", "none", schedule, models, "model", names, args.timeout))
    result = asdict(summarize(args.rate, outcomes, None, None))
    result["distinct_adapters"] = len({request.adapter for request in schedule})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", type=Path, required=True, help="the served export (int4 for the issue's figure)")
    parser.add_argument("--adapters-dir", type=Path, required=True, help="folders d1..dN (PEFT or processed)")
    parser.add_argument("--slots", type=int, default=8, help="the server's --max-loras")
    parser.add_argument("--max-lora-rank", type=int, default=64,
                        help="the server's --max-lora-rank: --max-loras places of this rank; lower ranks share them "
                             "(16 with r16 adapters: one adapter a place)")
    parser.add_argument("--few", type=int, default=8, help="adapters of the reference set (all fit the slots)")
    parser.add_argument("--many", type=int, default=64, help="adapters of the pressure set")
    parser.add_argument("--host-places", type=int, default=None, help="the server's --max-cpu-loras (default: --many)")
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson arrivals)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    parser.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (±25%%)")
    parser.add_argument("--max-tokens", type=int, default=64, help="mean output tokens (±25%%, EOS ignored)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the server's rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each set, alternating")
    parser.add_argument("--first-seed", type=int, default=0, help="round i's schedule uses seed first-seed + i")
    parser.add_argument("--threads", type=int, default=2, help="the server's CPU threads")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    parser.add_argument("--cache-dir", type=Path, default=Path("bench_out/slot_pressure_cache"),
                        help="where PEFT adapters are processed (kept between runs)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.few <= args.slots < args.many:
        parser.error("expected 1 <= --few <= --slots < --many")
    folders = adapter_folders(args.adapters_dir, args.many)
    vocab = json.loads((args.onnx_dir / "config.json").read_text()).get("vocab_size", 1000)
    server_args = ["--onnx-dir", str(args.onnx_dir), "--threads", str(args.threads), "--max-loras", str(args.slots),
                   "--max-lora-rank", str(args.max_lora_rank),
                   "--max-cpu-loras", str(args.host_places or args.many), "--max-num-seqs", str(args.max_num_seqs),
                   "--lora-cache-dir", str(args.cache_dir), "--lora-modules",
                   *[f"{name}={path}" for name, path in folders.items()]]
    sets = {"few": list(folders)[:args.few], "many": list(folders)}
    runs: dict[str, list[dict]] = {label: [] for label in sets}
    with running_server(*server_args, timeout_s=1800) as (url, _process):
        warm = [PlannedRequest(0.0, name, [5] * 4, 2) for name in folders]
        asyncio.run(run_schedule(f"{url}/v1", "none", warm, {n: n for n in folders}, "model", list(folders), 600))
        for repeat in range(args.repeats):
            order = list(sets) if repeat % 2 == 0 else list(sets)[::-1]
            for label in order:
                result = run_set(url, sets[label], args, seed=args.first_seed + repeat, vocab=vocab)
                runs[label].append(result)
                print(f"  round {repeat + 1} {label}: TTFT p99 {result['ttft_p99_ms']:.0f} ms, ITL p99 "
                      f"{result['itl_p99_ms']:.0f} ms, {result['completed']}/{result['offered']} done, "
                      f"{result['distinct_adapters']} adapters", flush=True)

    def median(label: str, key: str) -> float:
        return round(statistics.median(run[key] for run in runs[label]), 1)

    keys = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tokens_per_s")
    summary = {label: {key: median(label, key) for key in keys} for label in sets}
    ratios = {key: round(summary["many"][key] / summary["few"][key], 3) if summary["few"][key] else None
              for key in keys}
    # each round sends the same schedule shape (seed) to both sets: its own ratio is the paired comparison
    paired = [round(many["ttft_p99_ms"] / few["ttft_p99_ms"], 3) for few, many in zip(runs["few"], runs["many"])]
    report = {"first_seed": args.first_seed, "slots": args.slots, "max_lora_rank": args.max_lora_rank, "few": args.few, "many": args.many, "host_places": args.host_places or args.many,
              "rate": args.rate, "duration_s": args.duration, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs, "threads": args.threads,
              "summary": summary, "many_over_few": ratios, "ttft_p99_ratio_per_round": paired,
              "ttft_p99_ratio_median_of_rounds": round(statistics.median(paired), 3),
              "failed": {label: sum(run["failed"] for run in runs[label]) for label in sets}, "runs": runs}
    print(json.dumps({k: report[k] for k in ("summary", "many_over_few", "ttft_p99_ratio_per_round",
                                              "ttft_p99_ratio_median_of_rounds", "failed")}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not any(report["failed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
