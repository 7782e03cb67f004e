"""The small actor every other deployment talks to: which adapters exist, and each replica's metrics.

A deployment handle cannot reach one chosen replica, so nothing can ask "replica 2, your figures"
or tell every replica "adapter x is gone". Instead each replica reports to the hub once a second
(its metric families) and gets back the adapter registry; the ingress publishes the registry
(startup ``--lora-modules`` plus run-time loads) and reads the reports for ``/metrics`` and
``/health``. One replica of it, and it holds no model: losing it costs at most one report round
(the ingress publishes the registry again on its next poll).
"""

from __future__ import annotations

import time

from ray import serve

# A replica whose last report is older than this is gone (killed, or being replaced).
STALE_AFTER_S = 5.0

# The adapter registry: name -> (processed folder on shared storage, version = digest of its bytes).
Registry = dict[str, tuple[str, str]]

# Metric families as plain tuples: (name, documentation, type, [(sample name, labels, value), ...]).
Families = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]


# No access log: every replica reports once a second.
@serve.deployment(name="EdgeLoraHub", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
class AdapterHub:
    """Adapter registry (name -> folder and version) and the replicas' latest reports."""

    def __init__(self, adapters: Registry):
        self._adapters = dict(adapters)
        self._reports: dict[str, tuple[float, Families]] = {}

    def publish(self, adapters: Registry) -> dict[str, Families]:
        """The ingress's registry replaces ours; returns the live replicas' reports."""
        self._adapters = dict(adapters)
        return self.reports()

    def adapters(self) -> Registry:
        return dict(self._adapters)

    def report(self, replica: str, families: Families) -> Registry:
        """A replica's metrics; it gets the registry back (to drop adapters that were unloaded or replaced)."""
        self._reports[replica] = (time.monotonic(), families)
        return dict(self._adapters)

    def reports(self) -> dict[str, Families]:
        """Reports of replicas heard from within ``STALE_AFTER_S``, by replica id."""
        now = time.monotonic()
        for replica in [r for r, (seen, _) in self._reports.items() if now - seen > STALE_AFTER_S]:
            del self._reports[replica]
        return {replica: families for replica, (_, families) in sorted(self._reports.items())}
