"""The prefix cache through edgelora serve: per tenant by default, per cache_salt within one, base prefixes
shared across tenants only with --prefix-cache-share-base, off with --no-enable-prefix-caching; counted
in /metrics. A real server on loopback, real HTTP."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from server_process import metric, running_server

SERVED = "tiny"
PROMPT = np.random.default_rng(3).integers(3, 400, 80).tolist()  # 2 usable blocks of 32: a hit is 64 tokens
KEYS = {"key-a": {"adapters": "*", "admin": True}, "key-b": {"adapters": "*", "admin": True}}


@pytest.fixture(scope="module")
def sample(exported_samples):
    return exported_samples["qwen2"]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


def _server(sample, keys_file, *flags: str):
    return running_server("--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED, "--threads", "1",
                          "--api-keys", str(keys_file), "--lora-modules", f"a1={sample.processed['a1']}", *flags)


def _complete(url: str, key: str, model: str, **extra) -> list[int]:
    response = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60, json={
        "model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "return_token_ids": True, **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def _hit_tokens(url: str) -> float:
    return metric(url, "edgelora_prefix_cache_hit_tokens_total", api_key="key-a")


def test_cached_prefixes_are_kept_per_tenant_and_salt_and_never_change_an_answer(sample, keys_file):
    with _server(sample, keys_file) as (url, _):
        first = _complete(url, "key-a", "a1")
        assert _hit_tokens(url) == 0
        assert _complete(url, "key-a", "a1") == first and _hit_tokens(url) == 64, "the same tenant hits"
        assert metric(url, "edgelora_prefix_cache_bytes", api_key="key-a") > 0
        assert _complete(url, "key-b", "a1") == first and _hit_tokens(url) == 64, "another tenant does not"
        assert _complete(url, "key-a", "a1", cache_salt="s1") == first and _hit_tokens(url) == 64, "another salt"
        base = _complete(url, "key-a", SERVED)
        assert _complete(url, "key-b", SERVED) == base and _hit_tokens(url) == 64, "base prompts too, by default"


def test_share_base_shares_only_base_prefixes_across_tenants(sample, keys_file):
    with _server(sample, keys_file, "--prefix-cache-share-base") as (url, _):
        base = _complete(url, "key-a", SERVED)
        assert _complete(url, "key-b", SERVED) == base and _hit_tokens(url) == 64
        _complete(url, "key-a", "a1")
        _complete(url, "key-b", "a1")
        assert _hit_tokens(url) == 64, "adapter prefixes stay per tenant"


def test_no_enable_prefix_caching_turns_it_off(sample, keys_file):
    with _server(sample, keys_file, "--no-enable-prefix-caching") as (url, _):
        first = _complete(url, "key-a", "a1")
        assert _complete(url, "key-a", "a1") == first
        assert _hit_tokens(url) == 0 and metric(url, "edgelora_prefix_cache_queries_total", api_key="key-a") == 0
