"""Shipping a new version of an adapter under its name while a stream decodes on the old one.

Shared by the plain server's tests and the Ray tests: the same scenarios, the same checks, against
a running ``edgelora serve`` (any backend) with ``--enable-lora-updates --lora-root ROOT``.

Each scenario loads ``name`` from version-1 files, opens a long greedy stream on it, ships
version 2 one way (``how``), then checks that

* the load answers 200 at once (no "already registered" while the old rows drain);
* a request sent after the load answered gets version 2's tokens (never the old weights);
* the stream that spans the swap ends with exactly version 1's tokens (never a mix).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx

LONG_TOKENS = 1900  # the stream: long enough to outlive the swap's HTTP round trips (about 0.6 s at 3,000 tokens/s)
SHORT_TOKENS = 8
TIMEOUT_S = 120.0
HOWS = ("unload_then_new_folder", "files_replaced_in_place", "load_again_without_unload")

# (adapter folder, max tokens) -> the greedy token ids offline generation gives for the scenario's prompt
Expected = Callable[[Path, int], list[int]]


class OpenStream:
    """A streaming completion read up to its first data line and held open until ``close``.

    It keeps httpx's line iterator: dropping that iterator closes the response (the server then
    sees a disconnect and aborts the request).
    """

    def __init__(self, url: str, body: dict, headers: dict[str, str] | None = None):
        self.http = httpx.Client(timeout=TIMEOUT_S)
        request = self.http.build_request("POST", url + "/v1/completions", json={**body, "stream": True},
                                          headers=headers or {})
        self.response = self.http.send(request, stream=True)
        assert self.response.status_code == 200, self.response.read()
        self._lines = self.response.iter_lines()
        self.first = next(line for line in self._lines if line.startswith("data: "))

    def rest(self) -> list[str]:
        """The remaining data lines, to the end of the stream."""
        return [line for line in self._lines if line.startswith("data: ")]

    def close(self) -> None:
        self.response.close()
        self.http.close()


def stream_token_ids(lines: list[str]) -> tuple[list[int], str | None]:
    """Token ids of a completion stream sent with ``return_token_ids``, and its finish reason."""
    ids: list[int] = []
    finish = None
    for line in lines:
        if line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            ids += choice.get("token_ids") or []
            finish = choice.get("finish_reason") or finish
    return ids, finish


def copy_adapter(source: Path, target: Path) -> Path:
    """A fresh copy of an adapter folder (its files replace any that are there)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy(item, target / item.name)
    return target


def post(url: str, route: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/v1" + route, json=body, headers=headers or {}, timeout=TIMEOUT_S)


def greedy_ids(url: str, model: str, prompt: str, max_tokens: int, headers: dict[str, str] | None = None) -> list[int]:
    response = post(url, "/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                          "temperature": 0, "ignore_eos": True, "return_token_ids": True}, headers)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def swap_during_stream(url: str, root: Path, name: str, how: str, v1: Path, v2: Path, prompt: str,
                       expected: Expected, headers: dict[str, str] | None = None, engine_says: bool = True) -> None:
    """Run one scenario (see the module docstring); ``v1``/``v2``: adapter folders to ship (processed or PEFT).

    ``engine_says``: the server's answers to unload and load come from the engine that runs the stream
    (one process), so they prove the stream still held version 1 at the swap.
    """
    first = copy_adapter(v1, root / f"{name}_v1")
    assert (load := post(url, "/load_lora_adapter", {"lora_name": name, "lora_path": str(first)}, headers)
            ).status_code == 200, load.text
    stream = OpenStream(url, {"model": name, "prompt": prompt, "max_tokens": LONG_TOKENS, "ignore_eos": True,
                              "temperature": 0, "return_token_ids": True}, headers)
    try:
        # in place: a retrained adapter written over the folder it was loaded from
        second = copy_adapter(v2, first if how == "files_replaced_in_place" else root / f"{name}_v2")
        if how != "load_again_without_unload":
            unload = post(url, "/unload_lora_adapter", {"lora_name": name}, headers)
            assert unload.status_code == 200 and "finish first" in unload.text, unload.text  # the stream still runs
        load = post(url, "/load_lora_adapter", {"lora_name": name, "lora_path": str(second)}, headers)
        assert load.status_code == 200, load.text
        if engine_says and how == "load_again_without_unload":
            assert "requests already running finish on" in load.text, load.text  # the stream still runs
        after = greedy_ids(url, name, prompt, SHORT_TOKENS, headers)
        lines = [stream.first] + stream.rest()
    finally:
        stream.close()
    assert after == expected(v2, SHORT_TOKENS), "a request sent after the load must get the new version"
    ids, finish = stream_token_ids(lines)
    assert finish == "length"
    assert ids == expected(v1, LONG_TOKENS), "the stream that spans the swap must finish on the version it started on"
    assert post(url, "/unload_lora_adapter", {"lora_name": name}, headers).status_code == 200
