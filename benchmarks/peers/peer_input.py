"""What every peer runner reads and checks the same way: the command line's adapters, the
model's config and the workload file the compare script writes.

Plain Python (no edgelora import): the runners run under other venvs (onnxruntime-genai's) too,
and import this module from their own folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

READY = "@ready"  # a runner driven by --stdin-rounds says this once it is built and warmed up
ROUND_DONE = "@round"  # ... and this, with the round's index, at the end of each round


class InputError(Exception):
    """Bad command line or workload: reported as one line, exit status 2."""


class RunError(Exception):
    """A step failed for a reason other than the input (a build, a conversion, the runtime): exit status 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (the default prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        raise InputError(message)


@dataclass(frozen=True)
class Column:
    """One workload column: row i uses prompts[i] and adapter rows[i] (None = base)."""

    name: str
    rows: tuple[str | None, ...]


@dataclass(frozen=True)
class Prefill:
    """One prompt-speed column: a batch-1 base prompt whose prefill is timed (prompt tokens/s)."""

    name: str
    prompt: tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    """The prompts, the new tokens per row and the columns to time, as the compare script writes them."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    columns: tuple[Column, ...]
    prefills: tuple[Prefill, ...] = ()

    @property
    def longest_prefill(self) -> int:
        return max((len(p.prompt) for p in self.prefills), default=0)


def peer_parser(description: str) -> OneLineParser:
    """The arguments every peer runner takes; each adds its own, then calls ``check_peer_args``."""
    parser = OneLineParser(description=description)
    parser.add_argument("--workload", type=Path, required=True, help="workload JSON")
    parser.add_argument("--hf-dir", type=Path, required=True, help="Hugging Face model folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PEFT_DIR", help="a PEFT adapter")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--stdin-rounds", action="store_true",
                        help="instead of --rounds: after the warm-up print @ready, then run one round per line "
                             "'round' on stdin (printing '@round N' after it) until 'done' or end of input; the "
                             "compare script drives every engine this way, interleaving them round by round")
    return parser


def rounds_to_run(rounds: int, from_stdin: bool, samples: Samples) -> Iterator[int]:
    """The round indices to run: ``rounds`` of them, or, driven from stdin, one per 'round' line.

    Driven, each round's end is announced on stdout ('@round N {column: rate}') once the caller's loop
    body has run: the driver knows this engine is idle again, and keeps the rates if the run stops later.
    """
    if not from_stdin:
        yield from range(rounds)
        return
    print(READY, flush=True)
    for index, line in enumerate(sys.stdin):
        if line.strip() != "round":
            return
        yield index
        print(f"{ROUND_DONE} {index} {json.dumps(samples.latest())}", flush=True)


def check_peer_args(args: argparse.Namespace) -> argparse.Namespace:
    """What every runner refuses before it builds anything (``threads``: its own flag)."""
    if args.rounds < 1 or args.threads < 1:
        raise InputError("--rounds and --threads must be at least 1")
    if not (args.hf_dir / "config.json").is_file():
        raise InputError(f"--hf-dir {args.hf_dir}: no config.json there")
    return args


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The model's config.json: its vocabulary size and positions bound the workload."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"--hf-dir {hf_dir}: config.json unreadable ({error})") from None
    if not isinstance(config, dict) or type(config.get("vocab_size")) is not int:
        raise InputError(f"--hf-dir {hf_dir}: config.json has no integer vocab_size")
    return config


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """NAME=PEFT_DIR pairs, in the order given (llama.cpp's --lora order; genai's first gives the LoRA structure)."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"--adapter {spec!r}: expected NAME=PEFT_DIR")
        if name in adapters:
            raise InputError(f"--adapter {name}: given twice")
        path = Path(folder)
        if not (path / "adapter_config.json").is_file():
            raise InputError(f"--adapter {name}: no adapter_config.json in {path}")
        adapters[name] = path.resolve()
    return adapters


def _int_list(value: Any, what: str) -> tuple[int, ...]:
    """A non-empty list of plain ints (JSON booleans are not token ids)."""
    if not isinstance(value, list) or not value or not all(type(x) is int for x in value):
        raise InputError(f"workload: {what} must be a non-empty list of integers")
    return tuple(value)


def load_workload(path: Path, adapter_names: set[str], vocab_size: int, base_only: bool = False) -> Workload:
    """Read and check the workload, so that bad input fails before any build or conversion.

    ``base_only``: keep only the columns whose rows are all base (for a model built without LoRA)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"workload {path}: {error}") from None
    if not isinstance(data, dict):
        raise InputError("workload: expected a JSON object")
    prompts_raw = data.get("prompts")
    if not isinstance(prompts_raw, list) or not prompts_raw:
        raise InputError("workload: 'prompts' must be a non-empty list")
    prompts = tuple(_int_list(p, f"prompts[{i}]") for i, p in enumerate(prompts_raw))
    for i, prompt in enumerate(prompts):
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise InputError(f"workload: prompts[{i}] has a token id outside [0, {vocab_size})")
    max_tokens = data.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 2:
        raise InputError("workload: 'max_tokens' must be an integer >= 2 (the first token is not timed)")
    columns_raw = data.get("columns")
    if not isinstance(columns_raw, list) or not columns_raw:
        raise InputError("workload: 'columns' must be a non-empty list")
    if base_only:
        columns_raw = [c for c in columns_raw if isinstance(c, dict) and isinstance(c.get("rows"), list)
                       and all(row is None for row in c["rows"])]
        if not columns_raw:
            raise InputError("workload: no column has only base rows")
    columns = tuple(_column(c, i, len(prompts), adapter_names) for i, c in enumerate(columns_raw))
    prefills = tuple(_prefill(p, i, vocab_size) for i, p in enumerate(data.get("prefill") or []))
    names = [c.name for c in columns] + [p.name for p in prefills]
    if len(set(names)) != len(names):
        raise InputError("workload: column names must be unique")
    return Workload(prompts, max_tokens, columns, prefills)


def _prefill(value: Any, index: int, vocab_size: int) -> Prefill:
    """One checked prompt-speed column."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise InputError(f"workload: prefill[{index}] needs a string 'name'")
    prompt = _int_list(value.get("prompt"), f"prefill[{index}].prompt")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise InputError(f"workload: prefill[{index}] has a token id outside [0, {vocab_size})")
    return Prefill(value["name"], prompt)


def _column(value: Any, index: int, n_prompts: int, adapter_names: set[str]) -> Column:
    """One checked column."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise InputError(f"workload: columns[{index}] needs a string 'name'")
    rows = value.get("rows")
    if not isinstance(rows, list) or not rows or len(rows) > n_prompts:
        raise InputError(f"workload: column {value['name']!r} needs 1 to {n_prompts} rows")
    for row in rows:
        if row is not None and row not in adapter_names:
            raise InputError(f"workload: column {value['name']!r} uses adapter {row!r}, not given by --adapter")
    return Column(value["name"], tuple(rows))


class Samples:
    """Per column: every round's rate and the last round's greedy ids, and the columns whose ids moved."""

    def __init__(self, names: list[str]) -> None:
        self.columns: dict[str, dict[str, Any]] = {name: {"tokens_per_s": [], "tokens": []} for name in names}
        self.unstable: set[str] = set()

    def add(self, name: str, rate: float, tokens: list[list[int]] | None = None) -> None:
        entry = self.columns[name]
        if tokens is not None:
            if entry["tokens"] and entry["tokens"] != tokens:
                self.unstable.add(name)
            entry["tokens"] = tokens
        entry["tokens_per_s"].append(round(rate, 3))

    def latest(self) -> dict[str, float]:
        """Each column's newest rate."""
        return {name: entry["tokens_per_s"][-1] for name, entry in self.columns.items() if entry["tokens_per_s"]}

    def notes(self) -> list[str]:
        return [f"greedy tokens differed between rounds in: {sorted(self.unstable)}"] if self.unstable else []


def column_names(workload: Workload) -> list[str]:
    """Decode columns then prompt-speed columns, as results list them."""
    return [c.name for c in workload.columns] + [p.name for p in workload.prefills]
