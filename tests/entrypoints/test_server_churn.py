"""Correctness under churn: many concurrent requests over more adapters than slots equal offline infer.

32 greedy requests over 8 adapters, plus base rows, arrive at staggered times at a server with
``--max-loras 2 --max-lora-rank 16 --max-cpu-loras 4`` (two places for the rank-4..16 adapters): rows join and leave, adapters are evicted from slots and
host copies, slots are compacted. Every completion (text and token ids) must equal what
``edgelora infer`` gives for the same request, and afterwards nothing is left running.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from adapter_set import chat_requests, mismatches, offline_answers, processed_adapters, send_all
from server_process import metric, running_server

ADAPTER_COUNT = 8
ADAPTER_REQUESTS = 32
BASE_REQUESTS = 4


@pytest.fixture(scope="module")
def churn_setup(exported_samples, tmp_path_factory):
    """Eight processed adapters of the tiny Qwen2 (different seeds, ranks and targets) and 36 requests."""
    sample = exported_samples["qwen2"]
    root = tmp_path_factory.mktemp("churn")
    adapters = processed_adapters(sample, root, ADAPTER_COUNT, seed=300)
    requests = chat_requests(list(adapters), ADAPTER_REQUESTS, BASE_REQUESTS)
    return sample, adapters, requests, offline_answers(sample, adapters, requests, root / "offline")


@contextmanager
def _served_equal_offline(sample, adapters: dict, requests: list[dict], offline: list[dict], max_loras: int,
                          stagger_s: float) -> Iterator[str]:
    """Serve the adapters in ``max_loras`` places of rank 16 (4 host copies, 8 rows), send the requests at
    staggered times (rows join while others decode), check every answer equals offline; the ``with`` body gets the url of
    the server, still running, to read its metrics."""
    from openai import OpenAI

    modules = [f"{name}={path}" for name, path in adapters.items()]
    with running_server("--onnx-dir", str(sample.onnx_dir), "--served-model-name", "base", "--max-loras",
                        str(max_loras), "--max-lora-rank", "16", "--max-cpu-loras", "4", "--max-num-seqs", "8",
                        "--threads", "1", "--quiet", "--lora-modules", *modules) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        results, errors = send_all(client, requests, "base", stagger_s=stagger_s)
        assert not errors, errors
        found = mismatches(requests, results, offline)
        assert not found, "\n".join(found)
        yield url


def test_concurrent_requests_over_more_adapters_than_slots_equal_offline_infer(churn_setup):
    sample, adapters, requests, offline = churn_setup
    with _served_equal_offline(sample, adapters, requests, offline, max_loras=2, stagger_s=0.015) as url:
        assert metric(url, "edgelora_running_requests") == 0
        assert metric(url, "edgelora_adapter_slot_evictions_total") > 0
        assert metric(url, "edgelora_adapter_host_evictions_total") > 0


def test_churn_fixture_adapters_really_differ(churn_setup):
    """The check above means something only if each adapter changes the output of the same prompt."""
    from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams

    sample, adapters, _, _ = churn_setup
    llm = LLM(sample.onnx_dir, LoraConfig(max_loras=ADAPTER_COUNT, max_cpu_loras=ADAPTER_COUNT))
    lora = [None] + [LoRARequest(name, index + 1, str(path)) for index, (name, path) in enumerate(adapters.items())]
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    outputs = llm.generate([messages] * len(lora), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), lora)
    assert len({tuple(output.token_ids) for output in outputs}) == len(lora)


SYSTEMS = [" ".join(["You are a careful assistant for a shipping company; answer briefly and politely."] * 6),
           " ".join(["Numbers: one two three four five six seven eight nine ten, and the sea and the wind."] * 6)]


def test_shared_system_prompts_with_the_prefix_cache_equal_infer_without_it(churn_setup, tmp_path):
    """The churn above with long shared system prompts and weighted mixes: the server's prefix cache hits (per
    adapter version and mix), and every answer equals offline infer with --no-enable-prefix-caching."""
    sample, adapters, _, _ = churn_setup
    names = list(adapters)
    requests = chat_requests(names, 24, 3, systems=SYSTEMS, tag="prefix ")
    for index in (5, 11, 17):  # mixes: the base model with weighted adapters
        requests[index] = {**requests[index], "lora_name": None,
                           "lora_mix": {names[index % 8]: 0.5, names[(index + 1) % 8]: 0.25}}
    offline = offline_answers(sample, adapters, requests, tmp_path / "offline", "--no-enable-prefix-caching")
    with _served_equal_offline(sample, adapters, requests, offline, max_loras=3, stagger_s=0.05) as url:
        assert metric(url, "edgelora_prefix_cache_hit_tokens_total") > 0
