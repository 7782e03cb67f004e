#!/usr/bin/env bash
# The whole pipeline on the built-in sample, nothing fetched from a hub:
#   make a tiny Qwen2 model + tokenizer + three PEFT adapters -> export -> insert-lora
#   -> process-lora (x3) -> merge-lora (one adapter) -> infer one batch mixing a1, a2, a3 and base rows
#   -> serve: the same model behind the OpenAI API, queried with the official client (base and adapters).
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
echo "== 7. serve: OpenAI-compatible server on a free loopback port, queried with the openai client"
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PYTHON" -m edgelora serve --onnx-dir "$WORK/onnx" --served-model-name demo --port "$PORT" --threads 2 \
  --lora-modules a1="$WORK/onnx/lora_weights/a1" a2="$WORK/onnx/lora_weights/a2" a3="$WORK/sample/adapters/a3" \
  > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
"$PYTHON" - "$PORT" <<'PY'
import sys, time
import httpx
from openai import OpenAI
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):
    try:
        if httpx.get(f"{url}/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.5)
else:
    sys.exit("the server did not start; see serve.log")
client = OpenAI(base_url=f"{url}/v1", api_key="none")
print("models:", [m.id for m in client.models.list().data])
chat = [{"role": "user", "content": "Tell me about the sea."}]
for model in ("demo", "a1", "demo:a2", "a3"):
    reply = client.chat.completions.create(model=model, messages=chat, max_tokens=12, temperature=0)
    print(f"{model:8} {reply.choices[0].finish_reason:6} {reply.usage.completion_tokens:3} tokens: "
          f"{reply.choices[0].message.content[:60]!r}")
stream = client.chat.completions.create(model="a1", messages=chat, max_tokens=12, temperature=0, stream=True)
print("a1 streamed:", repr("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)[:60]))
PY
kill -TERM $SERVER && wait $SERVER && echo "server stopped (SIGTERM, exit 0)"
trap - EXIT
echo "== done: $WORK/output.json, $WORK/serve.log"
