"""A real ``edgelora serve`` process on a free loopback port, for tests: start, wait for /health, stop."""

from __future__ import annotations

import httpx

from edgelora.tools import serve_process
from edgelora.tools.serve_process import free_port

__all__ = ["free_port", "metric", "running_server"]

STARTUP_TIMEOUT_S = 120.0


def running_server(*args: str, timeout_s: float = STARTUP_TIMEOUT_S, **where):
    """The library's own launcher (edgelora/serve_process.py), with the tests' startup timeout."""
    return serve_process.running_server(*args, timeout_s=timeout_s, **where)


def metric(url: str, name: str, api_key: str | None = None) -> float:
    """One sample of /metrics (summed over its labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    total, seen = 0.0, False
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
                seen = True
    if not seen:
        raise AssertionError(f"/metrics has no {name}")
    return total
