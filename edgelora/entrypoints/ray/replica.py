"""One replica: the engine thread ``edgelora serve`` runs (``EngineLoop``, its Scheduler, its adapter cache).

Requests arrive with their adapter's ``name@version`` as Ray's multiplexed model id, so Ray's
router sends them to a replica that already holds that version. ``@serve.multiplexed`` is mapped
onto the adapter cache:

* Ray's loader (a miss) registers that version from its folder (its bytes checked against the
  version the ingress computed) and keeps it in the host cache, and counts one load
  (``edgelora_replica_adapter_loads``); a new version of a name replaces the old one for new
  requests while rows on the old one finish;
* Ray's LRU eviction (past ``max_num_models_per_replica`` = the replica's ``max_cpu_loras``)
  unloads it from the engine; rows still decoding with it finish first;
* a request whose version was dropped between Ray's check and the engine (an eviction, an unload)
  has it registered again in the same engine-thread command as the request itself.

There is no ``@serve.batch``: Ray would split batches by model id, and the point of the
scheduler is that rows of different adapters share every decode step.

The stream a caller gets: first ``ACCEPTED`` or the exception ``add_request`` raised, then lists of
SequenceUpdates (whatever queued up since the last item), or a RequestFailed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from edgelora.entrypoints.ray.hub import Registry
from edgelora.entrypoints.ray.metrics import adapter_load_metrics, families_of
from edgelora.entrypoints.server.engine_loop import EngineLoop, EngineSettings, RequestFailed
from edgelora.entrypoints.server.metrics import ServerMetrics
from edgelora.errors import EdgeLoraError, RuntimeFailure
from edgelora.runtime.scheduler import GenerationRequest

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
REPORT_INTERVAL_S = 1.0


@dataclass
class ReplicaJob:
    """One request as the ingress hands it over (the adapter's folder rides along: lazy loading)."""

    request_id: str
    generation: GenerationRequest
    adapter_label: str
    adapter_folder: str | None = None
    adapter_version: str | None = None  # the digest the ingress computed: the replica serves exactly it

    @property
    def model_id(self) -> str:
        """Ray's multiplexed model id: ``name@version`` ('' for the base model)."""
        return model_id(self.generation.adapter, self.adapter_version) if self.generation.adapter else ""


def model_id(name: str, version: str | None) -> str:
    return f"{name}@{version}" if version else name


def split_model_id(value: str) -> tuple[str, str | None]:
    """(name, version) of a multiplexed model id (the version never holds '@'; a name may)."""
    name, at, version = value.rpartition("@")
    return (name, version) if at else (value, None)


class _Lease:
    """What Ray's multiplexer caches per adapter; its ``__del__`` (Ray's eviction hook) releases it once."""

    def __init__(self, release):
        self._release = release

    def __del__(self):
        release = self.__dict__.pop("_release", None)
        if release is not None:
            release()


@serve.deployment(name="EdgeLoraReplica", health_check_period_s=5)
class EdgeLoraReplica:
    """An edgelora engine as a Ray Serve replica."""

    async def __init__(self, settings: EngineSettings, hub):
        """``settings.adapters`` stays empty: every adapter comes lazily, through the multiplexed loader."""
        self._hub = hub
        self._metrics = ServerMetrics(settings.adapter_labels)
        self._loads, self._read_seconds = adapter_load_metrics(self._metrics.registry)
        self._engine = EngineLoop(settings, self._metrics)
        self._info = await asyncio.to_thread(self._engine.start)
        self._engine.bind_loop(asyncio.get_running_loop())
        self._id = serve.get_replica_context().replica_id.unique_id
        self._held: dict[str, tuple[Path, float]] = {}  # model id (name@version) -> folder, when loaded
        self._wanted: dict[str, Path] = {}  # model id -> the folder the request now loading it brought
        self._report_now = asyncio.Event()
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=settings.engine.host_loras)(self._loader())
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        log.info("replica %s ready (%d adapters registered)", self._id, len(self._held))

    def info(self) -> dict:
        return {"replica": self._id, "max_model_len": self._info.max_model_len}

    def check_health(self) -> None:
        """Serve's health probe: a dead engine thread means a replacement replica."""
        if not self._engine.alive:
            raise RuntimeFailure("the engine thread has stopped")

    async def generate(self, job: ReplicaJob) -> AsyncIterator:
        name, folder = job.generation.adapter, Path(job.adapter_folder) if job.adapter_folder else None
        try:
            if name is not None and folder is not None:
                self._wanted[job.model_id] = folder
                await self._multiplexed(job.model_id)  # Ray's cache: the loader on a miss, an LRU touch on a hit
            stream = await self._engine.submit(job.request_id, job.generation, job.adapter_label,
                                               time.perf_counter(), folder, job.adapter_version)
        except EdgeLoraError as exc:
            yield exc
            return
        if stream.loaded_adapter:  # evicted between Ray's cache and the engine: read again, and counted
            self._loaded(job.model_id, folder)
        yield ACCEPTED
        finished = False
        try:
            while not finished:
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                failure = next((item for item in items if isinstance(item, RequestFailed)), None)
                if failure is not None:
                    finished = True
                    yield failure
                    return
                finished = items[-1].finished
                yield items
        finally:
            if not finished:  # the caller went away (or Ray cancelled the call): free the row
                self._engine.abort(job.request_id)

    # -- adapters ------------------------------------------------------------------------------
    def _loader(self):
        """The function ``@serve.multiplexed`` wraps (a plain function: the limit is this replica's)."""

        async def load_adapter(model: str) -> _Lease:
            folder = self._wanted[model]
            name, version = split_model_id(model)
            started = time.perf_counter()
            await self._engine.load_adapter(name, folder, read=True, version=version)
            self._read_seconds.observe(time.perf_counter() - started)
            self._loaded(model, folder)
            return _Lease(lambda: self._release(model))

        return load_adapter

    def _loaded(self, model: str, folder: Path) -> None:
        self._held[model] = (folder, time.monotonic())
        self._loads.inc()
        self._report_now.set()

    def _release(self, model: str) -> None:
        """Ray evicted the version (this may run in Ray's executor thread: only thread-safe calls)."""
        self._held.pop(model, None)
        self._wanted.pop(model, None)
        self._engine.release_adapter(*split_model_id(model))

    def _drop_unregistered(self, registry: Registry, asked_at: float) -> None:
        """Versions unloaded or replaced at the ingress leave this replica too (once their rows finish)."""
        current = {model_id(name, version) for name, (_, version) in registry.items()}
        for model, (_, loaded_at) in list(self._held.items()):
            if model not in current and loaded_at < asked_at:
                self._release(model)

    async def _report_loop(self) -> None:
        warned = False
        while True:
            asked_at = time.monotonic()
            try:
                registry = await self._hub.report.remote(self._id, families_of(self._metrics.registry))
                self._drop_unregistered(registry, asked_at)
                warned = False
            except Exception as exc:  # the hub is being replaced: report again next round
                if not warned:
                    log.warning("replica %s could not report to the hub: %s", self._id, exc)
                    warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_now.wait(), REPORT_INTERVAL_S)
            self._report_now.clear()

    def __del__(self):
        engine = self.__dict__.get("_engine")
        if engine is not None:
            engine.stop()
