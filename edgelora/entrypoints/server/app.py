"""The HTTP side of ``edgelora serve``: FastAPI routes in OpenAI's (and vLLM's) shapes.

Every route runs on the event loop and never waits on the model: requests go to the engine
thread (``EngineLoop``) and their tokens come back on per-request queues; tokenizing and adapter
processing run in worker threads. Errors leave as ``{"error": {...}}`` with OpenAI's status codes.
"""

import asyncio
import heapq
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgelora.entrypoints.server.adapters import AdapterSources, ForbiddenPath, folder_bytes, on_demand_name
from edgelora.entrypoints.server.engine_loop import (
    AdapterLoad,
    RequestFailed,
    RequestInterrupted,
    RequestStream,
    UnknownAdapter,
)
from edgelora.entrypoints.server.logprobs import chat_logprobs, completion_logprobs
from edgelora.entrypoints.server.metrics import CONTENT_TYPE, ServerMetrics
from edgelora.entrypoints.server.protocol import (
    SSE_DONE,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    UnloadLoraRequest,
    Usage,
    refused_fields,
    refused_message_fields,
    sse,
)
from edgelora.entrypoints.server.tenants import Tenant, Tenants
from edgelora.entrypoints.server.tools import call_grammar, check_tools, forced_functions, parse_calls, tool_format
from edgelora.errors import EdgeLoraError, UserInputError
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.lora_mix import MIX_LABEL, LoraMix, check_mix, duplicate_mix_names
from edgelora.runtime.output import TokenLogprob
from edgelora.runtime.scheduler import GenerationRequest, QueueFull, SequenceUpdate
from edgelora.runtime.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

UPDATES_FLAG = "--enable-lora-updates"
MODELS_PAGE_MAX = 1000  # /v1/models?limit= at most this many cards a page


class Backend(Protocol):
    """What the routes need of the engine side: ``EngineLoop`` (one process) or edgelora.entrypoints.ray's replicas.

    ``submit`` raises what the scheduler's ``add_request`` raises (UserInputError, QueueFull,
    UnknownAdapter); the stream then carries SequenceUpdates, or a RequestFailed.
    """

    @property
    def alive(self) -> bool: ...

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None: ...

    async def submit(self, request_id: str, request: GenerationRequest, adapter_label: str,
                     arrival_s: float) -> RequestStream: ...

    def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, name: str, folder) -> AdapterLoad: ...

    async def unload_adapter(self, name: str) -> bool: ...


@dataclass
class AppState:
    """Everything the routes share; mutated only on the event loop."""

    served_name: str
    engine: Backend
    tenants: Tenants
    metrics: ServerMetrics
    sources: AdapterSources
    tokenizer: ChatTokenizer  # the HTTP side's own (the engine thread detokenizes with another)
    max_model_len: int
    enable_lora_updates: bool = False
    adapters: set[str] = field(default_factory=set)  # names requests may use
    loading: set[str] = field(default_factory=set)  # names being loaded right now
    in_flight: dict[str, int] = field(default_factory=dict)  # tenant label -> running + waiting requests
    created: int = field(default_factory=lambda: int(time.time()))
    # /metrics' body; None: this process's own registry (edgelora.entrypoints.ray merges every replica's)
    render_metrics: Callable[[], Awaitable[bytes]] | None = None
    max_loras: int = EngineConfig.max_loras  # adapters one step may use: the most a lora_mix may name
    on_demand: bool = False  # a request's model naming a folder under the root loads it (--lora-on-demand)
    cache_max_bytes: int | None = None  # processed copies of on-demand PEFT adapters kept at most (LRU)
    demand: dict[str, asyncio.Future] = field(default_factory=dict)  # on-demand loads in flight, by name
    demand_used: OrderedDict[str, Path] = field(default_factory=OrderedDict)  # on-demand name -> folder, LRU first
    max_num_seqs: int = SchedulerConfig.max_num_seqs  # rows a step runs: the most choices (n) a request may ask
    share_base_prefixes: bool = False  # --prefix-cache-share-base: base prompts' cached KV shared across tenants


def _adapter_page(state: AppState, tenant: Tenant, loaded: list[str], after: str | None,
                  limit: int | None) -> list[str]:
    """Adapter names past ``after`` that ``tenant`` may use, sorted: ``loaded`` merged with the root's
    folders (on demand); at most ``limit`` + 1, so the caller knows whether more follow. Folders are
    checked (a stat of their config) only as far as the page reaches."""
    from_root = state.sources.root_names(after) if state.on_demand else []
    found: list[str] = []
    previous = None
    for name in heapq.merge(loaded, from_root):
        if name == previous or name == state.served_name:
            continue
        previous = name
        if not tenant.may_use(name):
            continue
        if name not in state.adapters and not state.sources.is_adapter_folder(name):
            continue
        found.append(name)
        if limit is not None and len(found) > limit:
            break
    return found


@dataclass
class _Result:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, update: SequenceUpdate) -> None:
        self.text.append(update.new_text)
        self.token_ids += update.new_token_ids
        self.finish_reason = update.finish_reason
        self.prompt_tokens = update.prompt_tokens
        self.completion_tokens = update.completion_tokens
        self.logprobs += update.logprobs or []
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs

    @property
    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)


@dataclass
class _Kept:
    """What a choice returns of its generated tokens (none with max_tokens 0: echo only)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]

    @classmethod
    def of(cls, result: _Result, drop: bool) -> "_Kept":
        return cls("", [], []) if drop else cls("".join(result.text), result.token_ids, result.logprobs)


class _Ticket:
    """One accepted request: on close (finished, failed or the client gone) abort it if it still runs
    and give the tenant its slot back. Closing twice is harmless."""

    def __init__(self, state: AppState, tenant: Tenant, stream: RequestStream):
        self.state, self.tenant, self.stream = state, tenant, stream
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.stream.finished:
            self.state.engine.abort(self.stream.request_id)
        _release(self.state, self.tenant)


class _EventStream(StreamingResponse):
    """Server-sent events that close their ticket however the stream ends (a disconnect cancels it)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _json(model: BaseModel) -> JSONResponse:
    """Dumped by pydantic itself, so fields marked exclude_if (vLLM's token ids) stay out when unset."""
    return JSONResponse(model.model_dump(mode="json"))


def _release(state: AppState, tenant: Tenant) -> None:
    count = state.in_flight.get(tenant.label, 0) - 1
    if count > 0:
        state.in_flight[tenant.label] = count
    else:
        state.in_flight.pop(tenant.label, None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """OpenAI-style message and param from pydantic's errors (the first few)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON{': ' + str(detail) if detail else ''}", None
    parts, param = [], None
    for error in errors[:3]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        param = param or location or None
        message = "field required" if error.get("type") == "missing" else str(error.get("msg", "invalid"))
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts), param


def _stream_error(exc: RequestFailed) -> ApiError:
    """The error event of a stream the engine could not finish (503 when sending it again would work)."""
    if isinstance(exc, RequestInterrupted):
        return ApiError(503, str(exc), code="replica_lost")
    return ApiError(500, str(exc))


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _merged(tickets: list[_Ticket]) -> AsyncIterator[tuple[int, SequenceUpdate]]:
    """Every choice's updates as they come, with the choice's index; RequestFailed if one could not finish."""
    if len(tickets) == 1:
        async for update in _updates(tickets[0].stream):
            yield 0, update
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, ticket: _Ticket) -> None:
        try:
            async for update in _updates(ticket.stream):
                await queue.put((index, update))
        except RequestFailed as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(index, ticket)) for index, ticket in enumerate(tickets)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, RequestFailed):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _updates(stream: RequestStream) -> AsyncIterator[SequenceUpdate]:
    """A request's updates until its last; RequestFailed if the engine could not finish it."""
    while True:
        item = await stream.queue.get()
        if isinstance(item, RequestFailed):
            stream.finished = True
            raise item
        if item.finished:
            stream.finished = True
        yield item
        if item.finished:
            return


def create_app(state: AppState) -> FastAPI:
    """The FastAPI app over a started engine loop."""
    tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="edgelora-tokenize")
    adapter_pool = ThreadPoolExecutor(1, thread_name_prefix="edgelora-adapters")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.bind_loop(asyncio.get_running_loop())
        yield
        tokenize_pool.shutdown(wait=False, cancel_futures=True)
        adapter_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="edgelora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # -- errors: always OpenAI's shape -----------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(ApiError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(EdgeLoraError)
    async def _ours(request: Request, exc: EdgeLoraError) -> JSONResponse:
        if isinstance(exc, ForbiddenPath):
            error = ApiError(403, str(exc), "lora_path")
        elif isinstance(exc, QueueFull):
            error = ApiError(503, str(exc), code="queue_full")
        elif isinstance(exc, RequestInterrupted):
            error = _stream_error(exc)
        elif isinstance(exc, UnknownAdapter):
            error = ApiError(404, str(exc), "model", "model_not_found")
        elif isinstance(exc, UserInputError):
            error = ApiError(400, str(exc))
        else:
            log.error("request failed: %s", exc)
            error = ApiError(500, str(exc))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def _defect(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback; the client still gets OpenAI's shape, and the server goes on.
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    # -- shared pieces ---------------------------------------------------------------------------
    async def tenant_of(request: Request) -> Tenant:
        tenant = state.tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")
        return tenant

    TenantOf = Annotated[Tenant, Depends(tenant_of)]  # FastAPI resolves the key per request

    def require_admin(tenant: Tenant) -> None:
        if not tenant.admin:
            raise ApiError(403, "this API key may not manage adapters (needs \"admin\": true)")

    def require_updates() -> None:
        if not state.enable_lora_updates:
            raise ApiError(404, f"loading and unloading adapters at run time is off; start the server with "
                                f"{UPDATES_FLAG} (and --lora-root)", code="lora_updates_disabled")

    def check_fields(body: SamplingFields) -> None:
        """400 for a field that would change the answer and is not implemented, or that nobody documents."""
        refused = refused_fields(body.model_extra)
        try:
            body.grammar()
        except UserInputError as exc:
            raise ApiError(400, str(exc), exc.param, "invalid_grammar") from exc
        if refused is None and isinstance(body, ChatCompletionRequest):
            refused = refused_message_fields(body.messages)
        if refused is not None:
            name, message, code = refused
            raise ApiError(400, message, name, code)

    async def resolve_model(name: str, tenant: Tenant) -> str | None:
        """None for the base model, else the adapter name; 404 for what this key cannot see (with
        --lora-on-demand, a folder under the root that is not loaded yet is loaded first)."""
        if name == state.served_name:
            return None
        prefix = state.served_name + ":"
        adapter = name[len(prefix):] if name.startswith(prefix) else name
        if tenant.may_use(adapter) and (adapter in state.adapters or await load_on_demand(adapter)):
            if adapter in state.demand_used:
                state.demand_used.move_to_end(adapter)
            return adapter
        raise ApiError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    async def load_on_demand(name: str) -> bool:
        """Register the folder ``name`` directly under --lora-root; False when there is none (a 404, like
        any unknown name: '..', separators and symlinks leaving the root included). Concurrent first
        requests share one load."""
        if not state.on_demand or not on_demand_name(name) or name == state.served_name:
            return False
        try:
            path = state.sources.inside_root(name)
        except ForbiddenPath:
            return False
        if not path.is_dir():
            return False
        pending = state.demand.get(name)
        if pending is None:
            pending = state.demand[name] = asyncio.ensure_future(demand_load(name, path))
            pending.add_done_callback(lambda _: state.demand.pop(name, None))
        await asyncio.shield(pending)
        return True

    async def demand_load(name: str, path) -> None:
        folder = await asyncio.get_running_loop().run_in_executor(adapter_pool, state.sources.prepare, path)
        loaded = await state.engine.load_adapter(name, folder)
        state.adapters.add(name)
        state.demand_used[name] = folder
        state.metrics.on_demand_loads.inc()
        log.info("adapter %s loaded on demand from %s (version %s)", name, path, loaded.version)
        await trim_cache(keep=name)

    async def trim_cache(keep: str) -> None:
        """Past --lora-cache-max-size, the least recently used on-demand adapters processed into the cache
        leave it and the registry (a later request loads them again); ``keep`` stays."""
        if state.cache_max_bytes is None:
            return
        cached = {name: folder for name, folder in state.demand_used.items()
                  if folder.is_relative_to(state.sources.cache_dir)}
        total = sum(folder_bytes(folder) for folder in cached.values())
        for name, folder in cached.items():  # least recently used first
            if total <= state.cache_max_bytes:
                break
            if name == keep:
                continue
            total -= folder_bytes(folder)
            state.adapters.discard(name)
            state.demand_used.pop(name, None)
            await state.engine.unload_adapter(name)
            await asyncio.get_running_loop().run_in_executor(adapter_pool, state.sources.drop, folder)
            log.info("adapter %s left the processed cache (--lora-cache-max-size)", name)

    async def tokenize(call: Callable, *args) -> list[int]:
        ids = await asyncio.get_running_loop().run_in_executor(tokenize_pool, call, *args)
        if not ids:
            raise ApiError(400, "the prompt is empty (it encodes to no tokens)", "prompt")
        return ids

    async def resolve_mix(body: SamplingFields, request: Request, adapter: str | None, tenant: Tenant
                          ) -> LoraMix | None:
        """The body's ``lora_mix``, checked: 400 for a malformed one, 404 for a member this key cannot see."""
        if body.lora_mix is None:
            return None
        if adapter is not None:
            raise ApiError(400, f"lora_mix mixes adapters over the base model: set model to `{state.served_name}`, "
                                f"not an adapter", "lora_mix")
        raw = json.loads(await request.body(), object_pairs_hook=duplicate_mix_names)  # keeps repeated names
        mix = check_mix(raw.get("lora_mix") if isinstance(raw, dict) else body.lora_mix, "lora_mix", state.max_loras)
        for name, _ in mix:
            if name not in state.adapters or not tenant.may_use(name):
                raise ApiError(404, f"lora_mix: the adapter `{name}` does not exist.", "lora_mix", "model_not_found")
        return mix

    def generation_request(body: SamplingFields, prompt_ids: list[int], adapter: str | None,
                           max_tokens: int | None, mix: LoraMix | None, tenant: Tenant) -> GenerationRequest:
        # prefix-cache namespace: the tenant (and the request's own cache_salt); base prompts may be shared
        shared = state.share_base_prefixes and adapter is None and mix is None
        salt = ("" if shared else f"tenant:{tenant.label}") + (f"\0salt:{body.cache_salt}" if body.cache_salt else "")
        return GenerationRequest(prompt_ids=prompt_ids, adapter=adapter, sampling=body.sampling_params(max_tokens),
                                 lora_mix=mix, cache_salt=salt)

    async def accept(tenant: Tenant, request_id: str, generation: GenerationRequest, arrival_s: float) -> _Ticket:
        """Hand the request to the engine; 429 over the key's limit, 503 on a full queue, 400 on bad input."""
        label = state.metrics.label(generation.adapter or (MIX_LABEL if generation.lora_mix else "base"))
        if tenant.max_concurrent is not None and state.in_flight.get(tenant.label, 0) >= tenant.max_concurrent:
            state.metrics.requests.labels(label, "rejected").inc()
            raise ApiError(429, f"this API key already has {tenant.max_concurrent} requests running or waiting",
                           code="rate_limit_exceeded")
        state.in_flight[tenant.label] = state.in_flight.get(tenant.label, 0) + 1
        try:
            stream = await state.engine.submit(request_id, generation, label, arrival_s)
        except BaseException:
            state.engine.abort(request_id)  # cancelled while queued: it may have been added (a no-op if not)
            _release(state, tenant)
            state.metrics.requests.labels(label, "rejected").inc()
            raise
        return _Ticket(state, tenant, stream)

    async def accept_all(tenant: Tenant, request_id: str, generations: list[GenerationRequest],
                         arrival_s: float) -> list[_Ticket]:
        """Every choice is a request of its own (``ID-INDEX`` when there are several); all or none."""
        tickets: list[_Ticket] = []
        try:
            for index, generation in enumerate(generations):
                name = request_id if len(generations) == 1 else f"{request_id}-{index}"
                tickets.append(await accept(tenant, name, generation, arrival_s))
        except BaseException:
            for ticket in tickets:
                ticket.close()
            raise
        return tickets

    async def collect(tickets: list[_Ticket], request: Request) -> list[_Result] | None:
        """Every choice's whole result, or None if the client left first (every request is then aborted)."""
        results = [_Result() for _ in tickets]

        async def gather_one(ticket: _Ticket, result: _Result) -> None:
            async for update in _updates(ticket.stream):
                result.add(update)

        gathering = asyncio.ensure_future(asyncio.gather(*(gather_one(t, r) for t, r in zip(tickets, results))))
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({gathering, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not gathering.done():
                gathering.cancel()
            for ticket in tickets:
                ticket.close()
        if gathering.done() and not gathering.cancelled():
            gathering.result()  # a choice the engine could not finish raises here
            return results
        return None

    def closer(tickets: list[_Ticket]) -> Callable[[], None]:
        def close() -> None:
            for ticket in tickets:
                ticket.close()
        return close

    def choices_of(body: SamplingFields, prompts: list[list[int]], adapter: str | None, max_tokens: int | None,
                   mix: LoraMix | None, tenant: Tenant) -> list[GenerationRequest]:
        """``n`` requests per prompt, in OpenAI's order (prompt-major); with a seed, choice j samples with seed + j."""
        if body.n > state.max_num_seqs:
            raise ApiError(400, f"n {body.n} is more than the {state.max_num_seqs} rows a step runs (--max-num-seqs)",
                           "n")
        generations = []
        for prompt_ids in prompts:
            for choice in range(body.n):
                generation = generation_request(body, prompt_ids, adapter, max_tokens, mix, tenant)
                if body.seed is not None and choice:
                    generation.sampling = replace(generation.sampling, seed=body.seed + choice)
                generations.append(generation)
        return generations

    def usage_of(results: list[_Result], n: int) -> Usage:
        """Prompt tokens once per prompt (not per choice), completion tokens of every choice."""
        return Usage.of(sum(result.prompt_tokens for result in results[::n]),
                        sum(result.completion_tokens for result in results))

    # -- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not state.engine.alive:
            raise ApiError(503, "the engine has stopped")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not state.tenants.open:
            require_admin(await tenant_of(request))
        body = state.metrics.render() if state.render_metrics is None else await state.render_metrics()
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(tenant: TenantOf, limit: Annotated[int | None, Query(ge=1, le=MODELS_PAGE_MAX)] = None,
                     after: str | None = None) -> Response:
        """The base model, then the adapters this key may use, sorted: those loaded and, with
        --lora-on-demand, every adapter folder under the root (listed, not read). ``limit`` / ``after``
        page through them as OpenAI's list endpoints do."""
        loaded = sorted(name for name in state.adapters if after is None or name > after)
        names = await asyncio.get_running_loop().run_in_executor(
            adapter_pool, _adapter_page, state, tenant, loaded, after, limit)
        base = [state.served_name] if after is None else []
        ids = (base + names)[:limit] if limit is not None else base + names
        cards = [ModelCard(id=name, root=name, created=state.created,
                           parent=None if name == state.served_name and not index else state.served_name)
                 for index, name in enumerate(ids)]
        if limit is None:
            return _json(ModelList(data=cards))
        return _json(ModelList(data=cards, has_more=len(base) + len(names) > limit,
                               first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, tenant: TenantOf) -> Response:
        """One model card (OpenAI's retrieve): the base, or an adapter this key may use (with --lora-on-demand,
        a folder under the root counts before it is loaded); else 404."""
        if model_id == state.served_name:
            return _json(ModelCard(id=model_id, root=model_id, created=state.created))
        known = model_id in state.adapters or (state.on_demand and on_demand_name(model_id)
                                               and state.sources.is_adapter_folder(model_id))
        if not (known and tenant.may_use(model_id)):
            raise ApiError(404, f"The model `{model_id}` does not exist.", "model", "model_not_found")
        return _json(ModelCard(id=model_id, root=model_id, parent=state.served_name, created=state.created))

    @app.get("/tokenizer_info")
    async def tokenizer_info(tenant: TenantOf) -> Response:
        return JSONResponse(state.tokenizer.info())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: TenantOf) -> Response:
        arrival_s = time.perf_counter()
        check_fields(body)
        adapter = await resolve_model(body.model, tenant)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 only goes with echo (the prompt's logprobs, nothing generated)",
                           "max_tokens")
        prompts = await prompts_of(body.prompt)
        generations = choices_of(body, prompts, adapter, body.max_tokens or (1 if body.echo else None),
                                 await resolve_mix(body, request, adapter, tenant), tenant)
        for generation in generations:  # max_tokens 0: one token is generated and dropped
            generation.sampling = replace(generation.sampling, logprobs=body.logprobs,
                                          prompt_logprobs=body.logprobs if body.echo else None)
        echoes = [await echo_text(body.prompt, index, prompt) for index, prompt in enumerate(prompts)] \
            if body.echo else None
        request_id = f"cmpl-{uuid.uuid4().hex}"
        tickets = await accept_all(tenant, request_id, generations, arrival_s)  # nothing may fail after this
        if body.stream:
            return _EventStream(completion_events(tickets, body, prompts, request_id, echoes), closer(tickets))
        results = await collect(tickets, request)
        if results is None:
            return Response(status_code=499)
        ids = body.return_token_ids
        choices = []
        for index, result in enumerate(results):
            prompt = prompts[index // body.n]
            kept = _Kept.of(result, body.max_tokens == 0)
            echo = echoes[index // body.n] if echoes else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(prompt, result.prompt_logprobs, text_of) if echoes else None
                logprobs = completion_logprobs(kept.token_ids, kept.logprobs, text_of, logprobs, len(echo))
            choices.append(CompletionChoice(index=index, text=echo + kept.text, finish_reason=result.finish_reason,
                                            logprobs=logprobs, prompt_token_ids=prompt if ids else None,
                                            token_ids=kept.token_ids if ids else None))
        usage = usage_of(results, body.n)
        if body.max_tokens == 0:
            usage = Usage.of(usage.prompt_tokens, 0)
        return _json(CompletionResponse(id=request_id, model=body.model, choices=choices, usage=usage))

    def text_of(token: int) -> str:
        return state.tokenizer.token_text(token)

    async def echo_text(prompt, index: int, ids: list[int]) -> str:
        """The prompt as the client gave it (a text), or its ids decoded."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt[0], str):
            return prompt[index]
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, state.tokenizer.decode, ids)

    async def prompts_of(prompt) -> list[list[int]]:
        """Text, token ids, or a list of either: one list of ids per prompt."""
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise ApiError(400, "the prompt is empty", "prompt")
        prompts = []
        for index, item in enumerate(items):
            ids = await tokenize(state.tokenizer.encode, item) if isinstance(item, str) else list(item)
            if not ids:
                raise ApiError(400, "the prompt is empty" if len(items) == 1 else f"prompt {index} is empty", "prompt")
            prompts.append(ids)
        return prompts

    async def completion_events(tickets: list[_Ticket], body: CompletionRequest, prompts: list[list[int]],
                                request_id: str, echoes: list[str] | None) -> AsyncIterator[str]:
        created = int(time.time())
        ids = body.return_token_ids
        results = [_Result() for _ in tickets]
        first = [True] * len(tickets)
        # where each choice's next generated token starts (logprobs' text_offset): the echo, then the token texts
        offsets = [len(echoes[index // body.n]) if echoes else 0 for index in range(len(tickets))]
        try:
            async for index, update in _merged(tickets):
                results[index].add(update)
                prompt = prompts[index // body.n]
                text, tokens, entries = update.new_text, update.new_token_ids, update.logprobs or []
                if body.max_tokens == 0:  # echo only: the one token generated is dropped
                    text, tokens, entries = "", [], []
                logprobs = None
                if first[index] and echoes:
                    text = echoes[index // body.n] + text
                    if body.logprobs is not None:
                        logprobs = completion_logprobs(prompt, update.prompt_logprobs or [], text_of)
                if body.logprobs is not None and tokens:
                    logprobs = completion_logprobs(tokens, entries, text_of, logprobs, offsets[index])
                    offsets[index] += sum(len(text_of(token)) for token in tokens)
                if not (text or update.finished or (ids and tokens) or logprobs):
                    continue
                choice = CompletionChoice(index=index, text=text, finish_reason=update.finish_reason,
                                          logprobs=logprobs,
                                          prompt_token_ids=prompt if ids and first[index] else None,
                                          token_ids=tokens if ids else None)
                first[index] = False
                yield sse(CompletionChunk(id=request_id, created=created, model=body.model, choices=[choice]))
        except RequestFailed as exc:
            yield sse(_stream_error(exc).body())
            yield SSE_DONE
            return
        if body.include_usage():
            usage = usage_of(results, body.n)
            yield sse(CompletionChunk(id=request_id, created=created, model=body.model, choices=[],
                                      usage=Usage.of(usage.prompt_tokens, 0) if body.max_tokens == 0 else usage))
        yield SSE_DONE

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               tenant: TenantOf) -> Response:
        arrival_s = time.perf_counter()
        check_fields(body)
        adapter = await resolve_model(body.model, tenant)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        try:
            messages = [message.as_template_input() for message in body.messages]
        except UserInputError as exc:
            raise ApiError(400, str(exc), "messages") from exc
        tools, fmt, forced = tools_of(body)
        prompt_ids = await tokenize(state.tokenizer.prompt_ids, messages, tools)
        generations = choices_of(body, [prompt_ids], adapter, body.token_budget(),
                                 await resolve_mix(body, request, adapter, tenant), tenant)
        for generation in generations:
            if body.logprobs:
                generation.sampling = replace(generation.sampling, logprobs=body.top_logprobs or 0)
            if forced:  # tool_choice required or a named function: the answer is one call, its arguments valid
                generation.sampling = replace(generation.sampling, grammar=call_grammar(forced, fmt))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        tickets = await accept_all(tenant, request_id, generations, arrival_s)
        if body.stream:
            return _EventStream(chat_events(tickets, body, prompt_ids, request_id, fmt), closer(tickets))
        results = await collect(tickets, request)
        if results is None:
            return Response(status_code=499)
        choices = []
        for index, result in enumerate(results):
            message, finish_reason = answer_of("".join(result.text), result.finish_reason, fmt)
            choices.append(ChatChoice(index=index, message=message, finish_reason=finish_reason,
                                      logprobs=chat_logprobs(result.logprobs, text_of) if body.logprobs else None,
                                      token_ids=result.token_ids if body.return_token_ids else None))
        return _json(ChatCompletionResponse(id=request_id, model=body.model, choices=choices,
                                            usage=usage_of(results, body.n),
                                            prompt_token_ids=prompt_ids if body.return_token_ids else None))

    def tools_of(body: ChatCompletionRequest) -> tuple[list[dict] | None, str | None, list[dict] | None]:
        """The tools to render, the model's call format, and the functions a call is forced to (400s for
        tools a template cannot show, a malformed tool list or choice, or a forced call with another grammar).
        ``tool_choice`` none: the tools are left out of the prompt altogether."""
        if not body.tools or body.tool_choice == "none":
            return None, None, None
        fmt = tool_format(state.tokenizer.template)
        if fmt is None:
            raise ApiError(400, f"tools: the chat template of {state.served_name} has no tools branch, so the "
                           "model would never see them; it cannot call tools", "tools", "unsupported_parameter")
        try:
            tools = check_tools(body.tools)
            forced = forced_functions(tools, body.tool_choice)
        except UserInputError as exc:
            raise ApiError(400, str(exc), exc.param) from exc
        if forced and body.grammar() is not None:
            raise ApiError(400, "tool_choice forces a call: it cannot go with response_format or structured_outputs",
                           "tool_choice")
        return tools, fmt, forced

    def answer_of(text: str, finish_reason: str | None, fmt: str | None) -> tuple[AssistantMessage, str | None]:
        """The assistant message: with tools, the calls parsed out of the text (finish_reason tool_calls)."""
        if fmt is None:
            return AssistantMessage(content=text), finish_reason
        content, calls = parse_calls(text, fmt)
        if not calls:
            return AssistantMessage(content=text), finish_reason
        return AssistantMessage(content=content, tool_calls=[call.as_openai() for call in calls]), "tool_calls"

    async def chat_events(tickets: list[_Ticket], body: ChatCompletionRequest, prompt_ids: list[int],
                          request_id: str, fmt: str | None = None) -> AsyncIterator[str]:
        created = int(time.time())
        ids = body.return_token_ids

        def chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None,
                  token_ids: list[int] | None = None, logprobs: list[TokenLogprob] | None = None, **extra) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, token_ids=token_ids,
                                     logprobs=chat_logprobs(logprobs, text_of) if logprobs else None)
            return sse(ChatCompletionChunk(id=request_id, created=created, model=body.model, choices=[choice],
                                           **extra))

        for index in range(len(tickets)):
            yield chunk(index, DeltaMessage(role="assistant", content=""),
                        prompt_token_ids=prompt_ids if ids and not index else None)
        results = [_Result() for _ in tickets]
        try:
            async for index, update in _merged(tickets):
                results[index].add(update)
                if fmt is not None:  # with tools the text is held until it can be told apart from calls
                    if update.finished:
                        message, finish_reason = answer_of("".join(results[index].text), update.finish_reason, fmt)
                        calls = [{"index": position, **call} for position, call in enumerate(message.tool_calls or [])]
                        yield chunk(index, DeltaMessage(content=message.content, tool_calls=calls or None),
                                    token_ids=results[index].token_ids if ids else None,
                                    logprobs=results[index].logprobs or None)
                        yield chunk(index, DeltaMessage(), finish_reason)
                    continue
                if update.new_text or (ids and update.new_token_ids) or update.logprobs:
                    yield chunk(index, DeltaMessage(content=update.new_text),
                                token_ids=update.new_token_ids if ids else None, logprobs=update.logprobs)
                if update.finished:
                    yield chunk(index, DeltaMessage(), update.finish_reason)
        except RequestFailed as exc:
            yield sse(_stream_error(exc).body())
            yield SSE_DONE
            return
        if body.include_usage():
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=body.model, choices=[],
                                          usage=usage_of(results, body.n)))
        yield SSE_DONE

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest, tenant: TenantOf) -> Response:
        require_updates()
        require_admin(tenant)
        name = body.lora_name
        if name == state.served_name or name.startswith(state.served_name + ":"):
            raise ApiError(400, f"{name!r} is the served model's name", "lora_name")
        if name in state.loading:
            raise ApiError(400, f"the adapter {name!r} is being loaded by another request; try again", "lora_name")
        path = state.sources.inside_root(body.lora_path)
        state.loading.add(name)
        try:
            folder = await asyncio.get_running_loop().run_in_executor(adapter_pool, state.sources.prepare, path)
            loaded = await state.engine.load_adapter(name, folder)
        finally:
            state.loading.discard(name)
        state.adapters.add(name)
        if loaded.previous is None:
            log.info("adapter %s loaded from %s (version %s)", name, path, loaded.version)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")
        if loaded.previous == loaded.version:
            return PlainTextResponse(f"Success: LoRA adapter '{name}' is already loaded with these files "
                                     f"(version {loaded.version}).")
        log.info("adapter %s: version %s from %s replaces %s", name, loaded.version, path, loaded.previous)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' replaced: version {loaded.version} serves new "
                                 "requests" + (f"; requests already running finish on {loaded.previous}."
                                               if loaded.previous_running else f" ({loaded.previous} is freed)."))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest, tenant: TenantOf) -> Response:
        require_updates()
        require_admin(tenant)
        name = body.lora_name
        if name not in state.adapters:
            raise ApiError(404, f"the adapter {name!r} is not loaded", "lora_name", "model_not_found")
        state.adapters.discard(name)  # new requests get a 404 from now on (or load it again, on demand)
        state.demand_used.pop(name, None)
        removed = await state.engine.unload_adapter(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully."
                                 + ("" if removed else " Requests that use it finish first."))

    return app
