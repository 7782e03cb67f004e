"""edgelora as a compare-script engine: the workload's columns on one export, in one long-lived process.

    python benchmarks/peers/edgelora_runner.py --onnx-dir DIR --adapter A=PROCESSED_DIR ... \
        --workload W.json --label int4 --threads 2 --out RESULT.json [--rounds 3 | --stdin-rounds]

The same measurement as ``edgelora bench --rows``: each column is one batch on the step scheduler,
every row admitted at once, greedy with EOS masked until ``max_tokens`` (``min_tokens``); decode
tokens/s = decode rows / decode seconds from the scheduler's own step timing (prefill excluded). A
column that mixes adapters is one mixed batch. Prompt-speed columns: one base row with
``max_tokens`` 1 on the scheduler's default step budget (a long prompt is prefilled in chunks, as
``serve`` does), prompt tokens over the wall time to its first token.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

from peer_input import InputError, Samples, Workload, column_names, load_workload, rounds_to_run

from edgelora.errors import EdgeLoraError
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True, help="an export with lora_model.onnx")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PROCESSED_DIR",
                        help="a processed adapter (process-lora's output) under the workload's name")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--label", required=True, help="the engine's name in the results (float32, int4, ...)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stdin-rounds", action="store_true", help="rounds driven from stdin (peer_input.py)")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def run_column(engine: Engine, workload: Workload, rows: tuple[str | None, ...]) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of one batch (all rows admitted at once) and its greedy ids in row order."""
    greedy = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0, min_tokens=workload.max_tokens)
    requests = [GenerationRequest(list(workload.prompts[index]), adapter, greedy) for index, adapter in enumerate(rows)]
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=len(rows)))
    finished = scheduler.run_to_completion(requests)
    return scheduler.stats.decode_rows / scheduler.stats.decode_s, [request.output_ids for request in finished]


def run_prefill(engine: Engine, prompt: tuple[int, ...]) -> float:
    """Prompt tokens/s of one base row: the wall time to its first token (default step budget)."""
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1))
    started = time.perf_counter()
    scheduler.run_to_completion([GenerationRequest(list(prompt), None, SamplingParams(max_tokens=1, temperature=0.0))])
    return len(prompt) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        adapters = dict(item.split("=", 1) for item in args.adapter)
        config = json.loads((args.onnx_dir / "config.json").read_text())
        workload = load_workload(args.workload, set(adapters), config["vocab_size"])
        engine = Engine(args.onnx_dir, EngineConfig(max_loras=max(len(adapters), 1),
                                                    max_cpu_loras=max(len(adapters), 1), num_threads=args.threads))
        for name, folder in adapters.items():
            engine.adapters.add(name, Path(folder))
            engine.adapters.activate(name)
    except (InputError, EdgeLoraError, OSError, ValueError, KeyError) as error:
        print(f"edgelora_runner: error: {error}", file=sys.stderr)
        return 2
    for column in workload.columns:  # warm-up: first runs pay for allocations
        run_column(engine, workload, column.rows)
    for prefill in workload.prefills:
        run_prefill(engine, prefill.prompt)
    samples = Samples(column_names(workload))
    for _ in rounds_to_run(args.rounds, args.stdin_rounds, samples):
        for column in workload.columns:
            rate, tokens = run_column(engine, workload, column.rows)
            samples.add(column.name, rate, tokens)
        for prefill in workload.prefills:
            samples.add(prefill.name, run_prefill(engine, prefill.prompt))
    args.out.write_text(json.dumps({
        "engine": f"edgelora {args.label}", "version": f"edgelora {version('edgelora')}, onnxruntime {version('onnxruntime')}",
        "columns": samples.columns, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "notes": ["each column one batch on the step scheduler (mixed columns: one mixed batch); decode tokens/s from "
                  "its step timing, prefill excluded; prompt-speed: default step budget, wall time to the first token",
                  *samples.notes()]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
