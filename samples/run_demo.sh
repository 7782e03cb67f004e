#!/usr/bin/env bash
# The whole pipeline on the built-in sample, nothing fetched from a hub:
#   make a tiny Qwen2 model + tokenizer + three PEFT adapters -> export -> insert-lora
#   -> process-lora (x3) -> merge-lora (one adapter) -> infer one batch mixing a1, a2, a3 and base rows.
# Usage: samples/run_demo.sh [WORK_DIR]   (default build/demo; PYTHON overrides the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${1:-build/demo}
edgelora() { "$PYTHON" -m edgelora "$@"; }

rm -rf "$WORK" && mkdir -p "$WORK"
echo "== 1. sample model, tokenizer and adapters -> $WORK/sample"
"$PYTHON" samples/make_sample.py --output-dir "$WORK/sample"
echo "== 2. export"
edgelora export --model-dir "$WORK/sample/model" --output-dir "$WORK/onnx"
echo "== 3. insert-lora (all seven projections)"
edgelora insert-lora --onnx-dir "$WORK/onnx"
echo "== 4. process-lora"
for name in a1 a2 a3; do
  edgelora process-lora --input-dir "$WORK/sample/adapters/$name" --output-dir "$WORK/onnx/lora_weights/$name" \
    --onnx-dir "$WORK/onnx"
done
echo "== 5. merge-lora (a1 into the base weights, a plain HF folder)"
edgelora merge-lora --model-dir "$WORK/sample/model" --lora-dir "$WORK/sample/adapters/a1" --output-dir "$WORK/merged_a1"
echo "== 6. infer: one batch, rows on a1 / a2 / base / a3 / a1 (sampled) / base"
cp samples/input.json "$WORK/input.json"
edgelora infer --onnx-dir "$WORK/onnx" --input-file "$WORK/input.json" --output-file "$WORK/output.json"
"$PYTHON" - "$WORK/output.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
for index, response in enumerate(result["responses"]):
    print(f"[{index}] {response['lora_name'] or 'base':4} {response['finish_reason']:6} "
          f"{response['completion_tokens']:3} tokens: {response['output_text'][:60]!r}")
print("stats:", json.dumps(result["stats"]))
PY
echo "== done: $WORK/output.json"
