"""The step scheduler: rows join and leave a persistent batch; every result equals the request run alone."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.errors import UserInputError
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.detokenizer import IncrementalDetokenizer
from edgelora.runtime.engine import Engine
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, QueueFull, Scheduler
from edgelora.runtime.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


def _engine(sample, max_loras: int = 3, max_cpu_loras: int = 3, max_lora_rank: int = 16) -> Engine:
    """max_lora_rank 16 = the pool's slot rank and the samples' highest: each adapter takes one of max_loras slots."""
    engine = Engine(sample.onnx_dir, EngineConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, num_threads=1,
                                                  max_lora_rank=max_lora_rank))
    for name, path in sample.processed.items():
        engine.adapters.add(name, path, read=True)  # host-ready: the step logs below never wait for a read
    return engine


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, length).tolist()


def _request(seed: int, adapter: str | None, max_tokens: int, length: int = 6, **extra) -> GenerationRequest:
    return GenerationRequest(_prompt(seed, length), adapter,
                             SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra))


def _alone(sample, request: GenerationRequest) -> list[int]:
    scheduler = Scheduler(_engine(sample), SchedulerConfig(max_num_seqs=1))
    return scheduler.run_to_completion([request])[0].output_ids


def _drive(scheduler: Scheduler, arrivals: dict[int, list[tuple[str, GenerationRequest]]], limit: int = 500):
    """Step the scheduler, adding requests at the given step numbers; return ids per request and step log."""
    outputs: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    log = []
    for step in range(limit):
        for request_id, request in arrivals.get(step, []):
            scheduler.add_request(request_id, request)
            outputs[request_id] = []
        if not scheduler.has_unfinished_requests() and step > max(arrivals):
            break
        for update in scheduler.step():
            outputs[update.request_id] += update.new_token_ids
            if update.finished:
                finished[update.request_id] = update.finish_reason
        log.append((scheduler.last_step.prefill_rows, scheduler.last_step.decode_rows))
    return outputs, finished, log


# -- continuous batching ------------------------------------------------------------------------


def test_rows_joining_and_leaving_mid_decode_give_the_ids_they_get_alone(qwen2):
    """Different adapters, prompt lengths and budgets; requests arrive while others decode."""
    requests = {
        "long-a1": _request(1, "a1", 24, length=9),
        "short-base": _request(2, None, 3, length=4),
        "mid-a2": _request(3, "a2", 10, length=12),
        "late-a3": _request(4, "a3", 6, length=5),
        "late-a1": _request(5, "a1", 8, length=7),
    }
    arrivals = {0: [("long-a1", requests["long-a1"]), ("short-base", requests["short-base"])],
                3: [("mid-a2", requests["mid-a2"])], 6: [("late-a3", requests["late-a3"])],
                9: [("late-a1", requests["late-a1"])]}
    scheduler = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=4))
    outputs, finished, log = _drive(scheduler, arrivals)
    for request_id, request in requests.items():
        assert outputs[request_id] == _alone(qwen2, request), request_id
        assert finished[request_id] == "length"
    assert max(decode for _, decode in log) >= 3, "rows decoded together"
    assert all(prefill == 0 or decode == 0 for prefill, decode in log), "a step is a prefill or a decode"
    assert scheduler.num_running == 0
    assert all(scheduler.engine.adapters.get(name).references == 0 for name in ("a1", "a2", "a3"))


def test_decode_steps_run_only_live_rows(qwen2):
    scheduler = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=8))
    _, _, log = _drive(scheduler, {0: [("a", _request(1, None, 2)), ("b", _request(2, None, 6))]})
    decode_rows = [decode for _, decode in log if decode]
    assert decode_rows == [2] + [1] * 4, "a 2-token row leaves after its first decode step; 8 rows are never paid for"


def test_a_step_binds_only_the_slots_its_rows_use(qwen2, monkeypatch):
    """Adapters left in slots 1 and 3 by earlier requests: the running pair is compacted into 1..2."""
    engine = _engine(qwen2, max_loras=3)
    for name in ("a1", "a2", "a3"):
        engine.adapters.activate(name)
    assert engine.adapters.slot_table() == {1: "a1", 2: "a2", 3: "a3"}
    bound = []
    original = Engine.bind_adapters

    def spy(self, binding, rows, lengths):
        bound.append(sorted({slot for members in rows for slot, _ in members}))
        return original(self, binding, rows, lengths)

    monkeypatch.setattr(Engine, "bind_adapters", spy)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4))
    results = scheduler.run_to_completion([_request(1, "a1", 4), _request(2, "a3", 4)])
    assert all(max(slots) <= 2 for slots in bound if slots), bound
    assert engine.adapters.stats.slot_moves >= 1
    assert [r.output_ids for r in results] == [_alone(qwen2, _request(1, "a1", 4)), _alone(qwen2, _request(2, "a3", 4))]


# -- admission ----------------------------------------------------------------------------------


def test_a_request_waits_for_a_slot_and_the_lru_slot_drains_for_it(qwen2):
    """max_loras 2, both slots held: a1 (held longest) drains for a3; a2 rows may still go ahead."""
    engine = _engine(qwen2, max_loras=2)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=8))
    admitted = []
    scheduler.add_request("A-a1", _request(1, "a1", 6))
    scheduler.step()
    scheduler.add_request("B-a2", _request(2, "a2", 12))
    scheduler.step()
    for request_id, adapter in (("C-a3", "a3"), ("D-a2", "a2"), ("E-a1", "a1")):
        scheduler.add_request(request_id, _request(3, adapter, 3))
    order = []
    for _ in range(60):
        if not scheduler.has_unfinished_requests():
            break
        running_before = {seq.request_id for seq in scheduler._running}
        scheduler.step()
        order += [seq.request_id for seq in scheduler._running if seq.request_id not in running_before]
        admitted.append(set(engine.adapters.slot_table().values()))
    assert order.index("D-a2") < order.index("C-a3"), "a request whose adapter is in a slot goes ahead"
    assert order.index("C-a3") < order.index("E-a1"), "the draining a1 slot takes no new rows: C gets it first"
    assert engine.adapters.stats.slot_evictions >= 1


def test_max_loras_counts_adapters_of_the_highest_rank_and_lower_ranks_share_their_room(qwen2):
    """max_loras 1 at max_lora_rank 64 is four 16-row slots: a1, a2, a3 (ranks 8, 16, 4) run side by side
    from the first step, with nothing evicted, each row equal to its adapter alone."""
    engine = _engine(qwen2, max_loras=1, max_lora_rank=64)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4))
    requests = {name: _request(seed, name, 5) for seed, name in enumerate(("a1", "a2", "a3"), start=1)}
    for name, request in requests.items():
        scheduler.add_request(name, request)
    outputs = {name: [] for name in requests}
    for update in scheduler.step():
        outputs[update.request_id] += update.new_token_ids
    assert {seq.request_id for seq in scheduler._running} == set(requests), "no request waited for a slot"
    assert sorted(engine.adapters.slot_table().values()) == ["a1", "a2", "a3"]
    while scheduler.has_unfinished_requests():
        for update in scheduler.step():
            outputs[update.request_id] += update.new_token_ids
    assert outputs == {name: _alone(qwen2, request) for name, request in requests.items()}
    assert engine.adapters.stats.slot_evictions == 0
    assert (engine.adapters.max_loras, engine.adapters.spare_host_places) == (1, 2), \
        "a lora_mix and the reads in flight are counted at max_loras, not the 4 places low ranks may fill"


def test_queue_full_is_refused_and_the_queue_keeps_working(qwen2):
    scheduler = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=1, max_waiting=1))
    scheduler.add_request("a", _request(1, None, 3))
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.add_request("b", _request(2, None, 3))
    results = []
    while scheduler.has_unfinished_requests():
        results += [u for u in scheduler.step() if u.finished]
    assert [u.request_id for u in results] == ["a"]


def test_abort_releases_the_row_and_the_adapter(qwen2):
    engine = _engine(qwen2)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4))
    scheduler.add_request("keep", _request(1, "a1", 10))
    scheduler.add_request("drop", _request(2, "a2", 50))
    scheduler.add_request("queued", _request(3, "a3", 5))
    kept = []
    for _ in range(3):
        kept += [t for u in scheduler.step() if u.request_id == "keep" for t in u.new_token_ids]
    scheduler.abort_request("drop")
    scheduler.abort_request("nobody")  # unknown ids are ignored
    updates = scheduler.step()
    assert [(u.request_id, u.finish_reason) for u in updates if u.finished] == [("drop", "abort")]
    kept += [t for u in updates if u.request_id == "keep" for t in u.new_token_ids]
    assert engine.adapters.get("a2").references == 0
    while scheduler.has_unfinished_requests():
        kept += [t for u in scheduler.step() if u.request_id == "keep" for t in u.new_token_ids]
    assert kept == _alone(qwen2, _request(1, "a1", 10))


# -- stopping -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(qwen2):
    return ChatTokenizer(qwen2.onnx_dir)


def test_stop_string_ends_the_text_before_it(qwen2, tokenizer):
    scheduler = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=2), tokenizer)
    full = scheduler.run_to_completion([_request(7, "a1", 30)])[0]
    assert len(full.text) > 12
    stop = full.text[6:9]
    cut = full.text.index(stop)
    stopped = scheduler.run_to_completion([_request(7, "a1", 30, stop=[stop, "never-there"])])[0]
    assert stopped.text == full.text[:cut] and stopped.finish_reason == "stop"
    assert stopped.output_ids == full.output_ids[: len(stopped.output_ids)]
    assert len(stopped.output_ids) < len(full.output_ids)


def test_streamed_pieces_never_split_a_character_and_join_to_the_text(tokenizer):
    ids = tokenizer.encode("héllo жук 😀 мир 🎉!")
    pieces = []
    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    for token in ids:
        pieces.append(detokenizer.add(token))
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == "héllo жук 😀 мир 🎉!"
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece == "") > 0, "some tokens hold only part of a character"


def test_min_tokens_masks_eos_and_ignore_eos_runs_to_max_tokens(qwen2):
    free = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=1))
    greedy = free.run_to_completion([_request(11, None, 12)])[0].output_ids
    engine = _engine(qwen2)
    engine.eos_ids = [greedy[3]]  # make the 4th greedy token the end of sequence
    eos_at = greedy.index(greedy[3])
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1))
    ends = scheduler.run_to_completion([GenerationRequest(_prompt(11, 6), None, SamplingParams(max_tokens=12, temperature=0.0))])[0]
    assert ends.output_ids == greedy[: eos_at + 1] and ends.finish_reason == "stop"
    late = scheduler.run_to_completion([GenerationRequest(_prompt(11, 6), None, SamplingParams(
        max_tokens=12, temperature=0.0, min_tokens=eos_at + 3))])[0]
    assert greedy[3] not in late.output_ids[: eos_at + 2], "eos cannot be sampled before min_tokens"
    ignored = scheduler.run_to_completion([GenerationRequest(_prompt(11, 6), None, SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True))])[0]
    assert ignored.output_ids == greedy and ignored.finish_reason == "length"


def test_max_tokens_defaults_to_the_rest_of_max_model_len(qwen2):
    scheduler = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=2, max_model_len=16))
    result = scheduler.run_to_completion([GenerationRequest(_prompt(1, 10), None, SamplingParams(
        max_tokens=None, temperature=0.0, ignore_eos=True))])[0]
    assert len(result.output_ids) == 6 and result.finish_reason == "length"
    assert scheduler.engine.kv.max_len == 16, "the KV cache never grows past max_model_len"
    with pytest.raises(UserInputError, match=r"prompt \(10 tokens\) \+ max tokens \(7\) exceeds the 16 positions"):
        scheduler.check(GenerationRequest(_prompt(1, 10), None, SamplingParams(max_tokens=7)))
    with pytest.raises(UserInputError, match="above the model's"):
        Scheduler(scheduler.engine, SchedulerConfig(max_model_len=qwen2.spec.max_position_embeddings + 1))


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                         ("min_tokens", -1), ("stop", ["ok", ""]), ("seed", -5)])
def test_bad_request_fields_are_refused(qwen2, tokenizer, field, value):
    scheduler = Scheduler(_engine(qwen2), tokenizer=tokenizer)
    request = GenerationRequest(_prompt(1, 4), None, SamplingParams(max_tokens=4))
    setattr(request.sampling, field, value)
    with pytest.raises(UserInputError, match=field):
        scheduler.add_request("x", request)
    assert not scheduler.has_unfinished_requests()


def test_unknown_adapter_is_refused(qwen2):
    with pytest.raises(UserInputError, match="unknown adapter 'zz'"):
        Scheduler(_engine(qwen2)).add_request("x", GenerationRequest(_prompt(1, 4), "zz", SamplingParams(max_tokens=4)))


# -- KV rows --------------------------------------------------------------------------------------


def test_move_row_packs_and_clears_what_the_target_held(qwen2):
    from edgelora.runtime.kv_cache import KVCache
    from edgelora.runtime.session import Device

    cache = KVCache(qwen2.spec, 3, max_len=8, device=Device("cpu"))
    cache.clear_rows(range(3))
    for buffer in cache.host_buffers():
        buffer[0, :, :6] = 1.0
        buffer[2, :, :3] = 2.0
    cache.note_written(0, [6, 0, 3])
    cache.move_row(2, 0)
    for buffer in cache.host_buffers():
        assert (buffer[0, :, :3] == 2.0).all() and (buffer[0, :, 3:] == 0).all()
    cache.clear_rows([2])
    for buffer in cache.host_buffers():
        assert (buffer[2] == 0).all()


# -- adapter versions -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_loras", [3, 1])
def test_a_new_version_serves_requests_added_after_it_while_running_rows_finish_on_theirs(qwen2, max_loras):
    """cust = a1's bytes; a request runs; cust gets a2's bytes; a second request: each equals its version alone.

    With one slot the new version waits for the old one's rows, like any request waiting for a slot.
    """
    engine = _engine(qwen2, max_loras=max_loras)
    engine.adapters.add("cust", qwen2.processed["a1"])
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4))
    outputs: dict[str, list[int]] = {"old": [], "new": []}
    finished_at: dict[str, int] = {}
    scheduler.add_request("old", _request(1, "cust", 24))
    old_version = engine.adapters.current("cust")
    for step in range(200):
        if step == 3:
            engine.adapters.add("cust", qwen2.processed["a2"])
            scheduler.add_request("new", _request(2, "cust", 8))
        if step > 3 and not scheduler.has_unfinished_requests():
            break
        for update in scheduler.step():
            outputs[update.request_id] += update.new_token_ids
            if update.finished:
                finished_at[update.request_id] = step
    assert outputs["old"] == _alone(qwen2, _request(1, "a1", 24))
    assert outputs["new"] == _alone(qwen2, _request(2, "a2", 8))
    if max_loras == 1:
        assert finished_at["new"] > finished_at["old"] + 1, "v2 waited for v1's slot"
    else:
        assert finished_at["new"] < finished_at["old"], "v2 ran beside v1"
    assert old_version not in engine.adapters.versions(), "v1 freed with its last row"
    assert engine.adapters.get("cust").requests == 0


# -- chunked prefill: a prompt longer than the step budget comes in chunks --------------------------


def _chunk_log(scheduler: Scheduler) -> tuple[int, int, int]:
    step = scheduler.last_step
    return step.prefill_rows, step.decode_rows, step.chunk_tokens


def test_chunked_prompts_give_the_ids_of_whole_prompts(qwen2):
    """Budget 8: prompts of 30 and 19 tokens come in chunks, beside short ones, adapters and a mix."""
    requests = [_request(1, "a1", 6, length=30), _request(2, None, 6, length=5), _request(3, "a2", 6, length=19),
                _request(4, "a3", 6, length=3),
                GenerationRequest(_prompt(5, 23), None, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                                  {"a1": 0.5, "a2": 0.5})]
    whole = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=0))
    chunked = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8))
    want = [out.output_ids for out in whole.run_to_completion(requests)]
    assert [out.output_ids for out in chunked.run_to_completion(requests)] == want
    assert chunked.stats.prefill_steps > whole.stats.prefill_steps


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(qwen2):
    """The step log: while the long prompt is pending, every chunk step is followed by a decode step
    of the two running rows, and no step feeds more than the budget."""
    scheduler = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8))
    scheduler.add_request("r1", _request(1, "a1", 40, length=4))
    scheduler.add_request("r2", _request(2, None, 40, length=4))
    scheduler.step()
    assert _chunk_log(scheduler) == (2, 0, 0), "two short prompts prefilled together"
    scheduler.add_request("long", _request(3, "a2", 4, length=37))
    log, first_token = [], None
    for _ in range(30):
        updates = scheduler.step()
        log.append(_chunk_log(scheduler))
        if any(update.request_id == "long" and update.new_token_ids for update in updates):
            first_token = len(log)
            break
    assert first_token is not None
    chunks = [entry[2] for entry in log if entry[2]]
    assert chunks == [8, 8, 8, 8, 5], "37 tokens in chunks of the budget"
    assert log == [(0, 0, 8), (0, 2, 0)] * 4 + [(1, 0, 5)], "a decode step of the running rows after every chunk"
    assert scheduler.num_running == 3


def test_a_prompt_aborted_mid_chunks_frees_its_row_at_once(qwen2):
    scheduler = Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8))
    scheduler.add_request("long", _request(3, "a2", 4, length=37))
    scheduler.step()
    assert _chunk_log(scheduler) == (0, 0, 8) and scheduler.num_running == 1
    scheduler.abort_request("long")
    scheduler.add_request("next", _request(4, None, 3))
    updates = scheduler.step()
    assert (updates[0].request_id, updates[0].finish_reason) == ("long", "abort")
    assert _chunk_log(scheduler) == (1, 0, 0), "the only row was free again in the same step"
    assert scheduler.engine.adapters.get("a2").references == 0


def test_a_budget_below_the_rows_is_refused(qwen2):
    with pytest.raises(UserInputError, match="max_num_batched_tokens 2"):
        Scheduler(_engine(qwen2), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=2))
