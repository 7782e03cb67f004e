"""The ``edgelora`` command: argparse subcommands over library functions.

This is the only place that turns exceptions into exit codes and one-line messages.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from edgelora.errors import EdgeLoraError, UserInputError
from edgelora.runtime.config import ADAPTER_LABELS, MIN_HOST_LORAS, STEP_TOKENS, EngineConfig, SchedulerConfig

log = logging.getLogger("edgelora")
BATCHED_TOKENS_HELP = (f"tokens one step may feed: a longer prompt is prefilled in chunks of this size, alternating with "
                       f"decode steps, so running streams wait one chunk, not the whole prompt; 0: no limit; "
                       f"default: max({STEP_TOKENS}, rows of the batch)")
RANK_HELP = f"largest adapter rank accepted (1..{EngineConfig.max_lora_rank}); with --max-loras it sizes the slot pool"


def _quiet_transformers() -> None:
    """--quiet: no 'Loading weights' progress bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _export(args: argparse.Namespace) -> None:
    from edgelora.export import ExportOptions, export_model

    if args.quiet:
        _quiet_transformers()
    export_model(args.model_dir, args.output_dir, ExportOptions(dtype=args.dtype, progress=not args.quiet,
                                                                gguf_file=args.gguf_file, save_hf_dir=args.save_hf_dir))


def _convert_gguf(args: argparse.Namespace) -> None:
    from edgelora.export.gguf import convert_gguf, find_gguf

    if args.quiet:
        _quiet_transformers()
    path = find_gguf(args.model_dir, args.gguf_file)
    if path is None:
        raise EdgeLoraError(f"--model-dir {args.model_dir}: no .gguf file there")
    convert_gguf(path, args.output_dir)


def _insert_lora(args: argparse.Namespace) -> None:
    from edgelora.graph import insert_lora

    insert_lora(args.onnx_dir, args.target_modules)


def _quantize(args: argparse.Namespace) -> None:
    from edgelora.graph.quantize import QuantizeOptions, quantize_export

    quantize_export(args.onnx_dir, args.output_dir, QuantizeOptions(
        mode=args.mode, block_size=args.block_size, asymmetric=args.asymmetric, accuracy_level=args.accuracy_level,
        gguf_file=args.gguf_file))


def _process_lora(args: argparse.Namespace) -> None:
    from edgelora.adapters import process_adapter

    process_adapter(args.input_dir, args.output_dir, args.onnx_dir, dtype=args.dtype)


def _merge_lora(args: argparse.Namespace) -> None:
    from edgelora.adapters.merge import merge_lora

    if args.quiet:
        _quiet_transformers()
    merge_lora(args.model_dir, args.lora_dir, args.output_dir, overwrite=args.overwrite)


def _infer(args: argparse.Namespace) -> None:
    from edgelora.entrypoints.infer_file import InferOptions, run_infer

    result = run_infer(InferOptions(
        onnx_dir=args.onnx_dir, input_file=args.input_file, output_file=args.output_file,
        max_lora_rank=args.max_lora_rank, max_batch_size=args.max_batch_size, device=args.device,
        num_threads=args.threads, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching))
    stats = result["stats"]
    log.info("%d responses in %.2f s (%s decode tokens/s) -> %s", stats["requests"], stats["total_s"],
             stats["decode_tokens_per_s"], args.output_file)


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _size(text: str) -> int:
    from edgelora.runtime.config import parse_size

    try:
        return parse_size(text)
    except UserInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bench(args: argparse.Namespace) -> None:
    from edgelora.tools.bench import BenchOptions, parse_rows, run_bench

    run_bench(BenchOptions(
        onnx_dir=args.onnx_dir, adapters=args.adapters, batches=args.batch, prompt_len=args.prompt_len,
        max_tokens=args.max_tokens, repeats=args.repeats, contexts=args.contexts, context_batch=args.context_batch,
        context_steps=args.context_steps, num_threads=args.threads, device=args.device, json_path=args.json,
        rows=[parse_rows(text) for text in args.rows or []], prompt_file=args.prompt_file,
        lora_chunk_rank=args.lora_chunk_rank))


def _serve(args: argparse.Namespace) -> None:
    from edgelora.entrypoints.lora_modules import parse_lora_modules
    from edgelora.entrypoints.server import ServeOptions, serve

    options = ServeOptions(
        onnx_dir=args.onnx_dir, lora_modules=parse_lora_modules(args.lora_modules),
        served_model_name=args.served_model_name, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
        max_cpu_lora_memory=args.max_cpu_lora_memory, adapter_labels=args.metrics_adapter_labels,
        lora_on_demand=args.lora_on_demand, lora_cache_max_size=args.lora_cache_max_size,
        max_lora_rank=args.max_lora_rank, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, host=args.host, port=args.port, api_key=args.api_key,
        api_keys=args.api_keys, lora_root=args.lora_root, lora_cache_dir=args.lora_cache_dir, enable_lora_updates=args.enable_lora_updates,
        max_waiting=args.max_waiting, device=args.device, threads=args.threads,
        shutdown_timeout_s=args.shutdown_timeout, enable_prefix_caching=args.enable_prefix_caching,
        prefix_cache_memory=args.prefix_cache_memory, prefix_cache_share_base=args.prefix_cache_share_base)
    if not args.ray:
        if args.replicas is not None or args.ray_address is not None:
            raise UserInputError("--replicas and --ray-address need --ray")
        serve(options)
        return
    try:
        from edgelora.entrypoints.ray import RayOptions, run
    except ImportError as exc:
        raise UserInputError(f"edgelora serve --ray needs {exc.name}: pip install 'edgelora[ray]'") from exc
    run(RayOptions(serve=options, replicas=1 if args.replicas is None else args.replicas,
                   ray_address=args.ray_address))


def _bench_serve(args: argparse.Namespace) -> None:
    from edgelora.entrypoints.lora_modules import parse_lora_modules
    from edgelora.tools.bench_serve import BenchServeOptions, run_bench_serve

    for name in ("httpx", "httpx2"):  # one line per HTTP request otherwise (recent openai clients use httpx2)
        logging.getLogger(name).setLevel(logging.WARNING)

    run_bench_serve(BenchServeOptions(
        adapters=args.adapters, url=args.url, onnx_dir=args.onnx_dir, lora_modules=parse_lora_modules(args.lora_modules),
        concurrency=args.concurrency, requests=args.requests, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
        repeats=args.repeats, threads=args.threads, max_loras=args.max_loras, max_num_seqs=args.max_num_seqs,
        compare_offline=args.compare_offline, api_key=args.api_key, json_path=args.json, rates=args.rates,
        requests_file=args.requests_file, duration_s=args.duration, zipf_alpha=args.zipf_alpha, spread=args.length_spread,
        shared_prefix_len=args.shared_prefix_len,
        seed=args.seed, slo_ttft_s=args.slo_ttft, slo_itl_s=args.slo_itl, sustain_ttft_p99_s=args.sustain_ttft_p99,
        adapter_field=args.adapter_field, chart_path=args.chart, timeout_s=args.request_timeout))


def _chat(args: argparse.Namespace) -> None:
    from edgelora.entrypoints.chat import ChatOptions, run_chat
    from edgelora.entrypoints.lora_modules import parse_lora_modules

    run_chat(ChatOptions(
        onnx_dir=args.onnx_dir, lora_modules=parse_lora_modules(args.lora_modules), lora=args.lora, system=args.system,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_model_len=args.max_model_len, max_lora_rank=args.max_lora_rank, device=args.device,
        num_threads=args.threads))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag under its one documented spelling; the aliases are accepted but not listed."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = action.option_strings[0]
        if action.nargs == 0:
            return flag
        return f"{flag} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def _flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> None:
    """Add ``--kebab-case`` plus the reference tools' spellings (``--camelCase``, ``--snake_case``) as aliases."""
    words = name.removeprefix("--").split("-")
    snake = "--" + "_".join(words)
    camel = "--" + words[0] + "".join(word.capitalize() for word in words[1:])
    spellings = list(dict.fromkeys([name, snake, camel, *aliases]))
    kwargs.setdefault("dest", "_".join(words))
    parser.add_argument(*spellings, **kwargs)


def _add(subparsers, name: str, handler: Callable[[argparse.Namespace], None], help_text: str,
         description: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=description, formatter_class=_HelpFormatter,
                                   epilog="Flags are also accepted in the spellings of TensorRT Edge-LLM's tools "
                                          "(--onnxDir, --inputFile, --maxLoraRank, ...) and in snake_case.")
    parser.set_defaults(handler=handler)
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors, no progress bars")
    return parser


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line and exit 2, like every other bad input (subcommands inherit this)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgelora",
        description="Multi-LoRA toolchain and runtime on ONNX Runtime: export a Hugging Face decoder once, "
                    "insert LoRA inputs once, then serve any number of adapters, mixed in one batch.",
        epilog="Pipeline: export -> insert-lora -> process-lora (per adapter) -> infer. "
               "Run 'edgelora COMMAND --help' for each command's flags.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = _add(subparsers, "export", _export, "HF model folder -> model.onnx + config.json",
                  "Export a Hugging Face decoder (Qwen2/2.5, Llama, Mistral, Qwen3) to ONNX with a KV cache "
                  "updated in place. Writes model.onnx, model.onnx.data (weights), config.json "
                  "(edgelora's model description) and copies the tokenizer and chat template files. Files of later "
                  "stages built from an earlier export of the folder (lora_model.onnx, lora_manifest.json) are removed.")
    _flag(export, "--model-dir", required=True, type=Path,
          help="Hugging Face model folder (config.json + weights), a .gguf file, or a folder holding one")
    _flag(export, "--output-dir", required=True, type=Path, help="folder to write the ONNX model into")
    _flag(export, "--gguf-file", default=None, metavar="NAME", help="the .gguf inside --model-dir (if it holds several)")
    _flag(export, "--save-hf-dir", type=Path, default=None,
          help="GGUF only: also keep the dequantized float Hugging Face folder here (for training and PEFT checks)")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weight and activation dtype")

    convert = _add(subparsers, "convert-gguf", _convert_gguf, "GGUF -> float Hugging Face folder",
                   "Dequantize a GGUF file (llama.cpp's format) with transformers' GGUF loader and write a float "
                   "Hugging Face folder (config, safetensors, tokenizer, chat template) that transformers, peft and "
                   "'edgelora export' read.")
    _flag(convert, "--model-dir", required=True, type=Path, help="a .gguf file, or a folder holding one")
    _flag(convert, "--output-dir", required=True, type=Path, help="folder for the float Hugging Face model")
    _flag(convert, "--gguf-file", default=None, metavar="NAME", help="the .gguf inside --model-dir (if it holds several)")

    quantize = _add(subparsers, "quantize", _quantize, "export -> weight-only int4/int8 export (MatMulNBits)",
                    "Quantize every projection and the lm_head of an export with ONNX Runtime's weight-only quantizer "
                    "(MatMulNBits) into a new export folder; the embedding, norms and attention stay float. Run "
                    "insert-lora on the quantized folder as on a float one: LoRA branches stay float, so the same "
                    "processed adapters serve both.")
    _flag(quantize, "--onnx-dir", required=True, type=Path, help="float export folder (edgelora export)")
    _flag(quantize, "--output-dir", required=True, type=Path, help="folder for the quantized export")
    quantize.add_argument("--mode", default="int4", choices=["int4", "int8"], help="weight bits")
    _flag(quantize, "--block-size", type=int, default=32, help="weights per scale (a power of two >= 16)")
    quantize.add_argument("--asymmetric", action="store_true", help="a zero point per block (default: symmetric)")
    _flag(quantize, "--accuracy-level", type=int, default=4,
          help="MatMulNBits compute precision: 4 = activations in int8 blocks (the fast CPU kernels: 4-5x "
               "faster per projection here), 0 = the activations' float (slow, for checking)")
    _flag(quantize, "--gguf-file", type=Path, default=None,
          help="the GGUF this export was made from: its Q4_0 / Q8_0 blocks become MatMulNBits exactly and its Q4_1 "
               "blocks with integer zero points, instead of quantizing the dequantized weights again; "
               "tensors of other types get --mode")

    insert = _add(subparsers, "insert-lora", _insert_lora, "model.onnx -> lora_model.onnx with LoRA inputs",
                  "Add LoRA branches beside the targeted projections of model.onnx and write lora_model.onnx "
                  "(sharing model.onnx.data) plus lora_manifest.json. One graph serves base rows, single-adapter "
                  "and mixed-adapter batches, with any rank up to the maximum; logits are computed only at the "
                  "positions the runtime samples from.")
    _flag(insert, "--onnx-dir", required=True, type=Path, help="folder written by 'edgelora export'")
    _flag(insert, "--target-modules", nargs="+", metavar="MODULE",
          help="projections that get LoRA inputs: q k v o gate up down (or q_proj ...); default: all seven")

    process = _add(subparsers, "process-lora", _process_lora, "PEFT adapter -> processed_adapter_model.safetensors",
                   "Convert a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for the runtime: "
                   "scaling folded into B (alpha/r, or alpha/sqrt(r) with use_rslora), tensors transposed to the "
                   "graph's layout, stored as float16; norm / lm_head / embedding tensors are dropped with a warning.")
    _flag(process, "--input-dir", required=True, type=Path, help="PEFT adapter folder")
    _flag(process, "--output-dir", required=True, type=Path,
          help="folder for processed_adapter_model.safetensors + config.json")
    _flag(process, "--onnx-dir", type=Path, help="exported model folder: check every tensor against its module sizes")
    process.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                         help="storage dtype of the processed weights")

    merge = _add(subparsers, "merge-lora", _merge_lora, "merge one adapter into the base model (HF folder out)",
                 "Merge a PEFT LoRA adapter into the base weights and write a Hugging Face model folder that "
                 "AutoModelForCausalLM loads; the tokenizer files are copied along.")
    _flag(merge, "--model-dir", required=True, type=Path, help="base Hugging Face model folder")
    _flag(merge, "--lora-dir", required=True, type=Path, help="PEFT LoRA adapter folder")
    _flag(merge, "--output-dir", required=True, type=Path, help="folder for the merged model (must be empty)")
    merge.add_argument("--overwrite", action="store_true",
                       help="allow a non-empty --output-dir (its files are replaced, none deleted)")

    infer = _add(subparsers, "infer", _infer, "run requests from a JSON file (adapters mixed per batch)",
                 "Generate for every request of an input file in TensorRT Edge-LLM's format "
                 "({available_lora_weights: {name: path}, requests: [{messages, lora_name}]}); requests are batched "
                 "up to --max-batch-size whatever their adapters. Sampling fields temperature, top_p, top_k, "
                 "max_generate_length, seed are read at the top level and per request (per request wins); "
                 "defaults: temperature 1.0, top_p 1.0, top_k 50, max_generate_length 256. temperature 0 or "
                 "top_k 1 is greedy. Everything is checked before generation starts.")
    _flag(infer, "--onnx-dir", required=True, type=Path, help="folder with lora_model.onnx (export + insert-lora)")
    _flag(infer, "--input-file", required=True, type=Path, help="input JSON (Edge-LLM format)")
    _flag(infer, "--output-file", required=True, type=Path, help="where to write {responses, stats} (atomically)")
    _flag(infer, "--max-lora-rank", type=int, default=EngineConfig.max_lora_rank, help=RANK_HELP)
    _flag(infer, "--max-batch-size", "--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
          help="most requests run together in one batch")
    _flag(infer, "--max-num-batched-tokens", type=int, default=None, help=BATCHED_TOKENS_HELP)
    infer.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="execution provider (cuda needs onnxruntime-gpu)")
    infer.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: all cores)")
    _flag(infer, "--enable-prefix-caching", action=argparse.BooleanOptionalAction,
          default=SchedulerConfig.enable_prefix_caching,
          help="requests whose prompts start the same way (a shared system prompt) under the same adapter reuse "
               "its KV instead of prefilling it again; --no-enable-prefix-caching turns it off")

    bench = _add(subparsers, "bench", _bench, "measure base / one-adapter / mixed-adapter speed",
                 "Measure prefill ms and decode tokens/s for the base model, one adapter on every row, and a mixed "
                 "batch (a different adapter per row), plus switching to a cached adapter, a cold adapter load, "
                 "decode at a short and a long context, and memory read bandwidth vs the bytes of weights. "
                 "Configurations are interleaved and medians reported.")
    _flag(bench, "--onnx-dir", required=True, type=Path, help="folder with lora_model.onnx")
    bench.add_argument("--adapters", required=True, type=Path, nargs="+", metavar="DIR",
                       help="processed adapter folders; the first is 'one adapter', all of them rotate in the mixed batch")
    bench.add_argument("--batch", type=_int_list, default=[1, 4, 8], help="batch sizes, comma-separated")
    bench.add_argument("--rows", action="append", metavar="A,B,-",
                       help="one batch per use, a row per entry: an adapter folder's name, or - for a base row "
                            "(e.g. --rows - --rows b2 --rows b1,b2,b3,-); replaces the --batch configurations")
    _flag(bench, "--prompt-file", type=Path, default=None,
          help="JSON list of token-id prompts (or an object with a \"prompts\" list); row i takes prompt i, "
               "the same every round; default: random prompts of --prompt-len tokens")
    _flag(bench, "--prompt-len", type=int, default=32, help="prompt tokens per row")
    _flag(bench, "--max-tokens", "--new-tokens", type=int, default=64, help="tokens generated per row (EOS ignored)")
    bench.add_argument("--repeats", type=int, default=3, help="interleaved rounds per configuration (medians reported)")
    bench.add_argument("--contexts", type=_int_list, default=[128, 2048], help="context lengths for the long-context decode check")
    _flag(bench, "--context-batch", type=int, default=4, help="rows in the long-context check")
    _flag(bench, "--context-steps", type=int, default=16, help="decode steps timed per context")
    _flag(bench, "--lora-chunk-rank", type=int, default=EngineConfig.lora_chunk_rank,
          help="rows of one adapter pool slot: an adapter of rank r takes ceil(r / this) slots, each a stack entry")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: all cores)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="execution provider")
    bench.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")

    serve = _add(subparsers, "serve", _serve, "OpenAI-compatible server: many adapters, one batch",
                 "Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models; "
                 "vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter with --enable-lora-updates), plus /health "
                 "and Prometheus /metrics. Requests on different adapters share every decode step (continuous "
                 "batching). 'model' is the served name (base), an adapter name, or NAME:ADAPTER. SIGTERM stops "
                 "accepting, lets running requests finish (up to --shutdown-timeout) and exits 0.")
    _flag(serve, "--onnx-dir", required=True, type=Path, help="folder with lora_model.onnx (export + insert-lora)")
    _flag(serve, "--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
          help="adapters served from the start: processed folders, or PEFT folders (processed at startup)")
    _flag(serve, "--served-model-name", default=None, help="the base model's name in the API; default: the onnx folder's name")
    _flag(serve, "--max-loras", type=int, default=EngineConfig.max_loras,
          help="adapter slot room: N adapters of --max-lora-rank at once; adapters of lower rank share it (at rank "
               "64, 8 holds 32 rank-16 adapters; --max-lora-rank 16 counts one r16 adapter a place, as vLLM); "
               "a lora_mix names at most N")
    _flag(serve, "--max-cpu-loras", type=int, default=EngineConfig.max_cpu_loras,
          help=f"adapters kept ready in host memory (at least --max-loras); default: max({MIN_HOST_LORAS}, --max-loras)")
    _flag(serve, "--max-cpu-lora-memory", type=_size, default=EngineConfig.max_cpu_lora_bytes, metavar="SIZE",
          help="and at most this much memory for them (2GiB, 512MB; with --ray, per replica): a host-ready adapter "
               "is kept at its file's precision, about its file's size; default: bounded by --max-cpu-loras only")
    _flag(serve, "--max-lora-rank", type=int, default=EngineConfig.max_lora_rank, help=RANK_HELP)
    _flag(serve, "--max-num-seqs", "--max-batch-size", "--max_batch_size", "--maxBatchSize", type=int,
          default=SchedulerConfig.max_num_seqs, help="requests decoded together (rows of the batch)")
    _flag(serve, "--max-model-len", type=int, default=None,
          help="prompt + generated tokens per request; default: the model's positions")
    _flag(serve, "--max-num-batched-tokens", type=int, default=None, help=BATCHED_TOKENS_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (another than loopback without a key logs a warning)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    keys = serve.add_mutually_exclusive_group()
    _flag(keys, "--api-key", default=None, help="one key with every adapter and admin rights (Authorization: Bearer KEY)")
    _flag(keys, "--api-keys", type=Path, default=None,
          help='JSON file {"KEY": {"adapters": ["a", ...] | "*", "admin": bool, "max_concurrent": N}}')
    _flag(serve, "--lora-root", type=Path, default=None, help="run-time adapter paths must resolve inside this folder")
    _flag(serve, "--lora-cache-dir", type=Path, default=None,
          help="where PEFT adapters are processed to; default: ONNX_DIR/.lora_cache")
    _flag(serve, "--lora-on-demand", action="store_true",
          help="a request whose model names a folder directly under --lora-root that is not loaded yet loads it "
               "(PEFT folders are processed into --lora-cache-dir once); any other name stays a 404")
    _flag(serve, "--lora-cache-max-size", type=_size, default=None, metavar="SIZE",
          help="bound the processed copies of on-demand PEFT adapters (2GiB, 500MB): past it the least recently "
               "used leave the cache and the registry (a later request loads them again); default: no bound")
    _flag(serve, "--enable-lora-updates", action="store_true",
          help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter (admin keys; needs --lora-root)")
    _flag(serve, "--max-waiting", type=int, default=None,
          help="requests that may wait for a row; beyond it a request gets 503; default: unbounded (with --ray: "
               "8 x --max-num-seqs per replica)")
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="execution provider (cuda needs onnxruntime-gpu)")
    serve.add_argument("--threads", type=int, default=None,
                       help="CPU threads for ONNX Runtime; default: all cores (with --ray: per replica, and the CPUs "
                            "Ray reserves for it; default: cores / replicas)")
    _flag(serve, "--metrics-adapter-labels", type=int, default=ADAPTER_LABELS, metavar="N",
          help="adapters with /metrics series of their own (requests, tokens, loads, location): the first N seen; "
               "later ones are counted under adapter=\"other\", so the series stay bounded")
    _flag(serve, "--enable-prefix-caching", action=argparse.BooleanOptionalAction,
          default=SchedulerConfig.enable_prefix_caching,
          help="keep the KV of prompt blocks and reuse it for later prompts that start the same way under the same "
               "adapter version and tenant (they prefill only the rest); --no-enable-prefix-caching turns it off")
    _flag(serve, "--prefix-cache-memory", type=_size, default=SchedulerConfig.prefix_cache_bytes, metavar="SIZE",
          help="host memory for cached prompt KV (1GiB, 512MB; with --ray, per replica); least recently used "
               "blocks leave first; default: 512MiB")
    _flag(serve, "--prefix-cache-share-base", action="store_true",
          help="share cached base-model prefixes across tenants (API keys); by default every tenant has its own, "
               "so response times cannot show one tenant what another asked. Adapter prefixes stay per tenant")
    _flag(serve, "--shutdown-timeout", type=float, default=30.0,
          help="seconds SIGTERM waits for running requests before it cancels them")
    serve.add_argument("--ray", action="store_true",
                       help="run on Ray Serve: --replicas engines behind one ingress, requests routed to a replica "
                            "that holds their adapter (needs the [ray] extra; see docs/scaling.md)")
    serve.add_argument("--replicas", type=int, default=None,
                       help="with --ray: engine replicas, each with its own batch and adapter cache; default 1")
    _flag(serve, "--ray-address", default=None,
          help="with --ray: join this Ray cluster (HOST:PORT, or 'auto'); default: start a local one on loopback")

    load = _add(subparsers, "bench-serve", _bench_serve, "load-test a server with the openai client (streaming)",
                "Send --requests streaming completions at each --concurrency level (random token-id prompts, greedy, "
                "ignore_eos, adapters round robin) and report request throughput, output tokens/s, time to first "
                "token and inter-token latency p50/p99, the server's mean prefill step and the share of each decode "
                "step spent outside ONNX Runtime (from its /metrics). Give --url of a running server, or --onnx-dir "
                "to start one on a free loopback port for the run.")
    load.add_argument("--url", default=None, help="base URL of a running edgelora serve (http://HOST:PORT or .../v1)")
    _flag(load, "--onnx-dir", type=Path, default=None, help="start 'edgelora serve' on this folder for the run")
    _flag(load, "--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
          help="with --onnx-dir: adapters the started server serves")
    load.add_argument("--adapters", nargs="+", required=True, metavar="NAME",
                      help="models requested round robin: adapter names, or 'base' for the served base model")
    load.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="concurrent clients per level, comma-separated")
    load.add_argument("--requests", type=int, default=32, help="requests per level (and per repeat)")
    _flag(load, "--prompt-len", type=int, default=32, help="prompt tokens per request")
    _flag(load, "--max-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    load.add_argument("--repeats", type=int, default=1, help="rounds per level (medians reported)")
    load.add_argument("--threads", type=int, default=None, help="with --onnx-dir: CPU threads of the server (and offline run)")
    _flag(load, "--max-loras", type=int, default=None, help="with --onnx-dir: the server's adapter slots")
    _flag(load, "--max-num-seqs", type=int, default=None, help="with --onnx-dir: the server's rows; default: the highest level")
    _flag(load, "--compare-offline", action="store_true",
          help="with --onnx-dir: also time LLM.generate of the same requests in one batch, interleaved with the server")
    _flag(load, "--api-key", default=None, help="key for the server (and for /metrics)")
    load.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    open_loop = load.add_argument_group(
        "open loop", "--rates replaces --concurrency: requests arrive on their own clock (Poisson), whatever the server "
                     "is doing, so overload shows; per rate: delivered requests/s and output tokens/s, TTFT and "
                     "inter-token p50/p99, failed requests, the share within the SLO, and the highest rate sustained")
    open_loop.add_argument("--rates", type=_float_list, default=None,
                           help="offered requests/s, comma-separated (e.g. 0.5,1,2,4)")
    open_loop.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    _flag(open_loop, "--zipf-alpha", type=float, default=1.0,
          help="adapter popularity: the i-th of --adapters is drawn with weight 1/i^alpha (0: uniform)")
    _flag(open_loop, "--length-spread", type=float, default=0.0,
          help="prompt and output lengths uniform within +-this fraction of --prompt-len / --max-tokens")
    _flag(open_loop, "--shared-prefix-len", type=int, default=0, metavar="N",
          help="every request starts with the same N-token system prompt before its own --prompt-len tokens (a "
               "prefix-cache workload: compare a server with and without --no-enable-prefix-caching)")
    open_loop.add_argument("--seed", type=int, default=0, help="seed of the arrivals, adapters, lengths and prompts")
    _flag(open_loop, "--slo-ttft", type=float, default=None, help="SLO: time to first token, seconds")
    _flag(open_loop, "--slo-itl", type=float, default=None, help="SLO: a request's mean inter-token gap, seconds")
    _flag(open_loop, "--sustain-ttft-p99", type=float, default=5.0,
          help="'sustained' = the highest rate with TTFT p99 within this (seconds) and no failed request")
    _flag(open_loop, "--adapter-field", choices=["model", "llama-lora"], default="model",
          help="how a request names its adapter: 'model' (edgelora, vLLM) or 'llama-lora' (llama-server: a per-request "
               "lora list of scales, adapters loaded at its start in --adapters order, 'base' excluded)")
    _flag(open_loop, "--requests-file", type=Path, default=None,
          help="instead of --rates, replay an earlier run's --json (every rate: the same arrivals, adapters and "
               "prompts, e.g. against another server) or a JSON list of {at_s, adapter, prompt, max_tokens}")
    open_loop.add_argument("--chart", type=Path, default=None,
                           help="PNG of output tokens/s and TTFT p99 per rate (needs the [bench] extra)")
    _flag(open_loop, "--request-timeout", type=float, default=600.0,
          help="seconds before a request counts as failed")

    chat = _add(subparsers, "chat", _chat, "talk to the model in the terminal, switching adapters by name",
                "An interactive chat: answers stream as they are generated, the whole conversation goes through the "
                "model's chat template each turn, and a conversation that outgrows the context drops its oldest turns "
                "(with a note). Commands: /lora NAME (switch adapter; /lora alone: the base model), /loras, /reset, "
                "/quit. Ctrl-C stops the current answer (what was said stays in the history); Ctrl-C or Ctrl-D at the "
                "prompt exits. With stdin not a terminal (echo QUESTION | edgelora chat ...), all of stdin is one "
                "question and stdout gets the answer alone. Prompt and answers go to stdout, notes to stderr.")
    _flag(chat, "--onnx-dir", required=True, type=Path, help="folder with lora_model.onnx (export + insert-lora)")
    _flag(chat, "--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
          help="adapters /lora NAME switches to: processed folders ('edgelora process-lora')")
    chat.add_argument("--lora", default=None, metavar="NAME", help="adapter of the first answer; default: the base model")
    chat.add_argument("--system", default=None, metavar="TEXT",
                      help="system message at the head of the conversation; default: none (the template's own, if any)")
    _flag(chat, "--max-tokens", type=int, default=256, help="most tokens per answer")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    _flag(chat, "--top-p", type=float, default=0.9, help="nucleus sampling: smallest set of tokens with this probability")
    _flag(chat, "--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0: no limit")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed, the same for every answer; default: random")
    _flag(chat, "--max-model-len", type=int, default=None,
          help="conversation + answer tokens; default: the model's positions")
    _flag(chat, "--max-lora-rank", type=int, default=EngineConfig.max_lora_rank, help=RANK_HELP)
    chat.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="execution provider (cuda needs onnxruntime-gpu)")
    chat.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime; default: all cores")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error, already printed as one line (--help exits 0 as argparse does)
        if not exc.code:
            raise
        return int(exc.code)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="edgelora: %(message)s")
    # torch's C++ side prints shape-inference chatter for our custom attention op; keep stderr for errors.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        args.handler(args)
    except EdgeLoraError as exc:
        print(f"edgelora {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"edgelora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the edge: never show a traceback unless asked
        if os.environ.get("EDGELORA_DEBUG"):
            raise
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] != "edgelora":
            from edgelora.dependencies import install_hint  # an optional dependency this command needs

            print(f"edgelora {args.command}: error: this command needs the module {exc.name!r}, which is not "
                  f"installed: {install_hint(exc.name)}", file=sys.stderr)
            return UserInputError.exit_code
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"edgelora {args.command}: internal error: {type(exc).__name__}: {message} "
              "(set EDGELORA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
