"""Prompt speed of one long prompt: edgelora (default step budget, and no budget) against llama-server, one run.

Build llama.cpp first (``benchmarks/build_llama_cpp.sh PREFIX``). The HF folder is converted with
llama.cpp's own tools (cached in --work-dir, see ``peers/llama_cpp.py``). Each round sends the same
token-id prompt to llama-server (``/completion``, ``n_predict`` 1, no prompt cache; its own prompt timing)
and runs it through edgelora's scheduler with ``max_tokens`` 1 (wall time to the first token), the
configurations interleaved; medians reported.

    python benchmarks/prefill_peer.py --onnx-dir bench_out/int4 --hf-dir bench_out/sample/model \\
        --llama-dir ~/.cache/edgelora/llama.cpp --quant q4_0 --prompt-len 1678 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from llama_cpp import HOST, convert_base, find_tools, stop_server, wait_healthy

from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler
from edgelora.tools.serve_process import free_port


def ours(engine: Engine, prompt: list[int], budget: int | None) -> float:
    """Seconds from the request to its first token."""
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=budget))
    started = time.perf_counter()
    scheduler.run_to_completion([GenerationRequest(prompt, None, SamplingParams(max_tokens=1, temperature=0.0))])
    return time.perf_counter() - started


def llama(client: httpx.Client, prompt: list[int]) -> tuple[float, float]:
    """(wall seconds, the server's own prompt_ms / 1000) for one prompt."""
    body = {"prompt": prompt, "n_predict": 1, "temperature": 0.0, "top_k": 1, "cache_prompt": False}
    started = time.perf_counter()
    response = client.post("/completion", json=body)
    wall = time.perf_counter() - started
    response.raise_for_status()
    timings = response.json()["timings"]
    if timings["prompt_n"] != len(prompt):
        raise SystemExit(f"llama-server prefilled {timings['prompt_n']} of {len(prompt)} tokens")
    return wall, timings["prompt_ms"] / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--baseline-onnx-dir", type=Path, default=None,
                        help="another export (e.g. an older one) timed in the same rounds, default budget")
    parser.add_argument("--hf-dir", type=Path, required=True, help="the HF folder the ONNX model was exported from")
    parser.add_argument("--llama-dir", type=Path, required=True, help="build_llama_cpp.sh's PREFIX")
    parser.add_argument("--quant", default="q4_0", choices=["f32", "q4_0"])
    parser.add_argument("--work-dir", type=Path, default=Path("bench_out/llama_cpp"))
    parser.add_argument("--prompt-len", type=int, default=1678)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    tools = find_tools(args.llama_dir.expanduser())
    (args.work_dir / "logs").mkdir(parents=True, exist_ok=True)
    model, notes = convert_base(tools, args.hf_dir, args.quant, args.work_dir)
    engine = Engine(args.onnx_dir, EngineConfig(max_loras=1, num_threads=args.threads))
    prompt = np.random.default_rng(0).integers(3, engine.spec.vocab_size, args.prompt_len).tolist()
    port = free_port()
    log = (args.work_dir / "prefill_peer_server.log").open("w")
    command = [str(tools.server), "-m", str(model), "--host", HOST, "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "--parallel", "1", "-c", str(args.prompt_len + 64), "--cache-ram", "0",
               "--no-webui"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    baseline = Engine(args.baseline_onnx_dir, EngineConfig(max_loras=1, num_threads=args.threads)) \
        if args.baseline_onnx_dir else None
    times: dict[str, list[float]] = {"llama_wall": [], "llama_prompt": [], "ours_default": [], "ours_whole": []}
    if baseline is not None:
        times["baseline_default"] = []
    try:
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=600) as client:
            wait_healthy(process, client, args.work_dir / "prefill_peer_server.log")
            llama(client, prompt[:64])  # warm-up
            ours(engine, prompt[:64], None)
            if baseline is not None:
                ours(baseline, prompt[:64], None)
            for index in range(args.rounds):
                wall, own = llama(client, prompt)
                times["llama_wall"].append(wall)
                times["llama_prompt"].append(own)
                times["ours_default"].append(ours(engine, prompt, None))
                times["ours_whole"].append(ours(engine, prompt, 0))
                if baseline is not None:
                    times["baseline_default"].append(ours(baseline, prompt, None))
                print(f"round {index}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        stop_server(process)
        log.close()
    medians = {key: statistics.median(values) for key, values in times.items()}
    speeds = {key: args.prompt_len / value for key, value in medians.items()}
    for key in medians:
        print(f"{key:16s} {medians[key]:6.2f} s  {speeds[key]:7.1f} prompt tok/s")
    print(f"ours (default budget) / llama.cpp {args.quant} prompt speed: "
          f"{speeds['ours_default'] / speeds['llama_wall']:.2f} (wall), {speeds['ours_default'] / speeds['llama_prompt']:.2f} "
          "(against its own prompt timing)")
    if args.json:
        args.json.write_text(json.dumps({"medians_s": medians, "prompt_tok_s": speeds, "notes": notes,
                                         "rounds": times}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
