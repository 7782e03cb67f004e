"""edgelora serve: a real server process on a free loopback port, driven by the official openai client.

Four server configurations, each started once per module: the main one (adapters from the start,
run-time updates inside a --lora-root), one with API keys (tenants), one with a one-row batch and
a one-request queue, and one per SIGTERM test. Raw and malformed requests go through httpx.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from hot_swap import HOWS, OpenStream, copy_adapter, greedy_ids, swap_during_stream
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port, running_server

from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.runtime.tokenizer import ChatTokenizer

SERVED = "tiny"
PROMPT = "The quick brown fox"
MODEL_LEN = 2048  # --max-model-len of the main server fixture: its longest requests outlive a few HTTP round trips
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Characters outside the tokenizer's training text: each is several byte-level tokens.
MULTIBYTE_PROMPTS = ["Say ж and 🙂 please", "Ж🙂ж", "Translate to German: ж good morning 🙂"]
TIMEOUT_S = 60.0


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample(exported_samples):
    return exported_samples["qwen2"]


@pytest.fixture(scope="module")
def lora_root(exported_samples, tmp_path_factory) -> Path:
    """An adapter root with good, broken and escaping entries; ``outside`` lies beside it."""
    sample = exported_samples["qwen2"]
    parent = tmp_path_factory.mktemp("lora")
    root = parent / "root"
    root.mkdir()
    shutil.copytree(sample.processed["a1"], parent / "outside")
    shutil.copytree(sample.adapters["a2"], root / "peft_a2")
    shutil.copytree(sample.processed["a3"], root / "processed_a3")
    for name in ("d1", "d2"):
        shutil.copytree(sample.processed["a1"], root / name)
    shutil.copytree(sample.processed["a2"], root / "truncated")
    shutil.copytree(sample.adapters["a1"], root / "truncated_peft")
    for path in (root / "truncated" / "processed_adapter_model.safetensors",
                 root / "truncated_peft" / "adapter_model.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    (root / "bin_only").mkdir()
    shutil.copy(sample.adapters["a1"] / "adapter_config.json", root / "bin_only")
    (root / "bin_only" / "adapter_model.bin").write_bytes(b"a pickle the server must not open")
    shutil.copytree(exported_samples["llama"].adapters["a1"], root / "other_base")
    (root / "escape").symlink_to(parent / "outside")
    return root


@dataclass
class Served:
    """A running ``edgelora serve``: its URL, its process, and the key requests send unless told otherwise."""

    url: str
    process: subprocess.Popen
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


@contextlib.contextmanager
def _serving(args: list[str], api_key: str | None = None) -> Iterator[Served]:
    with running_server(*args) as (url, process):
        yield Served(url, process, api_key)


@pytest.fixture(scope="module")
def server(sample, lora_root):
    """Adapters a1, a2 (processed) and a3 (a PEFT folder, processed at startup); run-time updates on."""
    with _serving(["--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED,
                   "--lora-modules", f"a1={sample.processed['a1']}", f"a2={sample.processed['a2']}",
                   f"a3={sample.adapters['a3']}", "--enable-lora-updates", "--lora-root", str(lora_root),
                   "--lora-cache-dir", str(lora_root.parent / "cache"), "--max-num-seqs", "4", "--max-model-len", str(MODEL_LEN),
                   "--threads", "1", "--metrics-adapter-labels", "2"]) as served:
        yield served


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def offline(sample) -> LLM:
    """The same model and adapters through the Python API, in this process."""
    return LLM(sample.onnx_dir, LoraConfig(lora_dir=[str(path) for path in sample.processed.values()]),
               num_threads=1)


KEYS = {"key-a": {"adapters": ["a1"]}, "key-b": {"adapters": ["a2"], "max_concurrent": 1},
        "key-admin": {"adapters": "*", "admin": True}}


@pytest.fixture(scope="module")
def tenant_server(sample, lora_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    (folder / "keys.json").write_text(json.dumps(KEYS))
    with _serving(["--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED,
                   "--lora-modules", f"a1={sample.processed['a1']}", f"a2={sample.processed['a2']}",
                   "--api-keys", str(folder / "keys.json"), "--enable-lora-updates", "--lora-root", str(lora_root),
                   "--lora-cache-dir", str(folder / "cache"), "--threads", "1"]) as served:
        yield served


@pytest.fixture(scope="module")
def small_server(sample):
    """One row, one waiting request, no run-time updates."""
    with _serving(["--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED, "--max-num-seqs", "1",
                   "--max-waiting", "1", "--threads", "1"]) as served:
        yield served


# -- helpers -------------------------------------------------------------------------------------
def _lora(sample, adapter: str | None) -> LoRARequest | None:
    return LoRARequest(adapter, 1, str(sample.processed[adapter])) if adapter else None


def _greedy(offline: LLM, sample, prompt, adapter: str | None, max_tokens: int):
    return offline.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), _lora(sample, adapter))[0]


def _metric(server: Served, sample_name: str, key: str | None = None, **labels: str) -> float:
    """Sum of the samples called ``sample_name`` whose labels include ``labels``."""
    text = httpx.get(server.url + "/metrics", headers=server.headers(key), timeout=TIMEOUT_S).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _decode_steps_with_rows(server: Served) -> tuple[float, float]:
    """(all decode steps, decode steps with one row) from the histogram."""
    return (_metric(server, "edgelora_decode_batch_size_count"),
            _metric(server, "edgelora_decode_batch_size_bucket", le="1.0"))


def _assert_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    return error


def _post(server: Served, route: str, body, key: str | None = None, **kwargs) -> httpx.Response:
    if isinstance(body, bytes):
        kwargs["content"] = body
        kwargs.setdefault("headers", {})["Content-Type"] = "application/json"
    else:
        kwargs["json"] = body
    headers = {**server.headers(key), **kwargs.pop("headers", {})}
    return httpx.post(server.v1 + route, headers=headers, timeout=TIMEOUT_S, **kwargs)


def _ids(choice) -> list[int]:
    return list(choice.token_ids or [])


def _wait_until(condition, timeout_s: float = 20.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def _open_stream(server: Served, body: dict, key: str | None = None) -> OpenStream:
    """A streaming completion read up to its first data line and held open until ``close``."""
    return OpenStream(server.url, body, server.headers(key))


# -- models, completions, chat -----------------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter(client):
    models = {model.id: model for model in client.models.list().data}
    assert set(models) == {SERVED, "a1", "a2", "a3"}
    assert models[SERVED].parent is None  # vLLM's shape: adapters name the base as parent
    assert all(models[name].parent == SERVED and models[name].object == "model" for name in ("a1", "a2", "a3"))


@pytest.mark.parametrize(("model", "adapter"), [(SERVED, None), ("a1", "a1"), (f"{SERVED}:a2", "a2"), ("a3", "a3")])
def test_completion_equals_offline_generate(client, offline, sample, model, adapter):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                         extra_body={"return_token_ids": True})
    expected = _greedy(offline, sample, PROMPT, adapter, 16)
    choice = response.choices[0]
    assert choice.text == expected.text
    assert _ids(choice) == expected.token_ids
    assert choice.prompt_token_ids == expected.prompt_token_ids
    assert choice.finish_reason == expected.finish_reason
    assert response.model == model
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
        (len(expected.prompt_token_ids), len(expected.token_ids), len(expected.prompt_token_ids) + len(expected.token_ids))


@pytest.mark.parametrize(("model", "adapter"), [(SERVED, None), ("a2", "a2"), (f"{SERVED}:a3", "a3")])
def test_chat_equals_offline_generate(client, offline, sample, model, adapter):
    response = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=12, temperature=0,
                                              extra_body={"return_token_ids": True})
    expected = _greedy(offline, sample, CHAT, adapter, 12)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert _ids(choice) == expected.token_ids
    assert response.prompt_token_ids == expected.prompt_token_ids  # vLLM puts them on the response for chat
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_adapters_change_the_answer(client):
    """Guards the equality tests: base and each adapter answer differently, so a wrong slot would show."""
    answers = {model: tuple(_ids(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                           extra_body={"return_token_ids": True}).choices[0]))
               for model in (SERVED, "a1", "a2", "a3")}
    assert len(set(answers.values())) == 4


@pytest.mark.parametrize("model", [SERVED, "a2"])
def test_streamed_completion_joined_equals_the_non_streamed_one(client, model):
    kwargs = dict(model=model, prompt=MULTIBYTE_PROMPTS[0], max_tokens=48, temperature=0,
                  extra_body={"return_token_ids": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert "".join(chunk.choices[0].text for chunk in with_choices) == whole.choices[0].text
    assert [t for chunk in with_choices for t in _ids(chunk.choices[0])] == _ids(whole.choices[0])
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: a last chunk with usage


@pytest.mark.parametrize("model", [SERVED, "a1"])
def test_streamed_chat_joined_equals_the_non_streamed_one(client, model):
    messages = [{"role": "user", "content": MULTIBYTE_PROMPTS[2]}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage is None  # no include_usage, no usage chunk


def test_characters_spanning_tokens_are_never_split(client, sample):
    """Byte-level BPE splits a rare character over several tokens; text only ever holds whole characters."""
    tokenizer = ChatTokenizer(sample.onnx_dir)
    spanning = 0
    for model in (SERVED, "a1", "a2"):
        for prompt in MULTIBYTE_PROMPTS:
            kwargs = dict(model=model, prompt=prompt, max_tokens=48, temperature=0, extra_body={"return_token_ids": True})
            whole = client.completions.create(**kwargs).choices[0]
            pieces = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices]
            decoded = tokenizer.decode(_ids(whole))
            assert whole.text == decoded == "".join(pieces)
            if "\ufffd" not in decoded:
                assert all("\ufffd" not in piece for piece in pieces)
            spanning += sum(1 for char in whole.text if char != "\ufffd" and len(char.encode()) > 1
                            and len(tokenizer.encode(char)) > 1)
    assert spanning, "no output held a character made of several tokens; pick other prompts"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(client, stream):
    full = client.completions.create(model="a1", prompt=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    kwargs = dict(model="a1", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "never-there"])
    if stream:
        chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
        stopped, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        answer = client.completions.create(**kwargs).choices[0]
        stopped, reason = answer.text, answer.finish_reason
    assert stopped == text[: text.index(stop)]
    assert reason == "stop"


def test_seeded_sampling_equals_offline_generate(client, offline, sample):
    """temperature, top_k, top_p and seed reach the sampler as the Python API passes them."""
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    expected = offline.generate(PROMPT, params, _lora(sample, "a2"))[0]
    for _ in range(2):
        answer = client.completions.create(model="a2", prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=7,
                                           extra_body={"top_k": 20, "return_token_ids": True}).choices[0]
        assert _ids(answer) == expected.token_ids and answer.text == expected.text


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_omitted_max_tokens_is_the_rest_of_the_context(client, route):
    if route == "completions":
        response = client.completions.create(model="a1", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    else:
        response = client.chat.completions.create(model="a1", messages=CHAT, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens + response.usage.completion_tokens == MODEL_LEN
    assert response.choices[0].finish_reason == "length"


def test_unknown_model_is_404_in_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    error = _assert_error_shape(_post(server, "/chat/completions", {"model": f"{SERVED}:nope", "messages": CHAT}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


# -- bad input ---------------------------------------------------------------------------------------
BAD_REQUESTS = {
    "malformed_json": ("/completions", b'{"model": "tiny", "prompt": '),
    "not_an_object": ("/completions", [1, 2, 3]),
    "missing_model": ("/completions", {"prompt": PROMPT}),
    "missing_prompt": ("/completions", {"model": SERVED}),
    "max_tokens_wrong_type": ("/completions", {"model": SERVED, "prompt": PROMPT, "max_tokens": "many"}),
    "max_tokens_zero": ("/completions", {"model": SERVED, "prompt": PROMPT, "max_tokens": 0}),
    "max_tokens_negative": ("/completions", {"model": SERVED, "prompt": PROMPT, "max_tokens": -3}),
    "n_above_the_rows": ("/completions", {"model": SERVED, "prompt": PROMPT, "n": 1000}),
    "n_zero": ("/completions", {"model": SERVED, "prompt": PROMPT, "n": 0}),
    "beyond_the_positions": ("/completions", {"model": SERVED, "prompt": PROMPT, "max_tokens": 5000}),
    "temperature_wrong_type": ("/completions", {"model": SERVED, "prompt": PROMPT, "temperature": "hot"}),
    "top_p_zero": ("/completions", {"model": SERVED, "prompt": PROMPT, "top_p": 0}),
    "stop_wrong_type": ("/completions", {"model": SERVED, "prompt": PROMPT, "stop": 5}),
    "empty_prompt": ("/completions", {"model": SERVED, "prompt": ""}),
    "token_outside_the_vocabulary": ("/completions", {"model": SERVED, "prompt": [10**6]}),
    "an_empty_prompt_of_two": ("/completions", {"model": SERVED, "prompt": [[5, 6], []]}),
    "chat_empty_messages": ("/chat/completions", {"model": SERVED, "messages": []}),
    "chat_messages_not_a_list": ("/chat/completions", {"model": SERVED, "messages": "hello"}),
    "chat_message_without_role": ("/chat/completions", {"model": SERVED, "messages": [{"content": "hi"}]}),
    "chat_beyond_the_positions": ("/chat/completions", {"model": SERVED, "messages": CHAT,
                                                         "max_completion_tokens": 5000}),
    "chat_n_above_the_rows": ("/chat/completions", {"model": SERVED, "messages": CHAT, "n": 1000}),
    "logprobs_above_20": ("/completions", {"model": SERVED, "prompt": PROMPT, "logprobs": 21}),
    "chat_top_logprobs_without_logprobs": ("/chat/completions", {"model": SERVED, "messages": CHAT,
                                                                  "top_logprobs": 2}),
    "load_without_path": ("/load_lora_adapter", {"lora_name": "x"}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_400_and_the_server_keeps_serving(server, client, case):
    route, body = BAD_REQUESTS[case]
    _assert_error_shape(_post(server, route, body), 400)
    assert client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


UNSUPPORTED = {"functions": [{"name": "f"}], "function_call": "auto", "best_of": 2, "suffix": "x",
               "min_p": 0.1, "reasoning_effort": "high"}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_an_unimplemented_field_that_changes_the_answer_is_a_400_naming_it(server, field):
    for route, body in (("/completions", {"model": SERVED, "prompt": PROMPT}),
                        ("/chat/completions", {"model": SERVED, "messages": CHAT})):
        error = _assert_error_shape(_post(server, route, {**body, field: UNSUPPORTED[field], "max_tokens": 2}), 400)
        assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_parameter"


def test_logit_bias_removes_or_forces_tokens_and_penalties_change_a_repetitive_answer(client):
    def ids(**extra) -> list[int]:
        response = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=12, temperature=0,
                                             extra_body={"return_token_ids": True, "ignore_eos": True, **extra})
        return response.choices[0].token_ids

    greedy = ids()
    assert ids(logit_bias={str(greedy[0]): -100})[0] != greedy[0], "-100 removes the greedy token"
    assert ids(logit_bias={"42": 100}) == [42] * 12, "+100 forces a token"
    assert ids(logit_bias={str(greedy[0]): 0}) == greedy
    forced = {"logit_bias": {"42": 5.0}}  # a preference strong enough to repeat, until each penalty pushes back
    assert ids(**forced) == [42] * 12
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 4.0}):
        penalised = ids(**forced, **penalty)
        assert penalised != [42] * 12 and penalised[0] == 42, penalty


def test_n_choices_several_prompts_and_token_id_prompts(client, offline, sample):
    def greedy_ids(prompt) -> list[int]:  # one prompt, one choice: equal to offline generate (tests above)
        response = client.completions.create(model=SERVED, prompt=prompt, max_tokens=5, temperature=0,
                                             extra_body={"return_token_ids": True})
        return response.choices[0].token_ids

    tokenizer = ChatTokenizer(sample.onnx_dir)
    first, second = tokenizer.encode(PROMPT), tokenizer.encode("Write a short poem")
    assert greedy_ids(first) == _greedy(offline, sample, PROMPT, None, 5).token_ids
    response = client.completions.create(model=SERVED, prompt=[first, second], max_tokens=5, temperature=0, n=2,
                                         extra_body={"return_token_ids": True})
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert [choice.token_ids for choice in response.choices] == [greedy_ids(first)] * 2 + [greedy_ids(second)] * 2
    assert response.usage.prompt_tokens == len(first) + len(second) and response.usage.completion_tokens == 20
    texts = client.completions.create(model=SERVED, prompt=[PROMPT, "Write a short poem"], max_tokens=5,
                                      temperature=0, extra_body={"return_token_ids": True})
    assert [choice.token_ids for choice in texts.choices] == [greedy_ids(first), greedy_ids(second)]
    sampled = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=8, n=3, seed=11, temperature=1.0)
    again = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=8, n=3, seed=11, temperature=1.0)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in sampled.choices}) > 1, "each choice samples with a seed of its own"
    stream = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=8, n=3, seed=11, temperature=1.0,
                                            stream=True)
    joined = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            joined[choice.index] += choice.delta.content or ""
    assert joined == [c.message.content for c in sampled.choices], "streaming == not, choice by choice"


@pytest.mark.parametrize("adapter", [None, "a1"])
def test_logprobs_equal_log_softmax_of_transformers_logits(server, client, sample, reference, adapter):
    """Completions echo + logprobs: every prompt token's logprob and top 5, then the generated tokens'; chat's
    top_logprobs; streaming gives the same; within 1e-4 of PEFT/transformers float32."""
    model = adapter or SERVED
    prompt_ids = ChatTokenizer(sample.onnx_dir).encode(PROMPT)
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 5,
            "return_token_ids": True}
    choice = _post(server, "/completions", body).json()["choices"][0]
    ids = prompt_ids + choice["token_ids"]
    logits = reference.logits(sample.model_dir, sample.adapters[adapter] if adapter else None, np.array([ids]))[0]
    expected = logits - logits.max(-1, keepdims=True)
    expected = expected - np.log(np.exp(expected.astype(np.float64)).sum(-1, keepdims=True))
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["token_logprobs"]) == len(ids)
    np.testing.assert_allclose(logprobs["token_logprobs"][1:], expected[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    best = np.sort(expected[:len(ids) - 1], axis=1)[:, ::-1][:, :5]
    for top, want in zip(logprobs["top_logprobs"][1:], best):  # texts shared by two tokens keep the best one
        got = sorted(top.values(), reverse=True)
        assert got[0] == pytest.approx(want[0], abs=1e-4) and all(np.abs(want - value).min() < 1e-4 for value in got)
    assert choice["text"].startswith(ChatTokenizer(sample.onnx_dir).decode(prompt_ids))
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", server.v1 + "/completions", json={**body, "stream": True}, headers=server.headers(),
                      timeout=TIMEOUT_S) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for part in json.loads(line[6:])["choices"]:
                    for key in streamed:
                        streamed[key] += (part["logprobs"] or {}).get(key, [])
    assert streamed == logprobs, "streaming == not"
    echo_only = _post(server, "/completions", {**body, "max_tokens": 0}).json()
    assert echo_only["usage"]["completion_tokens"] == 0 and len(echo_only["choices"][0]["logprobs"]["tokens"]) == len(
        prompt_ids) and echo_only["choices"][0]["token_ids"] == []
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=3, extra_body={"return_token_ids": True})
    chat_ids = chat.prompt_token_ids + chat.choices[0].token_ids
    chat_logits = reference.logits(sample.model_dir, sample.adapters[adapter] if adapter else None,
                                   np.array([chat_ids]))[0].astype(np.float64)
    chat_expected = chat_logits - chat_logits.max(-1, keepdims=True)
    chat_expected -= np.log(np.exp(chat_expected).sum(-1, keepdims=True))
    start = len(chat.prompt_token_ids) - 1
    for position, entry in enumerate(chat.choices[0].logprobs.content):
        token = chat.choices[0].token_ids[position]
        assert abs(entry.logprob - chat_expected[start + position, token]) < 1e-4
        np.testing.assert_allclose([top.logprob for top in entry.top_logprobs],
                                   np.sort(chat_expected[start + position])[::-1][:3], atol=1e-4)


STRUCTURED_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "score", "tag"],
                     "properties": {"name": {"type": "string", "maxLength": 10},
                                    "score": {"type": "integer", "minimum": 0, "maximum": 99},
                                    "tag": {"enum": ["red", "green", "blue"]}}}


def test_json_schema_answers_validate_for_the_base_and_every_adapter_in_one_mixed_batch(client):
    import jsonschema

    def ask(model: str) -> str:
        response = client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=64, temperature=0.8, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "card", "schema": STRUCTURED_SCHEMA}})
        assert response.choices[0].finish_reason == "stop"
        return response.choices[0].message.content

    def free(model: str) -> str:
        return client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0).choices[0] \
            .message.content

    models = [SERVED, "a1", "a2", "a3"]
    with ThreadPoolExecutor(6) as pool:  # four constrained rows and two free ones share the steps
        answers = list(pool.map(ask, models))
        frees = list(pool.map(free, [SERVED, "a1"]))
    for answer in answers:
        jsonschema.validate(json.loads(answer), STRUCTURED_SCHEMA)
    assert frees == [free(SERVED), free("a1")], "rows without a grammar are untouched"


@pytest.mark.parametrize("route", ["/completions", "/chat/completions"])
def test_choice_regex_and_json_object_hold_streaming_or_not(server, route):
    base = {"model": SERVED, "max_tokens": 24, "temperature": 0}
    base.update({"prompt": PROMPT} if route == "/completions" else {"messages": CHAT})

    def text(body: dict) -> str:
        response = _post(server, route, body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["text"] if route == "/completions" else choice["message"]["content"]

    def streamed(body: dict) -> str:
        joined = ""
        with httpx.stream("POST", server.v1 + route, json={**body, "stream": True}, headers=server.headers(),
                          timeout=TIMEOUT_S) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for part in json.loads(line[6:])["choices"]:
                        joined += part.get("text") or (part.get("delta") or {}).get("content") or ""
        return joined

    choice = {**base, "structured_outputs": {"choice": ["alpha", "beta gamma"]}}
    assert text(choice) in ("alpha", "beta gamma") and streamed(choice) == text(choice)
    regex = {**base, "structured_outputs": {"regex": "[0-9]{2}-[a-c]{3}"}}
    answer = text(regex)
    assert len(answer) == 6 and answer[:2].isdigit() and answer[2] == "-" and set(answer[3:]) <= set("abc")
    assert streamed(regex) == answer
    assert text({**base, "guided_choice": ["only"]}) == "only"
    short = {**base, "max_tokens": 2, "response_format": {"type": "json_object"}}
    response = _post(server, route, short).json()["choices"][0]
    assert response["finish_reason"] == "length", "max_tokens ends it before the grammar completes"


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, None),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
])
def test_an_invalid_grammar_is_a_400_naming_the_problem(server, fields, param):
    error = _assert_error_shape(_post(server, "/chat/completions", {"model": SERVED, "messages": CHAT, **fields}), 400)
    assert param is None or error["param"] == param
    assert "nonsense" in error["message"] or param in error["message"]


def test_one_model_card_and_the_tokenizer_info(server, client):
    assert client.models.retrieve(SERVED).id == SERVED
    assert client.models.retrieve("a1").parent == SERVED
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    info = httpx.get(f"{server.url}/tokenizer_info", headers=server.headers(None), timeout=TIMEOUT_S).json()
    assert info["eos_token"] and info["chat_template"] and info["vocab_size"] > 0


def test_unknown_fields_are_400_and_harmless_or_default_ones_pass(server):
    error = _assert_error_shape(_post(server, "/completions", {"model": SERVED, "prompt": PROMPT, "temprature": 0}), 400)
    assert error["param"] == "temprature" and error["code"] == "unknown_parameter"
    harmless = {"user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "presence_penalty": 0,
                "frequency_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"}, "tools": None}
    response = _post(server, "/chat/completions", {"model": SERVED, "messages": CHAT, "max_tokens": 2, **harmless})
    assert response.status_code == 200, response.text
    old_style = [*CHAT, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]
    error = _assert_error_shape(_post(server, "/chat/completions", {"model": SERVED, "messages": old_style}), 400)
    assert error["param"] == "messages[1].function_call"
    named = [{"role": "user", "content": "hi", "name": "ann"}]
    assert _post(server, "/chat/completions", {"model": SERVED, "messages": named, "max_tokens": 2}).status_code == 200
    missing = _assert_error_shape(_post(server, "/completions", {"model": "nope", "prompt": PROMPT}), 404)
    assert missing["code"] == "model_not_found"
    bad = _assert_error_shape(_post(server, "/completions", {"model": SERVED, "prompt": PROMPT, "max_tokens": 0}), 400)
    assert bad["code"] is None, "OpenAI's code is null or a name, never the status"


def test_unknown_route_is_404_in_openai_shape(server):
    _assert_error_shape(httpx.get(server.v1 + "/nothing-here", timeout=TIMEOUT_S), 404)


# -- run-time adapters --------------------------------------------------------------------------------
def test_peft_adapter_loaded_at_run_time_is_processed_used_and_unloaded(server, client, offline, sample, lora_root):
    response = _post(server, "/load_lora_adapter", {"lora_name": "rt_a2", "lora_path": str(lora_root / "peft_a2")})
    assert response.status_code == 200, response.text
    assert list((lora_root.parent / "cache").glob("peft_a2-*/processed_adapter_model.safetensors"))
    assert "rt_a2" in {model.id for model in client.models.list().data}
    answer = client.completions.create(model="rt_a2", prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.choices[0].text == _greedy(offline, sample, PROMPT, "a2", 12).text  # a copy of a2's PEFT folder

    assert _post(server, "/unload_lora_adapter", {"lora_name": "rt_a2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="rt_a2", prompt=PROMPT, max_tokens=2)
    assert "rt_a2" not in {model.id for model in client.models.list().data}
    _assert_error_shape(_post(server, "/unload_lora_adapter", {"lora_name": "rt_a2"}), 404)


def test_processed_adapter_loads_as_is_by_a_path_relative_to_the_root(server, client, offline, sample):
    assert _post(server, "/load_lora_adapter", {"lora_name": "rt_a3", "lora_path": "processed_a3"}).status_code == 200
    answer = client.chat.completions.create(model="rt_a3", messages=CHAT, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == _greedy(offline, sample, CHAT, "a3", 10).text
    assert _post(server, "/unload_lora_adapter", {"lora_name": "rt_a3"}).status_code == 200


@pytest.mark.parametrize("how", ["absolute", "dot_dot", "dot_dot_absolute", "symlink"])
def test_adapter_path_outside_the_root_is_403(server, client, lora_root, how):
    path = {"absolute": str(lora_root.parent / "outside"), "dot_dot": "../outside",
            "dot_dot_absolute": str(lora_root / "d1" / ".." / ".." / "outside"), "symlink": str(lora_root / "escape")}[how]
    _assert_error_shape(_post(server, "/load_lora_adapter", {"lora_name": f"out_{how}", "lora_path": path}), 403)
    assert f"out_{how}" not in {model.id for model in client.models.list().data}


@pytest.mark.parametrize(("folder", "says"), [("truncated", "processed_adapter_model"),
                                             ("truncated_peft", "truncated"),
                                             ("bin_only", "safetensors"),
                                             ("other_base", "projection"),
                                             ("missing", "no such")])
def test_bad_adapter_is_400_and_the_server_keeps_serving(server, client, folder, says):
    error = _assert_error_shape(_post(server, "/load_lora_adapter", {"lora_name": f"bad_{folder}",
                                                                      "lora_path": folder}), 400)
    assert says in error["message"]
    assert f"bad_{folder}" not in {model.id for model in client.models.list().data}
    assert client.completions.create(model="a1", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_the_base_models_name_is_refused_as_an_adapter_name(server):
    _assert_error_shape(_post(server, "/load_lora_adapter", {"lora_name": SERVED, "lora_path": "d1"}), 400)
    _assert_error_shape(_post(server, "/load_lora_adapter", {"lora_name": f"{SERVED}:x", "lora_path": "d1"}), 400)


def test_loading_a_name_again_with_the_same_bytes_changes_nothing(server, client, offline, sample):
    """d1 is a copy of a1's processed files: the same version, so the load is a no-op that says so."""
    response = _post(server, "/load_lora_adapter", {"lora_name": "a1", "lora_path": "d1"})
    assert response.status_code == 200 and "already loaded with these files" in response.text, response.text
    answer = client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert _ids(answer.choices[0]) == _greedy(offline, sample, PROMPT, "a1", 8).token_ids


# -- adapter versions: a name's new files serve new requests; running streams finish on theirs ------------------
def _expected_ids(offline: LLM, sample):
    """(adapter folder, max tokens) -> offline greedy ids for PROMPT; PEFT folders map to their processed copy."""
    processed = {**{path: path for path in sample.processed.values()},
                 **{sample.adapters[name]: sample.processed[name] for name in sample.adapters}}

    def expected(folder: Path, max_tokens: int) -> list[int]:
        folder = processed[folder]
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return offline.generate(PROMPT, params, LoRARequest(folder.name, 1, str(folder)))[0].token_ids

    return expected


@pytest.mark.parametrize("how", HOWS)
def test_a_new_version_serves_new_requests_while_the_stream_on_the_old_one_finishes(server, offline, sample,
                                                                                    lora_root, how):
    swap_during_stream(server.url, lora_root, f"cust_{how}", how, sample.processed["a1"], sample.processed["a2"],
                       PROMPT, _expected_ids(offline, sample))


def test_a_peft_folder_rewritten_in_place_is_processed_again(server, offline, sample, lora_root):
    """The server's processed-adapter cache is keyed by the PEFT files' bytes: no stale processed copy."""
    swap_during_stream(server.url, lora_root, "peft_cust", "files_replaced_in_place", sample.adapters["a1"],
                       sample.adapters["a2"], PROMPT, _expected_ids(offline, sample))


def test_files_changed_on_disk_without_a_load_keep_serving_the_registered_version(server, offline, sample,
                                                                                    lora_root):
    folder = copy_adapter(sample.processed["a1"], lora_root / "drift")
    assert _post(server, "/load_lora_adapter", {"lora_name": "drift", "lora_path": "drift"}).status_code == 200
    expected = _expected_ids(offline, sample)
    assert greedy_ids(server.url, "drift", PROMPT, 8) == expected(sample.processed["a1"], 8)
    copy_adapter(sample.processed["a2"], folder)  # retrained files written over it, but not loaded
    assert greedy_ids(server.url, "drift", PROMPT, 8) == expected(sample.processed["a1"], 8), \
        "the host copy of the registered bytes serves it"
    assert _post(server, "/unload_lora_adapter", {"lora_name": "drift"}).status_code == 200


@pytest.fixture(scope="module")
def one_slot_server(sample, lora_root, tmp_path_factory):
    """One adapter slot and one host-ready copy: every other adapter is read from its files again."""
    with _serving(["--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED, "--max-loras", "1",
                   "--max-lora-rank", "16", "--max-cpu-loras", "1", "--enable-lora-updates", "--lora-root", str(lora_root),
                   "--lora-cache-dir", str(tmp_path_factory.mktemp("one_slot_cache")), "--max-model-len",
                   str(MODEL_LEN), "--threads", "1"]) as served:
        yield served


def test_with_one_slot_the_new_version_waits_for_the_old_ones_rows(one_slot_server, offline, sample, lora_root):
    swap_during_stream(one_slot_server.url, lora_root, "slot_cust", "load_again_without_unload",
                       sample.processed["a1"], sample.processed["a2"], PROMPT, _expected_ids(offline, sample))


def test_files_changed_on_disk_and_evicted_give_a_clear_error_until_loaded_again(one_slot_server, offline, sample,
                                                                                 lora_root):
    url, expected = one_slot_server.url, _expected_ids(offline, sample)
    folder = copy_adapter(sample.processed["a1"], lora_root / "evicted_drift")
    copy_adapter(sample.processed["a3"], lora_root / "other")
    for name in ("evicted_drift", "other"):
        assert _post(one_slot_server, "/load_lora_adapter", {"lora_name": name, "lora_path": name}).status_code == 200
    assert greedy_ids(url, "evicted_drift", PROMPT, 8) == expected(sample.processed["a1"], 8)
    copy_adapter(sample.processed["a2"], folder)  # changed on disk, not loaded
    assert greedy_ids(url, "other", PROMPT, 8) == expected(sample.processed["a3"], 8)  # evicts drift's only copies
    body = {"model": "evicted_drift", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    error = _assert_error_shape(_post(one_slot_server, "/completions", body), 500)
    assert "adapter files changed on disk" in error["message"] and "load it again" in error["message"]
    response = _post(one_slot_server, "/load_lora_adapter", {"lora_name": "evicted_drift", "lora_path": "evicted_drift"})
    assert response.status_code == 200 and "replaced" in response.text, response.text
    assert greedy_ids(url, "evicted_drift", PROMPT, 8) == expected(sample.processed["a2"], 8)


def test_clients_that_disconnect_mid_stream_leave_no_rows_and_adapters_unloadable(server, lora_root):
    for name in ("d1", "d2"):
        assert _post(server, "/load_lora_adapter", {"lora_name": name, "lora_path": name}).status_code == 200
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    def leave_after_first_chunk(index: int) -> None:
        _open_stream(server, {**body, "model": ("d1", "d2", SERVED)[index % 3]}).close()  # gone mid-stream

    def leave_before_the_answer(index: int) -> None:
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(server.v1 + "/completions", json={**body, "model": ("d1", SERVED)[index % 2],
                                                          "max_tokens": MODEL_LEN - 20}, timeout=0.3)

    aborted_before = _metric(server, "edgelora_requests_total", outcome="abort")
    with ThreadPoolExecutor(24) as pool:
        list(pool.map(leave_after_first_chunk, range(20)))
        list(pool.map(leave_before_the_answer, range(4)))
    assert _wait_until(lambda: _metric(server, "edgelora_running_requests") == 0
                       and _metric(server, "edgelora_waiting_requests") == 0)
    assert _metric(server, "edgelora_requests_total", outcome="abort") - aborted_before == 24
    for name in ("d1", "d2"):
        response = _post(server, "/unload_lora_adapter", {"lora_name": name})
        assert response.status_code == 200 and "finish first" not in response.text  # removed at once: no references


def test_unloading_an_adapter_in_use_lets_its_request_finish(server, lora_root):
    assert _post(server, "/load_lora_adapter", {"lora_name": "busy", "lora_path": "d1"}).status_code == 200
    stream = _open_stream(server, {"model": "busy", "prompt": PROMPT, "max_tokens": 600, "ignore_eos": True,
                                  "temperature": 0})
    try:
        unload = _post(server, "/unload_lora_adapter", {"lora_name": "busy"})
        assert unload.status_code == 200
        _assert_error_shape(_post(server, "/completions", {"model": "busy", "prompt": PROMPT}), 404)
        rest = stream.rest()
    finally:
        stream.close()
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    # once it finished, the adapter is gone for good: loading the name again works
    assert _wait_until(lambda: _post(server, "/load_lora_adapter", {"lora_name": "busy", "lora_path": "d2"}).status_code == 200)
    assert _post(server, "/unload_lora_adapter", {"lora_name": "busy"}).status_code == 200


# -- continuous batching -----------------------------------------------------------------------------
def test_a_short_request_finishes_while_a_long_one_decodes(server):
    """A 4-token request sent after the first chunk of a 200-token one completes first; steps held both rows.

    Three attempts at most: the tiny model decodes 200 tokens in a fraction of a second, so a loaded
    machine can delay the short request's HTTP round trip past the long one's end. Without
    continuous batching every attempt fails (the short request would wait for the long one).
    """
    short_client = httpx.Client(base_url=server.v1, timeout=TIMEOUT_S)
    short_body = {"model": "a1", "prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    short_client.post("/completions", json=short_body).raise_for_status()  # warm the connection
    steps_before, single_before = _decode_steps_with_rows(server)
    outcome = []
    for _ in range(3):
        go, done = threading.Event(), {}

        def short(go=go, done=done) -> None:
            go.wait(TIMEOUT_S)
            response = short_client.post("/completions", json=short_body)
            done["tokens"] = response.json()["usage"]["completion_tokens"]
            done["at"] = time.perf_counter()

        thread = threading.Thread(target=short)
        thread.start()
        stream = _open_stream(server, {"model": SERVED, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                                      "temperature": 0})
        go.set()
        chunks = 1 + sum(1 for line in stream.rest() if line != "data: [DONE]")
        long_done = time.perf_counter()
        stream.close()
        thread.join(TIMEOUT_S)
        assert done["tokens"] == 4 and chunks >= 2
        outcome.append(done["at"] < long_done)
        if outcome[-1]:
            break
    short_client.close()
    assert outcome[-1], f"the short request finished after the long one in {len(outcome)} attempts"
    steps_after, single_after = _decode_steps_with_rows(server)
    assert (steps_after - single_after) - (steps_before - single_before) >= 1  # decode steps with 2+ rows


# -- tenants ------------------------------------------------------------------------------------------
def _tenant_client(server: Served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=TIMEOUT_S)


def test_each_key_lists_only_its_adapters(tenant_server):
    listed = {key: {m.id for m in _tenant_client(tenant_server, key).models.list().data} for key in KEYS}
    assert listed == {"key-a": {SERVED, "a1"}, "key-b": {SERVED, "a2"}, "key-admin": {SERVED, "a1", "a2"}}


def test_a_key_cannot_use_another_keys_adapter(tenant_server):
    tenant_a = _tenant_client(tenant_server, "key-a")
    for model in ("a2", f"{SERVED}:a2"):
        with pytest.raises(openai.NotFoundError) as refused:
            tenant_a.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.NotFoundError) as missing:
            tenant_a.completions.create(model=model.replace("a2", "zz"), prompt=PROMPT, max_tokens=2)
        # as if it did not exist: the same answer as for an adapter nobody has
        assert refused.value.body["code"] == missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        _tenant_client(tenant_server, "key-b").chat.completions.create(model="a1", messages=CHAT, max_tokens=2)
    assert tenant_a.completions.create(model="a1", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
    assert tenant_a.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_wrong_or_missing_key_is_401(tenant_server):
    with pytest.raises(openai.AuthenticationError):
        _tenant_client(tenant_server, "wrong").models.list()
    _assert_error_shape(httpx.get(tenant_server.v1 + "/models", timeout=TIMEOUT_S), 401)
    _assert_error_shape(_post(tenant_server, "/completions", {"model": SERVED, "prompt": PROMPT},
                              headers={"Authorization": "Basic key-a"}), 401)
    assert httpx.get(tenant_server.url + "/health", timeout=TIMEOUT_S).status_code == 200  # open


def test_max_concurrent_caps_a_key_with_429(tenant_server):
    tenant_a, tenant_b = _tenant_client(tenant_server, "key-a"), _tenant_client(tenant_server, "key-b")
    tenant_b.models.list()  # connections made before the clock starts: the long request lasts about a second
    tenant_a.models.list()
    stream = _open_stream(tenant_server, {"model": "a2", "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True,
                                         "temperature": 0}, key="key-b")
    try:
        with pytest.raises(openai.RateLimitError):
            tenant_b.completions.create(model="a2", prompt=PROMPT, max_tokens=2)
        assert tenant_a.completions.create(model="a1", prompt=PROMPT, max_tokens=2)  # other keys are not capped
    finally:
        stream.close()
    assert _wait_until(lambda: _post(tenant_server, "/completions", {"model": "a2", "prompt": PROMPT, "max_tokens": 2},
                                     key="key-b").status_code == 200)


def test_metrics_need_an_admin_key(tenant_server):
    _assert_error_shape(httpx.get(tenant_server.url + "/metrics", timeout=TIMEOUT_S), 401)
    _assert_error_shape(httpx.get(tenant_server.url + "/metrics", headers=tenant_server.headers("key-a"),
                                  timeout=TIMEOUT_S), 403)
    assert _metric(tenant_server, "edgelora_requests_total", key="key-admin") >= 0
    text = httpx.get(tenant_server.url + "/metrics", headers=tenant_server.headers("key-admin")).text
    for name in ("edgelora_running_requests", "edgelora_waiting_requests", "edgelora_decode_batch_size_bucket",
                 "edgelora_time_to_first_token_seconds_bucket", "edgelora_inter_token_latency_seconds_bucket",
                 "edgelora_adapter_slot_hits_total", "edgelora_adapter_slot_misses_total",
                 "edgelora_adapter_slot_evictions_total", "edgelora_adapter_slot_moves_total",
                 "edgelora_adapter_load_seconds_bucket",
                 "edgelora_prompt_tokens_total", "edgelora_generation_tokens_total"):
        assert name in text


def test_adapter_updates_need_an_admin_key(tenant_server, lora_root):
    body = {"lora_name": "t1", "lora_path": "d1"}
    _assert_error_shape(_post(tenant_server, "/load_lora_adapter", body, key="key-a"), 403)
    assert _post(tenant_server, "/load_lora_adapter", body, key="key-admin").status_code == 200
    # "*" includes adapters loaded at run time; a listed key does not get them
    assert "t1" in {m.id for m in _tenant_client(tenant_server, "key-admin").models.list().data}
    assert "t1" not in {m.id for m in _tenant_client(tenant_server, "key-a").models.list().data}
    _assert_error_shape(_post(tenant_server, "/unload_lora_adapter", {"lora_name": "t1"}, key="key-b"), 403)
    assert _post(tenant_server, "/unload_lora_adapter", {"lora_name": "t1"}, key="key-admin").status_code == 200


# -- limits, flags, shutdown -------------------------------------------------------------------------
def test_full_queue_is_503(small_server):
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    http, third = httpx.Client(timeout=TIMEOUT_S), httpx.Client(timeout=TIMEOUT_S)
    for warm in (http, third):  # connections made before the clock starts: the long request lasts about a second
        warm.get(small_server.url + "/health")
    running = _open_stream(small_server, body)  # holds the only row
    waiting = http.send(http.build_request("POST", small_server.v1 + "/completions", json={**body, "stream": True}),
                        stream=True)  # accepted: the one waiting place
    try:
        assert waiting.status_code == 200
        error = _assert_error_shape(third.post(small_server.v1 + "/completions", json={**body, "max_tokens": 2}), 503)
        assert "queue" in error["message"]
    finally:
        waiting.close()
        for closing in (running, http, third):
            closing.close()
    assert _wait_until(lambda: _post(small_server, "/completions", {**body, "max_tokens": 2}).status_code == 200)


def test_adapter_updates_without_the_flag_are_404_naming_it(small_server):
    for route, body in (("/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                        ("/unload_lora_adapter", {"lora_name": "x"})):
        error = _assert_error_shape(_post(small_server, route, body), 404)
        assert "--enable-lora-updates" in error["message"]


@pytest.mark.parametrize("case", ["updates_without_root", "missing_adapter", "bad_keys_file"])
def test_bad_startup_settings_exit_2_with_one_line(sample, tmp_path, case):
    (tmp_path / "keys.json").write_text('{"k": {"adapters": 3}}')
    extra = {"updates_without_root": ["--enable-lora-updates"],
             "missing_adapter": ["--lora-modules", f"x={tmp_path / 'nothing'}"],
             "bad_keys_file": ["--api-keys", str(tmp_path / "keys.json")]}[case]
    result = subprocess.run([sys.executable, "-m", "edgelora", "serve", "--onnx-dir", str(sample.onnx_dir),
                             "--port", str(free_port()), *extra], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelora serve: error:") and "Traceback" not in result.stderr
    if case == "updates_without_root":
        assert "--lora-root" in lines[0]


def test_sigterm_lets_the_running_request_finish_and_exits_0(sample):
    with _serving(["--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED, "--api-key", "secret",
                   "--threads", "1", "--shutdown-timeout", "60"], api_key="secret") as served:
        started, result = threading.Event(), {}

        def long_request() -> None:
            stream = _open_stream(served, {"model": SERVED, "prompt": PROMPT, "max_tokens": 2500, "ignore_eos": True,
                                           "temperature": 0, "return_token_ids": True})
            started.set()
            result["events"] = [stream.first, *stream.rest()]
            stream.close()

        thread = threading.Thread(target=long_request)
        thread.start()
        assert started.wait(TIMEOUT_S)
        served.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(served.url + "/health", timeout=1)
            except httpx.TransportError:
                return True
            return False

        assert _wait_until(refused, timeout_s=10)  # no new connections ...
        still_running = thread.is_alive()  # ... while the request goes on
        thread.join(TIMEOUT_S)
        assert served.process.wait(TIMEOUT_S) == 0
        assert still_running
        events = result["events"]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event[6:]) for event in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(chunk["choices"][0].get("token_ids") or []) for chunk in chunks) == 2500


def test_open_server_on_another_host_warns(sample, tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgelora", "serve", "--onnx-dir", str(sample.onnx_dir),
                             "--host", "0.0.0.0", "--port", str(free_port()), "--lora-modules", f"x={tmp_path / 'none'}"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "no API key" in result.stderr


def test_serve_flags_have_help_and_the_reference_spellings():
    from edgelora.cli import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    assert all(action.help for action in serve._actions)
    for spelling in ("--max-num-seqs", "--max-batch-size", "--maxBatchSize", "--max_num_seqs"):
        assert parser.parse_args(["serve", "--onnx-dir", "o", spelling, "3"]).max_num_seqs == 3
    args = parser.parse_args(["serve", "--onnxDir", "o", "--lora-modules", "a=x", "b=y", "--max_loras", "2",
                              "--enableLoraUpdates", "--lora-root", "r"])
    assert (args.lora_modules, args.max_loras, args.enable_lora_updates) == (["a=x", "b=y"], 2, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--onnx-dir", "o", "--api-key", "k", "--api-keys", "f"])


def test_the_server_never_imports_torch(sample, tmp_path):
    """Tokenizer, PEFT processing and the app: a deployment box without torch serves PEFT safetensors adapters."""
    code = ("import sys; from pathlib import Path; "
            "import edgelora.entrypoints.server, edgelora.entrypoints.server.app, edgelora.entrypoints.server.engine_loop; "
            "from edgelora.entrypoints.server.adapters import AdapterSources; "
            "from edgelora.runtime.tokenizer import ChatTokenizer; "
            f"ChatTokenizer(Path({str(sample.onnx_dir)!r})).prompt_ids([{{'role': 'user', 'content': 'hi'}}]); "
            f"AdapterSources(Path({str(sample.onnx_dir)!r}), Path({str(tmp_path)!r})).prepare(Path({str(sample.adapters['a1'])!r})); "
            "bad = [m for m in ('torch', 'peft') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- weighted mixes of adapters -----------------------------------------------------------------------
def _samples(server: Served, name: str) -> dict[str, float]:
    """adapter label -> value of one per-adapter series."""
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT_S).text
    return {sample.labels["adapter"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def test_per_adapter_metrics_stay_bounded_past_the_label_limit(server, client):
    """--metrics-adapter-labels 2 and three adapters used: two have series of their own, the third counts as other;
    the per-adapter series add up to the totals."""
    for model in ("a1", "a2", "a3", SERVED):
        client.completions.create(model=model, prompt="hello", max_tokens=3, temperature=0)
    tokens = _samples(server, "edgelora_adapter_generation_tokens_total")
    own = set(tokens) - {"base", "mix", "other"}
    assert len(own) == 2 and own <= {"a1", "a2", "a3"} and tokens["other"] >= 3 and tokens["base"] >= 3
    assert sum(tokens.values()) == _metric(server, "edgelora_generation_tokens_total")
    prompts = _samples(server, "edgelora_adapter_prompt_tokens_total")
    assert sum(prompts.values()) == _metric(server, "edgelora_prompt_tokens_total")
    labelled = set(_samples(server, "edgelora_adapter_loads_total")) | set(_samples(server, "edgelora_adapter_location"))
    assert labelled - {"other"} <= own
    assert _metric(server, "edgelora_adapters_by_location", where="slot") >= 1
    assert _metric(server, "edgelora_adapter_load_time_seconds_total") > 0


def test_a_lora_mix_in_the_openai_body_equals_the_python_api(server, client, offline):
    mix = {"a1": 0.7, "a2": -0.3}
    before = _metric(server, "edgelora_requests_total", adapter="mix")
    answer = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=6, temperature=0,
                                            extra_body={"lora_mix": mix, "return_token_ids": True})
    expected = offline.generate([CHAT], SamplingParams(max_tokens=6, temperature=0), lora_mix=mix)[0]
    assert answer.choices[0].token_ids == expected.token_ids
    assert _metric(server, "edgelora_requests_total", adapter="mix") == before + 1


@pytest.mark.parametrize("body, status, fragment", [
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "lora_mix": {}}', 400, "empty"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "lora_mix": {"a1": NaN}}', 400, "finite"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "lora_mix": {"a1": Infinity}}', 400, "finite"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "lora_mix": {"a1": 0.5, "a1": 0.5}}', 400, "twice"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "lora_mix": {"a1": 1, "a2": 1, "a3": 1, "b": 1, "c": 1,'
     b' "d": 1, "e": 1, "f": 1, "g": 1}}', 400, "max_loras"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "lora_mix": {"nope": 1}}', 404, "nope"),
    (b'{"model": "a1", "prompt": "hi", "max_tokens": 2, "lora_mix": {"a2": 1}}', 400, "base model"),
])
def test_bad_lora_mixes_are_4xx_naming_the_problem(server, body, status, fragment):
    error = _assert_error_shape(_post(server, "/completions", body), status)
    assert fragment in error["message"]


def test_a_tenant_may_mix_only_its_own_adapters(tenant_server):
    body = {"model": SERVED, "prompt": "hi", "max_tokens": 2, "lora_mix": {"a1": 0.5, "a2": 0.5}}
    _assert_error_shape(_post(tenant_server, "/completions", body, key="key-a"), 404)
    assert _post(tenant_server, "/completions", body, key="key-admin").status_code == 200
