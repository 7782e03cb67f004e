"""One ``/metrics`` page for the whole application: every replica's families, labelled ``replica``.

Replicas send their registry as plain tuples (``families_of``); the ingress merges them, and its
own request counter (requests refused before any replica saw them) under ``replica="ingress"``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from edgelora.entrypoints.ray.hub import Families
from edgelora.entrypoints.server.metrics import LATENCY_BUCKETS_S

REPLICA_LABEL = "replica"
INGRESS_FAMILIES = ("edgelora_requests", "edgelora_adapter_on_demand_loads")  # the ingress counts these; the rest is the replicas'


def families_of(registry: CollectorRegistry, only: tuple[str, ...] | None = None) -> Families:
    """A registry's current families as picklable tuples (``only``: these family names)."""
    families = []
    for family in registry.collect():
        if only is not None and family.name not in only:
            continue
        samples = [(sample.name, dict(sample.labels), float(sample.value)) for sample in family.samples]
        families.append((family.name, family.documentation, family.type, samples))
    return families


class _Merged:
    """A collector over reports taken at one moment (prometheus_client renders it)."""

    def __init__(self, reports: dict[str, Families]):
        self._reports = reports

    def collect(self):
        merged: dict[str, Metric] = {}
        for replica, families in self._reports.items():
            for name, documentation, kind, samples in families:
                metric = merged.get(name)
                if metric is None:
                    metric = merged[name] = Metric(name, documentation, kind)
                for sample_name, labels, value in samples:
                    metric.add_sample(sample_name, {REPLICA_LABEL: replica, **labels}, value)
        replicas = Metric("edgelora_replicas", "Replicas that reported within the last few seconds", "gauge")
        replicas.add_sample("edgelora_replicas", {}, float(sum(1 for r in self._reports if r != "ingress")))
        yield replicas
        yield from merged.values()


def exposition(reports: dict[str, Families], ingress: CollectorRegistry) -> bytes:
    """The text format of every replica's report plus the ingress's own counters."""
    everything = dict(reports)
    everything["ingress"] = families_of(ingress, INGRESS_FAMILIES)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(everything))
    return generate_latest(registry)


def adapter_load_metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    """Counted where a replica reads an adapter from storage (its multiplexed loader), and how long that took."""
    loads = Counter("edgelora_replica_adapter_loads", "Adapters this replica read from storage (Ray's multiplexed "
                    "loader, or a request that found its adapter evicted)", registry=registry)
    seconds = Histogram("edgelora_replica_adapter_read_seconds", "Time of the multiplexed loader: register the "
                        "adapter and read it from storage into the host cache", buckets=LATENCY_BUCKETS_S,
                        registry=registry)
    return loads, seconds
