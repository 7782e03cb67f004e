"""``--lora-modules NAME=PATH ...``: the one parser serve, chat and bench-serve share (vLLM's flag)."""

from __future__ import annotations

from pathlib import Path

from edgelora.errors import UserInputError


def parse_lora_modules(entries: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` pairs, names unique, in the order given."""
    modules: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserInputError(f"--lora-modules {entry!r}: expected NAME=PATH")
        if name in modules:
            raise UserInputError(f"--lora-modules: adapter name {name!r} is given twice")
        modules[name] = Path(path)
    return modules
