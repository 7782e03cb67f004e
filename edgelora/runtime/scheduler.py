"""The step loop: requests join and leave a persistent batch one model step at a time.

``add_request`` queues a request, ``abort_request`` cancels one, ``step`` runs one model step and
returns what each request gained; offline generation is the same loop with every request added up
front (``run_to_completion``). One step is either a prefill of newly admitted requests (alone or
together, into free rows) or a decode step over every live row, so a new request's first token
never waits behind a decode step and a decode step never waits for more than one prefill.

``max_num_batched_tokens`` (vLLM's name) bounds the tokens of a step: a decode step has one per
row, a prefill the prompts admitted together (admission stops at the budget), and a prompt longer
than the budget is prefilled in chunks of the budget into the top row, one chunk a step,
alternating with decode steps of the running rows, so a long prompt delays their next token by
one chunk, not by its whole prefill. Admission waits while a prompt is being chunked (first come,
first served); its last chunk gives its first token and moves it in after the running rows.

::

    add_request ──> waiting (FCFS) ──admit──> rows 0..n-1 of the KV cache (packed) ──step──> updates
                         │  adapter in a slot: admit          │ finished / aborted: row leaves,
                         │  a slot free or idle: load, admit  │ the last row moves into its place,
                         └  every slot held: wait; the LRU    │ the adapter's reference is released
                            held slot drains for it            ▼

Admission is first come, first served. A request whose adapter needs a slot while every slot is
held by running rows waits; requests behind it whose adapters already sit in a slot may go ahead,
but the least recently used held slot takes no new rows from then on, so it drains and the
waiting request gets it (hot adapters cannot starve a cold one). Running adapters are kept in
slots 1..k (``AdapterCache.compact``), so a step's LoRA work is that of the adapters it uses.
A request whose adapter must first be read from its file while rows are decoding waits while a
worker thread reads it (``prefetch``), and requests behind it go ahead meanwhile: no decode step
waits for a disk read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from edgelora.errors import EdgeLoraError, UserInputError
from edgelora.runtime.adapter_cache import AdapterRef
from edgelora.runtime.config import SchedulerConfig
from edgelora.runtime.engine import Engine, StepPlan
from edgelora.runtime.grammar import Grammars
from edgelora.runtime.lora_mix import LoraMix, check_mix
from edgelora.runtime.output import OutputStage, OutputState, TokenLogprob
from edgelora.runtime.prefetch import Prefetcher
from edgelora.runtime.prefix_cache import PrefixCache, chain_keys, namespace_of
from edgelora.runtime.sampling import SamplingParams

PROMPT_LOGPROBS_CHUNK = 256  # prompt positions whose logits one step keeps for prompt logprobs ([n, vocab])


class QueueFull(EdgeLoraError):
    """The waiting queue is at ``max_waiting``: try again later (a 503 in the server)."""


@dataclass
class GenerationRequest:
    """One request: prompt ids, its adapter (None: base) or a weighted mix, how to sample and when to stop."""

    prompt_ids: list[int]
    adapter: str | None = None
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=None))
    lora_mix: LoraMix | dict[str, float] | None = None  # several adapters with weights (then adapter is None)
    # Prefix-cache namespace (vLLM's cache_salt): prompts share cached KV only under the same salt. The
    # server sets it per tenant, so one tenant's timing cannot show what another asked.
    cache_salt: str | None = None


@dataclass
class SequenceUpdate:
    """What one request gained in one step."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # complete characters only; text that may begin a stop string is held back
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int  # so far
    error: str | None = None  # finish_reason "error": why (an adapter that could not be loaded)
    logprobs: list[TokenLogprob] | None = None  # of new_token_ids, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # every prompt token's, with the first token


@dataclass
class FinishedRequest:
    """A request's whole result (``run_to_completion``)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class StepStats:
    """The last step: what ran and where the time went."""

    prefill_rows: int = 0
    decode_rows: int = 0
    chunk_tokens: int = 0  # a chunk of a long prompt (0: none this step)
    run_s: float = 0.0  # inside ONNX Runtime
    total_s: float = 0.0  # the whole step, scheduling and sampling included


@dataclass
class SchedulerStats:
    """Totals since the scheduler started (benchmarks, infer's stats, the server's metrics)."""

    prefill_steps: int = 0
    prefill_s: float = 0.0
    prefill_run_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_run_s: float = 0.0
    decode_rows: int = 0  # summed over decode steps
    prompt_tokens: int = 0  # prefilled (computed); a prefix-cache hit's tokens are not
    cached_prompt_tokens: int = 0  # prompt tokens copied from the prefix cache instead
    generated_tokens: int = 0


@dataclass
class _Sequence:
    request_id: str
    request: GenerationRequest
    out: OutputState  # sampler, detokenizer, tokens, text, finish_reason (the output stage's)
    adapters: tuple[tuple[AdapterRef, float], ...] = ()  # versions held from add_request to the end, with weights
    row: int = -1
    total: int = 0  # tokens in this row's cache
    prefilled: int = 0  # prompt tokens in the cache so far (a prompt longer than the step budget comes in chunks)
    pending: int = 0  # the last sampled token, not yet in the cache
    prefix_keys: list[bytes] = field(default_factory=list)  # chain keys of the prompt's full blocks
    prefix: list = field(default_factory=list)  # cached blocks copied into the row when it starts
    cached: int = 0  # prompt tokens those blocks hold (the row's prefill starts there)


class Scheduler:
    """Continuous batching over one Engine: join, step, leave."""

    def __init__(self, engine: Engine, config: SchedulerConfig | None = None, tokenizer=None):
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.config.validate()
        positions = engine.spec.max_position_embeddings or 0
        limit = self.config.max_model_len or positions
        if not limit:
            raise UserInputError("the model does not say how many positions it has; set max_model_len")
        if positions and limit > positions:
            raise UserInputError(f"max_model_len {limit} is above the model's {positions} positions")
        self.max_model_len = limit
        grammars = None
        if tokenizer is not None and hasattr(tokenizer, "hf"):
            def grammars() -> Grammars:
                return Grammars(tokenizer.hf, engine.spec.vocab_size, engine.eos_ids)
        self.output = OutputStage(engine.eos_ids, tokenizer.decode if tokenizer is not None else None, grammars)
        self._waiting: OrderedDict[str, _Sequence] = OrderedDict()
        self._running: list[_Sequence] = []  # index = row
        self._chunking: _Sequence | None = None  # a prompt coming in chunks, in the top row
        self._last_kind = ""  # the last step: "prefill", "chunk" or "decode"
        self._aborts: list[str] = []
        self._finished: list[SequenceUpdate] = []  # updates owed for requests that ended outside a step
        self._draining: AdapterRef | None = None  # adapter whose slot takes no new rows (a request waits for a slot)
        self._rows = None  # the engine's KV rows this batch runs on (opened on the first step)
        # reads in flight: room in the host cache beside the slots' own copies (at least one)
        self._prefetch = (Prefetcher(engine.adapters, engine.adapters.spare_host_places)
                          if self.config.prefetch_adapters else None)
        self.prefix: PrefixCache | None = None  # host KV only: device rows have no cheap block copy here
        if self.config.enable_prefix_caching and engine.config.device == "cpu":
            self.prefix = PrefixCache(self.config.prefix_block_tokens, self.config.prefix_cache_bytes)
            engine.adapters.on_retire.append(self.prefix.drop)  # a replaced or unloaded version's blocks go
        self.last_step = StepStats()
        self.stats = SchedulerStats()

    # -- requests ------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running) + (self._chunking is not None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._chunking or self._waiting or self._aborts or self._finished)

    def _live(self) -> list[_Sequence]:
        """Sequences that hold a row: the running ones and a prompt coming in chunks."""
        return self._running + ([self._chunking] if self._chunking is not None else [])

    def check(self, request: GenerationRequest, where: str = "request") -> GenerationRequest:
        """Refuse what cannot run; return a copy with ``max_tokens`` filled in (the rest of the context)."""
        self.engine.check_prompt(request.prompt_ids, where)
        sampling = request.sampling
        room = self.max_model_len - len(request.prompt_ids)
        max_tokens = sampling.max_tokens if sampling.max_tokens is not None else room
        problems = sampling.problems()
        if sampling.stop and self.output.detokenize is None:
            problems.append("stop strings (this scheduler has no tokenizer)")
        if problems:
            raise UserInputError(f"{where}: invalid " + "; ".join(problems))
        if room < 1 or max_tokens > room:
            raise UserInputError(f"{where}: prompt ({len(request.prompt_ids)} tokens) + max tokens ({max_tokens}) "
                                 f"exceeds the {self.max_model_len} positions a request may use"
                                 + (" (max_model_len)" if self.max_model_len != self.engine.spec.max_position_embeddings
                                    else " (the model's positions)"))
        if sampling.grammar is not None:
            try:
                self.output.grammars().compile(sampling.grammar)
            except UserInputError as exc:
                raise UserInputError(f"{where}: {exc}") from exc
        vocab = self.engine.spec.vocab_size
        if any(token >= vocab for token in sampling.logit_bias):
            raise UserInputError(f"{where}: logit_bias names a token id outside the vocabulary (0..{vocab - 1})")
        if sampling.min_tokens > max_tokens:
            raise UserInputError(f"{where}: min_tokens {sampling.min_tokens} is above max_tokens {max_tokens}")
        mix = None
        if request.lora_mix is not None:
            if request.adapter is not None:
                raise UserInputError(f"{where}: give an adapter or a lora_mix, not both")
            mix = check_mix(request.lora_mix, where, self.engine.adapters.max_loras)
        for name in [request.adapter] if request.adapter is not None else [name for name, _ in mix or ()]:
            if name not in self.engine.adapters:
                raise UserInputError(f"{where}: unknown adapter {name!r}" + (" in lora_mix" if mix else ""))
        return GenerationRequest(list(request.prompt_ids), request.adapter,
                                 replace(sampling, max_tokens=max_tokens, stop=list(sampling.stop),
                                         logit_bias=dict(sampling.logit_bias)), mix,
                                 request.cache_salt)

    def add_request(self, request_id: str, request: GenerationRequest, where: str | None = None) -> None:
        """Check and queue a request; it runs once a row (and its adapter's slot) is free.

        The request holds its adapter's current version from here on: a new version loaded under
        the same name meanwhile serves later requests, not this one.
        """
        if request_id in self._waiting or any(seq.request_id == request_id for seq in self._live()):
            raise UserInputError(f"request id {request_id!r} is already in use")
        checked = self.check(request, where or f"request {request_id}")
        if self.config.max_waiting is not None and len(self._waiting) >= self.config.max_waiting:
            raise QueueFull(f"the queue is full ({self.config.max_waiting} waiting requests); try again later")
        members = checked.lora_mix or (((checked.adapter, 1.0),) if checked.adapter is not None else ())
        held = tuple((self.engine.adapters.hold(name), weight) for name, weight in members)
        seq = _Sequence(request_id, checked, self.output.start(checked.sampling, checked.prompt_ids), held)
        if self.prefix is not None:
            seq.prefix_keys = chain_keys(namespace_of(checked.cache_salt, held), checked.prompt_ids,
                                         self.prefix.block_tokens)
        self._waiting[request_id] = seq

    def abort_request(self, request_id: str) -> None:
        """Cancel a request; its final update (finish_reason "abort") comes from the next step."""
        self._aborts.append(request_id)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[SequenceUpdate]:
        """Handle aborts, then run one step: a prefill (if requests can be admitted), a chunk of a long
        prompt (alternating with decode steps), or a decode step."""
        started = time.perf_counter()
        self.last_step = StepStats()
        if self._prefetch is not None:
            self._prefetch.collect()
        updates = self._take_aborts() + self._finished
        self._finished = []
        admitted = self._admit() if self._chunking is None else []
        kind = ""
        if admitted:
            updates, kind = updates + self._prefill(admitted), "prefill"
        elif self._chunking is not None and (not self._running or self._last_kind != "chunk"):
            updates, kind = updates + self._chunk_step(), "chunk"
        elif self._running:
            updates, kind = updates + self._decode_step(), "decode"
        self._last_kind = kind
        if not kind and self._prefetch is not None:
            self._prefetch.wait()  # nothing to run but reads in flight: wait for one instead of spinning
        self._leave([seq for seq in self._running if seq.out.finish_reason])
        if not self._live() and self._rows is not None:
            self.engine.shrink_rows(0)
        self.last_step.total_s = time.perf_counter() - started
        if kind in ("prefill", "chunk"):
            self.stats.prefill_s += self.last_step.total_s
        elif self.last_step.decode_rows:
            self.stats.decode_s += self.last_step.total_s
        return updates

    def run_to_completion(self, requests: list[GenerationRequest], labels: list[str] | None = None
                          ) -> list[FinishedRequest]:
        """Offline generation: add every request (checked first, all of them), step until all finish."""
        labels = labels or [f"request {index}" for index in range(len(requests))]
        checked = [self.check(request, where) for request, where in zip(requests, labels)]
        ids = [f"offline-{index}" for index in range(len(requests))]
        for request_id, request, where in zip(ids, checked, labels):
            self.add_request(request_id, request, where)
        results: dict[str, FinishedRequest] = {}
        outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
        texts: dict[str, list[str]] = {request_id: [] for request_id in ids}
        while len(results) < len(ids):
            for update in self.step():
                outputs[update.request_id] += update.new_token_ids
                texts[update.request_id].append(update.new_text)
                if update.finished:
                    if update.finish_reason == "error":
                        raise UserInputError(f"{labels[ids.index(update.request_id)]}: {update.error}")
                    results[update.request_id] = FinishedRequest(
                        update.request_id, checked[ids.index(update.request_id)].prompt_ids,
                        outputs[update.request_id], "".join(texts[update.request_id]), update.finish_reason)
        return [results[request_id] for request_id in ids]

    # -- admission -----------------------------------------------------------------------------
    def _admit(self) -> list[_Sequence]:
        """Move waiting requests into free rows, first come first served (see the module docstring)."""
        free_rows = self.config.max_num_seqs - len(self._running)
        adapters = self.engine.adapters
        admitted: list[_Sequence] = []
        waiting_for_slot = False
        budget, tokens = self.config.step_tokens, 0
        for seq in list(self._waiting.values()):
            if free_rows == 0:
                break
            scored = seq.request.sampling.prompt_logprobs is not None  # every position's logits: alone, in chunks
            hit = self.prefix.peek(seq.prefix_keys, len(seq.request.prompt_ids)) \
                if self.prefix is not None and not scored else 0
            length = len(seq.request.prompt_ids) - hit  # what it prefills
            chunked = scored or (budget is not None and tokens + length > budget)
            if chunked and admitted:
                break  # the next step takes it
            refs = [ref for ref, _ in seq.adapters]
            if refs:
                missing = [ref for ref in refs if not adapters.is_resident(ref)]
                reading = self._reading(seq, [ref for ref in missing if adapters.needs_read(ref)])
                if seq.request_id not in self._waiting:
                    continue  # its adapter could not be read: it failed
                if not missing:
                    if self._draining in refs:
                        continue
                elif waiting_for_slot or not adapters.can_take(missing):
                    if not waiting_for_slot and self._draining is None:
                        busy = {ref for s in admitted for ref, _ in s.adapters} | set(refs)
                        held = [held for held in adapters.held_lru() if held not in busy]
                        self._draining = held[0] if held else None
                    waiting_for_slot = True
                    continue
                if reading:
                    continue  # admitted once its copy is in, at a later step
                try:
                    adapters.acquire(refs)
                except EdgeLoraError as exc:
                    self._fail(seq, str(exc))
                    continue
            del self._waiting[seq.request_id]
            if self.prefix is not None and not scored:
                seq.prefix = self.prefix.lookup(seq.prefix_keys, len(seq.request.prompt_ids))
                seq.cached = seq.prefilled = len(seq.prefix) * self.prefix.block_tokens
            if chunked:  # longer than the budget: prefilled in chunks into the top row
                seq.row = self.config.max_num_seqs - 1
                self._chunking = seq
                break
            admitted.append(seq)
            tokens += length
            free_rows -= 1
        if not waiting_for_slot:
            self._draining = None
        return admitted

    def _reading(self, seq: _Sequence, unread: list[AdapterRef]) -> bool:
        """Whether ``seq`` must wait for its adapters to be read (asked for here); a failed read fails it
        (it leaves the queue). Only while rows are live: with none, nobody waits for an inline read, and the
        requests admitted together share one prefill (offline batches, a server's first requests)."""
        if self._prefetch is None or not unread or not self._live():
            return False
        for ref in unread:
            failure = self._prefetch.take_failure(ref)
            if failure is not None:
                self._fail(seq, failure)
                return True
        for ref in unread:
            self._prefetch.request(ref)
        return True

    def _fail(self, seq: _Sequence, message: str) -> None:
        del self._waiting[seq.request_id]
        self._end(seq)
        self._finished.append(SequenceUpdate(seq.request_id, [], "", True, "error", len(seq.request.prompt_ids), 0,
                                             message))

    # -- model steps ---------------------------------------------------------------------------
    def _open_rows(self) -> None:
        """The engine's KV rows for this batch: opened on the first step, and again if someone else
        (a benchmark on the same engine) replaced them while no row of ours was live."""
        if self._rows is not None and self.engine.kv is self._rows:
            return
        if self._running or (self._chunking is not None and self._chunking.prefilled):
            raise EdgeLoraError("the engine's KV rows were replaced while this scheduler's requests run")
        self._rows = self.engine.open_rows(self.config.max_num_seqs, self.max_model_len,
                                           initial_len=min(self.max_model_len, self.config.kv_cache_initial_len))

    def _plan(self, first_row: int, seqs: list[_Sequence], tokens: list[list[int]], positions: list[int]) -> StepPlan:
        """The step over these rows: each row's slot, or for a row with a lora_mix its slots and weights."""
        slot_of = self.engine.adapters.slot_of
        slots = [slot_of(seq.adapters[0][0]) if seq.adapters and seq.request.lora_mix is None else 0 for seq in seqs]
        mixes = [tuple((slot_of(ref), weight) for ref, weight in seq.adapters) if seq.request.lora_mix else None
                 for seq in seqs]
        return StepPlan(first_row, tokens, positions, slots, mixes=mixes if any(mixes) else None)

    def _prefill(self, admitted: list[_Sequence]) -> list[SequenceUpdate]:
        """Prefill the admitted requests together into rows n..n+k-1 (one engine step)."""
        self._open_rows()
        first_row = len(self._running)
        for offset, seq in enumerate(admitted):
            seq.row = first_row + offset
            self._running.append(seq)
        self._compact()
        if any(seq.cached for seq in admitted):  # rows start from their cached prefixes
            self.engine.start_rows([seq.row for seq in admitted], [seq.prefix for seq in admitted],
                                   max(len(seq.request.prompt_ids) for seq in admitted))
        fed = [seq.request.prompt_ids[seq.cached:] for seq in admitted]
        plan = self._plan(first_row, admitted, fed, [seq.cached for seq in admitted])
        logits = self.engine.step(replace(plan, started=any(seq.cached for seq in admitted)))
        self.last_step.run_s = self.engine.last_run_s
        for seq in admitted:
            seq.total = seq.prefilled = len(seq.request.prompt_ids)
            self._keep_prefix(seq)
        tokens = self.output.sample([seq.out for seq in admitted], logits)
        self.last_step.prefill_rows = len(admitted)
        self.stats.prefill_steps += 1
        self.stats.prefill_run_s += self.last_step.run_s
        self.stats.prompt_tokens += sum(map(len, fed))
        self.stats.cached_prompt_tokens += sum(seq.cached for seq in admitted)
        return [self._accept(seq, int(token)) for seq, token in zip(admitted, tokens)]

    def _keep_prefix(self, seq: _Sequence) -> None:
        """After a prompt's prefill: copy its full blocks not cached yet into the prefix cache (not for a
        version retired meanwhile: no new request could reach them)."""
        prefix = self.prefix
        if prefix is None or not seq.prefix_keys:
            return
        seq.prefix = []  # the row holds them now
        adapters = self.engine.adapters
        if any(adapters.current(ref.name) != ref for ref, _ in seq.adapters):
            return
        refs = tuple(ref for ref, _ in seq.adapters)
        size = prefix.block_tokens
        for index in range(prefix.missing_from(seq.prefix_keys), len(seq.prefix_keys)):
            key = seq.prefix_keys[index]
            if key not in prefix:
                prefix.insert(key, self.engine.read_prefix(seq.row, index * size, (index + 1) * size), refs)

    def _chunk_step(self) -> list[SequenceUpdate]:
        """The next chunk of the prompt in the top row; its last chunk gives its first token and moves
        the row in after the running rows."""
        seq = self._chunking
        self._open_rows()
        self._compact()
        prompt = seq.request.prompt_ids
        start = seq.prefilled
        if start and start == seq.cached:  # the first chunk: the row starts from its cached prefix
            self.engine.start_rows([seq.row], [seq.prefix], min(len(prompt), start + self.config.step_tokens))
            self.stats.cached_prompt_tokens += seq.cached
        scored = seq.request.sampling.prompt_logprobs is not None
        size = self.config.step_tokens or len(prompt)
        chunk = prompt[start:start + (min(size, PROMPT_LOGPROBS_CHUNK) if scored else size)]
        logits = self.engine.step(replace(self._plan(seq.row, [seq], [chunk], [start]), every_position=scored))
        if scored:  # this chunk's positions score the prompt's next tokens; the last one samples
            self.output.prompt_logprobs(seq.out, prompt, start, logits[0])
            logits = logits[:, -1:]
        seq.prefilled += len(chunk)
        self.last_step.run_s = self.engine.last_run_s
        self.last_step.chunk_tokens = len(chunk)
        self.stats.prefill_steps += 1
        self.stats.prefill_run_s += self.last_step.run_s
        self.stats.prompt_tokens += len(chunk)
        if seq.prefilled < len(prompt):
            return []
        self._chunking = None
        row = len(self._running)
        if row != seq.row:
            self.engine.move_row(seq.row, row)
            seq.row = row
        self._running.append(seq)
        seq.total = len(prompt)
        self._keep_prefix(seq)
        self.last_step.prefill_rows = 1
        token = self.output.sample([seq.out], logits)[0]
        return [self._accept(seq, int(token))]

    def _decode_step(self) -> list[SequenceUpdate]:
        """One token for every live row: rows 0..n-1, each at its own position (one engine step)."""
        rows = self._running
        self._open_rows()  # a no-op unless the rows were replaced under running requests (then an error)
        self._compact()
        # the pending token goes at position total (the row's cache length)
        logits = self.engine.step(self._plan(0, rows, [[seq.pending] for seq in rows], [seq.total for seq in rows]))
        self.last_step.run_s = self.engine.last_run_s
        for seq in rows:
            seq.total += 1
        tokens = self.output.sample([seq.out for seq in rows], logits)
        self.last_step.decode_rows = len(rows)
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.decode_run_s += self.last_step.run_s
        return [self._accept(seq, int(token)) for seq, token in zip(rows, tokens)]

    def _compact(self) -> None:
        refs = [ref for seq in self._live() for ref, _ in seq.adapters]
        if refs:
            self.engine.adapters.compact(refs)

    def _accept(self, seq: _Sequence, token: int) -> SequenceUpdate:
        """The output stage takes the token; a row that goes on feeds it next step."""
        piece = self.output.accept(seq.out, token)
        self.stats.generated_tokens += 1
        if seq.out.finish_reason is None:
            seq.pending = token
        sampling = seq.out.sampling
        first = len(seq.out.output_ids) == 1
        return SequenceUpdate(seq.request_id, [token], piece, seq.out.finish_reason is not None,
                              seq.out.finish_reason, len(seq.request.prompt_ids), len(seq.out.output_ids),
                              logprobs=seq.out.logprobs[-1:] if sampling.logprobs is not None else None,
                              prompt_logprobs=seq.out.prompt_logprobs
                              if first and sampling.prompt_logprobs is not None else None)

    def _take_aborts(self) -> list[SequenceUpdate]:
        updates = []
        for request_id in self._aborts:
            seq = self._waiting.pop(request_id, None)
            if seq is not None:
                self._end(seq)
            elif self._chunking is not None and self._chunking.request_id == request_id:
                seq, self._chunking = self._chunking, None  # mid-prompt: its row is free at once
                self.engine.adapters.release([ref for ref, _ in seq.adapters])
                self._end(seq)
            else:
                seq = next((s for s in self._running if s.request_id == request_id and not s.out.finish_reason), None)
                if seq is None:
                    continue  # unknown or already finished
            seq.out.finish_reason = "abort"
            updates.append(SequenceUpdate(request_id, [], "", True, "abort", len(seq.request.prompt_ids),
                                          len(seq.out.output_ids)))
        self._aborts = []
        self._leave([seq for seq in self._running if seq.out.finish_reason == "abort"])
        return updates

    def _leave(self, finished: list[_Sequence]) -> None:
        """Finished rows leave: release their adapters, move the last live row into each hole."""
        for seq in finished:
            if seq.adapters:
                self.engine.adapters.release([ref for ref, _ in seq.adapters])
            self._end(seq)
            last = len(self._running) - 1
            row = self._running.index(seq)
            if row != last:
                moved = self._running[last]
                self.engine.move_row(last, row)
                moved.row = row
                self._running[row] = moved
            self._running.pop()


    def _end(self, seq: _Sequence) -> None:
        """The request is over: it stops holding its adapter versions (a retired one may be freed now)."""
        for ref, _ in seq.adapters:
            self.engine.adapters.unhold(ref)
        seq.adapters = ()

