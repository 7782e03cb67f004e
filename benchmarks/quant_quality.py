"""Quantized vs float logits, teacher-forced: max / mean abs difference and top-1 agreement.

    python benchmarks/quant_quality.py --float-dir OUT --quantized-dir QOUT_INT8 QOUT_INT4 [--tokens 300]

The text is the demo's committed training answers (samples/demo_adapters/training_data.json) unless
--text-file is given; the same token ids go through each folder's model.onnx in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from graph_runner import empty_past, session, token_feeds  # noqa: E402

from edgelora.formats.model_spec import ModelSpec  # noqa: E402
from edgelora.runtime.tokenizer import ChatTokenizer  # noqa: E402

DEFAULT_TEXT = ROOT / "samples" / "demo_adapters" / "training_data.json"


def _text(path: Path | None) -> str:
    if path is not None:
        return Path(path).read_text()
    return " ".join(json.loads(DEFAULT_TEXT.read_text())["base_answers"])


def _logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    spec = ModelSpec.load(folder)
    feeds = {**token_feeds(ids), **empty_past(spec, 1, ids.shape[1])}
    return session(folder / "model.onnx").run(["logits"], feeds)[0][0].astype(np.float32)


def compare(float_dir: Path, quantized_dirs: list[Path], text: str, tokens: int) -> list[dict]:
    ids = np.array([ChatTokenizer(float_dir).encode(text)[:tokens]], np.int64)
    reference = _logits(float_dir, ids)
    rows = []
    for folder in quantized_dirs:
        got = _logits(folder, ids)
        difference = np.abs(got - reference)
        rows.append({"folder": str(folder), "quantization": ModelSpec.load(folder).quantization,
                     "tokens": int(ids.shape[1]), "max_abs": float(difference.max()),
                     "mean_abs": float(difference.mean()),
                     "top1_agreement": float(np.mean(got.argmax(-1) == reference.argmax(-1)))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float-dir", required=True, type=Path, help="the float export")
    parser.add_argument("--quantized-dir", required=True, type=Path, nargs="+", help="quantized exports of it")
    parser.add_argument("--text-file", type=Path, default=None, help="text to teacher-force (default: the demo's answers)")
    parser.add_argument("--tokens", type=int, default=300, help="tokens of the text to use")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = compare(args.float_dir, args.quantized_dir, _text(args.text_file), args.tokens)
    for row in rows:
        print(f"{row['quantization']}: {row['tokens']} tokens, max abs {row['max_abs']:.3f}, "
              f"mean abs {row['mean_abs']:.4f}, top-1 agreement {row['top1_agreement']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
