"""What adapter affinity buys on Ray Serve: cold vs warm first tokens, and loads per replica.

Starts ``edgelora serve --ray`` (its own local Ray instance, loopback only) and, with the official
openai client (streaming):

1. **cold**: one request per adapter, one after another: each replica that gets an adapter for
   the first time reads it from storage (the multiplexed loader) before its first token;
2. **warm**: the same requests again: Ray's router sends each to the replica holding its adapter;
3. **concurrent**: ``--requests`` at once, round robin over the adapters, after the router has
   learned where each adapter is.

It reports time to first token (median) of the cold and warm rounds, the loader's read time, and
the replicas' adapter loads after each phase (from ``/metrics``, labelled by replica). Without
affinity each adapter would end up on every replica that a request for it reached (up to
``replicas`` loads per adapter, and that many host copies).

    python benchmarks/ray_affinity.py --onnx-dir bench_out/onnx_new \\
        --lora-modules b1=bench_out/onnx_new/lora_weights/b1 ... --replicas 2 --threads 1 --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from edgelora.entrypoints.lora_modules import parse_lora_modules
from edgelora.tools.serve_process import running_server

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def by_replica(url: str) -> dict[str, dict[str, float]]:
    """metric name -> replica -> value, for the samples that carry a replica label."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "replica" in sample.labels:
                values[sample.name][sample.labels["replica"]] += sample.value
    return values


def first_token_s(client: OpenAI, model: str, max_tokens: int) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0,
                                            stream=True, extra_body={"min_tokens": max_tokens})
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


def concurrent(client: OpenAI, names: list[str], count: int, max_tokens: int) -> float:
    errors = []

    def send(index: int) -> None:
        try:
            client.chat.completions.create(model=names[index % len(names)], messages=PROMPT, max_tokens=max_tokens,
                                           temperature=0, extra_body={"min_tokens": max_tokens})
        except Exception as exc:
            errors.append(str(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--lora-modules", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    modules = parse_lora_modules(args.lora_modules)
    names = list(modules)
    with running_server("--ray", "--replicas", str(args.replicas), "--threads", str(args.threads),
                        "--onnx-dir", str(args.onnx_dir), "--served-model-name", "base",
                        "--max-loras", str(len(names)), "--max-cpu-loras", str(len(names)),
                        "--lora-modules", *[f"{n}={p}" for n, p in modules.items()], timeout_s=600) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        first_token_s(client, "base", 2)  # the ingress and the base graph warm
        cold = [first_token_s(client, name, args.max_tokens) for name in names]
        time.sleep(3.0)
        after_cold = by_replica(url)
        warm = [first_token_s(client, name, args.max_tokens) for name in names]
        time.sleep(3.0)
        wall = concurrent(client, names, args.requests, args.max_tokens)
        time.sleep(2.0)
        final = by_replica(url)
    loads = "edgelora_replica_adapter_loads_total"
    reads = final.get("edgelora_replica_adapter_read_seconds_sum", {})
    result = {
        "replicas": args.replicas, "threads": args.threads, "adapters": len(names), "requests": args.requests,
        "max_tokens": args.max_tokens,
        "ttft_cold_ms_median": 1e3 * statistics.median(cold), "ttft_warm_ms_median": 1e3 * statistics.median(warm),
        "loader_read_ms_mean": 1e3 * sum(reads.values()) / max(1.0, sum(final[loads].values())),
        "loads_after_cold": dict(after_cold[loads]), "loads_after_all": dict(final[loads]),
        "concurrent_wall_s": wall,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(
            f"# Adapter affinity on Ray Serve ({time.strftime('%Y-%m-%d')})\n\n"
            f"`python benchmarks/ray_affinity.py --onnx-dir {args.onnx_dir} --lora-modules ... --replicas "
            f"{args.replicas} --threads {args.threads} --requests {args.requests} --max-tokens {args.max_tokens}`\n\n"
            f"| figure | value |\n|---|---|\n"
            f"| first token, adapter new to its replica (median of {len(names)}) | {result['ttft_cold_ms_median']:.0f} ms |\n"
            f"| first token, adapter already on its replica (median of {len(names)}) | {result['ttft_warm_ms_median']:.0f} ms |\n"
            f"| multiplexed loader: register + read from storage (mean) | {result['loader_read_ms_mean']:.0f} ms |\n"
            f"| adapter loads after the cold round, by replica | {sum(after_cold[loads].values()):.0f} "
            f"({', '.join(f'{v:.0f}' for v in after_cold[loads].values())}) |\n"
            f"| adapter loads after warm + {args.requests} concurrent, by replica | {sum(final[loads].values()):.0f} "
            f"({', '.join(f'{v:.0f}' for v in final[loads].values())}) |\n"
            f"| without affinity, at most | {len(names) * args.replicas} |\n"
            f"| {args.requests} concurrent requests, wall | {wall:.1f} s |\n")


if __name__ == "__main__":
    main()
