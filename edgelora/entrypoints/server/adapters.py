"""Where adapters come from: ``--lora-root`` checks, and PEFT folders processed into a cache folder.

A processed folder (``processed_adapter_model.safetensors`` + ``config.json``) is used as is. A
PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) goes through the same
``process_adapter`` as ``edgelora process-lora``, checked against the served model, into
``--lora-cache-dir`` under a key of its path and the digest of its files' bytes, so a changed
adapter is processed again (even one copied with its old modification times) and an unchanged
one only once. The server never imports torch, so a ``.bin``-only PEFT
adapter is refused with what to do instead.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import AdapterError, UserInputError
from edgelora.formats import contract

log = logging.getLogger(__name__)


class ForbiddenPath(UserInputError):
    """An adapter path outside ``--lora-root`` (after following symlinks): a 403."""


def on_demand_name(name: str) -> bool:
    """Whether a request's ``model`` may name a folder directly under the root: one plain path component
    (no separators, not ``.``/``..``, not hidden); anything else is an unknown model."""
    return 0 < len(name) <= 255 and not name.startswith(".") and not any(c in name for c in "/\\\0")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in a folder (0 if it is gone)."""
    try:
        return sum(item.stat().st_size for item in Path(folder).iterdir() if item.is_file())
    except OSError:
        return 0


@dataclass
class AdapterSources:
    """Turns a path a caller names into a processed folder the engine can register."""

    onnx_dir: Path
    cache_dir: Path
    root: Path | None = None  # run-time loads must resolve inside it

    def inside_root(self, path: str | Path) -> Path:
        """The path with symlinks followed and ``..`` folded; ForbiddenPath unless it lies in the root."""
        if self.root is None:
            raise ForbiddenPath("run-time adapter loading needs --lora-root")
        root = self.root.resolve()
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = root / candidate
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise ForbiddenPath(f"{path}: outside the adapter root (--lora-root)")
        return resolved

    def root_names(self, after: str | None = None) -> list[str]:
        """Names a request may load on demand, sorted, past ``after``: one directory listing, no file read.

        A folder counts when it holds a processed or a PEFT adapter's config (one ``stat`` each); its
        weights are read, and checked against the model, by the first request that names it."""
        if self.root is None:
            return []
        try:
            with os.scandir(self.root) as entries:
                names = sorted(entry.name for entry in entries if on_demand_name(entry.name))
        except OSError:
            return []
        if after is not None:
            names = names[bisect.bisect_right(names, after):]
        return names

    def is_adapter_folder(self, name: str) -> bool:
        """Whether the folder ``name`` under the root looks like an adapter (config files only; no weights read)."""
        try:
            folder = self.inside_root(name)
        except ForbiddenPath:  # a symlink that leaves the root
            return False
        return any((folder / marker).is_file() for marker in (contract.PROCESSED_ADAPTER, contract.PEFT_CONFIG))

    def prepare(self, path: Path) -> Path:
        """A processed folder for ``path``: itself when processed, else the processed copy of the PEFT folder."""
        path = Path(path)
        if path.is_file() and path.name == contract.PROCESSED_ADAPTER:
            return path.parent
        if not path.is_dir():
            raise UserInputError(f"{path}: no such adapter folder")
        if (path / contract.PROCESSED_ADAPTER).is_file():
            return path
        if not (path / contract.PEFT_CONFIG).is_file():
            raise AdapterError(f"{path}: neither a processed adapter ({contract.PROCESSED_ADAPTER}) nor a PEFT "
                               f"adapter ({contract.PEFT_CONFIG})")
        if not (path / contract.PEFT_WEIGHTS).is_file():
            if (path / contract.PEFT_WEIGHTS_BIN).is_file():
                raise AdapterError(f"{path}: only {contract.PEFT_WEIGHTS_BIN}; the server does not read PyTorch "
                                   f"pickles. Convert it to {contract.PEFT_WEIGHTS} (PeftModel.save_pretrained("
                                   "..., safe_serialization=True)) or run 'edgelora process-lora' on it")
            raise AdapterError(f"{path}: no {contract.PEFT_WEIGHTS}")
        key = self._cache_key(path)
        target = self.cache_dir / key
        if (target / contract.PROCESSED_ADAPTER).is_file() and (target / contract.PROCESSED_CONFIG).is_file():
            target.touch()  # used now: the cache's LRU order
            return target
        from edgelora.adapters import process_adapter  # numpy + safetensors only for a safetensors PEFT folder

        log.info("processing PEFT adapter %s -> %s", path, target)
        process_adapter(path, target, self.onnx_dir)
        if self._cache_key(path) != key:  # rewritten while we read it: what we wrote may mix two versions
            shutil.rmtree(target, ignore_errors=True)
            raise AdapterError(f"{path}: the adapter files changed while they were processed; load it again")
        return target

    def drop(self, folder: Path) -> None:
        """Delete a processed copy in the cache folder (nothing outside it)."""
        if Path(folder).resolve().is_relative_to(self.cache_dir.resolve()):
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _cache_key(path: Path) -> str:
        """Folder name + a digest of the resolved path and the files' bytes."""
        resolved = path.resolve()
        digest = hashlib.sha256(str(resolved).encode())
        for name in (contract.PEFT_CONFIG, contract.PEFT_WEIGHTS):
            digest.update(f"\0{name}\0".encode())
            try:
                with open(resolved / name, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
            except OSError as exc:
                raise AdapterError(f"{path}: cannot read {name} ({exc.strerror or exc})") from exc
        return f"{resolved.name}-{digest.hexdigest()[:16]}"


