"""How long a long prompt freezes the streams already decoding, per step budget (``max_num_batched_tokens``).

Eight streams decode (one adapter each); a long prompt arrives; the script steps the scheduler until
the long prompt's first token and reports the longest gap between two tokens of any stream in that
window, and the long prompt's time to first token. Budgets are interleaved round by round, medians
reported. It also times what a step that runs the decode rows *with* a chunk would cost in this
graph (every row right-padded to the chunk's width) against a chunk alone and a decode step alone:
the reason chunks alternate with decode steps.

    python benchmarks/long_prompt_stall.py --onnx-dir bench_out/int4 \\
        --adapters bench_out/onnx/lora_weights/d{1..8} --prompt-len 1678 --budgets 0,256,512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine, StepPlan
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler


def one_round(engine: Engine, names: list[str], budget: int, prompt_len: int, seed: int) -> dict:
    """Streams decode, the long prompt arrives, step until its first token: the longest gap and its TTFT."""
    rng = np.random.default_rng(seed)
    vocab = engine.spec.vocab_size
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=len(names) + 1, max_num_batched_tokens=budget))
    greedy = SamplingParams(max_tokens=min(512, scheduler.max_model_len - 64), temperature=0.0, ignore_eos=True)
    for index, name in enumerate(names):
        scheduler.add_request(f"s{index}", GenerationRequest(rng.integers(3, vocab, 32).tolist(), name, greedy))
    started: set[str] = set()
    for _ in range(200):  # until every stream is prefilled and decoding
        started |= {update.request_id for update in scheduler.step() if update.new_token_ids}
        if len(started) == len(names):
            break
    last_token = {f"s{index}": time.perf_counter() for index in range(len(names))}
    arrived = time.perf_counter()
    scheduler.add_request("long", GenerationRequest(rng.integers(3, vocab, prompt_len).tolist(), None,
                                                    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    gaps, ttft, chunks = [], None, 0
    while ttft is None:
        updates = scheduler.step()
        now = time.perf_counter()
        chunks += bool(scheduler.last_step.chunk_tokens)
        for update in updates:
            if update.request_id == "long" and update.new_token_ids:
                ttft = now - arrived
            elif update.request_id in last_token and update.new_token_ids:
                gaps.append(now - last_token[update.request_id])
                last_token[update.request_id] = now
    gaps += [time.perf_counter() - seen for seen in last_token.values()]  # streams still waiting at the end
    for request_id in list(last_token) + ["long"]:
        scheduler.abort_request(request_id)
    scheduler.step()
    return {"longest_gap_s": max(gaps), "ttft_s": ttft, "chunk_steps": chunks}


def step_shapes(engine: Engine, names: list[str], chunk: int, context: int, rounds: int = 3) -> dict:
    """Median ms at ``context`` of: a decode step of the streams, a chunk alone, and both in one padded step."""
    slots = engine.adapters.acquire(names)
    rows = len(names)
    engine.open_rows(rows + 1, context + chunk)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, engine.spec.vocab_size, context).tolist() for _ in range(rows + 1)]
    engine.step(StepPlan(0, prompts, [0] * (rows + 1), [slots[n] for n in names] + [0]))
    times: dict[str, list[float]] = {"decode": [], "chunk": [], "decode_with_chunk": []}
    piece = rng.integers(3, engine.spec.vocab_size, chunk).tolist()
    for _ in range(rounds):
        plans = {
            "decode": StepPlan(0, [[5]] * rows, [context] * rows, [slots[n] for n in names]),
            "chunk": StepPlan(rows, [piece], [context], [0]),
            "decode_with_chunk": StepPlan(0, [[5]] * rows + [piece], [context] * (rows + 1),
                                          [slots[n] for n in names] + [0]),
        }
        for kind, plan in plans.items():
            started = time.perf_counter()
            engine.step(plan)
            times[kind].append(time.perf_counter() - started)
    engine.adapters.release(names)
    return {kind: statistics.median(values) * 1e3 for kind, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--adapters", type=Path, nargs="+", required=True, help="processed adapters, one per stream")
    parser.add_argument("--prompt-len", type=int, default=1678)
    parser.add_argument("--budgets", default="0,256,512", help="max_num_batched_tokens values (0: no limit)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=1024, help="context of the one-step timings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    engine = Engine(args.onnx_dir, EngineConfig(max_loras=len(args.adapters), num_threads=args.threads))
    names = [path.name for path in args.adapters]
    for name, path in zip(names, args.adapters):
        engine.adapters.add(name, path)
    budgets = [int(part) for part in args.budgets.split(",")]
    results: dict[int, list[dict]] = {budget: [] for budget in budgets}
    for round_index in range(args.rounds):
        for budget in budgets:
            results[budget].append(one_round(engine, names, budget, args.prompt_len, seed=round_index))
            print(f"round {round_index} budget {budget or 'none'}: {results[budget][-1]}", flush=True)
    summary = {}
    for budget, runs in results.items():
        summary[budget or "none"] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"budget {budget or 'none':>5}: longest stream gap {summary[budget or 'none']['longest_gap_s']:.2f} s, "
              f"long prompt TTFT {summary[budget or 'none']['ttft_s']:.2f} s (medians of {len(runs)})")
    shapes = step_shapes(engine, names, chunk=max(budgets) or 256, context=args.context)
    print(f"one step at context {args.context}, ms: " + ", ".join(f"{kind} {value:.0f}" for kind, value in shapes.items()))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "step_shapes_ms": shapes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
