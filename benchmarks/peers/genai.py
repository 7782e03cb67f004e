"""onnxruntime-genai as a benchmark peer: decode tokens/s of one workload, base and LoRA columns.

Run with the python of a separate venv holding onnxruntime-genai (it pins its own onnxruntime):

    GENAI_PY benchmarks/peers/genai.py --workload W.json --hf-dir HF_DIR --adapter A=PEFT_DIR ... \
        --precision fp32|int4 --rounds 3 --threads 2 --work-dir DIR --out RESULT.json

Model and adapters (cached in --work-dir, reused when their sources are unchanged):
  * each PEFT adapter is built by the model builder (``--extra_options adapter_path=DIR``, fp32),
    which bakes its LoRA A/B weights (B pre-scaled by alpha/r) into the graph as initializers;
    those are read back and written as an ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``),
  * the base model is the builder's output for the first adapter, with every LoRA weight turned into
    a graph input of dynamic rank whose default is an empty (rank 0) initializer: ORT's multi-LoRA
    model contract (what Olive's ExtractAdapters produces), so no adapter active means the base model.
    For int4 the LoRA MatMuls are excluded from quantization (``nodes_to_exclude``) so they stay
    fp32 inputs; everything else uses the builder's int4 CPU defaults (reported in the notes).

Timing: greedy, exactly ``max_tokens`` new tokens per row (``min_length = max_length`` = prompt +
max_tokens keeps EOS out). genai runs the prefill inside ``append_tokens``; the first
``generate_next_token()`` only picks a token from the prefill logits, so it and its token are left
out: tokens/s = rows * (max_tokens - 1) / time of the other ``generate_next_token()`` calls, each of
which is one decode step. genai cannot give rows of one batch different adapters, so a column
that mixes them runs one batch per adapter group, one after another ("groups in turn"), and its
tokens/s is the total timed tokens over the summed decode time of its groups plus the prefills of
every group after the first (a mixed batch prefills all its rows before decoding, once; groups in
turn stop to prefill again for each further group).

Prompt-speed columns (the workload's ``prefill``): one base row, ``append_tokens`` timed; prompt
tokens/s = prompt length / that time.

``--plain`` builds the base model with no adapter at all (what a user without LoRA runs: the
builder fuses q/k/v then) and times only the base and prompt-speed columns.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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

LORA_MARKERS = ("/lora_A/", "/lora_B/")


# ---------------------------------------------------------------- input


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; values are checked further by the loaders."""
    parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "int4"), required=True)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work-dir", type=Path, required=True, help="where built models are cached")
    parser.add_argument("--plain", action="store_true",
                        help="the base model built without LoRA; only the base and prompt-speed columns run")
    return check_peer_args(parser.parse_args(argv))


def check_equal_prompt_lengths(workload: Workload) -> None:
    """genai batches a group's prompts without padding: they must be of one length."""
    for column in workload.columns:
        for group in adapter_groups(column).values():
            if len({len(workload.prompts[row]) for row in group}) != 1:
                raise InputError(f"workload: column {column.name!r} batches prompts of different lengths")


def adapter_groups(column: Column) -> dict[str | None, list[int]]:
    """Row indices per adapter, in order of first use: genai runs one adapter per batch."""
    groups: dict[str | None, list[int]] = {}
    for row, adapter in enumerate(column.rows):
        groups.setdefault(adapter, []).append(row)
    return groups


# ---------------------------------------------------------------- build


def run_builder(hf_dir: Path, out_dir: Path, precision: str, extra: list[str], log: Path) -> None:
    """The genai model builder in a child process (its peak memory stays out of ours)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir)]
    command += ["-p", precision, "-e", "cpu", "-c", str(out_dir.parent / "hf_cache")]
    command += ["--extra_options", *extra] if extra else []
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0 or not (out_dir / "model.onnx").is_file():
        raise RunError(f"model builder failed (exit {done.returncode}); see {log}")


def lora_weights(model: Any) -> dict[str, str]:
    """LoRA MatMul node name -> the name of its weight (the builder names them .../lora_A|B/MatMul)."""
    return {
        node.name: node.input[1]
        for node in model.graph.node
        if node.op_type == "MatMul" and any(marker in node.name for marker in LORA_MARKERS)
    }


def rank_dim(node_name: str) -> str:
    """The symbolic rank of one module's A/B pair: adapters may use different ranks per module."""
    return "lora_rank" + node_name.split("/lora_")[0].replace("/", ".")


def sources_stamp(*paths: Path) -> list[list[Any]]:
    """Path, size and mtime of every file under the sources: a cache entry is stale when they change."""
    stamp = []
    for root in paths:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            info = file.stat()
            stamp.append([str(file), info.st_size, info.st_mtime_ns])
    return stamp


def genai_version() -> str:
    """The installed onnxruntime-genai: a newer builder may build differently, so it is part of cache keys."""
    return importlib.metadata.version("onnxruntime-genai")


def cached(meta_path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The stored build record when it was made from the same sources, else None."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("key") == key else None


def build_adapter(hf_dir: Path, name: str, peft_dir: Path, work: Path) -> dict[str, Any]:
    """NAME.onnx_adapter from the builder's fp32 LoRA graph; returns its record (with the LoRA node names)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    folder = work / "adapters"
    target, meta_path = folder / f"{name}.onnx_adapter", folder / f"{name}.json"
    key = {"genai": genai_version(), "hf": sources_stamp(hf_dir), "peft": sources_stamp(peft_dir)}
    meta = cached(meta_path, key)
    if meta and target.is_file():
        return meta
    folder.mkdir(parents=True, exist_ok=True)
    scratch = work / f"scratch-{name}"
    run_builder(hf_dir, scratch, "fp32", [f"adapter_path={peft_dir}"], work / f"build-adapter-{name}.log")
    model = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
    weights = lora_weights(model)
    if not weights:
        raise RunError(f"adapter {name}: the builder made no LoRA MatMuls")
    wanted = set(weights.values())
    tensors = {t.name: t for t in model.graph.initializer if t.name in wanted}
    arrays = {n: numpy_helper.to_array(t, base_dir=str(scratch)) for n, t in tensors.items()}
    adapter = ort.AdapterFormat()
    adapter.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()})
    adapter.export_adapter(str(target))
    shutil.rmtree(scratch)
    meta = {"key": key, "lora_nodes": sorted(weights), "params": {n: list(a.shape) for n, a in arrays.items()}}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def expose_lora_inputs(model_dir: Path) -> int:
    """Turn every LoRA weight into an input of dynamic rank with an empty default; returns their count.

    The external data file is left as it is: the other initializers keep pointing into it, and the
    LoRA bytes that stay behind in it are never read.
    """
    import onnx
    from onnx import helper, numpy_helper

    path = model_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    nodes = {weight: node for node, weight in lora_weights(model).items()}
    lora = [t for t in model.graph.initializer if t.name in nodes]
    kept = [t for t in model.graph.initializer if t.name not in nodes]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for tensor in lora:
        rows, cols = tensor.dims
        node, dim = nodes[tensor.name], rank_dim(nodes[tensor.name])
        shape, empty = ([rows, dim], (rows, 0)) if "/lora_A/" in node else ([dim, cols], (0, cols))
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, shape))
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(empty, dtype=dtype), tensor.name))
    onnx.save(model, str(path))
    return len(lora)


def build_base(hf_dir: Path, precision: str, first: tuple[str, Path, dict[str, Any]], work: Path) -> Path:
    """The multi-LoRA base model for this precision, built (or reused) under the work dir."""
    name, peft_dir, adapter_meta = first
    target = work / f"base-{precision}"
    key = {"genai": genai_version(), "hf": sources_stamp(hf_dir), "structure_from": sources_stamp(peft_dir)}
    key["precision"] = precision
    if cached(target / "edgelora-build.json", key):
        return target
    extra = [f"adapter_path={peft_dir}"]
    if precision == "int4":  # LoRA weights must stay float graph inputs, not MatMulNBits constants
        extra.append("nodes_to_exclude=" + ",".join(adapter_meta["lora_nodes"]))
    scratch = work / f"scratch-base-{precision}"
    run_builder(hf_dir, scratch, precision, extra, work / f"build-base-{precision}.log")
    count = expose_lora_inputs(scratch)
    if count != len(adapter_meta["lora_nodes"]):
        raise RunError(f"base {precision}: {count} LoRA weights exposed, expected {len(adapter_meta['lora_nodes'])}")
    (scratch / "edgelora-build.json").write_text(json.dumps({"key": key, "structure_adapter": name}, indent=1))
    if target.exists():
        shutil.rmtree(target)
    scratch.rename(target)
    return target


def build_plain(hf_dir: Path, precision: str, work: Path) -> Path:
    """The builder's model with no adapter (its own defaults, fused q/k/v), built or reused."""
    target = work / f"plain-{precision}"
    key = {"genai": genai_version(), "hf": sources_stamp(hf_dir), "precision": precision}
    if cached(target / "edgelora-build.json", key):
        return target
    scratch = work / f"scratch-plain-{precision}"
    run_builder(hf_dir, scratch, precision, [], work / f"build-plain-{precision}.log")
    (scratch / "edgelora-build.json").write_text(json.dumps({"key": key}, indent=1))
    if target.exists():
        shutil.rmtree(target)
    scratch.rename(target)
    return target


def set_threads(model_dir: Path, threads: int) -> None:
    """genai reads its thread counts only from genai_config.json's session options."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    path.write_text(json.dumps(config, indent=4))


def describe_build(model_dir: Path) -> list[str]:
    """What the builder chose (MatMulNBits block size, accuracy level), read from the graph itself."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    ops: dict[str, int] = {}
    settings: set[tuple[Any, ...]] = set()
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            settings.add((node.op_type, attrs.get("bits"), attrs.get("block_size"), attrs.get("accuracy_level")))
    notes = [f"graph ops: {json.dumps(dict(sorted(ops.items())))}"]
    for op, bits, block, level in sorted(settings, key=str):
        notes.append(f"{op}: bits={bits} block_size={block} accuracy_level={level}")
    return notes


# ---------------------------------------------------------------- run


@dataclass
class GroupRun:
    """One batch of rows sharing an adapter: decode time, timed tokens and the generated ids per row."""

    seconds: float
    tokens: int
    generated: list[list[int]]
    prefill_seconds: float = 0.0


def run_group(
    og: Any, model: Any, adapters: Any, adapter: str | None, prompts: list[tuple[int, ...]], max_tokens: int
) -> GroupRun:
    """Greedy generation of exactly max_tokens per row; times every decode step after the first token."""
    prompt_len = len(prompts[0])
    length = prompt_len + max_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=len(prompts))
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    started = time.perf_counter()
    generator.append_tokens(np.array(prompts, dtype=np.int32))  # runs the prefill
    prefill = time.perf_counter() - started
    generator.generate_next_token()  # picks token 1 from the prefill logits: not timed
    started = time.perf_counter()
    for _ in range(max_tokens - 1):
        generator.generate_next_token()
    seconds = time.perf_counter() - started
    generated = [[int(t) for t in generator.get_sequence(i)[prompt_len:]] for i in range(len(prompts))]
    if any(len(row) != max_tokens for row in generated) or not generator.is_done():
        raise RunError(f"expected {max_tokens} new tokens per row, got {[len(row) for row in generated]}")
    return GroupRun(seconds, len(prompts) * (max_tokens - 1), generated, prefill)


def run_prefill(og: Any, model: Any, prompt: tuple[int, ...]) -> float:
    """Prompt tokens/s of one base row: the time of ``append_tokens`` (the whole prompt in one pass)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 1, batch_size=1)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    return len(prompt) / (time.perf_counter() - started)


def run_column(og: Any, model: Any, adapters: Any, workload: Workload, column: Column) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of one column (adapter groups in turn, each further group's prefill counted) and its
    generated ids in row order."""
    seconds, tokens = 0.0, 0
    generated: list[list[int]] = [[] for _ in column.rows]
    for index, (adapter, rows) in enumerate(adapter_groups(column).items()):
        result = run_group(og, model, adapters, adapter, [workload.prompts[r] for r in rows], workload.max_tokens)
        seconds += result.seconds + (result.prefill_seconds if index else 0.0)
        tokens += result.tokens
        for row, ids in zip(rows, result.generated, strict=True):
            generated[row] = ids
    return tokens / seconds, generated


def measure(
    og: Any, model_dir: Path, adapter_files: dict[str, Path], workload: Workload, rounds: int, from_stdin: bool
) -> tuple[dict[str, Any], list[str]]:
    """One untimed pass over every column, then the rounds (see ``rounds_to_run``), columns in order."""
    model = og.Model(str(model_dir))
    adapters = og.Adapters(model)
    used = {a for c in workload.columns for a in c.rows if a is not None}
    for name in sorted(used):
        adapters.load(str(adapter_files[name]), name)
    for column in workload.columns:
        run_column(og, model, adapters, workload, column)
    for prefill in workload.prefills:
        run_prefill(og, model, prefill.prompt)
    samples = Samples(column_names(workload))
    for _ in rounds_to_run(rounds, from_stdin, samples):
        for column in workload.columns:
            rate, generated = run_column(og, model, adapters, workload, column)
            samples.add(column.name, rate, generated)
        for prefill in workload.prefills:
            samples.add(prefill.name, run_prefill(og, model, prefill.prompt))
    return samples.columns, samples.notes()


def check_adapters(model_dir: Path, metas: dict[str, dict[str, Any]]) -> None:
    """Every adapter parameter must be a LoRA input of the base (same modules as the first adapter)."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    for name, meta in metas.items():
        missing = sorted(set(meta["params"]) - inputs)
        if missing:
            raise InputError(f"adapter {name} targets modules the first adapter does not (e.g. {missing[0]})")


def main(argv: list[str] | None = None) -> int:
    """Build or reuse, measure, write the result JSON."""
    try:
        args = parse_args(argv)
        adapters = parse_adapters(args.adapter)
        if not adapters and not args.plain:
            raise InputError("give at least one --adapter: the base model takes its LoRA structure from the first")
        hf_config = read_hf_config(args.hf_dir)
        workload = load_workload(args.workload, set(adapters), hf_config["vocab_size"], base_only=args.plain)
        check_equal_prompt_lengths(workload)
        context = hf_config.get("max_position_embeddings")
        longest = max(max(len(p) for p in workload.prompts) + workload.max_tokens, workload.longest_prefill + 1)
        if type(context) is int and longest > context:
            raise InputError(f"workload: prompt + max_tokens = {longest} exceeds the model's {context} positions")
        try:
            import onnxruntime_genai as og
        except ImportError as error:
            raise RunError(
                f"onnxruntime_genai is not importable here ({error}); run with the genai venv's python"
            ) from None
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        hf_dir = args.hf_dir.resolve()
        if args.plain:
            first, files = "", {}
            model_dir = build_plain(hf_dir, args.precision, work)
        else:
            metas = {name: build_adapter(hf_dir, name, path, work) for name, path in adapters.items()}
            first = next(iter(adapters))
            model_dir = build_base(hf_dir, args.precision, (first, adapters[first], metas[first]), work)
            check_adapters(model_dir, metas)
            files = {name: work / "adapters" / f"{name}.onnx_adapter" for name in adapters}
        set_threads(model_dir, args.threads)
        columns, run_notes = measure(og, model_dir, files, workload, args.rounds, args.stdin_rounds)
    except InputError as error:
        print(f"genai.py: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"genai.py: failed: {error}", file=sys.stderr)
        return 1
    lora_notes = [
        f"model builder: -p {args.precision} -e cpu --extra_options adapter_path=<{first}>"
        + (" nodes_to_exclude=<its LoRA MatMuls>" if args.precision == "int4" else "")
        + "; LoRA weights then made graph inputs of dynamic rank with empty defaults (multi-LoRA contract)",
        "adapters: builder fp32 LoRA initializers -> onnxruntime.AdapterFormat .onnx_adapter; "
        "og.Adapters.load + Generator.set_active_adapter per batch",
        "base rows run the same LoRA-input model with no adapter active (rank-0 LoRA MatMuls still execute); "
        "the builder does not fuse q/k/v when LoRA is present",
        "mixed columns: groups in turn (one batch per adapter group, in sequence); tokens/s over their summed "
        "decode time plus the prefill time of every group after the first",
    ]
    plain_notes = [f"model builder: -p {args.precision} -e cpu, no adapter (its defaults; base columns only)"]
    notes = [
        *(plain_notes if args.plain else lora_notes),
        *describe_build(model_dir),
        f"threads: intra_op_num_threads={args.threads}, inter_op_num_threads=1 (genai_config.json)",
        f"tokens/s = rows*(max_tokens-1) / time of generate_next_token() calls 2..{workload.max_tokens}; "
        "call 1 only picks the token from the prefill logits (prefill runs in append_tokens)",
        "EOS: min_length = max_length = prompt + max_tokens; every row checked to have max_tokens new tokens",
        "prompt-speed columns: one base row, prompt tokens / time of append_tokens",
        ("rounds driven by the compare script (engines interleaved round by round)" if args.stdin_rounds else
         f"rounds: {args.rounds}") + " after one untimed warm-up pass over every column; columns interleaved per round",
        "peak_rss_mb: this process only (builds run in child processes)",
        *run_notes,
    ]
    result = {
        "engine": f"onnxruntime-genai {args.precision}" + (" plain" if args.plain else ""),
        "version": f"onnxruntime-genai {og.__version__}, onnxruntime {importlib.metadata.version('onnxruntime')}",
        "columns": columns,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, entry in columns.items():
        print(f"{name:>12}: {' '.join(f'{r:.1f}' for r in entry['tokens_per_s'])} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
