"""``edgelora bench-serve``: starts the server, drives it with the openai client, reports per concurrency."""

from __future__ import annotations

import json

from edgelora.cli import main


def test_bench_serve_measures_every_level_against_offline(exported_samples, tmp_path, capsys):
    sample = exported_samples["qwen2"]
    out = tmp_path / "serve.json"
    code = main(["bench-serve", "--onnx-dir", str(sample.onnx_dir), "--lora-modules",
                 f"a1={sample.processed['a1']}", f"a2={sample.processed['a2']}", "--adapters", "base", "a1", "a2",
                 "--concurrency", "1,3", "--requests", "6", "--prompt-len", "5", "--max-tokens", "4",
                 "--threads", "1", "--compare-offline", "--json", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["output_tokens"] == 6 * 4, "every streamed request generated max_tokens (ignore_eos)"
        assert level["output_tokens_per_s"] > 0 and level["request_throughput"] > 0
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"]
        assert 0 < level["itl_p50_ms"] <= level["itl_p99_ms"]
        assert level["mean_prefill_ms"] > 0
        assert 0 < level["decode_overhead_share"] < 1
        assert level["offline_output_tokens_per_s"] > 0
    assert "out tok/s" in capsys.readouterr().out


def test_bench_serve_needs_a_server_or_a_model(tmp_path, capsys):
    assert main(["bench-serve", "--adapters", "base", "--quiet"]) == 2
    assert "--url" in capsys.readouterr().err


def test_a_server_that_cannot_start_says_why(tmp_path):
    import pytest

    from edgelora.tools.serve_process import ServerStartError, running_server

    with pytest.raises(ServerStartError, match=r"exited with 2: .*no lora_model.onnx"), \
            running_server("--onnx-dir", str(tmp_path), timeout_s=60):
        pass
