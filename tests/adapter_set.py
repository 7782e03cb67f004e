"""Many adapters of the tiny Qwen2, chat requests over them, their offline answers, and concurrent senders.

The churn test (one server) and the Ray tests (replicas) check the same thing: every answer a
server gives equals ``edgelora infer`` for the same request.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from edgelora.adapters import process_adapter
from edgelora.cli import main

TOPICS = ["the sea", "a red fox", "numbers", "the old bridge", "rain in spring", "two dogs", "a letter", "the moon"]


def processed_adapters(sample, root: Path, count: int, seed: int) -> dict[str, Path]:
    """``count`` processed adapters (different seeds, ranks and targets), named c0, c1, ..."""
    from make_sample import ADAPTERS, make_adapter

    recipes = list(ADAPTERS.values())
    adapters = {}
    for index in range(count):
        name = f"c{index}"
        peft_dir = make_adapter(sample.model_dir, root / "peft" / name, recipes[index % len(recipes)], seed=seed + index)
        adapters[name] = root / "processed" / name
        process_adapter(peft_dir, adapters[name], sample.onnx_dir)
    return adapters


def chat_requests(adapter_names: list[str], count: int, base: int = 0, max_tokens: tuple[int, int] = (4, 17),
                  seed: int = 7, tag: str = "", systems: list[str] | None = None) -> list[dict]:
    """``count`` requests round robin over the adapters, then ``base`` base-model ones; lengths drawn from ``max_tokens``.
    ``systems``: system prompts, request i gets the (i // 3)-th in turn (a prefix-cache workload)."""
    rng = np.random.default_rng(seed)
    requests = []
    for index in range(count + base):
        name = adapter_names[index % len(adapter_names)] if index < count else None
        system = [{"role": "system", "content": systems[(index // 3) % len(systems)]}] if systems else []
        requests.append({"lora_name": name, "max_tokens": int(rng.integers(*max_tokens)),
                         "messages": system + [{"role": "user", "content": f"Tell me about {TOPICS[index % len(TOPICS)]} "
                                                                           f"({tag}{index})."}]})
    return requests


def offline_answers(sample, adapters: dict[str, Path], requests: list[dict], root: Path,
                    *flags: str) -> list[dict]:
    """What ``edgelora infer`` answers (greedy) to each request: output_text and output_ids (``flags``: infer's)."""
    payload = {"temperature": 0, "available_lora_weights": {name: str(path) for name, path in adapters.items()},
               "requests": [{"messages": r["messages"], "lora_name": r["lora_name"],
                             **({"lora_mix": r["lora_mix"]} if r.get("lora_mix") else {}),
                             "max_generate_length": r["max_tokens"]} for r in requests]}
    root.mkdir(parents=True, exist_ok=True)
    input_file, output_file = root / "input.json", root / "output.json"
    input_file.write_text(json.dumps(payload))
    assert main(["infer", "--onnx-dir", str(sample.onnx_dir), "--input-file", str(input_file),
                 "--output-file", str(output_file), "--quiet", *flags]) == 0
    return json.loads(output_file.read_text())["responses"]


def send_all(client, requests: list[dict], base_name: str, stagger_s: float = 0.0, timeout_s: float = 240.0,
             during=None) -> tuple[list[dict | None], list[str]]:
    """Every request at once (one thread each, ``stagger_s`` apart) as greedy chat; results and errors by index.

    ``during`` (optional) runs on the calling thread once every request has been started.
    """
    results: list[dict | None] = [None] * len(requests)
    errors: list[str] = []

    def send(index: int) -> None:
        time.sleep(stagger_s * index)
        request = requests[index]
        try:
            extra = {"return_token_ids": True, **({"lora_mix": request["lora_mix"]} if request.get("lora_mix") else {})}
            response = client.chat.completions.create(
                model=request["lora_name"] or base_name, messages=request["messages"],
                max_tokens=request["max_tokens"], temperature=0, extra_body=extra)
            choice = response.choices[0]
            results[index] = {"text": choice.message.content, "ids": choice.model_extra.get("token_ids"),
                              "finish_reason": choice.finish_reason}
        except Exception as exc:  # collected and reported by the caller, with the request's index
            errors.append(f"request {index}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    errors += [f"request {index}: no answer within {timeout_s:.0f} s" for index, thread in enumerate(threads)
               if thread.is_alive()]
    return results, errors


def mismatches(requests: list[dict], results: list[dict | None], offline: list[dict]) -> list[str]:
    """Requests whose text or token ids differ from offline infer, described (empty when all match)."""
    found = []
    for index, (request, result, expected) in enumerate(zip(requests, results, offline)):
        if result is not None and result["ids"] == expected["output_ids"] and result["text"] == expected["output_text"]:
            continue
        if result is None or result["ids"] is None:
            found.append(f"request {index}: no token ids returned ({result})")
            continue
        ids, want = result["ids"], expected["output_ids"]
        first = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
        found.append(f"request {index} ({request['lora_name']}): differs at token {first}: server {ids} vs infer "
                     f"{want}; check the top-2 logit gap there with the reference model (below 1e-4 is a near-tie)")
    return found
