"""Prometheus metrics of one server, in a registry of its own (no process-global state).

The engine thread updates them after each step; ``/metrics`` renders the registry. Adapter cache
counters come from ``AdapterCache.stats`` as deltas since the last step, so the prometheus counters
stay monotonic and the cache object is only read on the engine thread.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgelora.runtime.adapter_cache import CacheStats
from edgelora.runtime.scheduler import StepStats

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
CACHE_COUNTERS = ("slot_hits", "slot_misses", "slot_evictions", "host_hits", "host_misses", "host_evictions")


class ServerMetrics:
    """Every metric ``edgelora serve`` exposes."""

    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry
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
        self._seen_cache = CacheStats()
        self._seen_loads = 0

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

    def observe_cache(self, stats: CacheStats, registered: int) -> None:
        """Advance the cache counters by what changed since the last call (engine thread only)."""
        for name in CACHE_COUNTERS:
            delta = getattr(stats, name) - getattr(self._seen_cache, name)
            if delta > 0:
                self.cache[name].inc(delta)
            setattr(self._seen_cache, name, getattr(stats, name))
        new_loads = min(stats.loads - self._seen_loads, len(stats.recent_load_s))
        for seconds in list(stats.recent_load_s)[len(stats.recent_load_s) - new_loads:]:
            self.adapter_load_seconds.observe(seconds)
        self._seen_loads = stats.loads
        self.adapters.set(registered)

    def observe_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
