"""10,000 adapters under ``--lora-root``: start-up time, resident memory, listing, and 1,000 served on demand.

    python benchmarks/many_adapters.py --work-dir bench_out/many --count 10000 --serve 1000 \
        --json benchmarks/results/DATE-many-adapters.json

Builds (once, under ``--work-dir``) the tiny Qwen2 sample, its export with LoRA inputs, and ``--count``
PEFT adapters, r4 on q_proj and v_proj, each with its own random weights (one adapter saved by
``peft``, the others the same files with other tensors: standard PEFT folders). Then, interleaved
``--repeats`` times, ``edgelora serve --lora-root ROOT --lora-on-demand`` on a root of ``--baseline``
adapters and on the root of ``--count``: seconds to the first 200 of /health and resident memory
(VmRSS) then. On the large root: ``/v1/models`` whole and one page, ``--serve`` adapters (spread over
the root) asked for through the official ``openai`` client, 8 at a time, each loaded on demand, and
resident memory after; a path escape must be a 404. The same requests go through ``edgelora infer``
(offline, the adapters processed by ``process_adapter``) and the answers must be equal, token for token.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from edgelora.formats import contract
from edgelora.tools.serve_process import edgelora_command, running_server

ROOT_DIR = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?", "Translate to German: good morning"]
MAX_TOKENS = 8


def rss_bytes(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def build_model(work: Path) -> Path:
    """The tiny Qwen2 sample exported with LoRA inputs (once)."""
    onnx_dir = work / "onnx"
    if (onnx_dir / contract.LORA_MANIFEST).is_file():
        return onnx_dir
    sys.path.insert(0, str(ROOT_DIR / "samples"))
    from make_sample import make_model

    from edgelora.export import ExportOptions, export_model
    from edgelora.graph import insert_lora

    model_dir = make_model("qwen2", work / "model", "tiny")
    export_model(model_dir, onnx_dir, ExportOptions(progress=False))
    insert_lora(onnx_dir)
    return onnx_dir


def build_adapters(work: Path, root: Path, count: int) -> list[str]:
    """``count`` PEFT folders under ``root`` (made once): a peft-saved template, the rest its files with new tensors."""
    from safetensors.numpy import load_file, save_file

    names = [f"t{index:05d}" for index in range(count)]
    template = work / "template"
    if not (template / contract.PEFT_WEIGHTS).is_file():
        sys.path.insert(0, str(ROOT_DIR / "samples"))
        from make_sample import AdapterRecipe, make_adapter

        make_adapter(work / "model", template, AdapterRecipe(4, 8, ("q_proj", "v_proj")), seed=7)
    tensors = load_file(template / contract.PEFT_WEIGHTS)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for index, name in enumerate(names):
        folder = root / name
        if (folder / contract.PEFT_WEIGHTS).is_file():
            continue
        rng = np.random.default_rng(index)
        folder.mkdir(exist_ok=True)
        shutil.copyfile(template / contract.PEFT_CONFIG, folder / contract.PEFT_CONFIG)
        fresh = {key: (rng.standard_normal(value.shape) * 0.3).astype(np.float16).astype(value.dtype)
                 for key, value in tensors.items()}
        save_file(fresh, str(folder / (contract.PEFT_WEIGHTS + ".tmp")))
        (folder / (contract.PEFT_WEIGHTS + ".tmp")).rename(folder / contract.PEFT_WEIGHTS)
        if index % 1000 == 999:
            print(f"  {index + 1} adapters made ({time.perf_counter() - started:.0f} s)", flush=True)
    return names


def start_and_measure(onnx_dir: Path, root: Path, cache: Path, threads: int) -> dict:
    """Seconds from launch to the first 200 of /health, and VmRSS then."""
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    with running_server("--onnx-dir", str(onnx_dir), "--lora-root", str(root), "--lora-on-demand",
                        "--lora-cache-dir", str(cache), "--threads", str(threads)) as (_url, process):
        return {"startup_s": time.perf_counter() - started, "rss_mb": rss_bytes(process.pid) / 2**20}


def serve_many(onnx_dir: Path, root: Path, cache: Path, threads: int, names: list[str]) -> dict:
    """On the large root: list, serve ``names`` on demand, check an escape; answers and memory."""
    import openai

    shutil.rmtree(cache, ignore_errors=True)
    with running_server("--onnx-dir", str(onnx_dir), "--lora-root", str(root), "--lora-on-demand",
                        "--lora-cache-dir", str(cache), "--threads", str(threads), "--max-num-seqs", "8") \
            as (url, process):
        result: dict = {"rss_ready_mb": rss_bytes(process.pid) / 2**20}
        started = time.perf_counter()
        listed = httpx.get(f"{url}/v1/models", timeout=120).json()["data"]
        result["list_all_s"] = time.perf_counter() - started
        result["listed"] = len(listed)
        started = time.perf_counter()
        page = httpx.get(f"{url}/v1/models", params={"limit": 100, "after": names[len(names) // 2]}, timeout=60).json()
        result["list_page_s"] = time.perf_counter() - started
        result["page_has_more"] = page["has_more"]
        result["rss_after_listing_mb"] = rss_bytes(process.pid) / 2**20
        escapes = {name: httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code
            for name in ("../template", "..", f"{names[0]}/..", "/etc")}
        result["escape_status"] = escapes
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(index_name: tuple[int, str]) -> list[int]:
            index, name = index_name
            response = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
            return response.choices[0].token_ids

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            result["answers"] = list(pool.map(ask, enumerate(names)))
        result["serve_s"] = time.perf_counter() - started
        result["rss_after_serving_mb"] = rss_bytes(process.pid) / 2**20
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        loads = re.search(r"^edgelora_adapter_on_demand_loads_total (\S+)$", metrics, re.M)
        result["on_demand_loads"] = float(loads.group(1)) if loads else None
        return result


def offline_answers(onnx_dir: Path, root: Path, work: Path, names: list[str], threads: int) -> dict:
    """``edgelora infer`` on the same requests, the adapters processed first (timed apart)."""
    from edgelora.adapters import process_adapter

    processed = work / "offline"
    started = time.perf_counter()
    for name in names:
        if not (processed / name / contract.PROCESSED_ADAPTER).is_file():
            process_adapter(root / name, processed / name, onnx_dir)
    process_s = time.perf_counter() - started
    job = {"available_lora_weights": {name: str(processed / name) for name in names}, "temperature": 0,
           "max_generate_length": MAX_TOKENS,
           "requests": [{"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], "lora_name": name}
                        for index, name in enumerate(names)]}
    with tempfile.TemporaryDirectory() as scratch:
        input_file, output_file = Path(scratch) / "input.json", Path(scratch) / "output.json"
        input_file.write_text(json.dumps(job))
        started = time.perf_counter()
        subprocess.run([*edgelora_command(), "infer", "--onnx-dir", str(onnx_dir), "--input-file", str(input_file),
                        "--output-file", str(output_file), "--threads", str(threads), "--max-batch-size", "8"],
                       check=True, stdout=subprocess.DEVNULL)
        infer_s = time.perf_counter() - started
        responses = json.loads(output_file.read_text())["responses"]
    return {"answers": [response["output_ids"] for response in responses], "process_s": process_s, "infer_s": infer_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("bench_out/many"), help="model, adapters and caches")
    parser.add_argument("--count", type=int, default=10_000, help="adapters under the large root")
    parser.add_argument("--baseline", type=int, default=10, help="adapters under the small root")
    parser.add_argument("--serve", type=int, default=1000, help="adapters of the large root served on demand")
    parser.add_argument("--repeats", type=int, default=3, help="start-ups of each server (interleaved; medians)")
    parser.add_argument("--threads", type=int, default=2, help="the server's CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.baseline <= args.count or not 1 <= args.serve <= args.count:
        parser.error("expected 1 <= --baseline, --serve <= --count")
    work = args.work_dir.resolve()
    onnx_dir = build_model(work)
    root = work / f"root{args.count}"
    names = build_adapters(work, root, args.count)
    small = work / f"root{args.baseline}"
    if not small.is_dir():
        small.mkdir()
        for name in names[:args.baseline]:
            shutil.copytree(root / name, small / name)
    # surplus folders from an earlier, larger --count would be listed too
    if sum(1 for _ in root.iterdir()) != args.count:
        parser.error(f"{root} holds other than {args.count} folders; use another --work-dir")

    startups: dict[str, list[dict]] = {"baseline": [], "large": []}
    for repeat in range(args.repeats):
        for label, folder in (("baseline", small), ("large", root))[::1 if repeat % 2 == 0 else -1]:
            startups[label].append(start_and_measure(onnx_dir, folder, work / "cache", args.threads))
            print(f"  start-up {label}: {startups[label][-1]}", flush=True)
    served = names[::max(1, args.count // args.serve)][:args.serve]
    online = serve_many(onnx_dir, root, work / "cache", args.threads, served)
    offline = offline_answers(onnx_dir, root, work, served, args.threads)
    equal = sum(a == b for a, b in zip(online.pop("answers"), offline.pop("answers"), strict=True))

    def median(label: str, key: str) -> float:
        return round(statistics.median(run[key] for run in startups[label]), 3)

    report = {
        "count": args.count, "baseline": args.baseline, "served": len(served), "threads": args.threads,
        "startup_s": {label: median(label, "startup_s") for label in startups},
        "rss_ready_mb": {label: median(label, "rss_mb") for label in startups},
        "startups": startups,
        "online": {key: round(value, 3) if isinstance(value, float) else value for key, value in online.items()},
        "offline": {key: round(value, 3) for key, value in offline.items()},
        "answers_equal": equal,
    }
    report["rss_above_baseline_mb"] = round(online["rss_after_serving_mb"] - report["rss_ready_mb"]["baseline"], 1)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = equal == len(served) and all(status == 404 for status in online["escape_status"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
