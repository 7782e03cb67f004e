"""Adapter lifecycle over the native slot pool: add / activate / deactivate / remove / pin.

Three levels, in TensorRT-LLM's and vLLM's words:

* **registered**: every adapter the cache was given, name -> processed folder, validated once
  (config, shapes, header). Never forgotten until ``remove``: beyond the two bounded levels below,
  an adapter is simply read again from its file on next use.
* **host-ready** (at most ``max_cpu_loras``): read, converted to the graph's dtype and transposed
  to the slot layout, one copy away from a slot. LRU.
* **slots** (``max_loras``): pool memory a batch binds (device memory on CUDA, host memory on the
  CPU); slot 0 means "no adapter". LRU among idle slots.

A slot held by a running batch (reference count > 0) or pinned is never evicted; eviction happens
before an insert, never after, so a call never drops what it has just made room for.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelora.errors import AdapterError, EdgeLoraError, UserInputError
from edgelora.lora_manifest import LoraManifest
from edgelora.model_spec import ModelSpec
from edgelora.processed_adapter import (
    ProcessedAdapterConfig,
    check_processed_weights,
    read_processed_tensors,
    resolve_adapter_path,
)

log = logging.getLogger(__name__)

RECENT_LOADS = 1024  # load times kept for metrics; counts and totals are kept forever


@dataclass
class RegisteredAdapter:
    """What the cache knows of an adapter by name, and where it currently lives."""

    name: str
    weights: Path
    config: ProcessedAdapterConfig
    slot: int = 0  # 0: not in a slot
    references: int = 0  # running batches that use it
    pinned: bool = False


@dataclass
class HostAdapter:
    """An adapter ready to copy into a slot: per LoRA site A^T [rank, in] and B [rank, out], or None."""

    rank: int
    a: list[np.ndarray | None]
    b: list[np.ndarray | None]

    @property
    def size_bytes(self) -> int:
        return sum(array.nbytes for array in self.a + self.b if array is not None)

    @classmethod
    def read(cls, weights: Path, manifest: LoraManifest, dtype, where: str) -> HostAdapter:
        """Read a processed file and lay it out for the pool (A transposed, the graph's dtype)."""
        tensors = read_processed_tensors(weights, where)
        a: list[np.ndarray | None] = []
        b: list[np.ndarray | None] = []
        ranks = set()
        for site in manifest.sites:
            lora_a, lora_b = tensors.get(site.a_name), tensors.get(site.b_name)
            if lora_a is None or lora_b is None:
                if (lora_a is None) != (lora_b is None):
                    raise AdapterError(f"{where}: {site.a_name} and {site.b_name} must both be present")
                a.append(None)
                b.append(None)
                continue
            # processed files store A [in, r] and B [r, out]; the slot holds A^T [r, in] and B
            if lora_a.shape[0] != site.in_features or lora_b.shape[1] != site.out_features \
                    or lora_a.shape[1] != lora_b.shape[0]:
                raise AdapterError(f"{where}: {site.a_name} {list(lora_a.shape)} / {site.b_name} {list(lora_b.shape)} "
                                   f"do not fit the projection {site.in_features}x{site.out_features}")
            ranks.add(int(lora_a.shape[1]))
            a.append(np.ascontiguousarray(lora_a.T, dtype=dtype))
            b.append(np.ascontiguousarray(lora_b, dtype=dtype))
        if len(ranks) != 1:
            raise AdapterError(f"{where}: " + ("holds no LoRA tensors" if not ranks else f"mixes ranks {sorted(ranks)}"))
        return cls(ranks.pop(), a, b)


@dataclass
class CacheStats:
    """Counters for metrics: where activations were served from, and what loads cost."""

    slot_hits: int = 0
    slot_misses: int = 0
    slot_evictions: int = 0
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
    slot_moves: int = 0  # compactions: a running adapter moved down so a step binds only used slots
    loads: int = 0  # activations that copied an adapter into a slot
    load_s_total: float = 0.0
    recent_load_s: deque = field(default_factory=lambda: deque(maxlen=RECENT_LOADS))  # bounded: servers run for weeks

    def record_load(self, seconds: float) -> None:
        self.loads += 1
        self.load_s_total += seconds
        self.recent_load_s.append(seconds)


def check_adapter(path: Path, spec: ModelSpec, manifest: LoraManifest, max_lora_rank: int
                  ) -> tuple[Path, ProcessedAdapterConfig]:
    """The weights file and config of a processed adapter, checked against the model (nothing read into memory).

    ``AdapterCache.add`` registers through it; a front end without an engine (the Ray ingress)
    checks an adapter with it before any replica sees the path.
    """
    folder, weights = resolve_adapter_path(path)
    config = ProcessedAdapterConfig.load(folder)
    config.check_fits(spec, manifest, str(path), max_lora_rank)
    check_processed_weights(weights, config, manifest, str(path))
    return weights, config


class AdapterCache:
    """Names -> host-ready copies -> pool slots, each bounded level LRU."""

    def __init__(self, pool, spec: ModelSpec, manifest: LoraManifest, max_lora_rank: int, max_cpu_loras: int,
                 dtype=np.float32):
        self._pool = pool
        self._spec = spec
        self._manifest = manifest
        self._max_lora_rank = max_lora_rank
        self._max_cpu_loras = max_cpu_loras
        self._dtype = dtype
        self._registered: dict[str, RegisteredAdapter] = {}
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU, oldest first
        self._slots: OrderedDict[int, str] = OrderedDict()  # slot -> name, least recently used first
        self.stats = CacheStats()

    # -- lifecycle ---------------------------------------------------------------------------
    def add(self, name: str, path: Path) -> RegisteredAdapter:
        """Register (and validate) an adapter by name; nothing is read into memory yet."""
        if not name or not isinstance(name, str):
            raise UserInputError("an adapter needs a non-empty name")
        _, weights = resolve_adapter_path(path)
        existing = self._registered.get(name)
        if existing is not None:
            if existing.weights.resolve() != weights.resolve():
                raise UserInputError(f"adapter name {name!r} is already registered for {existing.weights}")
            return existing
        weights, config = check_adapter(path, self._spec, self._manifest, self._max_lora_rank)
        entry = RegisteredAdapter(name, weights, config)
        self._registered[name] = entry
        return entry

    def activate(self, name: str) -> int:
        """Make sure the adapter sits in a slot; return the slot (1..max_loras)."""
        entry = self._entry(name)
        if entry.slot:
            self._slots.move_to_end(entry.slot)
            self.stats.slot_hits += 1
            return entry.slot
        self.stats.slot_misses += 1
        slot = self._free_slot()  # evicts first, so what follows never drops what it needs
        started = time.perf_counter()
        ready = self._host_copy(entry)
        self._pool.write(slot, ready.rank, ready.a, ready.b)
        self.stats.record_load(time.perf_counter() - started)
        entry.slot = slot
        self._slots[slot] = name
        log.debug("adapter %s -> slot %d (%.1f ms)", name, slot, self.stats.recent_load_s[-1] * 1e3)
        return slot

    def deactivate(self, name: str) -> None:
        """Take the adapter out of its slot (it stays registered, and host-ready if it was)."""
        entry = self._entry(name)
        if entry.references:
            raise EdgeLoraError(f"adapter {name!r} is in use by a running batch")
        if entry.slot:
            self._pool.clear(entry.slot)
            del self._slots[entry.slot]
            entry.slot = 0

    def remove(self, name: str) -> None:
        """Forget the adapter entirely (not allowed while a batch uses it)."""
        self.deactivate(name)
        self._host.pop(name, None)
        del self._registered[name]

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep an adapter in a slot and host-ready (``pinned=False`` lets LRU take it again)."""
        entry = self._entry(name)
        if pinned:
            entry.pinned = True
            try:
                self.activate(name)
            except BaseException:
                entry.pinned = False
                raise
        else:
            entry.pinned = False

    def prefetch(self, name: str) -> None:
        """Read the adapter into the host cache now (a server's loader), so its first step copies, not reads."""
        self._host_copy(self._entry(name))

    def forget_host_copy(self, name: str) -> None:
        """Drop the host-ready copy (benchmarks: make the next activation read the file)."""
        self._entry(name)
        self._host.pop(name, None)

    def acquire(self, names: list[str]) -> dict[str, int]:
        """Activate and hold every named adapter for one batch; return name -> slot."""
        distinct = list(dict.fromkeys(names))
        if len(distinct) > self._pool.num_slots:
            raise UserInputError(f"a batch uses {len(distinct)} adapters but max_loras is {self._pool.num_slots}")
        slots = {}
        try:
            for name in distinct:
                slots[name] = self.activate(name)
                self._registered[name].references += 1
        except BaseException:
            self.release(list(slots))
            raise
        return slots

    def release(self, names: list[str]) -> None:
        for name in dict.fromkeys(names):
            entry = self._registered.get(name)
            if entry is not None and entry.references:
                entry.references -= 1

    def compact(self, names: list[str]) -> None:
        """Put these adapters (the ones running rows use) in slots 1..k, so a step binds k slots.

        The graph computes every slot of the bound stack for every row, so a step whose adapters
        sit in slots 1 and 8 would pay for eight. An adapter above k moves into a slot below k
        that no listed adapter holds (one copy within the pool); that slot's idle occupant moves to a
        free slot if there is one, else leaves the slots (it stays registered and host-ready).
        A pinned idle occupant is never displaced, so compaction may stop short (still correct).
        """
        wanted = list(dict.fromkeys(names))
        k = len(wanted)
        movers = [name for name in wanted if self._registered[name].slot > k]
        for name in movers:
            target = next((slot for slot in range(1, k + 1)
                           if self._slots.get(slot) not in wanted
                           and not (slot in self._slots and self._registered[self._slots[slot]].pinned)), None)
            if target is None:
                return
            occupant = self._slots.get(target)
            if occupant is not None:
                free = next((slot for slot in range(k + 1, self._pool.num_slots + 1) if slot not in self._slots), None)
                if free is not None:
                    self._move(occupant, free)
                else:
                    self.deactivate(occupant)
                    self.stats.slot_evictions += 1
            self._move(name, target)

    def _move(self, name: str, target: int) -> None:
        entry = self._registered[name]
        self._pool.move(entry.slot, target)
        order = list(self._slots.items())  # keep the LRU position, change the slot number
        self._slots = OrderedDict((target if slot == entry.slot else slot, held) for slot, held in order)
        entry.slot = target
        self.stats.slot_moves += 1

    # -- inspection --------------------------------------------------------------------------
    def is_resident(self, name: str) -> bool:
        """In a slot now: a request for it needs no slot of its own."""
        return bool(self._entry(name).slot)

    def can_take_slot(self) -> bool:
        """A slot is free, or held by an idle unpinned adapter (activation would evict it)."""
        return len(self._slots) < self._pool.num_slots or any(
            not self._registered[name].references and not self._registered[name].pinned for name in self._slots.values())

    def held_lru(self) -> list[str]:
        """Adapters in slots that running requests hold (and that are not pinned), least recently used first."""
        return [name for name in self._slots.values()
                if self._registered[name].references and not self._registered[name].pinned]

    def __contains__(self, name: str) -> bool:
        return name in self._registered

    def get(self, name: str) -> RegisteredAdapter:
        return self._entry(name)

    def slot_of(self, name: str) -> int:
        return self._entry(name).slot

    def slot_table(self) -> dict[int, str]:
        return dict(sorted(self._slots.items()))

    def host_ready(self) -> list[str]:
        """Names with a host-ready copy, least recently used first."""
        return list(self._host)

    def names(self) -> list[str]:
        return list(self._registered)

    # -- internals ---------------------------------------------------------------------------
    def _entry(self, name: str) -> RegisteredAdapter:
        entry = self._registered.get(name)
        if entry is None:
            raise UserInputError(f"unknown adapter {name!r}")
        return entry

    def _host_copy(self, entry: RegisteredAdapter) -> HostAdapter:
        """The host-ready copy, read from the file on a miss; cached unless every cached copy is pinned."""
        ready = self._host.get(entry.name)
        if ready is not None:
            self._host.move_to_end(entry.name)
            self.stats.host_hits += 1
            return ready
        self.stats.host_misses += 1
        ready = HostAdapter.read(entry.weights, self._manifest, self._dtype, str(entry.weights))
        if ready.rank > self._max_lora_rank:
            raise AdapterError(f"{entry.weights}: rank {ready.rank} is above the maximum LoRA rank {self._max_lora_rank}")
        if self._max_cpu_loras > 0:
            while len(self._host) >= self._max_cpu_loras:
                victim = next((n for n in self._host if not self._registered[n].pinned), None)
                if victim is None:
                    return ready  # every cached copy is pinned: use this one once, keep none
                del self._host[victim]
                self.stats.host_evictions += 1
            self._host[entry.name] = ready
        return ready

    def _free_slot(self) -> int:
        for slot in range(1, self._pool.num_slots + 1):
            if slot not in self._slots:
                return slot
        for slot, name in self._slots.items():  # least recently used first
            victim = self._registered[name]
            if not victim.references and not victim.pinned:
                self.deactivate(name)
                self.stats.slot_evictions += 1
                return slot
        raise EdgeLoraError("every adapter slot is held by a running batch or pinned; raise max_loras")
