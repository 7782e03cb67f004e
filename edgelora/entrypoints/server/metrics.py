"""Prometheus metrics of one server, in a registry of its own (no process-global state).

The engine thread updates them after each step; ``/metrics`` renders the registry. Adapter cache
counters come from ``AdapterCache.stats`` as deltas since the last step, so the prometheus counters
stay monotonic and the cache object is only read on the engine thread.

Per-adapter series have bounded cardinality: the first ``adapter_labels`` adapters seen get a
label of their own, every later one is counted under ``other`` (``base`` and ``mix`` are always
there). A label once given is kept, so every counter stays monotonic, however many adapters a
server meets in its life.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgelora.runtime.adapter_cache import CacheStats
from edgelora.runtime.config import ADAPTER_LABELS
from edgelora.runtime.prefix_cache import PrefixCache, PrefixStats
from edgelora.runtime.scheduler import StepStats

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
# PrefixStats field -> counter: requests looked up / that hit, prompt tokens looked up / served from the cache,
# blocks evicted (memory bound) and dropped (their adapter version was replaced or unloaded)
PREFIX_COUNTERS = {"queries": "edgelora_prefix_cache_queries", "hits": "edgelora_prefix_cache_hits",
                   "query_tokens": "edgelora_prefix_cache_query_tokens",
                   "hit_tokens": "edgelora_prefix_cache_hit_tokens",
                   "evicted_blocks": "edgelora_prefix_cache_evicted_blocks",
                   "dropped_blocks": "edgelora_prefix_cache_dropped_blocks"}
CACHE_COUNTERS = ("slot_hits", "slot_misses", "slot_evictions", "slot_moves", "host_hits", "host_misses", "host_evictions")
FIXED_LABELS = ("base", "mix", "other")
LOCATIONS = ("slot", "host", "disk")  # edgelora_adapter_location's values 2, 1, 0


class AdapterLabels:
    """Adapter name -> metric label: its own for the first ``limit`` names seen, else ``other``."""

    def __init__(self, limit: int = ADAPTER_LABELS):
        self.limit = limit
        self._own: dict[str, None] = {}  # insertion-ordered set

    def __call__(self, name: str) -> str:
        if name in FIXED_LABELS or name in self._own:
            return name
        if len(self._own) < self.limit:
            self._own[name] = None
            return name
        return "other"

    @property
    def named(self) -> list[str]:
        """The adapters that have a label of their own."""
        return list(self._own)


class ServerMetrics:
    """Every metric ``edgelora serve`` exposes."""

    def __init__(self, adapter_labels: int = ADAPTER_LABELS):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.label = AdapterLabels(adapter_labels)
        self.requests = Counter("edgelora_requests", "Requests by adapter ('base' for none, 'mix' for a lora_mix) and outcome "
                                "(stop, length, abort, error, rejected)", ["adapter", "outcome"], registry=registry)
        self.prompt_tokens = Counter("edgelora_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.generation_tokens = Counter("edgelora_generation_tokens", "Generated tokens", registry=registry)
        self.running = Gauge("edgelora_running_requests", "Requests holding a row of the batch", registry=registry)
        self.waiting = Gauge("edgelora_waiting_requests", "Requests queued for a row or an adapter slot",
                             registry=registry)
        self.adapters = Gauge("edgelora_adapters_registered", "Adapters the engine knows", registry=registry)
        self.decode_batch_size = Histogram("edgelora_decode_batch_size", "Rows in each decode step",
                                           buckets=BATCH_BUCKETS, registry=registry)
        self.prefill_batch_size = Histogram("edgelora_prefill_batch_size", "Requests prefilled together in a step",
                                            buckets=BATCH_BUCKETS, registry=registry)
        self.prefill_step_seconds = Histogram("edgelora_prefill_step_seconds", "Wall time of a prefill step",
                                              buckets=LATENCY_BUCKETS_S, registry=registry)
        self.decode_step_seconds = Histogram("edgelora_decode_step_seconds", "Wall time of a decode step",
                                             buckets=LATENCY_BUCKETS_S, registry=registry)
        self.decode_overhead_seconds = Histogram("edgelora_decode_overhead_seconds",
                                                 "Time of a decode step outside ONNX Runtime (scheduling, sampling, "
                                                 "text); bench-serve reports its share of the step",
                                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        self.time_to_first_token = Histogram("edgelora_time_to_first_token_seconds",
                                             "From the request's arrival to its first token",
                                             buckets=LATENCY_BUCKETS_S, registry=registry)
        self.inter_token_latency = Histogram("edgelora_inter_token_latency_seconds",
                                             "Between consecutive tokens of a request",
                                             buckets=LATENCY_BUCKETS_S, registry=registry)
        self.cache = {name: Counter(f"edgelora_adapter_{name}", f"Adapter cache {name.replace('_', ' ')}",
                                    registry=registry) for name in CACHE_COUNTERS}
        self.adapter_load_seconds = Histogram("edgelora_adapter_load_seconds",
                                              "Time to bring an adapter into a slot (file or host copy -> slot)",
                                              buckets=LATENCY_BUCKETS_S, registry=registry)
        per_adapter = f" (the first {adapter_labels} adapters seen by name, later ones as 'other')"
        self.adapter_prompt_tokens = Counter("edgelora_adapter_prompt_tokens", "Prompt tokens by adapter" + per_adapter,
                                             ["adapter"], registry=registry)
        self.adapter_generation_tokens = Counter("edgelora_adapter_generation_tokens",
                                                 "Generated tokens by adapter" + per_adapter, ["adapter"],
                                                 registry=registry)
        self.adapter_loads = Counter("edgelora_adapter_loads", "Copies of an adapter into a slot" + per_adapter,
                                     ["adapter"], registry=registry)
        self.adapter_load_time = Counter("edgelora_adapter_load_time_seconds",
                                         "Seconds spent bringing an adapter into a slot" + per_adapter, ["adapter"],
                                         registry=registry)
        self.adapter_location = Gauge("edgelora_adapter_location", "Where an adapter with a label of its own is: "
                                      "2 in a slot, 1 host-ready, 0 on disk only", ["adapter"], registry=registry)
        self.on_demand_loads = Counter("edgelora_adapter_on_demand_loads", "Adapters registered because a request "
                                       "named their folder under --lora-root (--lora-on-demand)", registry=registry)
        self.adapters_by_location = Gauge("edgelora_adapters_by_location", "Adapters in slots, host-ready (and not "
                                          "in a slot) and on disk only", ["where"], registry=registry)
        self.prefix = {name: Counter(metric, f"Prefix cache: {name.replace('_', ' ')}", registry=registry)
                       for name, metric in PREFIX_COUNTERS.items()}
        self.prefix_bytes = Gauge("edgelora_prefix_cache_bytes", "Host memory of cached prompt KV blocks",
                                  registry=registry)
        self.prefix_blocks = Gauge("edgelora_prefix_cache_blocks", "Cached prompt KV blocks", registry=registry)
        self._seen_prefix = PrefixStats()
        self._seen_cache = CacheStats()
        self._seen_loads = 0
        self._seen_moved: tuple = ()

    def observe_step(self, stats: StepStats, iteration_s: float) -> None:
        """One engine-thread iteration around a scheduler step (a prefill of new rows, a chunk of a long
        prompt, or a decode step).

        ``iteration_s`` is the whole iteration: commands, the step, handing tokens to the event loop
        and these metrics; everything but the ONNX Runtime run is the scheduler's own overhead.
        """
        if stats.prefill_rows:  # a prompt that came in chunks counts once, at its last chunk
            self.prefill_batch_size.observe(stats.prefill_rows)
        if stats.prefill_rows or stats.chunk_tokens:  # a chunk of a long prompt is prefill time too
            self.prefill_step_seconds.observe(iteration_s)
        if stats.decode_rows:
            self.decode_batch_size.observe(stats.decode_rows)
            self.decode_step_seconds.observe(iteration_s)
            self.decode_overhead_seconds.observe(max(0.0, iteration_s - stats.run_s))

    def observe_cache(self, stats: CacheStats, registered: int,
                      locations: Callable[[], tuple[list[str], list[str]]] | None = None) -> None:
        """Advance the cache counters by what changed since the last call, and where adapters are (engine thread
        only; ``locations`` gives the names in slots and host-ready, asked only when a load, an eviction, a host
        read or the registry changed since the last call: not on every step)."""
        for name in CACHE_COUNTERS:
            delta = getattr(stats, name) - getattr(self._seen_cache, name)
            if delta > 0:
                self.cache[name].inc(delta)
            setattr(self._seen_cache, name, getattr(stats, name))
        new_loads = min(stats.loads - self._seen_loads, len(stats.recent_loads))
        for adapter, seconds in list(stats.recent_loads)[len(stats.recent_loads) - new_loads:]:
            self.adapter_load_seconds.observe(seconds)
            label = self.label(adapter)
            self.adapter_loads.labels(label).inc()
            self.adapter_load_time.labels(label).inc(seconds)
        self._seen_loads = stats.loads
        self.adapters.set(registered)
        moved = (stats.loads, stats.slot_evictions, stats.host_misses, stats.host_evictions, registered,
                 len(self.label.named))
        if locations is not None and moved != self._seen_moved:
            self._seen_moved = moved
            self.observe_locations(registered, *locations())

    def observe_prefix(self, cache: PrefixCache | None) -> None:
        """Advance the prefix-cache counters by what changed since the last call (engine thread only)."""
        if cache is None:
            return
        for name in PREFIX_COUNTERS:
            delta = getattr(cache.stats, name) - getattr(self._seen_prefix, name)
            if delta > 0:
                self.prefix[name].inc(delta)
            setattr(self._seen_prefix, name, getattr(cache.stats, name))
        self.prefix_bytes.set(cache.bytes)
        self.prefix_blocks.set(len(cache))

    def observe_locations(self, registered: int, in_slots: list[str], host_ready: list[str]) -> None:
        """Counts per location, and each labelled adapter's own (a retired version, ``name@v``, is not its name)."""
        slots, host = set(in_slots), set(host_ready) - set(in_slots)
        self.adapters_by_location.labels("slot").set(len(slots))
        self.adapters_by_location.labels("host").set(len(host))
        self.adapters_by_location.labels("disk").set(max(0, registered - len(slots) - len(host)))
        for name in self.label.named:
            self.adapter_location.labels(name).set(2 if name in slots else 1 if name in host else 0)

    def observe_first_token(self, label: str, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.adapter_prompt_tokens.labels(label).inc(prompt_tokens)

    def observe_tokens(self, label: str, count: int) -> None:
        self.generation_tokens.inc(count)
        self.adapter_generation_tokens.labels(label).inc(count)

    def observe_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
