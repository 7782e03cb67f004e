"""Adapter lifecycle over the native slot pool: add / activate / pin / remove, LRU eviction.

Words as in vLLM: ``max_loras`` slots hold adapters ready for a batch (slot 0 = no adapter);
``max_cpu_loras`` registered adapters are validated and known by name. An adapter that a running
batch holds (reference count > 0) or that is pinned is never evicted.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from edgelora import contract
from edgelora.adapters.process import ProcessedAdapterConfig, check_processed_weights
from edgelora.errors import AdapterError, EdgeLoraError, UserInputError
from edgelora.lora_manifest import LoraManifest
from edgelora.model_spec import ModelSpec

log = logging.getLogger(__name__)


def resolve_adapter_path(path: Path) -> tuple[Path, Path]:
    """Accept a processed folder or its safetensors file; return (folder, weights file)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    weights = path if path.suffix == ".safetensors" else path / contract.PROCESSED_ADAPTER
    if not weights.is_file():
        raise UserInputError(f"{path}: no {contract.PROCESSED_ADAPTER}; run 'edgelora process-lora' on the adapter")
    return folder, weights


@dataclass
class AdapterEntry:
    name: str
    weights: Path
    config: ProcessedAdapterConfig
    slot: int = 0  # 0: not in a slot
    references: int = 0
    pinned: bool = False


class AdapterCache:
    """Names -> pool slots, with LRU eviction of idle, unpinned adapters."""

    def __init__(self, pool, spec: ModelSpec, manifest: LoraManifest, max_lora_rank: int, max_cpu_loras: int):
        self._pool = pool
        self._spec = spec
        self._manifest = manifest
        self._max_lora_rank = max_lora_rank
        self._max_cpu_loras = max(max_cpu_loras, pool.num_slots)
        self._entries: OrderedDict[str, AdapterEntry] = OrderedDict()  # LRU order, oldest first
        self._slots: dict[int, str] = {}
        self.last_load_s = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def add(self, name: str, path: Path) -> AdapterEntry:
        """Register (and validate) an adapter; nothing is loaded into a slot yet."""
        if not name:
            raise UserInputError("an adapter needs a non-empty name")
        folder, weights = resolve_adapter_path(path)
        existing = self._entries.get(name)
        if existing is not None:
            if existing.weights.resolve() != weights.resolve():
                raise UserInputError(f"adapter name {name!r} is already registered for {existing.weights}")
            return existing
        config = ProcessedAdapterConfig.load(folder)
        config.check_fits(self._spec, self._manifest, str(path), self._max_lora_rank)
        check_processed_weights(weights, config, self._manifest, str(path))
        entry = AdapterEntry(name, weights, config)
        self._entries[name] = entry
        self._trim_registry()
        return entry

    def activate(self, name: str) -> int:
        """Make sure the adapter sits in a slot; return the slot (1..max_loras)."""
        entry = self._entry(name)
        self._entries.move_to_end(name)
        if entry.slot:
            return entry.slot
        slot = self._free_slot()
        started = time.perf_counter()
        try:
            self._pool.load(slot, str(entry.weights))
        except ValueError as exc:
            raise AdapterError(f"adapter {name!r}: {exc}") from exc
        self.last_load_s = time.perf_counter() - started
        entry.slot = slot
        self._slots[slot] = name
        log.debug("adapter %s -> slot %d (%.1f ms)", name, slot, self.last_load_s * 1e3)
        return slot

    def deactivate(self, name: str) -> None:
        entry = self._entry(name)
        if entry.references:
            raise EdgeLoraError(f"adapter {name!r} is in use by a running batch")
        if entry.slot:
            self._pool.clear(entry.slot)
            del self._slots[entry.slot]
            entry.slot = 0

    def remove(self, name: str) -> None:
        self.deactivate(name)
        del self._entries[name]

    def pin(self, name: str, pinned: bool = True) -> None:
        self._entry(name).pinned = pinned

    def acquire(self, names: list[str]) -> dict[str, int]:
        """Activate and hold every named adapter for one batch; return name -> slot."""
        distinct = list(dict.fromkeys(names))
        if len(distinct) > self._pool.num_slots:
            raise UserInputError(f"a batch uses {len(distinct)} adapters but max_loras is {self._pool.num_slots}")
        slots = {}
        try:
            for name in distinct:
                slots[name] = self.activate(name)
                self._entries[name].references += 1
        except BaseException:
            self.release(list(slots))
            raise
        return slots

    def release(self, names: list[str]) -> None:
        for name in dict.fromkeys(names):
            entry = self._entries.get(name)
            if entry is not None and entry.references:
                entry.references -= 1

    # -- inspection --------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def slot_of(self, name: str) -> int:
        return self._entry(name).slot

    def slot_table(self) -> dict[int, str]:
        return dict(sorted(self._slots.items()))

    def names(self) -> list[str]:
        return list(self._entries)

    # -- internals ---------------------------------------------------------------------------
    def _entry(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise UserInputError(f"unknown adapter {name!r}")
        return entry

    def _free_slot(self) -> int:
        for slot in range(1, self._pool.num_slots + 1):
            if slot not in self._slots:
                return slot
        for name, entry in self._entries.items():  # oldest first
            if entry.slot and not entry.references and not entry.pinned:
                slot = entry.slot
                self.deactivate(name)
                return slot
        raise EdgeLoraError("every adapter slot is held by a running batch or pinned; raise max_loras")

    def _trim_registry(self) -> None:
        while len(self._entries) > self._max_cpu_loras:
            victim = next((n for n, e in self._entries.items() if not e.references and not e.pinned and not e.slot), None)
            if victim is None:
                return
            del self._entries[victim]
