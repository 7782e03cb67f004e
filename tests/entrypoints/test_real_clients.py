"""Real clients against a real ``edgelora serve``: lm-evaluation-harness (its defaults: token-id prompts with
echo + logprobs, two prompts a request; and chat generation) and guidellm, each from its own venv.

The venvs are made once under ``build/client-venvs/`` (pinned versions, torch's CPU wheel) and kept: the
first run on a machine installs them (about a minute each on 2 cores), later runs reuse them. Tasks are
local JSONL files (no hub: datasets and the hub run offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from server_process import metric, running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / "build" / "client-venvs"
CLIENTS = {  # venv -> (its command, pinned packages): torch pinned first, or pip takes a multi-GB CUDA build
    "lm-eval": ("lm_eval", ["torch==2.13.0", "lm-eval[api]==0.4.13", "transformers"]),
    "guidellm": ("guidellm", ["torch==2.13.0", "guidellm==0.8.1"]),
}
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
SERVED = "tiny"

MC = [  # a multiple-choice task: loglikelihood of each choice after the question
    {"question": "The quick brown fox", "choices": [" jumps over the lazy dog.", " is a number.", " a poem."], "answer": 0},
    {"question": "What is the capital of France?", "choices": [" Paris.", " The sea and the wind.", " one two"],
     "answer": 0},
    {"question": "Translate to German:", "choices": [" good morning", " def add(a, b):", " refunds"], "answer": 0},
    {"question": "Numbers:", "choices": [" one two three", " Paris", " the lazy dog"], "answer": 0},
]
GEN = [{"question": "What is the capital of France?", "answer": "Paris"}, {"question": "Say hello.", "answer": "hello"}]


def _client(name: str) -> Path:
    """The client's command in its venv, installed on first use."""
    command, packages = CLIENTS[name]
    venv = VENVS / name
    executable = venv / "bin" / command
    if not executable.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True, timeout=1200)
    return executable


def _task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {data}\ntest_split: test\n" + textwrap.dedent(body))


@pytest.fixture(scope="module")
def sample(exported_samples):
    return exported_samples["qwen2"]


@pytest.fixture(scope="module")
def server(sample):
    with running_server("--onnx-dir", str(sample.onnx_dir), "--served-model-name", SERVED, "--threads", "1",
                        "--lora-modules", f"a1={sample.processed['a1']}") as (url, _):
        yield url


def _lm_eval(args: list[str], out: Path) -> dict:
    completed = subprocess.run([str(_client("lm-eval")), *args, "--output_path", str(out), "--log_samples"],
                               env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = sorted(out.rglob("results_*.json"))
    assert results, completed.stdout[-2000:]
    return json.loads(results[-1].read_text())


def test_lm_eval_multiple_choice_with_its_defaults(server, sample, tmp_path):
    """local-completions with tokenized_requests (token-id prompts, echo + logprobs) and batch_size 2 (two prompts
    in one request), on the base and on an adapter: a score, and loglikelihoods that are real numbers."""
    _task(tmp_path, "edgelora_mc", MC, '''\
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        ''')
    scores = {}
    for model in (SERVED, "a1"):
        before = metric(server, "edgelora_prompt_tokens_total")
        results = _lm_eval(["--model", "local-completions", "--model_args",
                            f"model={model},base_url={server}/v1/completions,tokenizer={sample.onnx_dir},"
                            "tokenizer_backend=huggingface,tokenized_requests=True", "--tasks", "edgelora_mc",
                            "--include_path", str(tmp_path), "--batch_size", "2"], tmp_path / f"out-{model}")
        scores[model] = results["results"]["edgelora_mc"]["acc,none"]
        assert 0 <= scores[model] <= 1
        assert metric(server, "edgelora_prompt_tokens_total") > before
        samples = [json.loads(line) for path in (tmp_path / f"out-{model}").rglob("samples_edgelora_mc_*.jsonl")
                   for line in path.read_text().splitlines()]
        assert len(samples) == len(MC)
        likelihoods = [float(response[0][0]) for row in samples for response in row["resps"]]  # logged as text
        assert len(likelihoods) == 3 * len(MC) and all(value < 0 for value in likelihoods)


def test_lm_eval_chat_generation(server, tmp_path):
    _task(tmp_path, "edgelora_gen", GEN, '''\
        output_type: generate_until
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        ''')
    results = _lm_eval(["--model", "local-chat-completions", "--model_args",
                        f"model={SERVED},base_url={server}/v1/chat/completions", "--tasks", "edgelora_gen",
                        "--include_path", str(tmp_path), "--apply_chat_template"], tmp_path / "out")
    assert 0 <= results["results"]["edgelora_gen"]["exact_match,none"] <= 1


def test_guidellm_completes_a_short_run(server, sample, tmp_path):
    """guidellm's own synthetic prompts (16 tokens in, 8 out) through its OpenAI HTTP backend: every request
    succeeds with the tokens it asked for."""
    out = tmp_path / "guidellm.json"
    completed = subprocess.run(
        [str(_client("guidellm")), "run", "--backend", f"kind=openai_http,target={server},model={SERVED}",
         "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=6",
         "--tokenizer", f"kind=hf_auto,model={sample.onnx_dir}",
         "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8", "--output", f"kind=json,path={out}",
         "--disable-console-interactive"],
        env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-2000:]
    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    assert benchmark["metrics"]["request_totals"] == {"successful": 6, "errored": 0, "incomplete": 0, "total": 6}
    assert benchmark["metrics"]["output_token_count"]["successful"]["mean"] == 8
