"""A long prompt arriving at ``edgelora serve`` while streams decode: how long do the streams freeze?

Starts ``edgelora serve`` on a free loopback port (the flags after ``--`` go to it), opens N streaming
chat completions (one adapter each), waits until every stream is producing tokens, then sends one
long prompt. Reports, from the clients' side: the longest gap between two streamed chunks of any
stream while the long prompt was pending, and the long prompt's time to first token.

    python benchmarks/serve_stall.py --onnx-dir bench_out/int4 \\
        --adapters bench_out/onnx/lora_weights/d{1..8} --prompt-tokens 1678 -- --max-num-batched-tokens 0

Needs the server's dependencies: ``pip install 'edgelora[serve]'``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from pathlib import Path

import httpx

from edgelora.runtime.tokenizer import ChatTokenizer
from edgelora.tools.serve_process import running_server


def long_prompt(onnx_dir: Path, tokens: int) -> str:
    """Decoded runs of the tokenizer's own token ids until the chat prompt has about ``tokens`` tokens."""
    tokenizer = ChatTokenizer(onnx_dir)
    text = ""
    for start in range(10_000):
        text += tokenizer.decode(list(range(100 + start % 50 * 20, 120 + start % 50 * 20))) + " "
        if len(tokenizer.prompt_ids([{"role": "user", "content": text}])) >= tokens:
            return text
    raise SystemExit("could not build a prompt that long")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--adapters", type=Path, nargs="+", required=True, help="processed adapters, one per stream")
    parser.add_argument("--prompt-tokens", type=int, default=1678)
    parser.add_argument("--stream-tokens", type=int, default=400)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("serve_args", nargs="*", help="flags for edgelora serve (after --)")
    args = parser.parse_args(argv)
    names = [path.name for path in args.adapters]
    modules = [f"{name}={path}" for name, path in zip(names, args.adapters)]
    text = long_prompt(args.onnx_dir, args.prompt_tokens)
    with running_server("--onnx-dir", str(args.onnx_dir), "--lora-modules", *modules, "--max-loras", str(len(names)),
                        "--max-num-seqs", str(len(names) + 1), "--threads", "2", *args.serve_args) as (url, _):
        chunk_times: dict[str, list[float]] = {name: [] for name in names}
        done = threading.Event()

        def stream(name: str) -> None:
            body = {"model": name, "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": args.stream_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "return_token_ids": True}  # a chunk for every token, with text or not
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk_times[name].append(time.perf_counter())
                    if done.is_set():
                        return

        threads = [threading.Thread(target=stream, args=(name,), daemon=True) for name in names]
        for thread in threads:
            thread.start()
        deadline = time.perf_counter() + 120
        while any(len(times) < 5 for times in chunk_times.values()) and time.perf_counter() < deadline:
            time.sleep(0.1)
        sent = time.perf_counter()
        body = {"model": Path(args.onnx_dir).resolve().name, "messages": [{"role": "user", "content": text}],
                "max_tokens": 1, "temperature": 0}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        answered = time.perf_counter()
        response.raise_for_status()
        prompt_tokens = response.json()["usage"]["prompt_tokens"]
        done.set()
        gaps = []
        for times in chunk_times.values():
            inside = [t for t in times if sent <= t <= answered]
            before = [t for t in times if t < sent]
            points = before[-1:] + inside + [answered]
            gaps += [later - earlier for earlier, later in itertools.pairwise(points)]
        result = {"prompt_tokens": prompt_tokens, "ttft_s": answered - sent, "longest_stream_gap_s": max(gaps),
                  "serve_args": args.serve_args}
        print(json.dumps(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
