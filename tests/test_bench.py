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

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "long_context_peer.py"
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
