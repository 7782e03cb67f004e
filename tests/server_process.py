"""A real ``edgelora serve`` process on a free loopback port, for tests: start, wait for /health, stop."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base url, process) once /health answers 200; terminate (then kill) it on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "edgelora", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty server never blocks on a full pipe
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            yield _wait_healthy(f"http://127.0.0.1:{port}", process, log, timeout_s), process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited with {process.returncode}: {log.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not answer /health within {timeout_s} s")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


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
