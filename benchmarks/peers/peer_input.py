"""What every peer runner reads and checks the same way: the command line's adapters, the
model's config and the workload file the compare script writes.

Plain Python (no edgelora import): the runners run under other venvs (onnxruntime-genai's) too,
and import this module from their own folder.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn


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
class Workload:
    """The prompts, the new tokens per row and the columns to time, as the compare script writes them."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    columns: tuple[Column, ...]


def peer_parser(description: str) -> OneLineParser:
    """The arguments every peer runner takes; each adds its own, then calls ``check_peer_args``."""
    parser = OneLineParser(description=description)
    parser.add_argument("--workload", type=Path, required=True, help="workload JSON")
    parser.add_argument("--hf-dir", type=Path, required=True, help="Hugging Face model folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PEFT_DIR", help="a PEFT adapter")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    return parser


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


def load_workload(path: Path, adapter_names: set[str], vocab_size: int) -> Workload:
    """Read and check the workload, so that bad input fails before any build or conversion."""
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
    columns = tuple(_column(c, i, len(prompts), adapter_names) for i, c in enumerate(columns_raw))
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise InputError("workload: column names must be unique")
    return Workload(prompts, max_tokens, columns)


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
