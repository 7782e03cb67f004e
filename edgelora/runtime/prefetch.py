"""Adapter reads off the step thread: a waiting request's adapter is read while the batch decodes.

Activating an adapter that is neither in a slot nor host-ready reads its file, checks its bytes and
lays it out: tens of milliseconds to seconds that every running row would wait for if the step
thread did it. The scheduler asks the prefetcher instead; a worker thread runs the cache's
``read_job`` (no cache state touched), and at the next step the scheduler installs the finished
copies into the host cache on its own thread. Until its copy is in, the waiting request is passed
over, so decoding rows never wait for a load.
"""

from __future__ import annotations

import concurrent.futures
import logging

from edgelora.runtime.adapter_cache import AdapterCache, AdapterRef

log = logging.getLogger(__name__)

WAIT_S = 0.05  # how long an idle step waits for a read to finish before it returns


class Prefetcher:
    """Reads adapter files on one worker thread; at most ``limit`` reads in flight."""

    def __init__(self, adapters: AdapterCache, limit: int):
        self._adapters = adapters
        self._limit = max(1, limit)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # made on the first read
        self._pending: dict[AdapterRef, concurrent.futures.Future] = {}
        self._failed: dict[AdapterRef, str] = {}

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def loading(self, ref: AdapterRef) -> bool:
        return ref in self._pending

    def request(self, ref: AdapterRef) -> bool:
        """Start reading ``ref`` unless it is read already or too many are; True while it is being read."""
        if ref in self._pending:
            return True
        if len(self._pending) >= self._limit:
            return False
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgelora-prefetch")
        self._pending[ref] = self._pool.submit(self._adapters.read_job(ref))
        return True

    def collect(self) -> None:
        """Install the copies read since the last call (the caller's thread owns the cache)."""
        for ref, future in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[ref]
            try:
                self._adapters.install_host_copy(ref, future.result())
            except Exception as exc:  # the request that needs it fails with this, once
                log.warning("adapter %s: prefetch failed: %s", ref, exc)
                self._failed[ref] = str(exc)

    def take_failure(self, ref: AdapterRef) -> str | None:
        """Why the last read of ``ref`` failed (then forgotten: a later request tries again)."""
        return self._failed.pop(ref, None)

    def wait(self, timeout_s: float = WAIT_S) -> None:
        """Block until a read finishes or ``timeout_s`` passes (an idle step, instead of spinning)."""
        if self._pending:
            concurrent.futures.wait(list(self._pending.values()), timeout=timeout_s,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
