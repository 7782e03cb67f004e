"""The ingress's engine side: the routes of ``edgelora serve`` over Ray Serve replicas.

It is the ``Backend`` the FastAPI app (edgelora/server/app.py) runs on, so the ingress has the very
routes, validation, tenants and error shapes of ``edgelora serve``. A request goes to a replica
as a streaming call with its adapter's ``name@version`` as the multiplexed model id (so Ray's
affinity, and each replica's cache, are per version: a replica never answers a request with an
old version); the replica's items are put on the request's queue as the engine loop would put them.

A replica that dies before the request's first token is invisible to the client: the request is
sent again (Ray routes it to a live replica). One that dies after tokens were handed on ends the
request with RequestInterrupted, a 503 the client retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry
from ray.exceptions import RayActorError

from edgelora.entrypoints.ray.hub import Families, Registry
from edgelora.entrypoints.ray.metrics import exposition
from edgelora.entrypoints.ray.replica import ACCEPTED, ReplicaJob
from edgelora.entrypoints.server.engine_loop import AdapterLoad, RequestFailed, RequestInterrupted, RequestStream
from edgelora.errors import UserInputError
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec
from edgelora.runtime.adapter_cache import check_adapter
from edgelora.runtime.scheduler import GenerationRequest, SequenceUpdate

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
START_ATTEMPTS = 6  # sends of one request while replicas die under it
RETRY_BACKOFF_S = 0.5


class ReplicaBackend:
    """Submit/abort/load/unload over a handle to the replica deployment, and the hub."""

    def __init__(self, replicas, hub, adapters: Registry, onnx_dir: Path, max_lora_rank: int):
        self._replicas = replicas
        self._hub = hub
        self._registry: Registry = dict(adapters)  # name -> (processed folder on shared storage, version)
        self._spec = ModelSpec.load(onnx_dir)
        self._manifest = LoraManifest.load(onnx_dir)
        self._max_lora_rank = max_lora_rank
        self._pumps: dict[str, asyncio.Task] = {}
        self._replicas_seen = 1  # optimistic until the first poll: serve.run waited for them
        self._poller: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._replicas_seen > 0

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._poller = loop.create_task(self._poll())

    # -- requests ------------------------------------------------------------------------------
    async def submit(self, request_id: str, request: GenerationRequest, adapter_label: str,
                     arrival_s: float) -> RequestStream:
        if request.lora_mix:
            raise UserInputError("lora_mix is not served with --ray yet (a replica holds the adapters of the "
                                 "requests routed to it, one each); run edgelora serve without --ray to mix adapters")
        folder, version = self._registry.get(request.adapter, (None, None)) if request.adapter is not None \
            else (None, None)
        job = ReplicaJob(request_id, request, adapter_label, folder, version)
        responses = await self._start(job)
        stream = RequestStream(request_id)
        self._pumps[request_id] = asyncio.ensure_future(self._pump(job, stream, responses))
        return stream

    def abort(self, request_id: str) -> None:
        task = self._pumps.get(request_id)
        if task is not None:
            task.cancel()

    async def _start(self, job: ReplicaJob):
        """The replica's stream once it accepted the job; raises what the replica's scheduler refused."""
        handle = self._replicas.options(stream=True, multiplexed_model_id=job.model_id)
        lost: Exception | None = None
        for attempt in range(START_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
            responses = handle.generate.remote(job)
            try:
                first = await responses.__anext__()
            except RayActorError as exc:
                lost = exc
                log.warning("request %s: replica lost before it answered (attempt %d): %s", job.request_id,
                            attempt + 1, type(exc).__name__)
                continue
            except BaseException:
                responses.cancel()
                raise
            if isinstance(first, BaseException):
                raise first
            if first != ACCEPTED:
                raise RequestFailed(f"unexpected first item from a replica: {first!r}")
            return responses
        raise RequestInterrupted(f"no replica could take the request ({type(lost).__name__}); try again")

    async def _pump(self, job: ReplicaJob, stream: RequestStream, responses) -> None:
        """Move the replica's items onto the request's queue; send the job again if its replica dies
        before anything was handed on."""
        delivered = False
        try:
            while True:
                try:
                    async for items in responses:
                        if isinstance(items, BaseException):
                            stream.queue.put_nowait(items if isinstance(items, RequestFailed)
                                                    else RequestFailed(str(items)))
                            return
                        for update in items:
                            stream.queue.put_nowait(update)
                        delivered = True
                        if items and isinstance(items[-1], SequenceUpdate) and items[-1].finished:
                            return
                    stream.queue.put_nowait(RequestFailed("the replica ended the request without finishing it"))
                    return
                except RayActorError as exc:
                    if delivered:
                        stream.queue.put_nowait(RequestInterrupted(
                            f"the replica serving this request was lost ({type(exc).__name__}); send it again"))
                        return
                    log.warning("request %s: replica lost before the first token; sending it again", job.request_id)
                    try:
                        responses = await self._start(job)
                    except RequestFailed as failed:
                        stream.queue.put_nowait(failed)
                        return
                    except Exception as refused:  # the new replica's scheduler refused it (a full queue)
                        stream.queue.put_nowait(RequestInterrupted(str(refused)))
                        return
        except asyncio.CancelledError:
            responses.cancel()  # the replica's generator is cancelled: it aborts the row
            raise
        except Exception as exc:  # a replica's own failure (RayTaskError): the request fails, the ingress goes on
            log.error("request %s failed in its replica: %s", job.request_id, exc)
            stream.queue.put_nowait(RequestFailed(f"the replica failed: {type(exc).__name__}"))
        finally:
            self._pumps.pop(job.request_id, None)

    # -- adapters ------------------------------------------------------------------------------
    async def load_adapter(self, name: str, folder: Path) -> AdapterLoad:
        """Check the processed adapter against the model here and learn its version, then publish it:
        requests from now on carry that version, and replicas load it on first use."""
        checked = await asyncio.to_thread(check_adapter, Path(folder), self._spec, self._manifest,
                                          self._max_lora_rank)
        previous = self._registry.get(name)
        self._registry[name] = (str(folder), checked.version)
        await self._publish()
        return AdapterLoad(checked.version, previous[1] if previous is not None else None)

    async def unload_adapter(self, name: str) -> bool:
        """Gone for new requests now; each replica drops it at its next report, after its rows finish."""
        self._registry.pop(name, None)
        await self._publish()
        return False

    async def _publish(self) -> dict[str, Families]:
        reports = await self._hub.publish.remote(dict(self._registry))
        self._replicas_seen = len(reports)
        return reports

    async def _poll(self) -> None:
        """Publish the registry (a replaced hub gets it back) and learn how many replicas report."""
        while True:
            with contextlib.suppress(Exception):
                await self._publish()
            await asyncio.sleep(POLL_INTERVAL_S)

    async def render_metrics(self, ingress: CollectorRegistry) -> bytes:
        reports = await self._hub.reports.remote()
        return exposition(reports, ingress)
