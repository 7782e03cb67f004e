"""Side by side, in one run: edgelora float32 / int8 / int4 against transformers + PEFT,
onnxruntime-genai and llama.cpp, on the same model, prompts and adapters.

    python benchmarks/compare.py --hf-dir bench_out/sample/model --onnx-dir bench_out/onnx \
        --adapter A=bench_out/sample/adapters/b1 --adapter B=bench_out/sample/adapters/b2 \
        --adapter C=bench_out/sample/adapters/b3 --distinct-dir bench_out/peft_serve --threads 2 --rounds 5

Decode columns (prompts of --prompt-len token ids, --max-tokens greedy tokens, EOS masked
everywhere, decode tokens/s aggregate over the batch, prefill excluded): batch 1 base and B; batch 4
base, B,B,B,B, B,B,A,base and A,B,C,base; with --distinct-dir, batches of 8 and 16 all on B (the
peers' ceiling) and on 8 and 16 distinct adapters. Prompt-speed columns: prompt tokens/s of one
base row at each --prefill-lens length.

Mixed batch vs groups in turn: edgelora runs a column that mixes adapters as one batch. The peers
cannot (llama-server batches only rows with equal adapter sets; onnxruntime-genai has one adapter
per generator), so they run such a column as their users must, one adapter group after another,
and their time then includes the prefill of every group after the first. Their same-adapter batch
of that size (bN B) is their ceiling; the report puts the three side by side. PEFT mixes adapters
in one batch (``adapter_names``).

Interleaving: every engine is one long-lived process (servers kept up), built and warmed up first;
then the script runs --rounds rounds, each engine once per round (its columns in order), the
engines' order rotating from round to round, so that every engine is measured in every minute of
the run. Beside each engine's round the machine's memory read bandwidth is measured (a noisy
neighbour shows as a dip). Cells are medians over the rounds with their min-max; ratios are ratios
of medians with the widest range the samples allow. Versions of every engine and of each ONNX
Runtime are recorded.

Everything the chosen ``--engines`` need is checked before anything runs: a missing piece (a module,
which extra or package brings it, a peer's venv or build) is one line each and nothing runs, or with
``--skip-missing`` that peer is left out and said so. If the run stops midway, the rounds measured so
far are written as ``NAME-partial``.

Also in the same run: resident memory with N adapters loaded. Output: a Markdown table (figures and
ratios), the raw JSON and a PNG chart in ``--out-dir``. onnxruntime-genai runs from its own venv
(``--genai-python``, see ``benchmarks/peers/genai.py``), llama.cpp from a build (``--llama-dir``,
``benchmarks/build_llama_cpp.sh``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from peer_input import READY, ROUND_DONE
from preflight import settle

from edgelora.formats import contract

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
EDGELORA = [sys.executable, "-m", "edgelora"]
FIXED_COLUMNS = [("b1 base", [None]), ("b1 B", ["B"]), ("b4 base", [None] * 4), ("b4 B", ["B"] * 4),
                 ("b4 B,B,A,base", ["B", "B", "A", None]), ("b4 A,B,C,base", ["A", "B", "C", None])]
SWEEP = (8, 16)  # batches of B (the ceiling) and of that many distinct adapters, with --distinct-dir
ENGINES = ("float32", "int8", "int4", "peft", "genai", "genai-plain", "llama", "llama-merged")
DEFAULT_GENAI_PY = Path.home() / ".cache/edgelora/genai-venv/bin/python"
DEFAULT_LLAMA_DIR = Path.home() / ".cache/edgelora/llama.cpp"


def mixed_columns(columns: list[tuple[str, list]]) -> list[tuple[str, str]]:
    """(mixed column, the same-size column all on B: the peers' ceiling) pairs."""
    names = {name for name, _ in columns}
    return [(name, f"b{len(rows)} B") for name, rows in columns
            if len({row for row in rows}) > 1 and f"b{len(rows)} B" in names]


@dataclass
class EngineRun:
    """One engine's figures: per column, its samples (one per round) and the ids of the last round."""

    engine: str
    columns: dict[str, dict] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    version: str | None = None
    bandwidth_gb_s: list[float] = field(default_factory=list)  # measured just before each of its rounds

    def samples(self, column: str) -> list[float]:
        entry = self.columns.get(column)
        return list(entry["tokens_per_s"]) if entry and entry.get("tokens_per_s") else []

    def median(self, column: str) -> float | None:
        values = self.samples(column)
        return statistics.median(values) if values else None

    def add_round(self, rates: dict[str, float]) -> None:
        for name, rate in rates.items():
            self.columns.setdefault(name, {"tokens_per_s": [], "tokens": []})["tokens_per_s"].append(rate)


class Worker:
    """One engine's long-lived process, driven round by round over stdin (``peer_input.rounds_to_run``)."""

    def __init__(self, key: str, command: list[str], work: Path) -> None:
        self.key, self.command = key, command
        stem = key.replace(" ", "_")
        self.log_path, self.out = work / f"{stem}.log", work / f"{stem}.json"
        self.process: subprocess.Popen | None = None
        self.log: IO[str] | None = None
        self.run = EngineRun(f"edgelora {key}" if key in ("float32", "int8", "int4") else key)

    def start(self) -> None:
        self.out.unlink(missing_ok=True)
        self.log = open(self.log_path, "w")  # noqa: SIM115 - open while the child lives, closed in stop()
        command = [*self.command, "--stdin-rounds", "--out", str(self.out)]
        print(f"  $ {' '.join(map(str, command))}", flush=True)
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, bufsize=1)

    def _until(self, marker: str) -> str | None:
        """Read the child's output up to a line starting with ``marker``; None when it ended first."""
        assert self.process and self.process.stdout and self.log
        for line in self.process.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip()
            self.log.write(line)
            self.log.flush()
        self._fail("exited")
        return None

    def _fail(self, what: str) -> None:
        assert self.process
        self.process.wait()
        lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path.is_file() else []
        tail = lines[-1] if lines else "no output"
        self.run.skipped = f"{what} (exit {self.process.returncode}): {tail}"
        print(f"compare: {self.key} {self.run.skipped} (see {self.log_path})", file=sys.stderr, flush=True)

    @property
    def alive(self) -> bool:
        return self.run.skipped is None and self.process is not None

    def ready(self) -> bool:
        return self.alive and self._until(READY) is not None

    def one_round(self) -> bool:
        """Run one round; its rates join the samples (so a run cut short keeps them)."""
        assert self.process and self.process.stdin
        try:
            self.process.stdin.write("round\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self._fail("exited")
            return False
        reply = self._until(ROUND_DONE)
        if reply is None:
            return False
        _index, _, rates = reply.partition(" ")
        self.run.add_round(json.loads(rates))
        return True

    def finish(self) -> EngineRun:
        """Let it write its result (ids, notes, version, peak memory); the rates measured stay ours."""
        if not self.alive:
            return self.run
        assert self.process and self.process.stdin
        try:
            self.process.stdin.write("done\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        assert self.process.stdout and self.log
        for line in self.process.stdout:  # its last words, to the log
            self.log.write(line)
        self.process.wait()
        if self.process.returncode != 0 or not self.out.is_file():
            self._fail("failed while writing its result")
        else:
            data = json.loads(self.out.read_text())
            self.run.engine = data["engine"]
            for name, entry in data["columns"].items():
                self.run.columns.setdefault(name, {"tokens_per_s": []})["tokens"] = entry.get("tokens") or []
            self.run.notes, self.run.version, self.run.peak_rss_mb = (data.get("notes", []), data.get("version"),
                                                                     data.get("peak_rss_mb"))
        return self.run

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.log:
            self.log.close()


def _workload(vocab: int, args) -> dict:
    rng = np.random.default_rng(args.seed)
    high = min(vocab, 2000)
    batch = max(len(rows) for _, rows in args.columns)
    return {"prompts": [rng.integers(10, high, args.prompt_len).tolist() for _ in range(batch)],
            "max_tokens": args.max_tokens, "columns": [{"name": name, "rows": rows} for name, rows in args.columns],
            "prefill": [{"name": f"prefill {length}", "prompt": rng.integers(10, high, length).tolist()}
                        for length in args.prefill_lens]}


def _prepare_edgelora(args, work: Path) -> dict[str, Path]:
    """The float export's int8 / int4 copies (with LoRA inputs) and the adapters processed once for all three."""
    folders = {"float32": args.onnx_dir}
    for mode in ("int8", "int4"):
        if mode not in args.engine_set:
            continue
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
        if not made.is_file() or made.stat().st_mtime < max((args.onnx_dir / "model.onnx").stat().st_mtime,
                                                            (Path(peft_dir) / "adapter_config.json").stat().st_mtime):
            subprocess.run([*EDGELORA, "process-lora", "--input-dir", str(peft_dir), "--output-dir", str(processed),
                            "--onnx-dir", str(args.onnx_dir), "--quiet"], check=True)
    return folders


def _versions() -> str:
    from importlib.metadata import version

    return f"edgelora {version('edgelora')}, onnxruntime {version('onnxruntime')}"


def _commands(args, folders: dict[str, Path], workload_path: Path) -> dict[str, list[str]]:
    """Each engine's runner command line (the worker adds --stdin-rounds and --out)."""
    engines = args.engine_set
    common = ["--workload", str(workload_path), "--threads", str(args.threads)]
    peft_adapters = [f"--adapter={name}={path}" for name, path in args.adapters.items()]
    commands: dict[str, list[str]] = {}
    for label in ("float32", "int8", "int4"):
        if label in engines:
            commands[label] = [sys.executable, str(PEERS / "edgelora_runner.py"), "--onnx-dir", str(folders[label]),
                               "--label", label, *common,
                               *[f"--adapter={name}={args.work_dir / 'processed' / name}" for name in args.adapters]]
    if "peft" in engines:
        commands["peft"] = [sys.executable, str(PEERS / "peft_eager.py"), "--hf-dir", str(args.hf_dir), *peft_adapters,
                            *common]
    genai = [str(args.genai_python), str(PEERS / "genai.py"), "--hf-dir", str(args.hf_dir), "--work-dir",
             str(args.work_dir / "genai"), *common]
    for precision in ("fp32", "int4"):
        if "genai" in engines:
            commands[f"genai {precision}"] = [*genai, *peft_adapters, "--precision", precision]
        if "genai-plain" in engines:
            commands[f"genai {precision} plain"] = [*genai, "--precision", precision, "--plain"]
    llama = [sys.executable, str(PEERS / "llama_cpp.py"), "--llama-dir", str(args.llama_dir), "--hf-dir",
             str(args.hf_dir), *peft_adapters, "--work-dir", str(args.work_dir / "llama"), *common]
    for quant in ("f32", "q4_0") if "llama" in engines else ():
        commands[f"llama {quant}"] = [*llama, "--quant", quant]
    if "llama-merged" in engines:
        commands["llama q4_0 merged B"] = [*llama, "--quant", "q4_0", "--merged", "B"]
    return commands


def _start(workers: list[Worker]) -> None:
    """Build and warm up every engine before anything is timed: runners of different scripts side by side,
    those of one script one after another (they share build caches: two conversions of one file would race)."""
    chains: dict[str, list[Worker]] = {}
    for worker in workers:
        chains.setdefault(worker.command[1], []).append(worker)

    def chain(members: list[Worker]) -> None:
        for worker in members:
            worker.start()
            worker.ready()
            print(f"{worker.key}: {'ready' if worker.alive else 'not measured: ' + str(worker.run.skipped)}",
                  flush=True)

    with ThreadPoolExecutor(max_workers=len(chains) or 1) as pool:
        for future in [pool.submit(chain, members) for members in chains.values()]:
            future.result()


def _interleave(workers: list[Worker], rounds: int, threads: int) -> None:
    """Every worker once per round, their order rotating; the bandwidth probe just before each one's round."""
    from edgelora.runtime import native

    for index in range(rounds):
        live = [worker for worker in workers if worker.alive]
        if not live:
            return
        shift = index % len(live)
        for worker in live[shift:] + live[:shift]:
            print(f"round {index + 1}/{rounds}: {worker.key}", flush=True)
            worker.run.bandwidth_gb_s.append(round(native.read_bandwidth(threads, repeats=3) / 1e9, 2))
            worker.one_round()


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


def _ratio(runs: dict[str, EngineRun], a: str, b: str, column: str,
           column_b: str | None = None) -> tuple[float, float, float] | None:
    """Ratio of medians, and the widest ratio the samples allow (min/max .. max/min)."""
    x = runs[a].samples(column) if a in runs else []
    y = runs[b].samples(column_b or column) if b in runs else []
    if not x or not y or min(y) <= 0:
        return None
    return statistics.median(x) / statistics.median(y), min(x) / max(y), max(x) / min(y)


def _ratios(runs: dict[str, EngineRun], columns: list[tuple[str, list]],
            prefills: list[str]) -> list[tuple[str, tuple[float, float, float] | None, str]]:
    """(what, ratio, target) rows for the acceptance figures."""
    rows = [("int4 b1 B / llama.cpp q4_0", _ratio(runs, "int4", "llama q4_0", "b1 B"), ">= 0.8"),
            ("int4 b1 B / llama.cpp q4_0 with B merged", _ratio(runs, "int4", "llama q4_0 merged B", "b1 B"), ""),
            ("int4 b1 base / llama.cpp q4_0", _ratio(runs, "int4", "llama q4_0", "b1 base"), ">= 0.75"),
            ("int4 b1 base / onnxruntime-genai int4 plain", _ratio(runs, "int4", "genai int4 plain", "b1 base"), ""),
            ("int4 b4 base / onnxruntime-genai int4 plain", _ratio(runs, "int4", "genai int4 plain", "b4 base"), "")]
    for mixed, ceiling in mixed_columns(columns):
        for peer, label in (("llama q4_0", "llama.cpp q4_0"), ("genai int4", "onnxruntime-genai int4")):
            rows.append((f"int4 {mixed} / {label} groups in turn", _ratio(runs, "int4", peer, mixed), ""))
            rows.append((f"int4 {mixed} / {label} ceiling ({ceiling})", _ratio(runs, "int4", peer, mixed, ceiling), ""))
    rows += [(f"int4 {name} / onnxruntime-genai int4", _ratio(runs, "int4", "genai int4", name), ">= 1.0")
             for name, rows_ in columns if len(set(rows_)) == 1]
    rows += [(f"int4 {name} / llama.cpp q4_0", _ratio(runs, "int4", "llama q4_0", name), "") for name in prefills]
    rows += [("float32 b4 base / onnxruntime-genai fp32", _ratio(runs, "float32", "genai fp32", "b4 base"), ">= 1.0"),
             ("float32 b4 B / onnxruntime-genai fp32", _ratio(runs, "float32", "genai fp32", "b4 B"), ">= 1.0"),
             ("float32 b4 A,B,C,base / llama.cpp f32", _ratio(runs, "float32", "llama f32", "b4 A,B,C,base"), ">= 2.0"),
             ("float32 b4 A,B,C,base / transformers + PEFT", _ratio(runs, "float32", "peft", "b4 A,B,C,base"), ">= 2.5"),
             ("int4 b4 A,B,C,base / int4 b4 B", _ratio(runs, "int4", "int4", "b4 A,B,C,base", "b4 B"), ""),
             ("int4 b1 base / float32 b1 base", _ratio(runs, "int4", "float32", "b1 base"), "")]
    return [row for row in rows if row[1] is not None or row[2]]


def _same_tokens(runs: dict[str, EngineRun], names: list[str], reference: str = "float32") -> dict[str, str]:
    """Per engine: of the rows both ran, how many have greedy ids equal to edgelora float32's, and the median
    count of leading ids they share (a row that leaves at token k shares k)."""
    ref = runs.get(reference)
    out = {}
    for key, run in runs.items():
        if key == reference or ref is None or not run.columns:
            continue
        equal, shared = 0, []
        for name in names:
            mine, theirs = run.columns.get(name, {}).get("tokens"), ref.columns.get(name, {}).get("tokens")
            for a, b in zip(mine or [], theirs or []):
                equal += a == b
                shared.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
        if shared:
            out[key] = f"{equal}/{len(shared)} rows (median {statistics.median(shared):g} leading ids shared)"
    return out


def _cell(run: EngineRun, name: str) -> str:
    values = run.samples(name)
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})" if values else "—"


def _table(runs: dict[str, EngineRun], names: list[str], extra: bool = True) -> str:
    head = "| engine | " + " | ".join(names) + (" | bandwidth GB/s beside its rounds | peak RSS MB |" if extra else " |")
    lines = [head, "|" + "---|" * (len(names) + 1 + 2 * extra)]
    for run in runs.values():
        if run.skipped and not any(run.samples(name) for name in names):
            cells = ["—"] * (len(names) + extra) + [f"not measured: {run.skipped}"]
            lines.append(f"| {run.engine} | " + " | ".join(cells) + " |")
            continue
        cells = [_cell(run, name) for name in names]
        if extra:
            band = run.bandwidth_gb_s
            cells.append(f"{statistics.median(band):.1f} ({min(band):.1f}–{max(band):.1f})" if band else "—")
            cells.append(f"{run.peak_rss_mb:.0f}" if run.peak_rss_mb else "—")
        lines.append(f"| {run.engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mixed_table(runs: dict[str, EngineRun], columns: list[tuple[str, list]]) -> str:
    """Mixed batch vs groups in turn: per mixed column, each engine's figure and its same-adapter ceiling."""
    lines = ["| column | engine | how it runs the column | tokens/s | its same-adapter batch (ceiling) |",
             "|---|---|---|---|---|"]
    for mixed, ceiling in mixed_columns(columns):
        for key, run in runs.items():
            if not run.samples(mixed):
                continue
            how = ("one mixed batch" if key in ("float32", "int8", "int4", "peft")
                   else "groups in turn, their extra prefills counted")
            lines.append(f"| {mixed} | {run.engine} | {how} | {_cell(run, mixed)} | {ceiling}: {_cell(run, ceiling)} |")
    return "\n".join(lines)


def _chart(runs: dict[str, EngineRun], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [run for run in runs.values() if any(run.samples(name) for name in names)]
    fig, ax = plt.subplots(figsize=(12, 4.5), dpi=80)
    width = 0.8 / max(len(measured), 1)
    for index, run in enumerate(measured):
        values = [run.median(name) or 0 for name in names]
        ax.bar(np.arange(len(names)) + index * width, values, width, label=run.engine)
    ax.set_xticks(np.arange(len(names)) + width * (len(measured) - 1) / 2, names, fontsize=7, rotation=20)
    ax.set_ylabel("decode tokens/s (batch aggregate)")
    ax.set_title(title + "\nmixed columns: edgelora and PEFT one mixed batch, the other peers groups in turn",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=3)
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
    if args.distinct_problem:
        problems.append((None, args.distinct_problem))
    needed = {"matplotlib": None}
    if engines & {"peft", "llama-merged"}:
        needed.update({"torch": "peft", "peft": "peft", "transformers": "peft"})
    lacking = _missing_modules(sys.executable, list(needed)) or []
    for module in lacking:
        for engine in ["peft", "llama-merged"] if needed[module] else [None]:
            if engine is None or engine in engines:
                what = "the chart" if engine is None else ("transformers + PEFT" if engine == "peft"
                                                           else "merging B for llama.cpp")
                problems.append((engine, f"{module} ({what}): {install_hint(module)}"))
    for engine in sorted(engines & {"genai", "genai-plain"}):
        lacking = _missing_modules(args.genai_python, GENAI_MODULES) if args.genai_python.is_file() else None
        if lacking is None:
            problems.append((engine, f"onnxruntime-genai: no working python at {args.genai_python} (--genai-python: "
                                     "a venv with onnxruntime-genai, onnx-ir, onnxscript, torch==2.13.0, transformers)"))
        elif lacking:
            packages = " ".join(module.replace("_", "-") for module in lacking)
            problems.append((engine, f"onnxruntime-genai: {args.genai_python} lacks {', '.join(lacking)} "
                                     f"({args.genai_python} -m pip install {packages})"))
    for engine in sorted(engines & {"llama", "llama-merged"}):
        prefix = args.llama_dir.expanduser()
        for part in ("bin/llama-server", "bin/llama-quantize", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
            if not (prefix / part).exists():
                problems.append((engine, f"llama.cpp: no {prefix / part} (benchmarks/build_llama_cpp.sh {prefix})"))
                break
    return problems


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _distinct(args) -> tuple[list[tuple[str, list]], str | None]:
    """The sweep's columns and adapters d1..dN from --distinct-dir (its PEFT folders in natural order)."""
    if args.distinct_dir is None:
        return [], None
    folders = sorted((f for f in args.distinct_dir.iterdir() if (f / "adapter_config.json").is_file()),
                     key=_natural) if args.distinct_dir.is_dir() else []
    if len(folders) < max(SWEEP):
        return [], f"--distinct-dir {args.distinct_dir}: {len(folders)} PEFT folders, the sweep needs {max(SWEEP)}"
    for index, folder in enumerate(folders[:max(SWEEP)]):
        args.adapters[f"d{index + 1}"] = str(folder)
    columns = []
    for batch in SWEEP:
        columns += [(f"b{batch} B", ["B"] * batch), (f"b{batch} {batch} adapters", [f"d{i + 1}" for i in range(batch)])]
    return columns, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-dir", required=True, type=Path, help="the Hugging Face model (PEFT, genai, llama.cpp read it)")
    parser.add_argument("--onnx-dir", required=True, type=Path, help="edgelora's float export of it, with lora_model.onnx")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=PEFT_DIR",
                        help="adapters A, B and C (PEFT folders)")
    parser.add_argument("--distinct-dir", type=Path, default=None,
                        help="a folder of at least 16 PEFT adapters of this model (the first 16 in natural order): "
                             "adds batches of 8 and 16 on B and on 8 and 16 distinct adapters")
    parser.add_argument("--memory-adapters", type=Path, nargs="*", default=[],
                        help="processed adapters for the resident-memory probe (default: A, B, C)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench_out" / "compare",
                        help="quantized copies, processed adapters, peer builds, logs")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=f"{datetime.date.today().isoformat()}-compare", help="output file stem")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefill-lens", default="32,1700",
                        help="prompt lengths of the prompt-speed columns, comma-separated (empty: none)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds; every engine runs its columns once per round, the engines' order rotating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="float32,int4,peft,genai,genai-plain,llama,llama-merged",
                        help=f"which to run, comma-separated, of {', '.join(ENGINES)}; each is checked before anything "
                             "runs (genai: its fp32 and int4 LoRA builds; genai-plain: its builds without LoRA, base "
                             "columns; llama: f32 and q4_0; llama-merged: q4_0 with B merged in, B columns)")
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
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if set(args.adapters) != {"A", "B", "C"}:
        parser.error("--adapter: give exactly A=..., B=... and C=...")
    try:
        args.prefill_lens = [int(x) for x in args.prefill_lens.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--prefill-lens {args.prefill_lens!r}: comma-separated integers")
    if any(length < 1 for length in args.prefill_lens) or args.prompt_len < 1 or args.max_tokens < 2:
        parser.error("--prefill-lens and --prompt-len must be >= 1, --max-tokens >= 2")
    sweep, args.distinct_problem = _distinct(args)
    args.columns = FIXED_COLUMNS + sweep
    args.engine_set = set(args.engines.split(","))
    unknown = args.engine_set - set(ENGINES)
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ENGINES)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not settle(preflight(args, args.engine_set), args.engine_set, args.skip_missing, "compare"):
        return 2
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.onnx_dir / "config.json").read_text())
    workload = _workload(config["vocab_size"], args)
    workload_path = work / "workload.json"
    workload_path.write_text(json.dumps(workload))
    args.model_label = (f"{config['family']}-shaped: hidden {config['hidden_size']}, {config['num_layers']} layers, "
                        f"vocab {config['vocab_size']}")
    print("preparing edgelora's quantized copies and processed adapters", flush=True)
    folders = _prepare_edgelora(args, work)
    workers = [Worker(key, command, work) for key, command in _commands(args, folders, workload_path).items()]
    runs = {worker.key: worker.run for worker in workers}
    try:
        _start(workers)
        _interleave(workers, args.rounds, args.threads)
        for worker in workers:
            worker.finish()
    except BaseException:
        if any(run.columns for run in runs.values()):  # what was measured is kept: the table so far, named -partial
            args.name += "-partial"
            _report(args, runs, {}, workload)
        raise
    finally:
        for worker in workers:
            worker.stop()
    memory_adapters = args.memory_adapters or [work / "processed" / name for name in ("A", "B", "C")]
    memory = {label: _memory_probe(folders[label], memory_adapters, args.threads) for label in ("float32", "int4")
              if label in args.engine_set}
    _report(args, runs, memory, workload)
    return 0


def _report(args, runs: dict[str, EngineRun], memory: dict, workload: dict) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / args.name
    decode = [name for name, _ in args.columns]
    prefills = [entry["name"] for entry in workload["prefill"]]
    title = (f"{args.model_label}: prompt {args.prompt_len}, {args.max_tokens} new tokens, {args.threads} threads, "
             f"medians of {args.rounds} interleaved rounds")
    lines = [f"# Side-by-side decode speed ({datetime.datetime.now().isoformat(timespec='minutes')})", "",
             f"Command: `python benchmarks/compare.py {' '.join(sys.argv[1:])}`", "", title + "; decode tokens/s, "
             "median (min–max) over the rounds:", "", _table(runs, decode), ""]
    if prefills:
        lines += ["Prompt speed, one base row, prompt tokens/s:", "", _table(runs, prefills, extra=False), ""]
    if mixed_columns(args.columns):
        lines += ["Mixed batch vs groups in turn (a peer that cannot mix adapters in a batch runs one adapter group "
                  "after another; its same-adapter batch of that size is its ceiling):", "",
                  _mixed_table(runs, args.columns), ""]
    lines += ["| ratio | measured (widest from the samples) | target |", "|---|---|---|"]
    for what, value, target in _ratios(runs, args.columns, prefills):
        lines.append(f"| {what} | {f'{value[0]:.2f} ({value[1]:.2f}–{value[2]:.2f})' if value else '—'} | {target} |")
    lines += ["", f"Versions: compare.py's own: {_versions()}; "
              + "; ".join(f"{run.engine}: {run.version}" for run in runs.values() if run.version)]
    lines += ["", "Greedy ids equal to edgelora float32's: "
              + ", ".join(f"{k}: {v}" for k, v in _same_tokens(runs, decode).items()), ""]
    for run in runs.values():
        for note in run.notes:
            lines.append(f"- {run.engine}: {note}")
    for label, probe in memory.items():
        if "rss_mb" in probe:
            lines.append(f"- edgelora {label} resident memory with 0..{len(probe['rss_mb']) - 1} adapters: "
                         + ", ".join(f"{v:.0f}" for v in probe["rss_mb"]) + f" MB ({probe['per_adapter_mb']:.1f} MB "
                         f"per adapter; adapter files {statistics.mean(probe['adapter_file_mb']):.1f} MB each)")
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    (stem.with_suffix(".json")).write_text(json.dumps(
        {"workload": workload, "memory": memory, "columns": args.columns,
         "runs": {k: {"engine": r.engine, "columns": r.columns, "peak_rss_mb": r.peak_rss_mb, "notes": r.notes,
                      "skipped": r.skipped, "version": r.version, "bandwidth_gb_s": r.bandwidth_gb_s}
                  for k, r in runs.items()}}, separators=(",", ":")) + "\n")  # compact: every row's ids
    print("\n".join(lines))
    try:
        _chart(runs, decode, stem.with_suffix(".png"), title)
    except Exception as exc:  # the table and JSON are already written
        print(f"compare: no chart ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(f"wrote {stem}.md, .json, .png")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
