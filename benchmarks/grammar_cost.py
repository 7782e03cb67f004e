"""What structured output costs a decode step: a batch with half its rows under a JSON-schema grammar against
the same batch with none.

    python benchmarks/grammar_cost.py --onnx-dir bench_out/int4_2 --batch 16 --repeats 5 \
        --json benchmarks/results/DATE-grammar-cost.json

One scheduler (the step loop the server runs), ``--batch`` greedy rows of ``--max-tokens`` tokens (EOS
ignored) per run; in the constrained runs every other row must match a JSON schema with long bounded
strings (so it does not finish early). Runs alternate, ``--repeats`` each. Reported: median decode-step
time of each, the difference, and the time inside the mask computation itself (llguidance's masks and
applying them), per step and per constrained row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgelora.runtime import output
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.grammar import GrammarSpec
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler
from edgelora.runtime.tokenizer import ChatTokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "body", "tags"],
          "properties": {"title": {"type": "string", "maxLength": 120}, "body": {"type": "string", "maxLength": 400},
                         "tags": {"type": "array", "maxItems": 8, "items": {"type": "string", "maxLength": 16}}}}


class MaskTimer:
    """Wraps the output stage's mask function and sums its time (steps, rows, seconds)."""

    def __init__(self):
        self.calls, self.rows, self.seconds = 0, 0, 0.0
        self._inner = output.mask_rows

    def __call__(self, rows, matchers, words):
        started = time.perf_counter()
        self._inner(rows, matchers, words)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.rows += len(matchers)


def run(scheduler: Scheduler, tokenizer: ChatTokenizer, batch: int, max_tokens: int, constrained: bool) -> list[float]:
    """Decode-step times of one batch run."""
    prompt = tokenizer.encode("Write a short title, a body and some tags for a note about the sea.")
    requests = [GenerationRequest(prompt, None, SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True,
        grammar=GrammarSpec.json_schema(SCHEMA) if constrained and index % 2 == 0 else None))
        for index in range(batch)]
    for index, request in enumerate(requests):
        scheduler.add_request(f"r{index}", request)
    steps = []
    while scheduler.has_unfinished_requests():
        scheduler.step()
        if scheduler.last_step.decode_rows == batch:
            steps.append(scheduler.last_step.total_s)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    engine = Engine(args.onnx_dir, EngineConfig(num_threads=args.threads))
    tokenizer = ChatTokenizer(args.onnx_dir)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=args.batch, enable_prefix_caching=False), tokenizer)
    timer = MaskTimer()
    output.mask_rows = timer  # the output stage looks the function up by name at each step
    steps: dict[str, list[float]] = {"none": [], "half": []}
    run(scheduler, tokenizer, args.batch, 4, True)  # warm-up: sessions, the grammar compiled once
    timer.calls, timer.rows, timer.seconds = 0, 0, 0.0
    for repeat in range(args.repeats):
        for label in (("none", "half") if repeat % 2 == 0 else ("half", "none")):
            steps[label] += run(scheduler, tokenizer, args.batch, args.max_tokens, label == "half")
    median = {label: statistics.median(values) * 1e3 for label, values in steps.items()}
    report = {"batch": args.batch, "constrained_rows": args.batch // 2 + args.batch % 2, "threads": args.threads,
              "vocab": engine.spec.vocab_size, "decode_step_ms": {k: round(v, 3) for k, v in median.items()},
              "extra_ms_per_step": round(median["half"] - median["none"], 3),
              "mask_ms_per_step": round(timer.seconds / max(1, timer.calls) * 1e3, 3),
              "mask_us_per_row": round(timer.seconds / max(1, timer.rows) * 1e6, 1),
              "steps": {label: len(values) for label, values in steps.items()},
              "p90_decode_step_ms": {label: round(float(np.percentile(values, 90)) * 1e3, 3)
                                     for label, values in steps.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
