"""The prefix cache on a served model: TTFT of a request that shares a long system prompt with the one
before it, and open-loop throughput on a shared-prefix workload with the cache on and off.

    python benchmarks/prefix_cache.py --onnx-dir bench_out/int4_2 --adapter B=bench_out/compare/processed/B \
        --prefix-len 1000 --repeats 5 --rate 0.75 --duration 40 --rounds 3 \
        --json benchmarks/results/DATE-prefix-cache.json

Two ``edgelora serve`` processes on the same export: the default (prefix cache on) and
``--no-enable-prefix-caching``, each asked in turn (the other idles). Part 1, per repeat and per model
(the base and ``--adapter``): a fresh ``--prefix-len``-token system prompt and a question, streamed,
then the same system prompt with another question; TTFT of each, the ratio second / first on both
servers. Part 2: the open-loop bench's Poisson arrivals at ``--rate`` for ``--duration`` seconds,
every request the same ``--prefix-len``-token system prompt plus its own ``--prompt-len`` tokens,
adapters drawn uniformly over the base and ``--adapter``; alternating servers ``--rounds`` times,
medians of throughput and TTFT / inter-token percentiles. Greedy outputs are compared between the
servers in part 1 (they must be equal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgelora.tools.open_loop import LoadShape, plan, run_schedule, summarize
from edgelora.tools.serve_process import running_server

QUESTION_LEN = 16
BASE = "base"


def first_token(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Seconds to the first streamed token, and the greedy ids."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, "ignore_eos": True}
    started, ttft, ids = time.perf_counter(), None, []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("token_ids"):
                ttft = ttft if ttft is not None else time.perf_counter() - started
                ids += choice["token_ids"]
    return ttft, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", type=Path, required=True, help="the served export")
    parser.add_argument("--adapter", default=None, metavar="NAME=PATH", help="an adapter asked for beside the base")
    parser.add_argument("--prefix-len", type=int, default=1000, help="tokens of the shared system prompt")
    parser.add_argument("--repeats", type=int, default=5, help="fresh system prompts in part 1 (medians)")
    parser.add_argument("--rate", type=float, default=0.75, help="part 2: requests per second")
    parser.add_argument("--duration", type=float, default=40.0, help="part 2: seconds of arrivals per round")
    parser.add_argument("--prompt-len", type=int, default=32, help="part 2: each request's own tokens")
    parser.add_argument("--max-tokens", type=int, default=32, help="part 2: tokens generated per request")
    parser.add_argument("--rounds", type=int, default=3, help="part 2: rounds per server, alternating (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="each server's CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    vocab = json.loads((args.onnx_dir / "config.json").read_text()).get("vocab_size", 1000)
    common = ["--onnx-dir", str(args.onnx_dir), "--served-model-name", BASE, "--threads", str(args.threads)]
    models = [BASE]
    if args.adapter:
        name, _, path = args.adapter.partition("=")
        common += ["--lora-modules", f"{name}={path}"]
        models.append(name)
    rng = np.random.default_rng(0)
    report: dict = {"prefix_len": args.prefix_len, "threads": args.threads, "models": models}
    with running_server(*common, timeout_s=600) as (on_url, _), \
            running_server(*common, "--no-enable-prefix-caching", timeout_s=600) as (off_url, _):
        servers = {"on": on_url, "off": off_url}
        for url in servers.values():  # warm-up: first runs of each shape
            for model in models:
                first_token(url, model, rng.integers(3, vocab, 40).tolist(), 2)
        ttft: dict = {label: {model: [] for model in models} for label in servers}
        equal = True
        for repeat in range(args.repeats):
            for model in models:
                system = rng.integers(3, vocab, args.prefix_len).tolist()
                questions = [rng.integers(3, vocab, QUESTION_LEN).tolist() for _ in range(2)]
                answers = {}
                for label in (("on", "off") if repeat % 2 == 0 else ("off", "on")):
                    runs = [first_token(servers[label], model, system + question, 4) for question in questions]
                    ttft[label][model].append([runs[0][0], runs[1][0]])
                    answers[label] = [ids for _, ids in runs]
                equal &= answers["on"] == answers["off"]
                print(f"  repeat {repeat + 1} {model}: on {ttft['on'][model][-1]}, off {ttft['off'][model][-1]}",
                      flush=True)
        report["ttft_s"] = ttft
        report["second_over_first"] = {
            label: {model: round(statistics.median(second / first for first, second in ttft[label][model]), 3)
                    for model in models} for label in servers}
        report["answers_equal"] = equal
        if args.rounds:
            shape = LoadShape(adapters=models, duration_s=args.duration, zipf_alpha=0.0, prompt_len=args.prompt_len,
                              output_len=args.max_tokens, vocab=vocab, seed=1, shared_prefix_len=args.prefix_len)
            runs: dict = {label: [] for label in servers}
            for round_index in range(args.rounds):
                for label in (("on", "off") if round_index % 2 == 0 else ("off", "on")):
                    schedule = plan(args.rate, LoadShape(**{**asdict(shape), "seed": round_index + 1}))
                    outcomes = asyncio.run(run_schedule(f"{servers[label]}/v1", "none", schedule,
                                                        {model: model for model in models}, "model", models, 900))
                    runs[label].append(asdict(summarize(args.rate, outcomes, None, None)))
                    result = runs[label][-1]
                    print(f"  round {round_index + 1} cache {label}: {result['request_throughput']:.2f} requests/s, "
                          f"TTFT p50 {result['ttft_p50_ms']:.0f} ms p99 {result['ttft_p99_ms']:.0f} ms, "
                          f"{result['failed']} failed", flush=True)
            keys = ("request_throughput", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                    "itl_p99_ms")
            report["open_loop"] = {
                "rate": args.rate, "duration_s": args.duration, "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                "median": {label: {key: round(statistics.median(run[key] for run in runs[label]), 3) for key in keys}
                           for label in servers},
                "runs": runs}
    summary = {key: report[key] for key in ("second_over_first", "answers_equal")}
    if "open_loop" in report:
        summary["open_loop"] = report["open_loop"]["median"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
