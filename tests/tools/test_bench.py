"""edgelora bench on the tiny sample: every figure is produced and the JSON is complete (no speed asserts)."""

from __future__ import annotations

import json
import statistics

import pytest

from edgelora.cli import main


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


def test_bench_reports_every_configuration(qwen2, tmp_path, capsys, monkeypatch):
    from edgelora.runtime.scheduler import Scheduler

    measured = []  # (rows, decode_steps, decode_s, prefill_s) of every batch the scheduler really ran
    run = Scheduler.run_to_completion

    def spy(scheduler, requests, labels=None):
        results = run(scheduler, requests, labels)
        stats = scheduler.stats
        measured.append((len(requests), stats.decode_steps, stats.decode_s, stats.prefill_s))
        return results

    monkeypatch.setattr(Scheduler, "run_to_completion", spy)
    adapters = [str(qwen2.processed[name]) for name in ("a1", "a2", "a3")]
    out = tmp_path / "bench.json"
    code = main(["bench", "--onnx-dir", str(qwen2.onnx_dir), "--adapters", *adapters, "--batch", "1,3",
                 "--prompt-len", "5", "--max-tokens", "4", "--repeats", "1", "--contexts", "8,24",
                 "--context-batch", "2", "--context-steps", "3", "--threads", "1", "--json", str(out), "--quiet"])
    assert code == 0
    result = json.loads(out.read_text())
    # The reported figures are the engine's own: after one warm-up pass, one timed pass per configuration.
    timed = measured[len(result["configs"]):]
    assert len(timed) == len(result["configs"])
    expected = sorted(round(rows * steps / decode_s, 6) for rows, steps, decode_s, _ in timed)
    assert sorted(round(c["decode_tokens_per_s"], 6) for c in result["configs"]) == expected
    assert all(steps == 3 for _, steps, _, _ in timed), "4 tokens: 1 from the prefill, 3 decode steps"
    kinds = [(config["kind"], config["batch"]) for config in result["configs"]]
    assert kinds == [("base", 1), ("single", 1), ("base", 3), ("single", 3), ("mixed", 3)]
    mixed = result["configs"][-1]["adapters"]
    assert len({name for name in mixed}) == 3  # a different adapter on every row
    for config in result["configs"]:
        assert config["decode_tokens_per_s"] > 0 and config["prefill_ms"] > 0
        assert len(config["samples_decode_tokens_per_s"]) == 1
    assert result["switch"]["median_ms"] > 0 and result["cold_load"]["median_ms"] > 0
    assert [c["context"] for c in result["contexts"]] == [8, 24]
    assert result["memory"]["read_bandwidth_gb_s"] > 0
    assert set(result["ratios"]) == {"single/base b1", "single/base b3", "mixed/single b3",
                                     "base b1 / bandwidth bound", "ctx24/ctx8"}
    table = capsys.readouterr().out
    assert "switch to a cached adapter" in table and "ratio mixed/single b3" in table


def test_bench_runs_explicit_rows_on_a_prompt_file(qwen2, tmp_path):
    """--rows A,B,- and --prompt-file: the peers' workload; each row's greedy ids equal LLM.generate's."""
    from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams

    prompts = [[5, 9, 13, 2, 7], [11, 3, 8], [4, 4, 6, 10], [12, 1]]
    prompt_file = tmp_path / "workload.json"
    prompt_file.write_text(json.dumps({"prompts": prompts, "max_tokens": 4}))
    adapters = [str(qwen2.processed[name]) for name in ("a1", "a2", "a3")]
    out = tmp_path / "bench.json"
    code = main(["bench", "--onnx-dir", str(qwen2.onnx_dir), "--adapters", *adapters, "--rows", "-", "--rows", "a2",
                 "--rows", "a1,a2,a3,-", "--prompt-file", str(prompt_file), "--max-tokens", "4", "--repeats", "1",
                 "--contexts", "8", "--context-steps", "1", "--context-batch", "1", "--threads", "1",
                 "--json", str(out), "--quiet"])
    assert code == 0
    configs = json.loads(out.read_text())["configs"]
    assert [(c["kind"], c["adapters"]) for c in configs] == [
        ("base", [None]), ("single", ["a2"]), ("mixed", ["a1", "a2", "a3", None])]
    llm = LLM(qwen2.onnx_dir, LoraConfig(max_loras=3, max_cpu_loras=3), num_threads=1)
    requests = {name: LoRARequest(name, index + 1, adapters[index]) for index, name in enumerate(("a1", "a2", "a3"))}
    rows = configs[-1]["adapters"]
    want = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, min_tokens=4),
                        [requests[name] if name else None for name in rows])
    assert configs[-1]["tokens"] == [output.token_ids for output in want]
    base = llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0, min_tokens=4))
    assert configs[0]["tokens"] == [base[0].token_ids]


def test_bench_rejects_unknown_rows_and_bad_prompt_files(qwen2, tmp_path, capsys):
    adapter = str(qwen2.processed["a1"])
    for extra, message in ((["--rows", "a1,zz"], "no adapter folder named zz"),
                           (["--rows", "a1,,-"], "--rows a1,,-"),
                           (["--prompt-file", str(tmp_path / "missing.json")], "--prompt-file")):
        code = main(["bench", "--onnx-dir", str(qwen2.onnx_dir), "--adapters", adapter, *extra,
                     "--json", str(tmp_path / "b.json"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "b.json").exists()


def test_bench_rejects_missing_adapter(qwen2, tmp_path, capsys):
    code = main(["bench", "--onnx-dir", str(qwen2.onnx_dir), "--adapters", str(tmp_path / "nope"),
                 "--json", str(tmp_path / "b.json")])
    assert code == 2
    assert not (tmp_path / "b.json").exists()
    assert "nope" in capsys.readouterr().err


def test_long_context_peer_script_interleaves_engines(qwen2, capsys, monkeypatch):
    """benchmarks/long_context_peer.py: our decode and a stand-in peer whose step time grows with context."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "long_context_peer.py"
    spec = importlib.util.spec_from_file_location("long_context_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_peer(model_dir, threads):
        def run(batch, context, steps):
            calls.append(context)
            return [0.01 * (1 + context / 24)] * steps
        return run

    ours = {8: [], 24: []}  # what edgelora's real decode measured, per context
    real_time_decode = module.time_decode

    def recording(engine, adapters, context, steps):
        durations = real_time_decode(engine, adapters, context, steps)
        ours[context].append(len(adapters) / statistics.median(durations[1:]))
        return durations

    monkeypatch.setattr(module, "genai_decode", fake_peer)
    monkeypatch.setattr(module, "time_decode", recording)
    code = module.main(["--onnx-dir", str(qwen2.onnx_dir), "--genai-dir", "unused", "--contexts", "8,24",
                        "--batch", "2", "--steps", "3", "--rounds", "2", "--threads", "1"])
    assert code == 0
    assert calls == [8, 24, 8, 24], "rounds interleave the contexts"
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert [len(ours[8]), len(ours[24])] == [2, 2], "edgelora ran once per round and context"
    for column, context in ((1, 8), (2, 24)):
        assert float(rows["edgelora"][column]) == pytest.approx(statistics.median(ours[context]), abs=0.006)
    ratio = statistics.median(ours[24]) / statistics.median(ours[8])
    assert float(rows["edgelora"][3]) == pytest.approx(ratio, abs=0.0006)
    # 2 rows / (0.01 * (1 + c/24)) s: 150 tok/s at 8, 100 at 24, ratio 2/3
    assert rows["onnxruntime-genai"][1:] == ["150.00", "100.00", "0.667"]


def test_decode_timing_on_an_llms_engine_leaves_its_generation_right(qwen2):
    """time_decode opens KV rows of its own on the engine; the LLM's scheduler opens its rows again after."""
    from edgelora.entrypoints.api import LLM, SamplingParams
    from edgelora.tools.bench import time_decode

    llm = LLM(qwen2.onnx_dir, num_threads=1)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    before = llm.generate(["Hello", "Write a poem"], params)
    assert len(time_decode(llm.engine, [None], 16, 2)) == 2  # one row: too few for the next generate
    after = llm.generate(["Hello", "Write a poem"], params)
    assert [o.token_ids for o in after] == [o.token_ids for o in before]
