"""edgelora on Ray Serve: two replicas of the tiny Qwen2 behind the ingress, driven by the openai client.

The test process starts a local Ray instance on loopback only (127.0.0.1, no dashboard, usage
stats off) and runs ``edgelora serve --ray --ray-address ...`` as a real process joined to it, so
it can also reach the replicas' actors (to kill one). Tests run in file order on one application:
affinity and correctness first (on fresh replicas), then the routes, then a replica's death.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from adapter_set import chat_requests, mismatches, offline_answers, processed_adapters, send_all
from hot_swap import HOWS, swap_during_stream
from prometheus_client.parser import text_string_to_metric_families
from server_process import running_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the [ray] extra")]

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ADAPTERS = 8
BASE = "base"
APP = "edgelora"
REPLACEMENT_TIMEOUT_S = 120.0
SWAP_PROMPT = "The quick brown fox"


@dataclass
class RaySetup:
    sample: object
    adapters: dict[str, Path]
    requests: list[dict]  # 32 short greedy chats over the 8 adapters
    offline: list[dict]
    long_requests: list[dict]  # longer ones, for the replica that dies under them
    long_offline: list[dict]
    late_request: dict  # on the adapter loaded at run time
    late_offline: dict
    root: Path  # --lora-root


@pytest.fixture(scope="module")
def ray_setup(exported_samples, tmp_path_factory) -> RaySetup:
    sample = exported_samples["qwen2"]
    work = tmp_path_factory.mktemp("ray")
    adapters = processed_adapters(sample, work, ADAPTERS + 1, seed=500)
    late = adapters.pop(f"c{ADAPTERS}")
    root = work / "root"
    root.mkdir()
    shutil.copytree(work / "peft" / f"c{ADAPTERS}", root / "late")  # loaded at run time as a PEFT folder
    requests = chat_requests(list(adapters), 32)
    long_requests = chat_requests(list(adapters), 32, max_tokens=(200, 400), seed=11, tag="long ")
    late_request = chat_requests(["late"], 1, max_tokens=(12, 13), tag="late ")[0]
    offline = offline_answers(sample, {**adapters, "late": late}, requests + long_requests + [late_request],
                              work / "offline")
    return RaySetup(sample, adapters, requests, offline[:32], long_requests, offline[32:64], late_request,
                    offline[64], root)


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head in this process: loopback only, 6 logical CPUs, no dashboard, no usage stats (conftest.py
    puts RAY_ENV in the environment before any test imports Ray)."""
    assert {name: os.environ.get(name) for name in RAY_ENV} == RAY_ENV
    import ray

    context = ray.init(num_cpus=6, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        yield ray, context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_served(ray_setup, ray_cluster):
    """``edgelora serve --ray``: 2 replicas, room for all 8 adapters on each, run-time loads allowed, and
    adapters under the root loaded on demand."""
    _, address = ray_cluster
    modules = [f"{name}={path}" for name, path in ray_setup.adapters.items()]
    with running_server("--ray", "--ray-address", address, "--replicas", "2", "--threads", "1",
                        "--onnx-dir", str(ray_setup.sample.onnx_dir), "--served-model-name", BASE,
                        "--max-num-seqs", "8", "--max-loras", str(ADAPTERS), "--max-cpu-loras", str(ADAPTERS),
                        "--enable-lora-updates", "--lora-root", str(ray_setup.root), "--lora-on-demand",
                        "--lora-cache-dir", str(ray_setup.root.parent / "cache"),
                        "--lora-modules", *modules, timeout_s=300) as (url, process):
        yield url, process


def _by_replica(url: str, name: str, **labels: str) -> dict[str, float]:
    """One sample of /metrics per replica label (summed over its other labels, or only those given)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and "replica" in sample.labels and labels.items() <= sample.labels.items():
                values[sample.labels["replica"]] += sample.value
    return dict(values)


def _client(url: str, retries: int = 0, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=retries, timeout=120, **kwargs)


def test_ray_instance_is_loopback_only(ray_cluster):
    ray, address = ray_cluster
    assert address.startswith("127.0.0.1:"), address
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_adapter_affinity_and_answers_equal_offline_infer(ray_setup, ray_served):
    """Warm-up (one request per adapter), then 32 concurrent greedy requests: each answer equals
    offline infer, and the replicas loaded each adapter about once (≤ 12 loads in all, not 16)."""
    url, _ = ray_served
    client = _client(url)
    for name in ray_setup.adapters:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "warm up"}],
                                       max_tokens=2, temperature=0)
    time.sleep(3.0)  # replicas push their adapter ids; the controller tells the router
    results, errors = send_all(client, ray_setup.requests, BASE)
    assert not errors, errors
    found = mismatches(ray_setup.requests, results, ray_setup.offline)
    assert not found, "\n".join(found)
    time.sleep(2.0)  # a replica reports its figures at least once a second
    loads = _by_replica(url, "edgelora_replica_adapter_loads_total")
    print(f"adapter loads by replica after warm-up + 32 requests: {loads}")
    assert len(loads) == 2, loads  # both replicas report, labelled
    assert ADAPTERS <= sum(loads.values()) <= 12, loads
    served = _by_replica(url, "edgelora_requests_total")
    assert sum(served.values()) >= ADAPTERS + 32, served


def test_routes_streaming_models_and_run_time_adapters(ray_setup, ray_served):
    import openai

    url, _ = ray_served
    client = _client(url)
    ids = {card.id for card in client.models.list().data}
    assert ids == {BASE, *ray_setup.adapters, "late"}  # "late": a folder under the root, listed, not loaded
    request, expected = ray_setup.requests[3], ray_setup.offline[3]
    chunks = client.chat.completions.create(model=request["lora_name"], messages=request["messages"],
                                            max_tokens=request["max_tokens"], temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected["output_text"]
    for escape in ("../offline", "..", "late/..", str(ray_setup.root / "late")):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=escape, messages=request["messages"], max_tokens=2)
    late = ray_setup.late_request
    for _ in range(2):  # on demand (the PEFT folder processed at the ingress), then again after an unload
        results, errors = send_all(client, [late], BASE)
        assert not errors, errors
        assert not mismatches([late], results, [ray_setup.late_offline])
        response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=30)
        assert response.status_code == 200, response.text
    assert _by_replica(url, "edgelora_adapter_on_demand_loads_total")["ingress"] == 2.0  # counted at the ingress
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"}, timeout=120)
    assert response.status_code == 200, response.text
    results, errors = send_all(client, [late], BASE)
    assert not errors and not mismatches([late], results, [ray_setup.late_offline]), errors
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"},
                      timeout=30).status_code == 403
    response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=30)
    assert response.status_code == 200, response.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="x", messages=late["messages"], max_tokens=2)
    _client_that_leaves_mid_stream_frees_its_row(url)
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": BASE, "messages": "not a list"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def _client_that_leaves_mid_stream_frees_its_row(url: str) -> None:
    """A streaming client that goes away: the ingress cancels the replica's call, which aborts the row."""
    body = {"model": "c0", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 3000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events >= 3:
                break
    deadline = time.monotonic() + 30
    while True:
        time.sleep(1.0)
        running = sum(_by_replica(url, "edgelora_running_requests").values())
        aborted = sum(_by_replica(url, "edgelora_requests_total", outcome="abort").values())
        if running == 0 and aborted >= 1:
            return
        assert time.monotonic() < deadline, f"the left stream still runs: {running} rows, {aborted}"


@pytest.fixture(scope="module")
def offline_ids(ray_setup):
    """(processed adapter folder, max tokens) -> greedy ids for SWAP_PROMPT, from the Python API in this process."""
    from edgelora.entrypoints.api import LLM, LoRARequest, SamplingParams

    llm = LLM(ray_setup.sample.onnx_dir, num_threads=1)

    def expected(folder: Path, max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return llm.generate(SWAP_PROMPT, params, LoRARequest(folder.name, 1, str(folder)))[0].token_ids

    return expected


@pytest.mark.parametrize("how", HOWS)
def test_a_new_version_serves_new_requests_while_the_stream_on_the_old_one_finishes(ray_setup, ray_served,
                                                                                    offline_ids, how):
    """The multiplexed model id carries the version: no replica keeps answering with the old one."""
    url, _ = ray_served
    processed = ray_setup.sample.processed
    swap_during_stream(url, ray_setup.root, f"ray_{how}", how, processed["a1"], processed["a2"], SWAP_PROMPT,
                       offline_ids, engine_says=False)


def test_killed_replica_loses_no_retried_request(ray_setup, ray_cluster, ray_served):
    """ray.kill on a busy replica mid-run: every (retried) request still gets offline infer's answer,
    Serve starts a replacement within a bounded wait, and requests after it succeed."""
    ray, _ = ray_cluster
    url, _ = ray_served
    before = set(_by_replica(url, "edgelora_replica_adapter_loads_total"))
    retried = []
    client = _client(url, retries=10, http_client=httpx.Client(
        timeout=120, event_hooks={"response": [lambda r: retried.append(r.status_code) if r.status_code >= 500
                                               else None]}))
    killed = []

    def kill_a_busy_replica() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = _by_replica(url, "edgelora_running_requests")
            victim = max(running, key=running.get, default=None)
            if victim is not None and running[victim] >= 2:
                actor = next(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                             if entry["name"].startswith(f"SERVE_REPLICA::{APP}#EdgeLoraReplica#")
                             and entry["name"].endswith(f"#{victim}"))
                ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
                killed.append((victim, running[victim]))
                return
            time.sleep(0.1)

    results, errors = send_all(client, ray_setup.long_requests, BASE, during=kill_a_busy_replica)
    print(f"killed replica {killed}; responses >= 500 the client retried: {retried}")
    assert killed, "no replica was seen running requests"
    assert not errors, errors
    found = mismatches(ray_setup.long_requests, results, ray_setup.long_offline)
    assert not found, "\n".join(found)
    victim = killed[0][0]
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
    while True:
        replicas = set(_by_replica(url, "edgelora_replica_adapter_loads_total"))
        if len(replicas) == 2 and victim not in replicas:
            break
        assert time.monotonic() < deadline, f"no replacement for {victim} within {REPLACEMENT_TIMEOUT_S:.0f} s"
        time.sleep(1.0)
    assert replicas != before
    later, errors = send_all(_client(url), ray_setup.requests[:8], BASE)
    assert not errors, errors
    assert not mismatches(ray_setup.requests[:8], later, ray_setup.offline[:8])
