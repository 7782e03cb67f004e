"""Side by side, in one run: edgelora float32 / int8 / int4 against transformers + PEFT,
onnxruntime-genai and llama.cpp, on the same model, prompts and adapters.

    python benchmarks/compare.py --hf-dir bench_out/sample/model --onnx-dir bench_out/onnx \
        --adapter A=bench_out/sample/adapters/b1 --adapter B=bench_out/sample/adapters/b2 \
        --adapter C=bench_out/sample/adapters/b3 --threads 2 --rounds 3

Five columns (prompts of --prompt-len token ids, --max-tokens greedy tokens, EOS ignored, decode
tokens/s aggregate over the batch, prefill excluded): batch 1 base, batch 1 adapter B, batch 4
base, batch 4 B on every row, batch 4 rows A, B, C, base. Each engine runs in its own process; the
whole sequence of engines runs ``--passes`` times (default 2), its order rotating, so every engine
is measured in separate minutes of the run; inside one pass the columns interleave round by round.
Cells are medians over passes x rounds with their min-max; ratios are ratios of medians with the
widest range the samples allow.
The engines that cannot mix adapters in a batch run the last column as their users must (their
runners say how). onnxruntime-genai runs from its own venv (``--genai-python``, see
``benchmarks/peers/genai.py``), llama.cpp from a build (``--llama-dir``,
``benchmarks/build_llama_cpp.sh``). Everything the chosen ``--engines`` need is checked before
anything runs: a missing piece (a module, which extra or package brings it, a peer's venv or
build) is one line each and nothing runs, or with ``--skip-missing`` that peer is left out and
said so. If the run stops midway, the engines measured so far are written as ``NAME-partial``.

Also in the same run: memory read bandwidth, resident memory with N adapters loaded, cold adapter
load, and bytes of weights read per second against the bandwidth. Output: a Markdown table
(figures and ratios), the raw JSON and a PNG chart in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from preflight import settle

from edgelora.formats import contract

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
EDGELORA = [sys.executable, "-m", "edgelora"]
COLUMNS = [("b1 base", [None]), ("b1 B", ["B"]), ("b4 base", [None] * 4), ("b4 B", ["B"] * 4),
           ("b4 A,B,C,base", ["A", "B", "C", None])]
DEFAULT_GENAI_PY = Path.home() / ".cache/edgelora/genai-venv/bin/python"
DEFAULT_LLAMA_DIR = Path.home() / ".cache/edgelora/llama.cpp"


@dataclass
class EngineRun:
    """One engine's figures: per column, the median decode tokens/s and its samples."""

    engine: str
    columns: dict[str, dict] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    bench: dict | None = None  # edgelora bench's whole JSON (bandwidth, weights, cold load)
    version: str | None = None

    def samples(self, column: str) -> list[float]:
        entry = self.columns.get(column)
        return list(entry["tokens_per_s"]) if entry and entry.get("tokens_per_s") else []

    def median(self, column: str) -> float | None:
        values = self.samples(column)
        return statistics.median(values) if values else None

    def merge(self, other: EngineRun) -> None:
        """Another pass of the same engine: its samples join these (the first pass's notes stay)."""
        if other.skipped:
            self.notes.append(f"a later pass was not measured: {other.skipped}")
            return
        if self.skipped:
            other.notes.append(f"an earlier pass was not measured: {self.skipped}")
            self.__dict__.update(other.__dict__)
            return
        for name, entry in other.columns.items():
            mine = self.columns.setdefault(name, {"tokens_per_s": [], "tokens": entry.get("tokens")})
            mine["tokens_per_s"] = list(mine.get("tokens_per_s", [])) + list(entry.get("tokens_per_s", []))
        self.peak_rss_mb = max(filter(None, [self.peak_rss_mb, other.peak_rss_mb]), default=None)


def _run(command: list[str], log_path: Path) -> tuple[int, float]:
    """A child process with its output in a log; returns its exit code and its peak resident MB."""
    with open(log_path, "w") as log:
        print(f"  $ {' '.join(map(str, command))}", flush=True)
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        return child.returncode, usage.ru_maxrss / 1024


def _workload(vocab: int, prompt_len: int, max_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    high = min(vocab, 2000)
    return {"prompts": [rng.integers(10, high, prompt_len).tolist() for _ in range(4)], "max_tokens": max_tokens,
            "columns": [{"name": name, "rows": rows} for name, rows in COLUMNS]}


def _prepare_edgelora(args, work: Path) -> dict[str, Path]:
    """The float export's int8 / int4 copies (with LoRA inputs) and the adapters processed once for all three."""
    folders = {"float32": args.onnx_dir}
    for mode in ("int8", "int4"):
        folder = work / f"onnx_{mode}"
        built = folder / "lora_model.onnx"
        if not built.is_file() or built.stat().st_mtime < (args.onnx_dir / "model.onnx").stat().st_mtime:
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run([*EDGELORA, "quantize", "--onnx-dir", str(args.onnx_dir), "--output-dir", str(folder),
                            "--mode", mode, "--quiet"], check=True)
            subprocess.run([*EDGELORA, "insert-lora", "--onnx-dir", str(folder), "--quiet"], check=True)
        folders[mode] = folder
    for name, peft_dir in args.adapters.items():
        processed = work / "processed" / name
        made = processed / contract.PROCESSED_ADAPTER
        if not made.is_file() or made.stat().st_mtime < (args.onnx_dir / "model.onnx").stat().st_mtime:
            subprocess.run([*EDGELORA, "process-lora", "--input-dir", str(peft_dir), "--output-dir", str(processed),
                            "--onnx-dir", str(args.onnx_dir), "--quiet"], check=True)
    return folders


def _edgelora(label: str, folder: Path, args, work: Path, workload_path: Path) -> EngineRun:
    """``edgelora bench`` on the workload's rows and prompts (its own interleaving and medians)."""
    out = work / f"edgelora_{label}.json"
    rows = [",".join(row or "-" for row in column[1]) for column in COLUMNS]
    command = [*EDGELORA, "bench", "--onnx-dir", str(folder),
               "--adapters", *[str(work / "processed" / name) for name in args.adapters],
               *[f"--rows={text}" for text in rows], "--prompt-file", str(workload_path),
               "--max-tokens", str(args.max_tokens), "--repeats", str(args.rounds), "--contexts", "64",
               "--context-steps", "2", "--context-batch", "1", "--threads", str(args.threads), "--json", str(out),
               "--quiet"]
    code, peak_mb = _run(command, work / f"edgelora_{label}.log")
    if code != 0:
        return EngineRun(f"edgelora {label}", skipped=f"bench failed, see {work / f'edgelora_{label}.log'}")
    result = json.loads(out.read_text())
    run = EngineRun(f"edgelora {label}", peak_rss_mb=peak_mb, version=_edgelora_version())
    for (name, _), config in zip(COLUMNS, result["configs"]):
        run.columns[name] = {"tokens_per_s": config["samples_decode_tokens_per_s"], "tokens": config["tokens"]}
    run.notes.append(f"bandwidth {result['memory']['read_bandwidth_gb_s']:.1f} GB/s, weights "
                     f"{result['memory']['weight_bytes'] / 1e9:.3f} GB, cold adapter load "
                     f"{result['cold_load']['median_ms']:.1f} ms")
    run.bench = result
    return run


def _edgelora_version() -> str:
    from importlib.metadata import version

    return f"edgelora {version('edgelora')}, onnxruntime {version('onnxruntime')}"


def _peer(label: str, command: list[str], work: Path) -> EngineRun:
    out = work / f"{label}.json"
    out.unlink(missing_ok=True)
    if _run([*command, "--out", str(out)], work / f"{label}.log")[0] != 0 or not out.is_file():
        tail = (work / f"{label}.log").read_text().strip().splitlines()[-1:] or ["no output"]
        print(f"compare: {label} failed: {tail[0]} (see {work / f'{label}.log'})", file=sys.stderr, flush=True)
        return EngineRun(label, skipped=f"failed: {tail[0]}")
    data = json.loads(out.read_text())
    return EngineRun(data["engine"], data["columns"], data.get("peak_rss_mb"), data.get("notes", []),
                     version=data.get("version"))


def _memory_probe(onnx_dir: Path, adapters: list[Path], threads: int) -> dict:
    """Resident memory of an engine with 0..N adapters loaded (run in a child: a fresh process)."""
    code = f"""
import json, re
from pathlib import Path
from edgelora.runtime.config import EngineConfig
from edgelora.runtime.engine import Engine
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
paths = {json.dumps([str(p) for p in adapters])}
engine = Engine(Path({str(onnx_dir)!r}), EngineConfig(max_loras=len(paths), max_cpu_loras=len(paths), num_threads={threads}))
steps = [rss()]
for index, path in enumerate(paths):
    engine.adapters.add(f"m{{index}}", Path(path)); engine.adapters.activate(f"m{{index}}"); steps.append(rss())
print(json.dumps(steps))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    sizes = [sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) for p in adapters]
    return {"rss_mb": [s / 2**20 for s in steps], "adapter_file_mb": [s / 2**20 for s in sizes],
            "per_adapter_mb": (steps[-1] - steps[0]) / max(len(adapters), 1) / 2**20}


def _ratios(runs: dict[str, EngineRun]) -> list[tuple[str, tuple[float, float, float] | None, str]]:
    """(what, ratio, target) rows for the acceptance figures."""
    def ratio(a: str, b: str, column: str, column_b: str | None = None) -> tuple[float, float, float] | None:
        """Ratio of medians, and the widest ratio the samples allow (min/max .. max/min)."""
        x = runs[a].samples(column) if a in runs else []
        y = runs[b].samples(column_b or column) if b in runs else []
        if not x or not y or min(y) <= 0:
            return None
        return statistics.median(x) / statistics.median(y), min(x) / max(y), max(x) / min(y)

    mixed = "b4 A,B,C,base"
    rows = [("int4 b1 B / llama.cpp q4_0", ratio("int4", "llama q4_0", "b1 B"), ">= 0.8"),
            ("int4 b1 base / llama.cpp q4_0", ratio("int4", "llama q4_0", "b1 base"), ">= 0.75"),
            ("int4 mixed / llama.cpp q4_0", ratio("int4", "llama q4_0", mixed), ">= 1.5")]
    rows += [(f"int4 {name} / onnxruntime-genai int4", ratio("int4", "genai int4", name), ">= 1.0") for name, _ in COLUMNS]
    rows += [("float32 b4 base / onnxruntime-genai fp32", ratio("float32", "genai fp32", "b4 base"), ">= 1.0"),
             ("float32 b4 B / onnxruntime-genai fp32", ratio("float32", "genai fp32", "b4 B"), ">= 1.0"),
             ("float32 mixed / llama.cpp f32", ratio("float32", "llama f32", mixed), ">= 2.0"),
             ("float32 mixed / transformers + PEFT", ratio("float32", "peft", mixed), ">= 2.5"),
             ("float32 mixed / float32 b4 B", ratio("float32", "float32", mixed, "b4 B"), ""),
             ("int4 b1 base / float32 b1 base", ratio("int4", "float32", "b1 base"), "")]
    return rows


def _same_tokens(runs: dict[str, EngineRun], reference: str = "float32") -> dict[str, str]:
    """Per engine: the columns whose greedy ids equal edgelora float32's on every row."""
    ref = runs.get(reference)
    out = {}
    for key, run in runs.items():
        if key == reference or run.skipped or ref is None:
            continue
        equal = [name for name, _ in COLUMNS if name in run.columns and run.columns[name].get("tokens")
                 and run.columns[name]["tokens"] == ref.columns.get(name, {}).get("tokens")]
        out[key] = f"{len(equal)}/{len(COLUMNS)} columns"
    return out


def _table(runs: dict[str, EngineRun]) -> str:
    head = "| engine | " + " | ".join(name for name, _ in COLUMNS) + " | peak RSS MB |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for run in runs.values():
        if run.skipped:
            lines.append(f"| {run.engine} | " + " | ".join("—" for _ in COLUMNS) + f" | not measured: {run.skipped} |")
            continue
        cells = [f"{run.median(name):.1f} ({min(run.samples(name)):.1f}–{max(run.samples(name)):.1f})"
                 if run.median(name) else "—" for name, _ in COLUMNS]
        rss = f"{run.peak_rss_mb:.0f}" if run.peak_rss_mb else "—"
        lines.append(f"| {run.engine} | " + " | ".join(cells) + f" | {rss} |")
    return "\n".join(lines)


def _chart(runs: dict[str, EngineRun], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [run for run in runs.values() if not run.skipped]
    fig, ax = plt.subplots(figsize=(9, 4), dpi=80)
    width = 0.8 / max(len(measured), 1)
    for index, run in enumerate(measured):
        values = [run.median(name) or 0 for name, _ in COLUMNS]
        ax.bar(np.arange(len(COLUMNS)) + index * width, values, width, label=run.engine)
    ax.set_xticks(np.arange(len(COLUMNS)) + width * (len(measured) - 1) / 2, [name for name, _ in COLUMNS])
    ax.set_ylabel("decode tokens/s (batch aggregate)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


GENAI_MODULES = ["onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir", "onnxscript", "torch", "transformers",
                 "safetensors", "numpy"]  # its model builder's imports, and genai.py's


def _missing_modules(python: Path | str, modules: list[str]) -> list[str] | None:
    """The modules ``python`` cannot import (None: that python does not run)."""
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    try:
        done = subprocess.run([str(python), "-c", probe, *modules], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def preflight(args, engines: set[str]) -> list[tuple[str | None, str]]:
    """(engine, line) per missing piece, found before anything runs; engine None: every run needs it."""
    from edgelora.dependencies import install_hint

    problems: list[tuple[str | None, str]] = []
    for path in (args.onnx_dir / contract.MODEL_ONNX, args.onnx_dir / contract.LORA_MODEL_ONNX,
                 args.hf_dir / "config.json"):
        if not path.is_file():
            problems.append((None, f"{path} (--onnx-dir: 'edgelora export' + 'insert-lora'; --hf-dir: an HF folder)"))
    for name, folder in args.adapters.items():
        if not (Path(folder) / "adapter_config.json").is_file():
            problems.append((None, f"--adapter {name}={folder}: not a PEFT folder (no adapter_config.json)"))
    needed = {"matplotlib": None}
    if "peft" in engines:
        needed.update({"torch": "peft", "peft": "peft", "transformers": "peft"})
    lacking = _missing_modules(sys.executable, list(needed)) or []
    for module in lacking:
        problems.append((needed[module], f"{module} ({'the chart' if needed[module] is None else 'transformers + PEFT'}):"
                                         f" {install_hint(module)}"))
    if "genai" in engines:
        lacking = _missing_modules(args.genai_python, GENAI_MODULES) if args.genai_python.is_file() else None
        if lacking is None:
            problems.append(("genai", f"onnxruntime-genai: no working python at {args.genai_python} (--genai-python: "
                                      "a venv with onnxruntime-genai, onnx-ir, onnxscript, torch==2.13.0, transformers)"))
        elif lacking:
            packages = " ".join(module.replace("_", "-") for module in lacking)
            problems.append(("genai", f"onnxruntime-genai: {args.genai_python} lacks {', '.join(lacking)} "
                                      f"({args.genai_python} -m pip install {packages})"))
    if "llama" in engines:
        prefix = args.llama_dir.expanduser()
        for part in ("bin/llama-server", "bin/llama-quantize", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
            if not (prefix / part).exists():
                problems.append(("llama", f"llama.cpp: no {prefix / part} (benchmarks/build_llama_cpp.sh {prefix})"))
                break
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-dir", required=True, type=Path, help="the Hugging Face model (PEFT, genai, llama.cpp read it)")
    parser.add_argument("--onnx-dir", required=True, type=Path, help="edgelora's float export of it, with lora_model.onnx")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=PEFT_DIR",
                        help="adapters A, B and C (PEFT folders)")
    parser.add_argument("--memory-adapters", type=Path, nargs="*", default=[],
                        help="processed adapters for the resident-memory probe (default: A, B, C)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench_out" / "compare",
                        help="quantized copies, processed adapters, peer builds, logs")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=f"{datetime.date.today().isoformat()}-compare", help="output file stem")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the columns per engine and pass")
    parser.add_argument("--passes", type=int, default=2,
                        help="the whole engine sequence this many times, its order rotating: every engine is measured "
                             "in separate minutes of the run (medians and min-max over passes x rounds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="float32,int8,int4,peft,genai,llama",
                        help="which to run, comma-separated; each is checked before anything runs")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out the engines whose pieces are missing instead of stopping (they are reported)")
    parser.add_argument("--genai-python", type=Path, default=DEFAULT_GENAI_PY,
                        help="python of a venv with onnxruntime-genai (benchmarks/peers/genai.py)")
    parser.add_argument("--llama-dir", type=Path, default=DEFAULT_LLAMA_DIR,
                        help="llama.cpp build prefix (benchmarks/build_llama_cpp.sh)")
    args = parser.parse_args(argv)
    try:
        args.adapters = dict(item.split("=", 1) for item in args.adapter)
    except ValueError:
        parser.error("--adapter takes NAME=PEFT_DIR")
    if args.passes < 1 or args.rounds < 1:
        parser.error("--passes and --rounds must be >= 1")
    if set(args.adapters) != {"A", "B", "C"}:
        parser.error("--adapter: give exactly A=..., B=... and C=...")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engines = set(args.engines.split(","))
    unknown = engines - {"float32", "int8", "int4", "peft", "genai", "llama"}
    if unknown:
        print(f"compare: error: --engines: unknown {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if not settle(preflight(args, engines), engines, args.skip_missing, "compare"):
        return 2
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.onnx_dir / "config.json").read_text())
    workload = _workload(config["vocab_size"], args.prompt_len, args.max_tokens, args.seed)
    workload_path = work / "workload.json"
    workload_path.write_text(json.dumps(workload))
    print("preparing edgelora's int8 / int4 copies and processed adapters", flush=True)
    folders = _prepare_edgelora(args, work)
    adapters = [f"{name}={path}" for name, path in args.adapters.items()]
    common = ["--workload", str(workload_path), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    runs: dict[str, EngineRun] = {}
    args.model_label = (f"{config['family']}-shaped: hidden {config['hidden_size']}, {config['num_layers']} layers, "
                        f"vocab {config['vocab_size']}")
    tasks: list[tuple[str, Callable[[], EngineRun]]] = []
    for label in ("float32", "int8", "int4"):
        if label in engines:
            tasks.append((label, lambda label=label: _edgelora(label, folders[label], args, work, workload_path)))
    if "peft" in engines:
        tasks.append(("peft", lambda: _peer("peft", [sys.executable, str(PEERS / "peft_eager.py"), "--hf-dir",
                                                      str(args.hf_dir), *[f"--adapter={a}" for a in adapters],
                                                      *common], work)))
    for precision in ("fp32", "int4") if "genai" in engines else ():
        key = f"genai {precision}"
        tasks.append((key, lambda key=key, precision=precision: _peer(
            key.replace(" ", "_"), [str(args.genai_python), str(PEERS / "genai.py"), "--hf-dir", str(args.hf_dir),
                                    *[f"--adapter={a}" for a in adapters], "--precision", precision, "--work-dir",
                                    str(work / "genai"), *common], work)))
    for quant in ("f32", "q4_0") if "llama" in engines else ():
        key = f"llama {quant}"
        tasks.append((key, lambda key=key, quant=quant: _peer(
            key.replace(" ", "_"), [sys.executable, str(PEERS / "llama_cpp.py"), "--llama-dir", str(args.llama_dir),
                                    "--hf-dir", str(args.hf_dir), *[f"--adapter={a}" for a in adapters], "--quant",
                                    quant, "--work-dir", str(work / "llama"), *common], work)))
    try:
        for index in range(args.passes):  # every engine once per pass, the order rotating from pass to pass
            shift = index % max(len(tasks), 1)
            for key, run in tasks[shift:] + tasks[:shift]:
                print(f"pass {index + 1}/{args.passes}: {key}", flush=True)
                result = run()
                if key in runs:
                    runs[key].merge(result)
                else:
                    runs[key] = result
    except BaseException:
        if runs:  # what was measured is kept: the table so far, named -partial
            args.name += "-partial"
            _report(args, runs, {}, workload)
        raise
    memory_adapters = args.memory_adapters or [work / "processed" / name for name in args.adapters]
    memory = {label: _memory_probe(folders[label], memory_adapters, args.threads) for label in ("float32", "int4")
              if label in engines}
    _report(args, runs, memory, workload)
    return 0


def _report(args, runs: dict[str, EngineRun], memory: dict, workload: dict) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / args.name
    title = (f"{args.model_label}: prompt {args.prompt_len}, {args.max_tokens} new tokens, {args.threads} threads, "
             f"medians of {args.rounds}")
    lines = [f"# Side-by-side decode speed ({datetime.datetime.now().isoformat(timespec='minutes')})", "",
             f"Command: `python benchmarks/compare.py {' '.join(sys.argv[1:])}`", "", title + "; tokens/s:", "",
             _table(runs), "", "| ratio | measured (widest from the samples) | target |", "|---|---|---|"]
    for what, value, target in _ratios(runs):
        lines.append(f"| {what} | {f'{value[0]:.2f} ({value[1]:.2f}–{value[2]:.2f})' if value else '—'} | {target} |")
    lines += ["", "Versions: " + "; ".join(f"{run.engine}: {run.version}" for run in runs.values() if run.version)]
    lines += ["", "Greedy ids equal to edgelora float32's: "
              + ", ".join(f"{k}: {v}" for k, v in _same_tokens(runs).items()), ""]
    for key, run in runs.items():
        for note in run.notes:
            lines.append(f"- {run.engine}: {note}")
        if run.bench and key in ("float32", "int4"):
            mem = run.bench["memory"]
            b1 = run.median("b1 base")
            if b1:
                lines.append(f"- {run.engine}: batch 1 base reads {mem['weight_bytes'] * b1 / 1e9:.1f} GB/s of weights "
                             f"= {mem['weight_bytes'] * b1 / (mem['read_bandwidth_gb_s'] * 1e9):.2f} of the measured "
                             "bandwidth")
    for label, probe in memory.items():
        if "rss_mb" in probe:
            lines.append(f"- edgelora {label} resident memory with 0..{len(probe['rss_mb']) - 1} adapters: "
                         + ", ".join(f"{v:.0f}" for v in probe["rss_mb"]) + f" MB ({probe['per_adapter_mb']:.1f} MB "
                         f"per adapter; adapter files {statistics.mean(probe['adapter_file_mb']):.1f} MB each)")
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    (stem.with_suffix(".json")).write_text(json.dumps(
        {"workload": workload, "memory": memory,
         "runs": {k: {"engine": r.engine, "columns": r.columns, "peak_rss_mb": r.peak_rss_mb, "notes": r.notes,
                      "skipped": r.skipped, "version": r.version} for k, r in runs.items()}}, indent=1) + "\n")
    print("\n".join(lines))
    try:
        _chart(runs, stem.with_suffix(".png"), title)
    except Exception as exc:  # the table and JSON are already written
        print(f"compare: no chart ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(f"wrote {stem}.md, .json, .png")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
