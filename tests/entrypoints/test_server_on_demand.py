"""edgelora serve --lora-on-demand: a request naming a folder under --lora-root loads it, once, and nothing else
does; the processed cache stays within --lora-cache-max-size. A real server, the official openai client."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from server_process import metric, running_server

from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.entrypoints.server.adapters import AdapterSources
from edgelora.entrypoints.server.app import _adapter_page
from edgelora.entrypoints.server.tenants import Tenant
from edgelora.formats import contract

SERVED = "tiny"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def sample(exported_samples):
    return exported_samples["qwen2"]


@pytest.fixture(scope="module")
def root(sample, tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("on_demand")
    root = parent / "root"
    root.mkdir()
    shutil.copytree(sample.adapters["a1"], root / "peft_a1")
    shutil.copytree(sample.adapters["a2"], root / "peft_a2")
    shutil.copytree(sample.processed["a3"], root / "processed_a3")
    shutil.copytree(sample.processed["a1"], parent / "outside")
    (root / "escape").symlink_to(parent / "outside")
    (root / "inside_link").symlink_to(root / "processed_a3")
    return root


@pytest.fixture(scope="module")
def server(sample, root):
    """A cache bound of one byte: each new on-demand PEFT adapter pushes the previous one out."""
    with running_server("--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED, "--lora-root", str(root),
                        "--lora-on-demand", "--lora-cache-dir", str(root.parent / "cache"), "--lora-cache-max-size",
                        "1", "--threads", "1") as (url, _process):
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(sample) -> LLM:
    return LLM(sample.onnx_dir, LoraConfig(lora_dir=[str(path) for path in sample.processed.values()]), num_threads=1)


def _expected(offline: LLM, sample, adapter: str) -> list[int]:
    request = LoRARequest(adapter, 1, str(sample.processed[adapter]))
    return offline.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), request)[0].token_ids


def _ids(client: openai.OpenAI, model: str) -> list[int]:
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"return_token_ids": True})
    return response.choices[0].token_ids


def test_a_folder_under_the_root_is_loaded_for_the_request_that_names_it(client, offline, sample):
    assert _ids(client, "processed_a3") == _expected(offline, sample, "a3")
    assert _ids(client, f"{SERVED}:inside_link") == _expected(offline, sample, "a3")  # a link inside the root


def test_models_lists_the_root_s_adapter_folders_without_loading_them_and_pages(server, client):
    before = metric(server, "edgelora_adapter_on_demand_loads_total")
    listed = [model.id for model in client.models.list().data]
    # the links: one inside the root is an adapter, one that leaves it is not; "outside" is not under the root
    assert listed == [SERVED, "inside_link", "peft_a1", "peft_a2", "processed_a3"]
    pages, after = [], None
    for _ in range(10):
        body = httpx.get(f"{server}/v1/models", params={"limit": 2, **({"after": after} if after else {})},
                         timeout=10).json()
        pages.append([card["id"] for card in body["data"]])
        assert body["first_id"] == pages[-1][0] and body["last_id"] == pages[-1][-1]
        after = body["last_id"]
        if not body["has_more"]:
            break
    assert pages == [[SERVED, "inside_link"], ["peft_a1", "peft_a2"], ["processed_a3"]]
    assert httpx.get(f"{server}/v1/models", params={"limit": 0}, timeout=10).status_code == 400
    assert metric(server, "edgelora_adapter_on_demand_loads_total") == before, "listing loads nothing"


@pytest.mark.parametrize("name", ["../outside", "escape", "missing", ".hidden", "processed_a3/..", "/etc",
                                  "peft_a1/adapter_config.json"])
def test_names_that_leave_the_root_or_name_no_folder_are_404(client, name):
    with pytest.raises(openai.NotFoundError) as caught:
        _ids(client, name)
    assert caught.value.body["code"] == "model_not_found"


def test_concurrent_first_requests_load_the_adapter_once(server, client, offline, sample):
    before = metric(server, "edgelora_adapter_on_demand_loads_total")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _ids(client, "peft_a2"), range(6)))
    assert answers == [_expected(offline, sample, "a2")] * 6
    assert metric(server, "edgelora_adapter_on_demand_loads_total") == before + 1


def test_the_processed_cache_keeps_within_its_bound_and_reloads_what_left(server, client, offline, sample, root):
    cache = root.parent / "cache"
    _ids(client, "peft_a2")
    assert _ids(client, "peft_a1") == _expected(offline, sample, "a1")
    assert [folder.name.split("-")[0] for folder in cache.iterdir()] == ["peft_a1"], "peft_a2 left the cache"
    before = metric(server, "edgelora_adapter_on_demand_loads_total")
    assert _ids(client, "peft_a2") == _expected(offline, sample, "a2")
    assert metric(server, "edgelora_adapter_on_demand_loads_total") == before + 1


def test_tenant_adapter_lists_may_hold_patterns():
    tenant = Tenant("k", frozenset({"acme-*", "shared"}))
    assert tenant.may_use("acme-legal") and tenant.may_use("shared")
    assert not tenant.may_use("globex-legal") and not tenant.may_use("acme")


def test_a_tenant_s_model_pages_hold_only_its_adapters(tmp_path):
    for name in ("acme-1", "acme-2", "acme-3", "globex-1", "shared", "acme-empty"):
        (tmp_path / name).mkdir()
        if name != "acme-empty":
            (tmp_path / name / contract.PEFT_CONFIG).write_text("{}")
    state = SimpleNamespace(sources=AdapterSources(tmp_path, tmp_path / "cache", tmp_path), on_demand=True,
                            served_name=SERVED, adapters={"acme-0", "globex-0"})
    acme = Tenant("acme", frozenset({"acme-*", "shared"}))
    assert _adapter_page(state, acme, ["acme-0", "globex-0"], None, None) == ["acme-0", "acme-1", "acme-2",
                                                                                  "acme-3", "shared"]
    assert _adapter_page(state, acme, [], "acme-1", 2) == ["acme-2", "acme-3", "shared"]  # limit + 1: more follow
    assert _adapter_page(state, Tenant("g", frozenset({"globex-*"})), ["globex-0"], None, 5) == ["globex-0",
                                                                                                  "globex-1"]
