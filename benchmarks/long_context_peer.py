"""Decode speed at a short and a long context: edgelora against onnxruntime-genai, in one run.

Both engines get the same model, batch, contexts and thread count; rounds interleave the engines
and contexts, and medians are reported (the machines are shared and noisy: compare ratios).
edgelora's cache is filled with random keys/values (``edgelora.tools.bench.time_decode``); onnxruntime-genai's
by a prefill of random tokens, which is not timed. Attention cost does not depend on the values.

    python -m onnxruntime_genai.models.builder -i HF_DIR -o GENAI_DIR -p fp32 -e cpu
    python benchmarks/long_context_peer.py --onnx-dir OUT --genai-dir GENAI_DIR

Without onnxruntime-genai installed (or without ``--genai-dir``) only edgelora is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgelora.runtime.config import EngineConfig
from edgelora.runtime.engine import Engine
from edgelora.tools.bench import time_decode


def genai_decode(model_dir: Path, threads: int):
    """A callable (batch, context, steps) -> seconds per decode step, or None without the package."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    config_path = model_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:  # genai reads its thread count from this file only
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        config_path.write_text(json.dumps(config, indent=1))
    model = og.Model(str(model_dir))

    def run(batch: int, context: int, steps: int) -> list[float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context + steps + 1, batch_size=batch, do_sample=False)
        generator = og.Generator(model, params)
        prompt = np.random.default_rng(0).integers(10, 1000, size=(batch, context)).astype(np.int32)
        generator.append_tokens(prompt)
        durations = []
        for _ in range(steps):
            started = time.perf_counter()
            generator.generate_next_token()
            durations.append(time.perf_counter() - started)
        return durations

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", "--onnxDir", dest="onnx_dir", type=Path, required=True, help="edgelora export folder (with lora_model.onnx)")
    parser.add_argument("--genai-dir", "--genaiDir", dest="genai_dir", type=Path, help="onnxruntime-genai model folder built from the same HF model")
    parser.add_argument("--contexts", default="128,2048", help="cache lengths to decode at (default 128,2048)")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch (default 4)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for both engines (default 2)")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]

    engine = Engine(args.onnx_dir, EngineConfig(num_threads=args.threads))
    engines = {"edgelora": lambda batch, context, steps: time_decode(engine, [None] * batch, context, steps)}
    if args.genai_dir:
        peer = genai_decode(args.genai_dir, args.threads)
        if peer is None:
            print("onnxruntime-genai is not installed: measuring edgelora only")
        else:
            engines["onnxruntime-genai"] = peer

    samples = {(name, context): [] for name in engines for context in contexts}
    for _ in range(args.rounds):
        for name, decode in engines.items():
            for context in contexts:
                durations = decode(args.batch, context, args.steps)[1:] or [float("nan")]
                samples[(name, context)].append(args.batch / statistics.median(durations))
    print(f"batch {args.batch}, {args.threads} threads, {args.steps} steps x {args.rounds} rounds; decode tokens/s")
    print(f"{'engine':18s}" + "".join(f"{'ctx ' + str(c):>12s}" for c in contexts) + f"{'last/first':>12s}")
    for name in engines:
        medians = [statistics.median(samples[(name, c)]) for c in contexts]
        print(f"{name:18s}" + "".join(f"{m:12.2f}" for m in medians) + f"{medians[-1] / medians[0]:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
