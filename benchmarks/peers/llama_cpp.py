"""llama.cpp (llama-server) as a benchmark peer: decode tokens/s of one workload, base and LoRA columns.

Build llama.cpp first with ``benchmarks/build_llama_cpp.sh PREFIX``, then:

    python benchmarks/peers/llama_cpp.py --workload W.json --llama-dir PREFIX --hf-dir HF_DIR \
        --adapter A=PEFT_DIR ... --quant f32|q4_0 --rounds 3 --threads 2 --work-dir DIR --out RESULT.json

Model and adapters (cached in --work-dir, reused while newer than their sources and the converter):
  * the HF folder goes through llama.cpp's own ``convert_hf_to_gguf.py --outtype f32``, then
    ``llama-quantize --token-embedding-type q4_0 --output-tensor-type q4_0 ... Q4_0`` for q4_0, at edgelora's
    int4 precision (its lm_head is int4 too); the server keeps its KV cache in f32 (``-ctk f32 -ctv f32``), as
    edgelora does, so greedy tokens can be compared. ``--library-defaults`` takes llama.cpp's own (the output
    in Q8_0, an f16 cache). The result's notes count the tensor types;
  * each PEFT adapter goes through ``convert_lora_to_gguf.py --base HF_DIR --outtype f32``. That
    converter scales by lora_alpha / r and ignores ``use_rslora``: such adapters get a warning note.
  * Where the converter does not know a BPE tokenizer's pre-tokenizer hash (e.g. a made-up test
    tokenizer) it would stop; it is then told 'gpt-2' (HF's ByteLevel regex) and a note says so. Text
    tokenization plays no part here: prompts go in and outputs come back as token ids.

Server: ``llama-server`` on 127.0.0.1 and a free port, ``--lora A.gguf,B.gguf,...`` (one comma-separated
list: a repeated ``--lora`` keeps only the last) with ``--lora-init-without-apply``, ``--parallel``
= the biggest column, ``-c`` = that many times (longest prompt + max_tokens) so each slot (ctx/parallel)
holds a whole row, ``--no-cont-batching`` (a prompt is never prefilled inside a decode step),
``--cache-ram 0`` and ``cache_prompt: false`` per request (no prompt reuse between requests).

Requests: a column's rows are grouped by adapter; each group is one ``/completion`` request whose
``prompt`` is the list of its rows' token-id lists (so llama-server admits the whole group in one
step and prefills it in one batch), and the groups are sent concurrently. Each request is greedy
(``temperature 0, top_k 1``), ``n_predict = max_tokens``, ``ignore_eos``, ``return_tokens`` and
``lora = [{"id": i, "scale": s_i}]`` over every adapter in --adapter order, s_i = 1 for the row's
adapter and 0 for the others. A base row sends all of them at scale 0, which llama.cpp leaves out
of the graph: the base model with no LoRA work. An empty ``lora`` list (or none) would NOT be the
base: it means "the server's global scales", and those stay 1.0 for every ``--lora`` adapter even
with ``--lora-init-without-apply`` (the flag only skips applying them at start-up), so such a request
runs with all adapters applied at once (checked: its tokens equal those of all adapters at scale 1).
``--request-per-row`` sends one request per row instead (all concurrently), to compare.

llama-server batches only slots whose adapter sets are equal: per step it takes the first generating
slot's set and skips the others, so a column that mixes adapters runs its groups one after another.

Timing (decode only, prefill excluded): each result's ``timings`` give, on the server clock,
prompt_ms (start of its prefill to its first token, which comes from the prefill logits) and
predicted_ms (first token to last), over predicted_n tokens. The rows of one request start their
prefill in the same step, so on the client clock a row's decode interval is
``[T0 + prompt_ms, T0 + prompt_ms + predicted_ms]`` with ``T0 = t_response - max(prompt_ms +
predicted_ms)`` (the response leaves when its last row ends; loopback latency is ~1 ms against
decode windows of seconds). The column's decode wall time is the length of the union of its rows'
intervals: the time during which some row was decoding. It holds for concurrent rows (one window)
and for groups the server runs in sequence (their windows add up) alike. tokens/s = the sum over
rows of (predicted_n - 1), the tokens made by decode steps, over that time.

Rounds: one untimed pass over every column first, then --rounds rounds, each running the columns in
order (so configurations interleave). ``peak_rss_mb`` is the server's VmHWM (/proc/PID/status), which
counts the resident pages of the mmapped model file too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from peer_input import (
    Column,
    InputError,
    RunError,
    Samples,
    Workload,
    check_peer_args,
    column_names,
    load_workload,
    parse_adapters,
    peer_parser,
    read_hf_config,
    rounds_to_run,
)

from edgelora.tools.serve_process import free_port, stop_process  # what edgelora serve's launcher uses

HOST = "127.0.0.1"  # the server listens here only
PRE_TOKENIZER_MARKER = "llama_cpp_peer: unrecognized BPE pre-tokenizer"
PRE_TOKENIZER_FALLBACK = "gpt-2"
HEALTH_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 1800.0

# Runs a llama.cpp converter with one change: an unknown BPE pre-tokenizer hash gets a fallback
# instead of stopping the conversion. argv: [-c, script, args...].
CONVERTER_SHIM = f"""
import os, runpy, sys
script = sys.argv[1]
root = os.path.dirname(os.path.abspath(script))
sys.path[:0] = [root] + ([] if 'NO_LOCAL_GGUF' in os.environ else [os.path.join(root, 'gguf-py')])
sys.argv = sys.argv[1:]
from conversion import base
_pre = base.TextModel.get_vocab_base_pre
def _pre_or_fallback(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        print({PRE_TOKENIZER_MARKER!r} + "; writing {PRE_TOKENIZER_FALLBACK}", file=sys.stderr, flush=True)
        return {PRE_TOKENIZER_FALLBACK!r}
base.TextModel.get_vocab_base_pre = _pre_or_fallback
runpy.run_path(script, run_name='__main__')
"""


@dataclass(frozen=True)
class Tools:
    """What build_llama_cpp.sh installs under its prefix."""

    prefix: Path
    server: Path
    quantize: Path
    convert_hf: Path
    convert_lora: Path


@dataclass(frozen=True)
class RowResult:
    """One row's generated ids and its server timings."""

    tokens: list[int]
    prompt_ms: float
    predicted_ms: float
    predicted_n: int


# ---------------------------------------------------------------- input


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; folders and the workload are checked by the loaders."""
    parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--llama-dir", type=Path, required=True, help="prefix given to build_llama_cpp.sh")
    parser.add_argument("--quant", choices=("f32", "q4_0"), required=True)
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t and -tb (default 2)")
    parser.add_argument("--work-dir", type=Path, required=True, help="where GGUF files and logs are cached")
    parser.add_argument("--request-per-row", action="store_true",
                        help="one request per row instead of one per adapter group")
    parser.add_argument("--merged", metavar="NAME", default=None,
                        help="serve the base with adapter NAME merged into it (PEFT merge_and_unload, then converted "
                             "and quantized like the base): what a one-adapter user runs; only the columns whose rows "
                             "all use NAME run, with no LoRA at run time")
    parser.add_argument("--library-defaults", action="store_true",
                        help="llama-quantize's and llama-server's own defaults (output Q8_0, f16 KV cache) instead of "
                             "edgelora's precision (embedding and output Q4_0 too, f32 KV cache)")
    return check_peer_args(parser.parse_args(argv))


def find_tools(prefix: Path) -> Tools:
    """The binaries and converters under --llama-dir, or an error naming the first one missing."""
    prefix = prefix.expanduser().resolve()
    tools = Tools(prefix, prefix / "bin" / "llama-server", prefix / "bin" / "llama-quantize",
                  prefix / "convert_hf_to_gguf.py", prefix / "convert_lora_to_gguf.py")
    for path in (tools.server, tools.quantize, tools.convert_hf, tools.convert_lora, prefix / "conversion"):
        if not path.exists():
            raise InputError(f"--llama-dir {prefix}: no {path.relative_to(prefix)} (run benchmarks/build_llama_cpp.sh {prefix})")
    for path in (tools.server, tools.quantize):
        if not os.access(path, os.X_OK):
            raise InputError(f"--llama-dir {prefix}: {path.relative_to(prefix)} is not executable")
    return tools


def adapter_warnings(adapters: dict[str, Path]) -> list[str]:
    """What convert_lora_to_gguf.py does not carry over: rsLoRA scaling, per-module alpha or rank."""
    notes = []
    for name, folder in adapters.items():
        config = json.loads((folder / "adapter_config.json").read_text())
        if config.get("use_rslora"):
            notes.append(f"WARNING: adapter {name} has use_rslora=true; llama.cpp's convert_lora_to_gguf.py ignores it "
                         "and scales by lora_alpha/r instead of lora_alpha/sqrt(r), so its outputs differ from PEFT's")
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            notes.append(f"WARNING: adapter {name} has alpha_pattern/rank_pattern; the converter uses one lora_alpha")
    return notes


# ---------------------------------------------------------------- conversion


def newest_mtime(paths: Iterable[Path]) -> float:
    """Latest modification time of the given files and of every file under the given folders."""
    latest = 0.0
    for path in paths:
        files = (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            latest = max(latest, file.stat().st_mtime)
    return latest


def is_fresh(target: Path, sources: list[Path]) -> bool:
    """A cached output is reused when it was made from these sources and is newer than all of them."""
    record = target.with_name(target.name + ".sources.json")
    try:
        same = json.loads(record.read_text()) == [str(s) for s in sources]
    except (OSError, ValueError):
        return False
    return same and target.is_file() and target.stat().st_mtime > newest_mtime(sources)


def run_logged(command: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> str:
    """Run a conversion step with its output in a log file; its text is returned for the notes."""
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False)
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RunError(f"{what} failed (exit {done.returncode}): {last[0].strip()}; see {log}")
    return text


def produce(target: Path, sources: list[Path], command: list[str], log: Path, what: str,
            env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Make target with command (writing to target.tmp first), unless a fresh one is cached.

    Returns (made now, its log text); a cached target returns the log of the run that made it.
    """
    if is_fresh(target, sources):
        return False, log.read_text(errors="replace") if log.is_file() else ""
    partial = target.with_name(target.name + ".tmp")
    partial.unlink(missing_ok=True)
    text = run_logged([part if part != "{out}" else str(partial) for part in command], log, what, env)
    if not partial.is_file():
        raise RunError(f"{what} exited 0 but wrote no {partial.name}; see {log}")
    partial.replace(target)
    target.with_name(target.name + ".sources.json").write_text(json.dumps([str(s) for s in sources]))
    return True, text


def converter_env(tools: Tools) -> dict[str, str]:
    """The converters run on this python, with sentencepiece from the build prefix on the path."""
    env = dict(os.environ)
    extra = [str(tools.prefix / "pydeps")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(extra)
    return env


def convert_base(tools: Tools, hf_dir: Path, quant: str, work: Path, matched: bool = False) -> tuple[Path, list[str]]:
    """model-f32.gguf (and model-q4_0.gguf) in the work dir; returns the one to serve and notes.

    ``matched``: the token embedding and the output in Q4_0 too (``model-q4_0-all.gguf``), as edgelora's
    int4 quantizes its lm_head; llama-quantize's defaults keep the output in Q8_0.
    """
    notes: list[str] = []
    f32 = work / "model-f32.gguf"
    command = [sys.executable, "-c", CONVERTER_SHIM, str(tools.convert_hf), str(hf_dir),
               "--outtype", "f32", "--outfile", "{out}"]
    made, log = produce(f32, [hf_dir, tools.convert_hf, tools.prefix / "conversion"], command,
                        work / "logs" / "convert-model.log", "convert_hf_to_gguf.py", converter_env(tools))
    notes.append(f"model: convert_hf_to_gguf.py --outtype f32 ({'converted now' if made else 'cached'})")
    if PRE_TOKENIZER_MARKER in log:
        notes.append(f"tokenizer: the converter did not recognize the BPE pre-tokenizer; '{PRE_TOKENIZER_FALLBACK}' "
                     "was written (text tokenization is not used: prompts and outputs are token ids)")
    if quant == "f32":
        return f32, notes
    flags = ["--token-embedding-type", "q4_0", "--output-tensor-type", "q4_0"] if matched else []
    q4 = work / ("model-q4_0-all.gguf" if matched else "model-q4_0.gguf")
    made, _ = produce(q4, [f32, tools.quantize], [str(tools.quantize), *flags, str(f32), "{out}", "Q4_0"],
                      work / "logs" / f"quantize-{q4.stem}.log", "llama-quantize")
    how = "edgelora's int4 precision" if matched else "its defaults"
    notes.append(f"model: llama-quantize {' '.join(flags) + ' ' if flags else ''}model-f32.gguf Q4_0 ({how}; "
                 f"{'quantized now' if made else 'cached'})")
    return q4, notes


def merge_adapter(hf_dir: Path, name: str, peft_dir: Path, work: Path) -> Path:
    """An HF folder with the adapter merged into the weights (PEFT, float32), made once per source change."""
    target = work / f"merged-{name}"
    if is_fresh(target / "model.safetensors", [hf_dir, peft_dir]):
        return target
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    scratch = work / f"merged-{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload()
    merged.save_pretrained(scratch, safe_serialization=True)
    for item in hf_dir.iterdir():  # tokenizer and generation files: the converter reads them
        if item.is_file() and not (scratch / item.name).exists() and item.suffix not in (".safetensors", ".bin"):
            shutil.copy2(item, scratch / item.name)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    (target / "model.safetensors.sources.json").write_text(json.dumps([str(hf_dir), str(peft_dir)]))
    return target


def merged_workload(workload: Workload, name: str) -> Workload:
    """The columns a model with ``name`` merged in stands for: every row on ``name``."""
    columns = tuple(Column(c.name, (None,) * len(c.rows)) for c in workload.columns if set(c.rows) == {name})
    if not columns:
        raise InputError(f"--merged {name}: no workload column has every row on {name}")
    return Workload(workload.prompts, workload.max_tokens, columns)


def convert_adapter(tools: Tools, hf_dir: Path, name: str, peft_dir: Path, work: Path) -> Path:
    """adapter-NAME-f32.gguf in the work dir, from the PEFT folder and its base's config."""
    target = work / f"adapter-{name}-f32.gguf"
    command = [sys.executable, "-c", CONVERTER_SHIM, str(tools.convert_lora), str(peft_dir),
               "--base", str(hf_dir), "--outtype", "f32", "--outfile", "{out}"]
    produce(target, [peft_dir, hf_dir / "config.json", tools.convert_lora, tools.prefix / "conversion"], command,
            work / "logs" / f"convert-adapter-{name}.log", f"convert_lora_to_gguf.py ({name})", converter_env(tools))
    return target


def tensor_types(path: Path) -> str:
    """Tensor type counts of a GGUF file (what llama-quantize chose), as a JSON object string."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return "(gguf not importable)"
    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        kind = tensor.tensor_type.name
        counts[kind] = counts.get(kind, 0) + 1
    return json.dumps(dict(sorted(counts.items())))


# ---------------------------------------------------------------- server


def server_command(tools: Tools, model: Path, loras: list[Path], workload: Workload, threads: int,
                   port: int, f32_cache: bool = False) -> list[str]:
    """llama-server's command line: enough slots for the biggest column, each slot holding one row."""
    parallel = max(len(c.rows) for c in workload.columns)
    per_slot = max(max(len(p) for p in workload.prompts) + workload.max_tokens, workload.longest_prefill + 1)
    command = [str(tools.server), "-m", str(model), "--host", HOST, "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel), "-c", str(parallel * per_slot),
               "--no-cont-batching", "--cache-ram", "0", "--no-webui"]
    if f32_cache:  # the KV cache in float32 as edgelora's (llama.cpp's default is f16)
        command += ["-ctk", "f32", "-ctv", "f32"]
    if loras:  # one comma-separated --lora: when it is given more than once, only the last one counts
        if any("," in str(path) for path in loras):
            raise InputError(f"adapter GGUF paths must not contain ',' (llama-server splits --lora on it): {loras}")
        command += ["--lora", ",".join(str(path) for path in loras), "--lora-init-without-apply"]
    return command


def log_tail(log: Path, lines: int = 3) -> str:
    """The last non-empty lines of the server log, for an error message."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def wait_healthy(process: subprocess.Popen[bytes], client: httpx.Client, log: Path) -> None:
    """Poll /health until the model is loaded (503 while loading); fail early if the server exits."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RunError(f"llama-server exited with {process.returncode} while starting: {log_tail(log)}")
        try:
            if client.get("/health", timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RunError(f"llama-server not healthy after {HEALTH_TIMEOUT_S:.0f} s; see {log}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it has not exited after 10 s."""
    stop_process(process, 10.0)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def server_version(client: httpx.Client, tools: Tools) -> str:
    """/props build_info (b<build number>-<commit>), else the first line of llama-server --version."""
    try:
        info = client.get("/props").json().get("build_info")
        if info:
            return str(info)
    except (httpx.HTTPError, ValueError):
        pass
    done = subprocess.run([str(tools.server), "--version"], capture_output=True, text=True, check=False)
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def check_lora_order(client: httpx.Client, loras: list[Path]) -> None:
    """The server must list every adapter, in --lora order, since requests address them by id."""
    listed = client.get("/lora-adapters").json()
    paths = [Path(entry["path"]).resolve() for entry in sorted(listed, key=lambda e: e["id"])]
    if paths != [p.resolve() for p in loras]:
        raise RunError(f"llama-server lists its adapters as {[str(p) for p in paths]}, not as given to --lora")


# ---------------------------------------------------------------- measurement


def request_groups(column: Column, per_row: bool) -> list[tuple[str | None, list[int]]]:
    """(adapter, row indices) per request: rows sharing an adapter together, or one row each."""
    if per_row:
        return [(adapter, [row]) for row, adapter in enumerate(column.rows)]
    groups: dict[str | None, list[int]] = {}
    for row, adapter in enumerate(column.rows):
        groups.setdefault(adapter, []).append(row)
    return list(groups.items())


def lora_field(adapter: str | None, order: list[str]) -> list[dict[str, Any]]:
    """Every adapter by id, scale 1 for this row's and 0 for the rest (all 0 = base, see the docstring)."""
    return [{"id": i, "scale": 1.0 if name == adapter else 0.0} for i, name in enumerate(order)]


def completion(client: httpx.Client, prompts: list[tuple[int, ...]], lora: list[dict[str, Any]],
               max_tokens: int) -> tuple[float, list[RowResult]]:
    """One /completion request for these prompts; returns when the response arrived and its rows."""
    body = {"prompt": [list(p) for p in prompts], "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
            "ignore_eos": True, "cache_prompt": False, "return_tokens": True, "stream": False, "lora": lora}
    response = client.post("/completion", json=body)
    received = time.monotonic()
    if response.status_code != 200:
        raise RunError(f"/completion answered {response.status_code}: {response.text[:300]}")
    try:
        data = response.json()
        results = data if isinstance(data, list) else [data]
        if len(results) != len(prompts):
            raise RunError(f"/completion returned {len(results)} results for {len(prompts)} prompts")
        return received, [_row_result(r, len(p), max_tokens) for r, p in zip(results, prompts)]
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"unexpected /completion answer ({error!r}): {response.text[:300]}") from None


def _row_result(result: dict[str, Any], prompt_len: int, max_tokens: int) -> RowResult:
    """One result's ids and timings, checked: every prompt token prefilled, max_tokens generated."""
    timings = result["timings"]
    tokens = [int(t) for t in result.get("tokens") or []]
    if len(tokens) != max_tokens or timings["predicted_n"] != max_tokens:
        raise RunError(f"expected {max_tokens} new tokens, got {len(tokens)} ids and predicted_n {timings['predicted_n']}")
    if timings.get("cache_n", 0) != 0 or timings["prompt_n"] != prompt_len:
        raise RunError(f"prompt of {prompt_len} tokens: prompt_n {timings['prompt_n']}, cache_n {timings.get('cache_n')}")
    return RowResult(tokens, float(timings["prompt_ms"]), float(timings["predicted_ms"]), int(timings["predicted_n"]))


def decode_intervals(received: float, rows: list[RowResult]) -> list[tuple[float, float]]:
    """Each row's [first token, last token] on the client clock (the rows of a request start together)."""
    start = received - max(r.prompt_ms + r.predicted_ms for r in rows) / 1e3
    return [(start + r.prompt_ms / 1e3, start + (r.prompt_ms + r.predicted_ms) / 1e3) for r in rows]


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals: the time in which at least one row was decoding."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


class ForeignCpu:
    """Share of the machine's CPU time that neither the server nor this script used: noise to report.

    llama.cpp's threads wait for each other at every op, so another busy process slows it far more
    than its own share of the cores; a share above a few percent makes the figures unreliable.
    """

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cpus = sum(line[:3] == "cpu" and line[3:4].isdigit() for line in Path("/proc/stat").read_text().splitlines())

    def sample(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of everything else) now."""
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        server = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = os.times()
        others = busy / self.tick - (int(server[11]) + int(server[12])) / self.tick - (own.user + own.system)
        return time.monotonic(), others

    def share(self, before: tuple[float, float], after: tuple[float, float]) -> float:
        """Other processes' CPU time between two samples over the machine's capacity in that time."""
        wall = after[0] - before[0]
        return max(0.0, (after[1] - before[1]) / (wall * self.cpus)) if wall > 0 else 0.0


def prefill_intervals(received: float, rows: list[RowResult]) -> tuple[float, float]:
    """A request's prefill [start, first token] on the client clock (its rows prefill together)."""
    start = received - max(r.prompt_ms + r.predicted_ms for r in rows) / 1e3
    return start, start + max(r.prompt_ms for r in rows) / 1e3


def run_column(client: httpx.Client, workload: Workload, column: Column, order: list[str],
               per_row: bool) -> tuple[float, list[list[int]], float]:
    """Decode tokens/s of one column, its generated ids in row order, and its mean rows decoding at once.

    With several adapter groups (groups in turn), the prefill of every group but the first to start counts
    as decode wall time too: a mixed batch prefills all rows once, the server stops to prefill each group.
    """
    groups = request_groups(column, per_row)
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        futures = [pool.submit(completion, client, [workload.prompts[r] for r in rows], lora_field(adapter, order),
                               workload.max_tokens) for adapter, rows in groups]
        answers = [f.result() for f in futures]
    generated: list[list[int]] = [[] for _ in column.rows]
    intervals: list[tuple[float, float]] = []
    tokens = 0
    for (_, rows), (received, results) in zip(groups, answers):
        intervals += decode_intervals(received, results)
        for row, result in zip(rows, results):
            generated[row] = result.tokens
            tokens += result.predicted_n - 1
    decoding = union_length(intervals)
    extra_prefills = sorted(prefill_intervals(received, results) for received, results in answers)[1:]
    seconds = union_length(intervals + extra_prefills)
    concurrency = sum(hi - lo for lo, hi in intervals) / decoding
    return tokens / seconds, generated, concurrency


def run_prefill(client: httpx.Client, prompt: tuple[int, ...], order: list[str]) -> float:
    """Prompt tokens/s of one base row, from the server's own prompt timing (n_predict 1, no prompt cache)."""
    _, (row,) = completion(client, [prompt], lora_field(None, order), 1)
    return len(prompt) / (row.prompt_ms / 1e3)


def measure(client: httpx.Client, workload: Workload, order: list[str], rounds: int, per_row: bool,
            meter: ForeignCpu, from_stdin: bool = False) -> tuple[dict[str, Any], list[str]]:
    """One untimed pass over every column, then the rounds (see ``rounds_to_run``), columns in order."""
    for column in workload.columns:
        run_column(client, workload, column, order, per_row)
    for prefill in workload.prefills:
        run_prefill(client, prefill.prompt, order)
    samples = Samples(column_names(workload))
    concurrency: dict[str, float] = {}
    noise: dict[str, list[float]] = {c.name: [] for c in workload.columns}
    for _ in rounds_to_run(rounds, from_stdin, samples):
        for column in workload.columns:
            before = meter.sample()
            rate, generated, rows_at_once = run_column(client, workload, column, order, per_row)
            noise[column.name].append(meter.share(before, meter.sample()))
            samples.add(column.name, rate, generated)
            concurrency[column.name] = rows_at_once
        for prefill in workload.prefills:
            samples.add(prefill.name, run_prefill(client, prefill.prompt, order))
    at_once = ", ".join(f"{name} {value:.2f}" for name, value in concurrency.items())
    worst = max(max(values) for values in noise.values())
    shares = ", ".join(f"{name} {' '.join(f'{v:.0%}' for v in values)}" for name, values in noise.items())
    notes = [f"mean rows decoding at once (sum of the rows' decode times / decode wall time), last round: {at_once}",
             f"{'WARNING: ' if worst > 0.05 else ''}CPU used by other processes while timing (share of the "
             f"machine, per round): {shares}"]
    return samples.columns, notes + samples.notes()


def serve_and_measure(tools: Tools, model: Path, loras: dict[str, Path], workload: Workload,
                      args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[str], str, float | None]:
    """Start llama-server, measure, read its version and peak RSS, and always stop it."""
    port = free_port()
    command = server_command(tools, model, list(loras.values()), workload, args.threads, port,
                             f32_cache=not args.library_defaults)
    log = work / "logs" / f"llama-server-{args.quant}.log"
    with log.open("w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
            wait_healthy(process, client, log)
            version = server_version(client, tools)
            if loras:
                check_lora_order(client, list(loras.values()))
            meter = ForeignCpu(process.pid)
            columns, notes = measure(client, workload, list(loras), args.rounds, args.request_per_row, meter,
                                     args.stdin_rounds)
            rss = peak_rss_mb(process.pid)
    finally:
        stop_server(process)
    flags = " ".join(",".join(Path(p).name if p.startswith("/") else p for p in part.split(",")) for part in command[1:])
    return columns, [f"llama-server {flags}", *notes], version, rss


def main(argv: list[str] | None = None) -> int:
    """Convert or reuse, serve, measure, write the result JSON."""
    try:
        args = parse_args(argv)
        tools = find_tools(args.llama_dir)
        adapters = parse_adapters(args.adapter)
        workload = load_workload(args.workload, set(adapters), read_hf_config(args.hf_dir)["vocab_size"])
        work = args.work_dir.resolve()
        (work / "logs").mkdir(parents=True, exist_ok=True)
        hf_dir = args.hf_dir.resolve()
        if args.merged:
            if args.merged not in adapters:
                raise InputError(f"--merged {args.merged}: not one of the --adapter names")
            workload = merged_workload(workload, args.merged)
            merged_work = work / f"merged-{args.merged}-gguf"
            (merged_work / "logs").mkdir(parents=True, exist_ok=True)
            merged_hf = merge_adapter(hf_dir, args.merged, adapters[args.merged], work)
            model, notes = convert_base(tools, merged_hf, args.quant, merged_work, matched=not args.library_defaults)
            notes.insert(0, f"adapter {args.merged} merged into the weights (PEFT merge_and_unload, float32), "
                            "then converted like the base; served with no --lora")
            adapters = {}
        else:
            model, notes = convert_base(tools, hf_dir, args.quant, work, matched=not args.library_defaults)
        loras = {name: convert_adapter(tools, hf_dir, name, path, work) for name, path in adapters.items()}
        columns, run_notes, version, rss = serve_and_measure(tools, model, loras, workload, args, work)
    except InputError as error:
        print(f"llama_cpp.py: error: {error}", file=sys.stderr)
        return 2
    except (RunError, httpx.HTTPError, OSError) as error:
        print(f"llama_cpp.py: failed: {error}", file=sys.stderr)
        return 1
    notes += [
        f"model tensor types: {tensor_types(model)}",
        "adapters: convert_lora_to_gguf.py --base <hf-dir> --outtype f32; loaded with --lora, "
        "--lora-init-without-apply; per request lora=[{id, scale}] over all adapters (1 for the row's, 0 others)",
        *adapter_warnings(adapters),
        "base rows: every adapter at scale 0, which llama.cpp leaves out of the graph; an empty lora list would "
        "apply every adapter at its global scale (1.0, even with --lora-init-without-apply)",
        "batches only rows whose adapter sets are equal: a mixed column runs its adapter groups one after another",
        ("requests: one per row, all of a column's sent concurrently" if args.request_per_row else
         "requests: one per adapter group (its rows as a list of prompts, admitted and prefilled together), "
         "a column's groups sent concurrently"),
        "greedy (temperature 0, top_k 1), ignore_eos, cache_prompt false; every row checked for max_tokens "
        "new tokens and a fully prefilled prompt (cache_n 0)",
        "tokens/s = sum(predicted_n - 1) / union of the rows' decode intervals [first token, last token], "
        "placed on the client clock from timings.prompt_ms/predicted_ms and the response time",
        "mixed columns: groups in turn; the prefill of every group after the first counts as decode time",
        "prompt-speed columns: one base row, n_predict 1, prompt_n / timings.prompt_ms",
        ("rounds driven by the compare script (engines interleaved round by round)" if args.stdin_rounds else
         f"rounds: {args.rounds}") + " after one untimed warm-up pass over every column; columns interleaved per round",
        "peak_rss_mb: llama-server's VmHWM (includes resident pages of the mmapped model)",
        *run_notes,
    ]
    engine = f"llama.cpp {args.quant}" + (f" merged {args.merged}" if args.merged else "")
    result = {"engine": engine, "version": version, "columns": columns,
              "peak_rss_mb": rss, "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, entry in columns.items():
        print(f"{name:>12}: {' '.join(f'{r:.1f}' for r in entry['tokens_per_s'])} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
