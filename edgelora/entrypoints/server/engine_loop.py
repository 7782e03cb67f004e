"""The engine thread: the only thread that touches the engine, its adapter cache and the scheduler.

::

    event loop (HTTP)                       engine thread
    ─────────────────                       ─────────────
    submit / abort / load / unload ──────>  command queue ──> scheduler.add_request / abort / adapters
                                                 │ (blocks here when no request is unfinished)
                                                 ▼
    RequestStream.queue  <── call_soon_threadsafe ── scheduler.step() ──> SequenceUpdates
                                                 │
                                                 └─> metrics

Commands that answer (submit, load, unload) carry a ``concurrent.futures.Future`` the event loop
awaits; updates reach each request's ``asyncio.Queue`` in one ``call_soon_threadsafe`` per step.
Adapter versions live in the adapter cache: a load of new files under a known name serves every
request submitted after it, an unload hides the name at once, and the bytes that running rows
still hold are freed by the cache when the last of them ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.entrypoints.server.metrics import ServerMetrics
from edgelora.errors import EdgeLoraError, RuntimeFailure, UserInputError
from edgelora.runtime.adapter_cache import AdapterRef
from edgelora.runtime.config import ADAPTER_LABELS, EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.scheduler import GenerationRequest, Scheduler, SequenceUpdate
from edgelora.runtime.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineSettings:
    """What the engine thread builds before it serves."""

    onnx_dir: Path
    engine: EngineConfig
    scheduler: SchedulerConfig
    adapters: dict[str, Path] = field(default_factory=dict)  # processed folders registered at start
    adapter_labels: int = ADAPTER_LABELS  # adapters with metric series of their own


@dataclass
class AdapterLoad:
    """What a load did: the version now current, and the one it replaced (None: a new name)."""

    version: str
    previous: str | None = None
    previous_running: bool = True  # requests still hold the previous version (they finish on it)


@dataclass
class EngineInfo:
    """What the HTTP side needs to know once the engine is up."""

    max_model_len: int
    adapters: list[str]


class UnknownAdapter(UserInputError):
    """The request names an adapter that is gone (unloaded meanwhile): a 404, as if it never existed."""


class RequestFailed(EdgeLoraError):
    """The engine could not finish a request it had accepted (a failed step, an adapter it could not load)."""


class RequestInterrupted(RequestFailed):
    """The process serving the request went away mid-answer (a Ray replica died): the same request,
    sent again, succeeds elsewhere, so the client gets a 503 it retries, not a 500."""


@dataclass
class RequestStream:
    """The event loop's end of one request: its updates (or a RequestFailed) arrive on ``queue``."""

    request_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    loaded_adapter: bool = False  # submit registered the adapter from ``adapter_folder`` (it was not there)


@dataclass
class _Live:
    """The engine thread's record of an accepted request (timing for the latency histograms)."""

    stream: RequestStream
    adapter_label: str
    arrival_s: float
    last_token_s: float | None = None


_STOP = object()


class EngineLoop:
    """Owns the engine thread. ``start`` and ``stop`` are for the main thread; the other methods run
    on the event loop and never block it."""

    def __init__(self, settings: EngineSettings, metrics: ServerMetrics):
        self._settings = settings
        self._metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="edgelora-engine", daemon=True)
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        # engine-thread state
        self._engine: Engine | None = None
        self._scheduler: Scheduler | None = None
        self._live: dict[str, _Live] = {}
        self._failed: BaseException | None = None

    # -- lifecycle (main thread) ----------------------------------------------------------------
    def start(self) -> EngineInfo:
        """Start the thread and wait until the model is loaded; re-raise what stopped it."""
        self._thread.start()
        return self._ready.result()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that receives updates (set at app startup)."""
        self._loop = loop

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to finish its current step and end; requests still in flight get an error."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._failed is None

    # -- commands (event loop) ------------------------------------------------------------------
    async def submit(self, request_id: str, request: GenerationRequest, adapter_label: str,
                     arrival_s: float, adapter_folder: Path | None = None,
                     adapter_version: str | None = None) -> RequestStream:
        """Queue a request; raises what ``add_request`` raises (UserInputError, QueueFull).

        With ``adapter_folder`` and ``adapter_version`` (a Ray replica), an adapter that is not
        registered here at that version is registered from that folder in the same engine-thread
        step, so no eviction can come between the check and the request (``stream.loaded_adapter``
        says so), and the request runs on exactly the version the ingress checked.
        """
        stream = RequestStream(request_id)
        await self._call(self._do_submit, stream, request, adapter_label, arrival_s, adapter_folder, adapter_version)
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (a no-op when it has finished); its row and adapter reference are released."""
        self._commands.put((self._do_abort, (request_id,), None))

    async def load_adapter(self, name: str, folder: Path, read: bool = False, version: str | None = None
                           ) -> AdapterLoad:
        """Register an adapter, or a new version of a known name (requests submitted from now on get it).

        ``read`` also keeps it in the host cache; ``version`` refuses files whose bytes are not that version.
        """
        return await self._call(self._do_load, name, folder, read, version)

    async def unload_adapter(self, name: str) -> bool:
        """Gone for new requests now; its memory is freed once the requests using it finish (True: at once)."""
        return await self._call(self._do_unload, name)

    def release_adapter(self, name: str, version: str | None = None) -> None:
        """``unload_adapter`` without an answer, from any thread; a no-op for an adapter that is not here
        (or, with ``version``, whose current version is another one)."""
        self._commands.put((self._do_release, (name, version), None))

    async def _call(self, method: Callable, *args):
        if not self.alive:
            raise RuntimeFailure("the engine thread has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((method, args, future))
        return await asyncio.wrap_future(future)

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            info = self._build()
        except BaseException as exc:  # handed to start(), which re-raises it in the main thread
            self._failed = exc
            self._ready.set_exception(exc)
            return
        self._ready.set_result(info)
        try:
            while self._serve_once():
                pass
        except BaseException as exc:  # a defect: say so, and fail what waits instead of hanging it
            self._failed = exc
            log.exception("the engine thread stopped")
        finally:
            self._close()

    def _serve_once(self) -> bool:
        """Commands, then one step if any request is unfinished; False once asked to stop."""
        scheduler = self._scheduler
        idle = not scheduler.has_unfinished_requests()
        started = time.perf_counter()
        if not self._run_commands(block=idle):
            return False
        if idle:
            started = time.perf_counter()  # waiting for work is not the scheduler's time
        stepped = scheduler.has_unfinished_requests()
        if stepped:
            self._step()
        self._metrics.observe_queue(scheduler.num_running, scheduler.num_waiting)
        adapters = self._engine.adapters
        self._metrics.observe_cache(adapters.stats, len(adapters.names()),
                                    lambda: (list(adapters.slot_table().values()), adapters.host_ready()))
        self._metrics.observe_prefix(scheduler.prefix)
        if stepped:
            self._metrics.observe_step(scheduler.last_step, time.perf_counter() - started)
        return True

    def _close(self) -> None:
        """Requests still in flight (the shutdown timeout ran out, or a defect) get an error, not silence."""
        failure = RequestFailed("the server is shutting down" if self._failed is None else
                                f"the engine stopped: {self._failed}")
        self._deliver([(live.stream, failure) for live in self._live.values()])
        self._live.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is not _STOP and command[2] is not None:
                command[2].set_exception(RuntimeFailure("the engine thread has stopped"))

    def _build(self) -> EngineInfo:
        settings = self._settings
        engine = Engine(settings.onnx_dir, settings.engine)
        tokenizer = ChatTokenizer(settings.onnx_dir)  # the scheduler's own: detokenizing happens on this thread
        for name, folder in settings.adapters.items():
            try:
                engine.adapters.add(name, folder)
            except UserInputError as exc:
                raise type(exc)(f"--lora-modules {name}: {exc}") from exc
        self._engine = engine
        self._scheduler = Scheduler(engine, settings.scheduler, tokenizer)
        return EngineInfo(self._scheduler.max_model_len, engine.adapters.names())

    def _run_commands(self, block: bool) -> bool:
        """Run queued commands (waiting for one if ``block``); False once asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                return False
            method, args, future = command
            if future is None:
                method(*args)
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(method(*args))
                except Exception as exc:  # the caller gets it; the thread goes on
                    future.set_exception(exc)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _do_submit(self, stream: RequestStream, request: GenerationRequest, adapter_label: str,
                   arrival_s: float, adapter_folder: Path | None, adapter_version: str | None) -> None:
        name = request.adapter
        adapters = self._engine.adapters
        if name is not None and adapter_folder is not None:
            current = adapters.current(name)
            if current is None or (adapter_version is not None and current.version != adapter_version):
                # a version rows still hold comes back without a read
                stream.loaded_adapter = adapter_version is None or not adapters.in_memory(
                    AdapterRef(name, adapter_version))
                self._do_load(name, adapter_folder, version=adapter_version)
        elif name is not None and name not in adapters:
            raise UnknownAdapter(f"The model `{name}` does not exist.")
        for member, _ in request.lora_mix or ():
            if member not in adapters:
                raise UnknownAdapter(f"lora_mix: the adapter `{member}` does not exist.")
        self._scheduler.add_request(stream.request_id, request, "request")
        self._live[stream.request_id] = _Live(stream, adapter_label, arrival_s)

    def _do_abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._scheduler.abort_request(request_id)

    def _do_load(self, name: str, folder: Path, read: bool = False, version: str | None = None) -> AdapterLoad:
        adapters = self._engine.adapters
        previous = adapters.current(name)
        entry = adapters.add(name, folder, version=version, read=read)
        if previous is None:
            return AdapterLoad(entry.version)
        return AdapterLoad(entry.version, previous.version, previous in adapters.versions())

    def _do_unload(self, name: str) -> bool:
        if name not in self._engine.adapters:
            raise UnknownAdapter(f"the adapter {name!r} is not loaded")
        removed = self._engine.adapters.remove(name)
        log.info("adapter %s unloaded%s", name, "" if removed else " (freed once its running requests finish)")
        return removed

    def _do_release(self, name: str, version: str | None) -> None:
        current = self._engine.adapters.current(name)
        if current is not None and (version is None or current.version == version):
            self._do_unload(name)

    def _step(self) -> None:
        try:
            updates = self._scheduler.step()
        except Exception as exc:  # the engine thread outlives a failed step
            log.exception("a scheduler step failed")
            failure = RequestFailed(f"the engine failed: {exc}")
            self._deliver([(live.stream, failure) for live in self._live.values()])
            for request_id in self._live:
                self._scheduler.abort_request(request_id)
            self._live.clear()
            return
        now = time.perf_counter()
        metrics = self._metrics
        deliveries: list[tuple[RequestStream, SequenceUpdate | RequestFailed]] = []
        for update in updates:
            live = self._live.get(update.request_id)
            if live is None:
                continue
            if update.new_token_ids:
                if live.last_token_s is None:
                    metrics.time_to_first_token.observe(now - live.arrival_s)
                    metrics.observe_first_token(live.adapter_label, update.prompt_tokens)
                else:
                    metrics.inter_token_latency.observe(now - live.last_token_s)
                live.last_token_s = now
                metrics.observe_tokens(live.adapter_label, len(update.new_token_ids))
            if update.finish_reason == "error":
                deliveries.append((live.stream, RequestFailed(update.error or "the request failed")))
            else:
                deliveries.append((live.stream, update))
            if update.finished:
                metrics.requests.labels(live.adapter_label, update.finish_reason or "stop").inc()
                del self._live[update.request_id]
        self._deliver(deliveries)

    def _deliver(self, deliveries: list[tuple[RequestStream, SequenceUpdate | RequestFailed]]) -> None:
        if not deliveries or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop has closed (shutdown): nobody listens
            self._loop.call_soon_threadsafe(_put_all, deliveries)


def _put_all(deliveries: list[tuple[RequestStream, SequenceUpdate | RequestFailed]]) -> None:
    for stream, item in deliveries:
        stream.queue.put_nowait(item)
