"""transformers + PEFT (eager, float32) as a benchmark peer: the compare script's workload, in one process.

    python benchmarks/peers/peft_eager.py --workload W.json --hf-dir HF --adapter A=PEFT_DIR ... \
        --rounds 3 --threads 2 --out RESULT.json

A column runs as one ``generate`` call; PEFT mixes adapters in a batch through ``adapter_names``
(``"__base__"`` for a base row). Decode tokens/s excludes the prefill: a logits processor stamps
the time of every generation step, and the rate is ``rows * (steps - 1)`` over the time from the
first step (the prefill's output) to the last. Greedy, exactly ``max_tokens`` new tokens per row
(``min_new_tokens`` keeps EOS away). Prompt-speed columns: one base row's forward pass over the
prompt (with the cache, as ``generate`` does), timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from peer_input import Samples, rounds_to_run

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in adapter_names


class _StepClock:
    """A logits processor that only records when each generation step's logits arrive."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _load(hf_dir: Path, adapters: dict[str, Path]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def _run_column(model, prompts: list[list[int]], rows: list[str | None], max_tokens: int) -> tuple[float, list]:
    """Decode tokens/s of one batch and its greedy ids."""
    import torch
    from transformers import LogitsProcessorList

    batch = [prompts[index % len(prompts)] for index in range(len(rows))]
    width = max(len(prompt) for prompt in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding (none for equal lengths)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    clock = _StepClock()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             adapter_names=[row or BASE_ROW for row in rows], pad_token_id=0)
    stamps = clock.stamps
    rate = len(rows) * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return rate, out[:, width:].tolist()


def _prefill(model, prompt: list[int]) -> float:
    """Prompt tokens/s of one base row: one forward pass over the whole prompt."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad(), model.disable_adapter():
        started = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        return len(prompt) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, type=Path)
    parser.add_argument("--hf-dir", required=True, type=Path)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--stdin-rounds", action="store_true", help="rounds driven from stdin (peer_input.py)")
    args = parser.parse_args(argv)
    try:
        workload = json.loads(args.workload.read_text())
        adapters = dict(item.split("=", 1) for item in args.adapter)
        for name, folder in adapters.items():
            if not (Path(folder) / "adapter_config.json").is_file():
                raise ValueError(f"--adapter {name}={folder}: not a PEFT folder")
        if not (args.hf_dir / "config.json").is_file():
            raise ValueError(f"--hf-dir {args.hf_dir}: no config.json")
    except (OSError, ValueError) as exc:
        print(f"peft_eager: error: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    model = _load(args.hf_dir, {name: Path(folder) for name, folder in adapters.items()})
    columns, prefills = workload["columns"], workload.get("prefill") or []
    samples = Samples([column["name"] for column in columns] + [entry["name"] for entry in prefills])
    for column in columns:  # warm-up
        _run_column(model, workload["prompts"], column["rows"], min(workload["max_tokens"], 4))
    for entry in prefills:
        _prefill(model, entry["prompt"])
    for _ in rounds_to_run(args.rounds, args.stdin_rounds, samples):
        for column in columns:
            rate, tokens = _run_column(model, workload["prompts"], column["rows"], workload["max_tokens"])
            samples.add(column["name"], rate, tokens)
        for entry in prefills:
            samples.add(entry["name"], _prefill(model, entry["prompt"]))
    results = samples.columns
    for entry in results.values():
        entry["median"] = statistics.median(entry["tokens_per_s"])
    args.out.write_text(json.dumps({
        "engine": "transformers + PEFT eager", "version": f"torch {torch.__version__}",
        "columns": results, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "notes": ["mixed batches through PEFT's adapter_names", *samples.notes()]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
