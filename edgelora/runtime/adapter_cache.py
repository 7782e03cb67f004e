"""Adapter lifecycle over the native slot pool: add / activate / deactivate / remove / pin.

Three levels, in TensorRT-LLM's and vLLM's words:

* **registered**: every adapter the cache was given, name -> its current version (``AdapterRef``),
  validated once. Never forgotten until ``remove``: beyond the two bounded levels below, an
  adapter is simply read again from its file on next use.
* **host-ready** (at most ``max_cpu_loras``, and at most ``max_cpu_lora_bytes``): read and
  transposed to the slot layout at the file's own precision (float16 files stay float16: a host
  copy costs about its file), converted to the graph's dtype while it is copied into a slot. LRU.
* **slots** (``max_loras``): pool memory a batch binds (device memory on CUDA, host memory on the
  CPU); slot 0 means "no adapter". LRU among idle slots. A pool slot holds ``chunk_rank`` rows
  (the pool's ``max_rank``): an adapter of rank r takes ceil(r / chunk_rank) slots in a row, each
  a stack entry of its own, so a batch's LoRA work follows its adapters' own ranks, not the
  largest one loaded. The engine sizes the pool for ``max_loras`` adapters of ``max_lora_rank``
  and lets adapters of lower rank share that room (S-LoRA's unified pages, in rank rows): with
  the default ranks, ``max_loras`` 8 holds 32 rank-16 adapters at once, so more distinct adapters
  run side by side in the same memory. ``max_loras=`` caps the count as well (vLLM's meaning).

Identity is not a name (SGLang's LoRA registry, vLLM's lora_int_id): an adapter is a name plus a
version, the digest of its files' bytes. ``add`` of a name with other bytes makes a new version
the name's current one; a request holds the version it was submitted with (``hold`` / ``unhold``),
so rows already running finish on the old bytes while new requests get the new ones. A version
that is no longer current (replaced or removed: *retired*) keeps its slot and host copy while
requests hold it, and leaves every level when the last one lets go: the pending removal lives
here, with the references it waits for. Every read from disk checks the bytes against the
version that was registered: files changed on disk without a new ``add`` are never served as the
registered adapter (``AdapterChanged``); a host copy made before the change still serves it.

::

    add(name, files) ──> AdapterRef(name, version) ──hold──> request ──acquire──> slot ──release──┐
         │ other bytes: new current version,                                                    │
         └ the old one retired ──> freed (slot, host copy, entry) when no request holds it <── unhold

A slot held by a running batch (reference count > 0) or pinned is never evicted; eviction happens
before an insert, never after, so a call never drops what it has just made room for.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelora.errors import AdapterError, EdgeLoraError, UserInputError
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec
from edgelora.formats.processed_adapter import (
    ProcessedAdapterConfig,
    ProcessedAdapterFiles,
    check_processed_tensors,
)

log = logging.getLogger(__name__)

RECENT_LOADS = 1024  # load times kept for metrics; counts and totals are kept forever


class AdapterChanged(AdapterError):
    """The files of a registered adapter no longer hold the bytes it was registered with."""


@dataclass(frozen=True)
class AdapterRef:
    """One version of a named adapter: what a request holds from submission to its last token."""

    name: str
    version: str  # content digest of the processed files (processed_adapter.content_version)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class RegisteredAdapter:
    """What the cache knows of one adapter version, and where it currently lives."""

    ref: AdapterRef
    weights: Path
    config: ProcessedAdapterConfig
    slot: int = 0  # 0: not in a slot; else the first of its ``span`` slots
    span: int = 0  # pool slots it takes while in them: ceil(rank / chunk rank)
    references: int = 0  # running batches that use it
    requests: int = 0  # requests holding this version (waiting or running)
    pinned: bool = False
    retired: bool = False  # replaced or removed: freed once no request or batch holds it

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def version(self) -> str:
        return self.ref.version


HOST_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))  # kept as the file has them; others become the graph's


@dataclass
class HostAdapter:
    """An adapter ready to copy into a slot: per LoRA site A^T [rank, in] and B [rank, out], or None.

    At the file's precision: the conversion to the pool's dtype happens on the copy into a slot."""

    rank: int
    a: list[np.ndarray | None]
    b: list[np.ndarray | None]

    @property
    def size_bytes(self) -> int:
        return sum(array.nbytes for array in self.a + self.b if array is not None)

    @classmethod
    def of(cls, tensors: dict[str, np.ndarray], manifest: LoraManifest, dtype, where: str) -> HostAdapter:
        """Lay a processed file's tensors out for the pool (A transposed), at the file's float16 / float32
        precision (any other becomes ``dtype``, the graph's)."""
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
            a.append(np.ascontiguousarray(lora_a.T, dtype=lora_a.dtype if lora_a.dtype in HOST_DTYPES else dtype))
            b.append(np.ascontiguousarray(lora_b, dtype=lora_b.dtype if lora_b.dtype in HOST_DTYPES else dtype))
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
    # (adapter name, seconds) of the latest loads; bounded: servers run for weeks
    recent_loads: deque = field(default_factory=lambda: deque(maxlen=RECENT_LOADS))

    def record_load(self, name: str, seconds: float) -> None:
        self.loads += 1
        self.load_s_total += seconds
        self.recent_loads.append((name, seconds))


@dataclass
class CheckedAdapter:
    """A processed adapter read once and checked against the model: its files, config and version."""

    files: ProcessedAdapterFiles
    config: ProcessedAdapterConfig
    tensors: dict[str, np.ndarray]

    @property
    def version(self) -> str:
        return self.files.version


def check_adapter(path: Path, spec: ModelSpec, manifest: LoraManifest, max_lora_rank: int) -> CheckedAdapter:
    """Read a processed adapter's files once and check them against the model; the version is their digest.

    ``AdapterCache.add`` registers through it; a front end without an engine (the Ray ingress)
    checks an adapter with it, and learns its version, before any replica sees the path.
    """
    files = ProcessedAdapterFiles.read(path)
    config = files.config()
    config.check_fits(spec, manifest, str(path), max_lora_rank)
    tensors = files.tensors(str(path))
    check_processed_tensors({name: list(value.shape) for name, value in tensors.items()}, config, manifest, str(path))
    return CheckedAdapter(files, config, tensors)


class AdapterCache:
    """Names -> versions -> host-ready copies -> pool slots, each bounded level LRU."""

    def __init__(self, pool, spec: ModelSpec, manifest: LoraManifest, max_lora_rank: int, max_cpu_loras: int,
                 dtype=np.float32, max_loras: int | None = None, max_cpu_lora_bytes: int | None = None):
        self._pool = pool
        self._chunk_rank = pool.max_rank  # rows of one pool slot
        self._max_loras = max_loras or pool.num_slots  # adapters in slots at once (None: as many as the slots hold)
        self._spec = spec
        self._manifest = manifest
        self._max_lora_rank = max_lora_rank
        self._max_cpu_loras = max_cpu_loras
        self._max_cpu_bytes = max_cpu_lora_bytes  # None: bounded by the count only
        self._dtype = np.dtype(dtype)
        self._current: dict[str, AdapterRef] = {}  # name -> the version new requests get
        self._registered: dict[AdapterRef, RegisteredAdapter] = {}  # current and retired-but-held versions
        self._host: OrderedDict[AdapterRef, HostAdapter] = OrderedDict()  # LRU, oldest first
        self._slots: OrderedDict[int, AdapterRef] = OrderedDict()  # slot -> version, least recently used first
        self.stats = CacheStats()
        # called with each version that stops being current (replaced or removed): caches of what was
        # computed under it (the scheduler's prefix cache) drop it
        self.on_retire: list[Callable[[AdapterRef], object]] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def add(self, name: str, path: Path, version: str | None = None, read: bool = False) -> RegisteredAdapter:
        """Register (and validate) an adapter under ``name``; its bytes' digest is its version.

        The same bytes again change nothing. Other bytes become the name's current version; the
        previous one is retired (requests holding it finish on it). ``version``: refuse files whose
        bytes are not that version (a Ray replica loads what the ingress checked); a version still
        in memory (held by running requests) is made current again without reading. ``read``: keep
        the bytes just read as the host-ready copy, so the first step copies instead of reading.
        """
        if not name or not isinstance(name, str):
            raise UserInputError("an adapter needs a non-empty name")
        if version is not None and AdapterRef(name, version) in self._registered:
            return self._make_current(self._registered[AdapterRef(name, version)])  # in memory: nothing to read
        checked = check_adapter(path, self._spec, self._manifest, self._max_lora_rank)
        if version is not None and checked.version != version:
            raise AdapterChanged(f"{path}: adapter files changed on disk since they were checked (version {version}, "
                                 f"now {checked.version}); load it again")
        ref = AdapterRef(name, checked.version)
        entry = self._registered.get(ref)  # current, or retired but still held: the same bytes either way
        if entry is None:
            entry = RegisteredAdapter(ref, checked.files.weights, checked.config)
        entry.weights = checked.files.weights  # the latest place these bytes were seen
        if read and ref not in self._host:
            self._keep_host_copy(entry, self._host_adapter(checked.tensors, entry.weights))
        self._registered[ref] = entry
        return self._make_current(entry)

    def _make_current(self, entry: RegisteredAdapter) -> RegisteredAdapter:
        """New requests for the name get this version; the one it replaces is retired."""
        previous = self._current.get(entry.name)
        self._current[entry.name] = entry.ref
        entry.retired = False
        if previous is not None and previous != entry.ref:
            log.info("adapter %s: version %s replaces %s", entry.name, entry.version, previous.version)
            self._retire(previous)
        return entry

    def activate(self, target: str | AdapterRef) -> int:
        """Make sure the adapter sits in a slot; return the slot (1..max_loras)."""
        entry = self._entry(target)
        if entry.slot:
            self._slots.move_to_end(entry.slot)
            self.stats.slot_hits += 1
            return entry.slot
        self.stats.slot_misses += 1
        span = self._span(entry.config.rank)
        slot = self._free_run(span)  # evicts first, so what follows never drops what it needs
        started = time.perf_counter()
        ready = self._host_copy(entry)
        self._write(slot, ready)
        self.stats.record_load(entry.name, time.perf_counter() - started)
        entry.slot, entry.span = slot, span
        self._slots[slot] = entry.ref
        log.debug("adapter %s -> slot %d (%.1f ms)", entry.ref, slot, self.stats.recent_loads[-1][1] * 1e3)
        return slot

    def deactivate(self, target: str | AdapterRef) -> None:
        """Take the adapter out of its slot (it stays registered, and host-ready if it was)."""
        entry = self._entry(target)
        if entry.references:
            raise EdgeLoraError(f"adapter {entry.name!r} is in use by a running batch")
        if entry.slot:
            self._clear(entry)

    def remove(self, name: str) -> bool:
        """Forget the name now; its version leaves memory once no request holds it. True: gone at once."""
        ref = self._current.pop(name, None)
        if ref is None:
            raise UserInputError(f"unknown adapter {name!r}")
        self._retire(ref)
        return ref not in self._registered

    def pin(self, target: str | AdapterRef, pinned: bool = True) -> None:
        """Keep an adapter in a slot and host-ready (``pinned=False`` lets LRU take it again)."""
        entry = self._entry(target)
        if pinned:
            entry.pinned = True
            try:
                self.activate(entry.ref)
            except BaseException:
                entry.pinned = False
                raise
        else:
            entry.pinned = False

    def prefetch(self, target: str | AdapterRef) -> None:
        """Read the adapter into the host cache now (a server's loader), so its first step copies, not reads."""
        self._host_copy(self._entry(target))

    def needs_read(self, target: str | AdapterRef) -> bool:
        """Neither in a slot nor host-ready: activating it now would read its file (on the caller's thread)."""
        entry = self._entry(target)
        return not entry.slot and entry.ref not in self._host

    def read_job(self, target: str | AdapterRef) -> Callable[[], HostAdapter]:
        """A job that reads and lays out the adapter's host copy touching no cache state, so it may run on
        another thread (the scheduler's prefetch); ``install_host_copy`` then keeps it, on the cache's thread."""
        entry = self._entry(target)
        ref, weights = entry.ref, entry.weights
        return lambda: self._read_host(ref, weights)

    def install_host_copy(self, ref: AdapterRef, ready: HostAdapter) -> None:
        """Keep a host copy a ``read_job`` made (nothing if that version left meanwhile or is there already)."""
        entry = self._registered.get(ref)
        if entry is not None and ref not in self._host:
            self.stats.host_misses += 1
            self._keep_host_copy(entry, ready)

    def forget_host_copy(self, target: str | AdapterRef) -> None:
        """Drop the host-ready copy (benchmarks: make the next activation read the file)."""
        self._host.pop(self._entry(target).ref, None)

    def hold(self, target: str | AdapterRef) -> AdapterRef:
        """A request takes the name's current version: it keeps it until ``unhold``, whatever is loaded meanwhile."""
        entry = self._entry(target)
        entry.requests += 1
        return entry.ref

    def unhold(self, ref: AdapterRef) -> None:
        """The request that held ``ref`` has ended; a retired version with no holder left is freed."""
        entry = self._registered.get(ref)
        if entry is not None and entry.requests:
            entry.requests -= 1
            self._free_if_unused(entry)

    def acquire(self, targets: list) -> dict:
        """Activate and hold every named adapter for one batch; return target -> slot."""
        distinct = list(dict.fromkeys(targets))
        if len(distinct) > self._max_loras:
            raise UserInputError(f"a batch uses {len(distinct)} adapters but the slots hold at most {self._max_loras}")
        slots = {}
        try:
            for target in distinct:
                slots[target] = self.activate(target)
                self._entry(target).references += 1
        except BaseException:
            self.release(list(slots))
            raise
        return slots

    def release(self, targets: list) -> None:
        for target in dict.fromkeys(targets):
            entry = self._find(target)
            if entry is not None and entry.references:
                entry.references -= 1
                self._free_if_unused(entry)

    def compact(self, targets: list) -> None:
        """Put these adapters (the ones running rows use) in slots 1..k, so a step binds k slots.

        A step binds slots first..last as its stack and every bound slot is an entry the graph
        runs (padding for a slot no row uses), so a step whose adapters sit in slots 1 and 8 would
        pay for eight. Each move copies the adapter's slots within the pool (33.6 MiB per slot on
        the bench model), so as few move as can: the listed adapters already inside 1..k stay, and
        each one outside moves into a hole (free slots first, else the slots of the least recently
        used unlisted adapters). An unlisted adapter in the way moves to free slots past k if there
        are any, else leaves the slots (it stays registered and host-ready), unless it is pinned:
        then compaction stops short (still correct). When no hole fits (ranks of several spans,
        fragmented), the listed adapters are packed down in slot order instead.
        """
        wanted = sorted(dict.fromkeys(self._entry(target).ref for target in targets),
                        key=lambda ref: self._registered[ref].slot)
        end = 1 + sum(self._registered[ref].span for ref in wanted)
        movers = [ref for ref in wanted if self._registered[ref].slot + self._registered[ref].span > end]
        for ref in sorted(movers, key=lambda ref: -self._registered[ref].span):
            hole = self._hole(ref, set(wanted), end)
            if not hole:
                self._pack(wanted, end)
                return
            if not self._clear_way(hole, self._registered[ref].span, set(wanted), end):
                return
            self._move(ref, hole)

    def _hole(self, ref: AdapterRef, wanted: set, end: int) -> int:
        """The first of span slots below ``end`` that no other listed adapter holds, for ``ref`` to move
        into: free ones first, else the ones whose unlisted holders were used least recently (0: none)."""
        span = self._registered[ref].span
        holder: dict[int, AdapterRef] = {}
        for slot, held in self._slots.items():
            for chunk in range(self._registered[held].span):
                holder[slot + chunk] = held
        recency = {held: index for index, held in enumerate(self._slots.values())}  # least recently used first
        best, best_cost = 0, None
        for start in range(1, end - span + 1):
            others = [holder.get(slot) for slot in range(start, start + span)]
            if any(other in wanted and other != ref for other in others if other is not None):
                continue
            unlisted = [recency[other] for other in others if other is not None and other not in wanted]
            cost = (bool(unlisted), max(unlisted, default=-1))
            if best_cost is None or cost < best_cost:
                best, best_cost = start, cost
        return best

    def _pack(self, wanted: list[AdapterRef], end: int) -> None:
        """Move the listed adapters down, in slot order, each into the first slots after the one before."""
        position = 1
        for ref in wanted:
            entry = self._registered[ref]
            if entry.slot != position:
                if not self._clear_way(position, entry.span, set(wanted), end):
                    return
                self._move(ref, position)
            position += entry.span

    def _clear_way(self, first: int, span: int, wanted: set, end: int) -> bool:
        """Empty slots first..first+span-1 of unlisted adapters; False if a pinned one cannot move."""
        for slot, ref in list(self._slots.items()):
            entry = self._registered[ref]
            if ref in wanted or slot >= first + span or slot + entry.span <= first:
                continue
            free = self._find_run(entry.span, start=end)
            if free:
                self._move(ref, free)
            elif entry.pinned:
                return False
            else:
                self.deactivate(ref)
                self.stats.slot_evictions += 1
        return True

    def _move(self, ref: AdapterRef, target: int) -> None:
        """Move an adapter's slots to target..target+span-1 (the ranges may overlap)."""
        entry = self._registered[ref]
        chunks = range(entry.span) if target < entry.slot else reversed(range(entry.span))
        for chunk in chunks:
            self._pool.move(entry.slot + chunk, target + chunk)
        order = list(self._slots.items())  # keep the LRU position, change the slot number
        self._slots = OrderedDict((target if slot == entry.slot else slot, held) for slot, held in order)
        entry.slot = target
        self.stats.slot_moves += 1

    # -- inspection --------------------------------------------------------------------------
    def is_resident(self, target: str | AdapterRef) -> bool:
        """In a slot now: a request for it needs no slot of its own."""
        return bool(self._entry(target).slot)

    @property
    def max_loras(self) -> int:
        """Adapters of the highest rank the slots hold at once: the most one request's ``lora_mix`` may name,
        whatever its members' ranks (adapters of lower rank share the room, so more of them run at once)."""
        return min(self._max_loras, self._pool.num_slots // self._span(self._max_lora_rank))

    def span(self, slot: int) -> int:
        """The pool slots the adapter starting at ``slot`` takes (its rank over the chunk rank, rounded up)."""
        return self._registered[self._slots[slot]].span

    def can_take(self, refs: list[AdapterRef]) -> bool:
        """Whether these adapters (not in slots yet) fit now, evicting idle unpinned adapters if needed."""
        distinct = list(dict.fromkeys(refs))
        return self._room(len(distinct), sum(self._span(self._entry(ref).config.rank) for ref in distinct))

    def held_lru(self) -> list[AdapterRef]:
        """Adapters in slots that running requests hold (and that are not pinned), least recently used first."""
        return [ref for ref in self._slots.values()
                if self._registered[ref].references and not self._registered[ref].pinned]

    def __contains__(self, name: str) -> bool:
        return name in self._current

    def get(self, target: str | AdapterRef) -> RegisteredAdapter:
        return self._entry(target)

    def in_memory(self, ref: AdapterRef) -> bool:
        """This version is registered here (current, or retired but held): ``add`` with it reads nothing."""
        return ref in self._registered

    def current(self, name: str) -> AdapterRef | None:
        """The version a request for ``name`` gets now (None: not registered)."""
        return self._current.get(name)

    def slot_of(self, target: str | AdapterRef) -> int:
        return self._entry(target).slot

    def slot_table(self) -> dict[int, str]:
        """Slot -> adapter name (a retired version shows as ``name@version``)."""
        return {slot: self._label(ref) for slot, ref in sorted(self._slots.items())}

    @property
    def spare_host_places(self) -> int:
        """Host-ready places beyond the slots' own copies (reads worth having in flight; at least 1)."""
        return max(1, self._max_cpu_loras - self.max_loras)

    @property
    def host_bytes(self) -> int:
        """Bytes of the host-ready copies."""
        return sum(ready.size_bytes for ready in self._host.values())

    def host_ready(self) -> list[str]:
        """Names with a host-ready copy, least recently used first (a retired version: ``name@version``)."""
        return [self._label(ref) for ref in self._host]

    def names(self) -> list[str]:
        return list(self._current)

    def versions(self) -> list[AdapterRef]:
        """Every version in memory: the current ones and the retired ones requests still hold."""
        return list(self._registered)

    # -- internals ---------------------------------------------------------------------------
    def _label(self, ref: AdapterRef) -> str:
        return ref.name if self._current.get(ref.name) == ref else str(ref)

    def _find(self, target: str | AdapterRef) -> RegisteredAdapter | None:
        ref = self._current.get(target) if isinstance(target, str) else target
        return self._registered.get(ref) if ref is not None else None

    def _entry(self, target: str | AdapterRef) -> RegisteredAdapter:
        entry = self._find(target)
        if entry is None:
            raise UserInputError(f"unknown adapter {str(target)!r}")
        return entry

    def _retire(self, ref: AdapterRef) -> None:
        for listener in self.on_retire:
            listener(ref)
        entry = self._registered.get(ref)
        if entry is not None and self._current.get(ref.name) != ref:
            entry.retired = True
            entry.pinned = False  # a pin is the name's, not the old bytes'
            self._free_if_unused(entry)

    def _free_if_unused(self, entry: RegisteredAdapter) -> None:
        """A retired version that no request or batch holds leaves the slots, the host cache and the registry."""
        if not entry.retired or entry.requests or entry.references:
            return
        if entry.slot:
            self._clear(entry)
        self._host.pop(entry.ref, None)
        del self._registered[entry.ref]
        log.info("adapter %s freed (no request holds it)", entry.ref)

    def _host_copy(self, entry: RegisteredAdapter) -> HostAdapter:
        """The host-ready copy, read from the file on a miss (its bytes checked against the version)."""
        ready = self._host.get(entry.ref)
        if ready is not None:
            self._host.move_to_end(entry.ref)
            self.stats.host_hits += 1
            return ready
        self.stats.host_misses += 1
        ready = self._read_host(entry.ref, entry.weights)
        self._keep_host_copy(entry, ready)
        return ready

    def _read_host(self, ref: AdapterRef, weights: Path) -> HostAdapter:
        """Read the file, check its bytes are this version, lay it out: no cache state (any thread)."""
        files = ProcessedAdapterFiles.read(weights)
        if files.version != ref.version:
            raise AdapterChanged(f"adapter {ref.name!r}: adapter files changed on disk since it was loaded "
                                 f"({weights.parent}: version {ref.version}, now {files.version}); load it again")
        return self._host_adapter(files.tensors(str(weights)), weights)

    def _host_adapter(self, tensors: dict[str, np.ndarray], weights: Path) -> HostAdapter:
        ready = HostAdapter.of(tensors, self._manifest, self._dtype, str(weights))
        if ready.rank > self._max_lora_rank:
            raise AdapterError(f"{weights}: rank {ready.rank} is above the maximum LoRA rank {self._max_lora_rank}")
        return ready

    def _keep_host_copy(self, entry: RegisteredAdapter, ready: HostAdapter) -> None:
        """Cache a host-ready copy, evicting LRU unpinned ones until the count and the byte budget allow it;
        none is kept if they cannot (every cached copy pinned, or this one alone over the budget)."""
        if self._max_cpu_loras <= 0 or (self._max_cpu_bytes is not None and ready.size_bytes > self._max_cpu_bytes):
            return
        held = self.host_bytes
        while len(self._host) >= self._max_cpu_loras or (
                self._max_cpu_bytes is not None and held + ready.size_bytes > self._max_cpu_bytes):
            victim = next((ref for ref in self._host if not self._registered[ref].pinned), None)
            if victim is None:
                return  # every cached copy is pinned: use this one once, keep none
            held -= self._host.pop(victim).size_bytes
            self.stats.host_evictions += 1
        self._host[entry.ref] = ready

    def _span(self, rank: int) -> int:
        return -(-rank // self._chunk_rank)

    @staticmethod
    def _evictable(entry: RegisteredAdapter) -> bool:
        return not entry.references and not entry.pinned

    def _write(self, slot: int, ready: HostAdapter) -> None:
        """Copy a host-ready adapter into slots slot.., chunk_rank rows of A^T and B each."""
        for first in range(0, ready.rank, self._chunk_rank):
            rows = slice(first, min(first + self._chunk_rank, ready.rank))
            self._pool.write(slot + first // self._chunk_rank, rows.stop - rows.start,
                             [self._pool_rows(a, rows) for a in ready.a], [self._pool_rows(b, rows) for b in ready.b])

    def _pool_rows(self, array: np.ndarray | None, rows: slice) -> np.ndarray | None:
        """Rows of a host copy in the pool's dtype (converted here: the host keeps the file's precision)."""
        return None if array is None else np.ascontiguousarray(array[rows], dtype=self._dtype)

    def _clear(self, entry: RegisteredAdapter) -> None:
        for chunk in range(entry.span):
            self._pool.clear(entry.slot + chunk)
        del self._slots[entry.slot]
        entry.slot, entry.span = 0, 0

    def _find_run(self, span: int, start: int = 1) -> int:
        """The first slot of ``span`` free slots in a row at or after ``start`` (0: none)."""
        taken = [False] * (self._pool.num_slots + 1)
        for slot, ref in self._slots.items():
            for chunk in range(self._registered[ref].span):
                taken[slot + chunk] = True
        run = 0
        for slot in range(start, self._pool.num_slots + 1):
            run = 0 if taken[slot] else run + 1
            if run == span:
                return slot - span + 1
        return 0

    def _free_run(self, span: int) -> int:
        """The first of ``span`` free slots in a row: idle adapters leave (least recently used first)
        and resident ones move down until there is room. Nothing changes if there can be none."""
        if not self._room(1, span):
            raise EdgeLoraError("every adapter slot is held by a running batch or pinned; raise max_loras")
        idle = [ref for ref in self._slots.values() if self._evictable(self._registered[ref])]  # LRU first
        while len(self._slots) >= self._max_loras:
            self._evict(idle.pop(0))
        while not (first := self._find_run(span)) and idle:
            self._evict(idle.pop(0))
        if not first:  # room enough, in pieces: move every resident adapter down, in slot order
            position = 1
            for slot in sorted(self._slots):
                ref = self._slots[slot]
                if slot != position:
                    self._move(ref, position)
                position += self._registered[ref].span
            first = self._find_run(span)
        return first

    def _room(self, adapters: int, slots: int) -> bool:
        """Whether ``adapters`` more adapters taking ``slots`` pool slots fit once idle unpinned ones leave."""
        idle = [entry for entry in map(self._registered.get, self._slots.values()) if self._evictable(entry)]
        used = sum(self._registered[ref].span for ref in self._slots.values())
        return len(self._slots) - len(idle) + adapters <= self._max_loras \
            and slots <= self._pool.num_slots - used + sum(entry.span for entry in idle)

    def _evict(self, ref: AdapterRef) -> None:
        self.deactivate(ref)
        self.stats.slot_evictions += 1
