"""Correctness under churn: many concurrent requests over more adapters than slots equal offline infer.

32 greedy requests over 8 adapters, plus base rows, arrive at staggered times at a server with
``--max-loras 2 --max-cpu-loras 4``: rows join and leave, adapters are evicted from slots and
host copies, slots are compacted. Every completion (text and token ids) must equal what
``edgelora infer`` gives for the same request, and afterwards nothing is left running.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from server_process import metric, running_server

from edgelora.adapters import process_adapter
from edgelora.cli import main

ADAPTER_COUNT = 8
ADAPTER_REQUESTS = 32
BASE_REQUESTS = 4
TOPICS = ["the sea", "a red fox", "numbers", "the old bridge", "rain in spring", "two dogs", "a letter", "the moon"]


@pytest.fixture(scope="module")
def churn_setup(exported_samples, tmp_path_factory):
    """Eight processed adapters of the tiny Qwen2 (different seeds, ranks and targets) and 36 requests."""
    from make_sample import ADAPTERS, make_adapter

    sample = exported_samples["qwen2"]
    root = tmp_path_factory.mktemp("churn")
    recipes = list(ADAPTERS.values())
    adapters = {}
    for index in range(ADAPTER_COUNT):
        name = f"c{index}"
        peft_dir = make_adapter(sample.model_dir, root / "peft" / name, recipes[index % len(recipes)], seed=300 + index)
        adapters[name] = root / "processed" / name
        process_adapter(peft_dir, adapters[name], sample.onnx_dir)
    rng = np.random.default_rng(7)
    requests = []
    for index in range(ADAPTER_REQUESTS + BASE_REQUESTS):
        name = f"c{index % ADAPTER_COUNT}" if index < ADAPTER_REQUESTS else None
        requests.append({"lora_name": name, "max_tokens": int(rng.integers(4, 17)),
                         "messages": [{"role": "user", "content": f"Tell me about {TOPICS[index % len(TOPICS)]} "
                                                                  f"({index})."}]})
    payload = {"temperature": 0, "available_lora_weights": {name: str(path) for name, path in adapters.items()},
               "requests": [{"messages": r["messages"], "lora_name": r["lora_name"],
                             "max_generate_length": r["max_tokens"]} for r in requests]}
    input_file = root / "input.json"
    input_file.write_text(json.dumps(payload))
    output_file = root / "output.json"
    assert main(["infer", "--onnx-dir", str(sample.onnx_dir), "--input-file", str(input_file),
                 "--output-file", str(output_file), "--quiet"]) == 0
    offline = json.loads(output_file.read_text())["responses"]
    return sample, adapters, requests, offline


def test_concurrent_requests_over_more_adapters_than_slots_equal_offline_infer(churn_setup):
    from openai import OpenAI

    sample, adapters, requests, offline = churn_setup
    modules = [f"{name}={path}" for name, path in adapters.items()]
    with running_server("--onnx-dir", str(sample.onnx_dir), "--served-model-name", "base", "--max-loras", "2",
                        "--max-cpu-loras", "4", "--max-num-seqs", "8", "--threads", "1", "--quiet",
                        "--lora-modules", *modules) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        results: list[dict | None] = [None] * len(requests)
        errors = []

        def send(index: int) -> None:
            time.sleep(0.015 * index)  # staggered arrivals: rows join while others decode
            request = requests[index]
            try:
                response = client.chat.completions.create(
                    model=request["lora_name"] or "base", messages=request["messages"],
                    max_tokens=request["max_tokens"], temperature=0, extra_body={"return_token_ids": True})
                choice = response.choices[0]
                results[index] = {"text": choice.message.content, "ids": choice.model_extra.get("token_ids"),
                                  "finish_reason": choice.finish_reason}
            except Exception as exc:  # collected and reported below, with the request's index
                errors.append(f"request {index}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=send, args=(index,)) for index in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert not errors, errors
        mismatches = []
        for index, (result, expected) in enumerate(zip(results, offline)):
            if result is None or result["ids"] != expected["output_ids"] or result["text"] != expected["output_text"]:
                mismatches.append(_describe(sample, requests[index], result, expected, index))
        assert not mismatches, "\n".join(mismatches)
        assert metric(url, "edgelora_running_requests") == 0
        assert metric(url, "edgelora_adapter_slot_evictions_total") > 0
        assert metric(url, "edgelora_adapter_host_evictions_total") > 0


def _describe(sample, request: dict, result: dict | None, expected: dict, index: int) -> str:
    """Where a row differs, and whether that is a true near-tie of the model (top-2 logit gap < 1e-4)."""
    if result is None or result["ids"] is None:
        return f"request {index}: no token ids returned ({result})"
    ids, want = result["ids"], expected["output_ids"]
    first = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
    return (f"request {index} ({request['lora_name']}): differs at token {first}: server {ids} vs infer {want}; "
            f"check the top-2 logit gap there with the reference model (a gap below 1e-4 is a near-tie)")


def test_churn_fixture_adapters_really_differ(churn_setup):
    """The check above means something only if each adapter changes the output of the same prompt."""
    from edgelora.api import LLM, LoraConfig, LoRARequest, SamplingParams

    sample, adapters, _, _ = churn_setup
    llm = LLM(sample.onnx_dir, LoraConfig(max_loras=ADAPTER_COUNT, max_cpu_loras=ADAPTER_COUNT))
    lora = [None] + [LoRARequest(name, index + 1, str(path)) for index, (name, path) in enumerate(adapters.items())]
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    outputs = llm.generate([messages] * len(lora), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), lora)
    assert len({tuple(output.token_ids) for output in outputs}) == len(lora)
