"""Make many PEFT adapters for the bench model and process them: the workload of the distinct-adapter sweep.

``make_sample.py --size bench`` writes four adapters (b1..b4) through PEFT, which loads the whole
model each time; a sweep of 32 distinct adapters (and of mixed ranks) needs more. This writes
standard PEFT folders (``adapter_config.json`` + ``adapter_model.safetensors``) with the template's
tensor names and targets, random non-zero A and B at the rank asked, then runs ``edgelora
process-lora`` on each into ``ONNX_DIR/lora_weights/NAME``. Then run the sweep with ``edgelora bench
--rows`` (see README, "Many adapters in one batch").

    python benchmarks/distinct_adapters.py --template bench_out/sample/adapters/b1 \\
        --onnx-dir bench_out/onnx --count 32 --rank 16 --prefix d
    python benchmarks/distinct_adapters.py --template bench_out/sample/adapters/b1 \\
        --onnx-dir bench_out/onnx --ranks 4,8,16,64,23 --prefix r
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def make_adapter(template: Path, out_dir: Path, rank: int, seed: int) -> None:
    """A PEFT folder shaped like ``template`` at ``rank`` (alpha = 2 * rank), random weights."""
    config = json.loads((template / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=2 * rank, rank_pattern={}, alpha_pattern={})
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, value in load_file(str(template / "adapter_model.safetensors")).items():
        if re.search(r"lora_A\.weight$", name):
            shape = (rank, value.shape[1])
        elif re.search(r"lora_B\.weight$", name):
            shape = (value.shape[0], rank)
        else:
            raise SystemExit(f"{template}: unexpected tensor {name}")
        tensors[name] = (rng.standard_normal(shape) * 0.05).astype(np.float16).astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--template", type=Path, required=True, help="a PEFT adapter of the bench model (b1)")
    parser.add_argument("--onnx-dir", type=Path, required=True, help="folder with lora_model.onnx")
    parser.add_argument("--count", type=int, default=0, help="adapters of --rank to make")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ranks", default="", help="comma-separated ranks: one adapter each")
    parser.add_argument("--prefix", default="d", help="adapter names: PREFIX1, PREFIX2, ...")
    parser.add_argument("--peft-dir", type=Path, default=None, help="where the PEFT folders go (default: a temp dir)")
    args = parser.parse_args(argv)
    ranks = [args.rank] * args.count + [int(r) for r in args.ranks.split(",") if r]
    peft_root = args.peft_dir or Path(args.onnx_dir) / "peft_sweep"
    for index, rank in enumerate(ranks, start=1):
        name = f"{args.prefix}{index}"
        peft_dir, processed = peft_root / name, args.onnx_dir / "lora_weights" / name
        make_adapter(args.template, peft_dir, rank, seed=1000 + index)
        shutil.rmtree(processed, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "edgelora", "process-lora", "--quiet", "--onnx-dir", str(args.onnx_dir),
                        "--input-dir", str(peft_dir), "--output-dir", str(processed)], check=True)
        print(f"{name}: rank {rank} -> {processed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
