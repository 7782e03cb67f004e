"""The scheduler's policy with a fake engine that returns chosen logits: no ONNX model, fast.

As vLLM tests its scheduler with hand-made model outputs: the engine here is a few lines of
Python that keeps each KV row's tokens (so a row moved or cleared wrongly shows up in the
tokens), and picks each row's next token from its tokens and the adapter in its slot. The
adapter cache is the real one, over the real native slot pool, with tiny adapter files.

What is checked: FCFS admission into free rows, the least recently used held slot draining for a
request that waits for a slot, compaction of running adapters into slots 1..k, stop conditions
(eos, min_tokens, max_tokens, stop strings), aborts of waiting and running requests, the queue
bound, and that every request's tokens equal the ones it gets when it runs alone.
"""

from __future__ import annotations

import shutil
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgelora.errors import UserInputError
from edgelora.formats import contract
from edgelora.formats.lora_manifest import LoraManifest, LoraSite
from edgelora.formats.model_spec import ModelSpec
from edgelora.formats.processed_adapter import ProcessedAdapterConfig
from edgelora.runtime import native
from edgelora.runtime.adapter_cache import AdapterCache
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import StepPlan
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, QueueFull, Scheduler

VOCAB = 32
EOS = 31
SIZE = 4  # the one LoRA site: a 4x4 projection of layer 0


def _spec() -> ModelSpec:
    return ModelSpec(architecture="Fake", family="fake", num_layers=1, num_heads=1, num_kv_heads=1, head_dim=SIZE,
                     hidden_size=SIZE, intermediate_size=SIZE, vocab_size=VOCAB, max_position_embeddings=256,
                     dtype="float32", eos_token_ids=[EOS], module_shapes={"q": [SIZE, SIZE]})


def _manifest() -> LoraManifest:
    site = LoraSite(0, "q", contract.lora_a_name(0, "q"), contract.lora_b_name(0, "q"), SIZE, SIZE)
    return LoraManifest(target_modules=["q"], num_layers=1, dtype="float32", sites=[site])


def _adapter(folder: Path, seed: int) -> Path:
    """A processed rank-2 adapter on the one site (its values do not matter to the fake engine)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({contract.lora_a_name(0, "q"): rng.standard_normal((SIZE, 2)).astype(np.float16),
               contract.lora_b_name(0, "q"): rng.standard_normal((2, SIZE)).astype(np.float16)},
              str(folder / contract.PROCESSED_ADAPTER))
    ProcessedAdapterConfig(rank=2, lora_alpha=2.0, use_rslora=False, target_modules=["q"], num_layers=1,
                           module_shapes={"q": [SIZE, SIZE]}, dtype="float16").save(folder)
    return folder


@dataclass
class FakeEngine:
    """What the scheduler needs of an engine; each KV row is the list of its tokens."""

    adapters: AdapterCache
    spec: ModelSpec = field(default_factory=_spec)
    eos_at: dict[str, int] = field(default_factory=dict)  # adapter name -> completion index at which it says EOS
    eos_ids: list[int] = field(default_factory=lambda: [EOS])
    plans: list[StepPlan] = field(default_factory=list)
    row_adapters: list[list[str]] = field(default_factory=list)  # per step: each row's adapter name ("base")
    rows: list[list[int]] = field(default_factory=list)
    prompt_len: list[int] = field(default_factory=list)
    last_run_s: float = 0.0
    config: EngineConfig = field(default_factory=EngineConfig)
    fresh: set[int] = field(default_factory=set)  # rows started from a cached prefix, not stepped yet

    def check_prompt(self, prompt_ids: list[int], where: str) -> None:
        if not prompt_ids:
            raise UserInputError(f"{where}: the prompt has no tokens")

    def open_rows(self, rows: int, max_len: int, initial_len: int | None = None) -> list[list[int]]:
        self.rows, self.prompt_len = [[] for _ in range(rows)], [0] * rows
        return self.rows

    @property
    def kv(self) -> list[list[int]]:
        return self.rows

    def move_row(self, source: int, target: int) -> None:
        self.rows[target], self.prompt_len[target] = list(self.rows[source]), self.prompt_len[source]
        self.rows[source] = []

    def shrink_rows(self, positions: int) -> None:
        pass

    def start_rows(self, rows: list[int], prefixes: list[list[np.ndarray]], positions: int = 0) -> None:
        for row, blocks in zip(rows, prefixes):
            self.rows[row] = [int(token) for block in blocks for token in block]
            self.fresh.add(row)

    def read_prefix(self, row: int, start: int, stop: int) -> np.ndarray:
        return np.array(self.rows[row][start:stop], np.int64)  # a fake row's "KV" is its tokens

    def step(self, plan: StepPlan) -> np.ndarray:
        plan.check()
        self.plans.append(plan)
        names = self.adapters.slot_table()
        self.row_adapters.append([names[slot] if slot else "base" for slot in plan.slots])
        logits = np.zeros((plan.rows, 1, VOCAB), np.float32)
        for index, (tokens, position, slot) in enumerate(zip(plan.token_ids, plan.positions, plan.slots)):
            row = self.rows[plan.first_row + index]
            if position == 0 or plan.first_row + index in self.fresh:
                if position == 0:
                    row.clear()
                self.prompt_len[plan.first_row + index] = position + len(tokens)
                self.fresh.discard(plan.first_row + index)
            assert len(row) == position, "a row's cache must hold exactly the tokens before this step"
            row.extend(tokens)
            name = names[slot] if slot else "base"
            generated = len(row) - self.prompt_len[plan.first_row + index]
            if self.eos_at.get(name) == generated:
                logits[index, 0, EOS] = 1.0
            else:  # a token that depends on the whole row and on the adapter
                logits[index, 0, zlib.crc32(f"{name}:{row}".encode()) % (VOCAB - 1)] = 1.0
        return logits


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policy_adapters")
    return {name: _adapter(root / name, seed) for seed, name in enumerate(("x", "y", "z"))}


def _engine(adapter_files, max_loras: int = 3, **extra) -> FakeEngine:
    pool = native.AdapterPool([(SIZE, SIZE)], max_loras, contract.MAX_LORA_RANK, "float32", "cpu")
    cache = AdapterCache(pool, _spec(), _manifest(), contract.MAX_LORA_RANK, max(16, max_loras))
    for name, path in adapter_files.items():
        cache.add(name, path, read=True)  # host-ready: admission here never waits for a read (see test_prefetch)
    return FakeEngine(cache, **extra)


def _request(adapter: str | None, max_tokens: int = 6, prompt: tuple[int, ...] = (1, 2, 3), **sampling):
    return GenerationRequest(list(prompt), adapter, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                   **sampling))


def _run(scheduler: Scheduler, arrivals: dict[int, dict[str, GenerationRequest]], aborts: dict[int, list[str]] = (),
         limit: int = 200) -> tuple[dict[str, list[int]], dict[str, str]]:
    outputs: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    aborts = dict(aborts)
    for step in range(limit):
        for request_id, request in arrivals.get(step, {}).items():
            scheduler.add_request(request_id, request)
            outputs[request_id] = []
        for request_id in aborts.get(step, []):
            scheduler.abort_request(request_id)
        if step > max(arrivals) and not scheduler.has_unfinished_requests():
            break
        for update in scheduler.step():
            outputs[update.request_id] += update.new_token_ids
            if update.finished:
                finished[update.request_id] = update.finish_reason
    return outputs, finished


def _alone(adapter_files, request: GenerationRequest) -> list[int]:
    return Scheduler(_engine(adapter_files), SchedulerConfig(max_num_seqs=1)).run_to_completion([request])[0].output_ids


def test_admission_is_first_come_first_served_into_free_rows(adapter_files):
    engine = _engine(adapter_files)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=2))
    requests = {"a": _request("x", 3), "b": _request(None, 6), "c": _request("y", 2, prompt=(4, 5))}
    outputs, finished = _run(scheduler, {0: requests})
    kinds = [("prefill" if plan.is_prefill else "decode", plan.first_row, plan.rows) for plan in engine.plans]
    assert kinds[:2] == [("prefill", 0, 2), ("decode", 0, 2)], "a and b fill both rows; c waits"
    assert ("prefill", 1, 1) in kinds, "c takes the row a left (b moved to row 0)"
    assert finished == {"a": "length", "b": "length", "c": "length"}
    for request_id, request in requests.items():
        assert outputs[request_id] == _alone(adapter_files, request), request_id


def test_a_request_waiting_for_a_slot_drains_the_least_recently_used_held_one(adapter_files):
    """One slot: x runs; y waits for the slot; later x requests do not jump ahead of y (no starvation)."""
    engine = _engine(adapter_files, max_loras=1)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4))
    outputs, finished = _run(scheduler, {0: {"x1": _request("x", 5)}, 1: {"y1": _request("y", 3)},
                                         2: {"x2": _request("x", 3)}})
    prefills = [names for plan, names in zip(engine.plans, engine.row_adapters) if plan.is_prefill]
    assert prefills == [["x"], ["y"], ["x"]], "x2 arrived while x held the slot, yet waits behind y1"
    y_prefill = engine.row_adapters.index(["y"])
    assert all(names == ["x"] for names in engine.row_adapters[:y_prefill]), "y1 waited for x1's rows to drain"
    assert all(len(set(names)) == 1 for names in engine.row_adapters), "one slot: one adapter a step"
    assert set(finished.values()) == {"length"}
    assert outputs["y1"] == _alone(adapter_files, _request("y", 3))
    assert outputs["x2"] == _alone(adapter_files, _request("x", 3))


def test_running_adapters_are_compacted_into_the_lowest_slots(adapter_files):
    engine = _engine(adapter_files, max_loras=3)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=3))
    _run(scheduler, {0: {"x": _request("x", 2), "y": _request("y", 2), "z": _request("z", 8)}})
    late = [plan for plan in engine.plans if plan.rows == 1]
    assert late and all(plan.slots == [1] for plan in late), "z alone runs from slot 1 once x and y left"
    assert all(sorted(set(plan.slots)) == list(range(1, len(set(plan.slots)) + 1)) for plan in engine.plans)


def test_stop_conditions_eos_min_tokens_max_tokens(adapter_files):
    engine = _engine(adapter_files, eos_at={"x": 2})
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4))
    outputs, finished = _run(scheduler, {0: {"eos": _request("x", 10), "ignored": _request("x", 5, ignore_eos=True),
                                             "length": _request("y", 4)}})
    assert finished == {"eos": "stop", "ignored": "length", "length": "length"}
    assert outputs["eos"][-1] == EOS and len(outputs["eos"]) == 3
    assert len(outputs["ignored"]) == 5 and len(outputs["length"]) == 4


def test_min_tokens_masks_eos_until_reached(adapter_files):
    engine = _engine(adapter_files, eos_at={"x": 1})
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1))
    outputs, finished = _run(scheduler, {0: {"r": _request("x", 6, min_tokens=4)}})
    assert EOS not in outputs["r"] and finished["r"] == "length"


def test_stop_strings_end_the_text_before_them(adapter_files):
    class Letters:
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + token % 26) for token in ids)

    engine = _engine(adapter_files)
    greedy = _alone(adapter_files, _request("x", 8))
    stop = Letters.decode(greedy[2:4])
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1), Letters())
    update_text, finished = "", None
    scheduler.add_request("r", _request("x", 8, stop=[stop]))
    while scheduler.has_unfinished_requests():
        for update in scheduler.step():
            update_text += update.new_text
            finished = update.finish_reason or finished
    assert finished == "stop" and update_text == Letters.decode(greedy)[: Letters.decode(greedy).find(stop)]


def test_aborts_free_rows_and_adapters_and_keep_the_others_right(adapter_files):
    engine = _engine(adapter_files)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=2))
    requests = {"keep": _request("x", 8), "drop": _request("y", 8), "queued": _request("z", 3)}
    outputs, finished = _run(scheduler, {0: requests}, aborts={2: ["drop"], 3: ["nobody"]})
    assert finished["drop"] == "abort" and finished["keep"] == "length" and finished["queued"] == "length"
    assert outputs["keep"] == _alone(adapter_files, requests["keep"]), "the row that stayed kept its cache"
    assert outputs["queued"] == _alone(adapter_files, requests["queued"])
    assert all(engine.adapters.get(name).references == 0 and engine.adapters.get(name).requests == 0
               for name in ("x", "y", "z"))


def test_aborting_a_waiting_request_runs_nothing_for_it(adapter_files):
    engine = _engine(adapter_files)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1))
    scheduler.add_request("running", _request(None, 4))
    scheduler.add_request("waiting", _request("y", 4))
    scheduler.step()
    scheduler.abort_request("waiting")
    updates = scheduler.step()
    assert [(u.request_id, u.finish_reason) for u in updates if u.finished] == [("waiting", "abort")]
    assert engine.adapters.get("y").requests == 0 and all(plan.slots == [0] for plan in engine.plans)


def test_the_queue_bound_refuses_with_queue_full(adapter_files):
    scheduler = Scheduler(_engine(adapter_files), SchedulerConfig(max_num_seqs=1, max_waiting=1))
    scheduler.add_request("a", _request(None))
    with pytest.raises(QueueFull):
        scheduler.add_request("b", _request(None))
    scheduler.step()  # a runs; its waiting place is free again
    scheduler.add_request("b", _request(None))


def test_a_mix_takes_a_slot_per_member_and_waits_until_it_has_them(adapter_files):
    """Two slots, x running: a mix of y and z needs both slots, so it waits for x's row to leave,
    holds both members' versions while it runs, and releases both when it ends."""
    engine = _engine(adapter_files, max_loras=2)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4))
    mix = GenerationRequest([1, 2, 3], None, SamplingParams(max_tokens=3, temperature=0.0), {"y": 0.5, "z": -1.0})
    outputs, finished = _run(scheduler, {0: {"x1": _request("x", 4)}, 1: {"m": mix}})
    mixed = [plan for plan in engine.plans if plan.mixes]
    assert mixed and all(plan.rows == 1 and plan.slots == [0] for plan in mixed), "the mix ran alone, after x1"
    x_steps = [i for i, names in enumerate(engine.row_adapters) if "x" in names]
    assert max(x_steps) < engine.plans.index(mixed[0]), "x1 drained before the mix took both slots"
    assert {slot for slot, _ in mixed[0].mixes[0]} == {1, 2}
    assert sorted(weight for _, weight in mixed[0].mixes[0]) == [-1.0, 0.5]
    assert finished == {"x1": "length", "m": "length"}
    assert outputs["x1"] == _alone(adapter_files, _request("x", 4))
    assert all(engine.adapters.get(name).requests == 0 and engine.adapters.get(name).references == 0
               for name in ("x", "y", "z"))


def test_a_waiting_adapters_file_is_read_on_a_worker_thread_while_the_batch_decodes(adapter_files, monkeypatch):
    """x runs; y is registered but not read. y's read blocks on a worker thread until released: meanwhile every
    step decodes x, and once the copy is in, y is admitted and answers as alone."""
    pool = native.AdapterPool([(SIZE, SIZE)], 3, contract.MAX_LORA_RANK, "float32", "cpu")
    cache = AdapterCache(pool, _spec(), _manifest(), contract.MAX_LORA_RANK, 16)
    cache.add("x", adapter_files["x"], read=True)
    cache.add("y", adapter_files["y"])
    engine = FakeEngine(cache)
    release, threads = threading.Event(), []
    real_job = cache.read_job

    def slow_job(target):
        job = real_job(target)

        def blocked():
            threads.append(threading.current_thread().name)
            assert release.wait(30)
            return job()
        return blocked

    monkeypatch.setattr(cache, "read_job", slow_job)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=2))
    scheduler.add_request("x", _request("x", 40))
    scheduler.step()
    scheduler.add_request("y", _request("y", 3))
    for _ in range(5):
        scheduler.step()
    assert [plan.rows for plan in engine.plans[1:]] == [1] * 5, "x decodes alone while y's file is read"
    assert scheduler.num_waiting == 1 and threads and threads[0].startswith("edgelora-prefetch")
    release.set()
    outputs = {"x": [], "y": []}
    for _ in range(100):
        for update in scheduler.step():
            outputs[update.request_id] += update.new_token_ids
        if not scheduler.has_unfinished_requests():
            break
    assert outputs["y"] == _alone(adapter_files, _request("y", 3))
    assert cache.stats.host_misses == 1 and cache.stats.slot_misses == 2


def test_a_failed_read_fails_only_the_request_that_needed_it(adapter_files, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter_files["y"], broken)
    engine = _engine({"x": adapter_files["x"]})
    engine.adapters.add("b", broken)
    weights = broken / contract.PROCESSED_ADAPTER
    weights.write_bytes(weights.read_bytes()[:100])  # damaged after registration
    outputs, finished = _run(Scheduler(engine, SchedulerConfig(max_num_seqs=2)),
                             {0: {"b": _request("b", 3), "x": _request("x", 3)}})
    assert finished == {"b": "error", "x": "length"}
    assert outputs["x"] == _alone({"x": adapter_files["x"]}, _request("x", 3))
