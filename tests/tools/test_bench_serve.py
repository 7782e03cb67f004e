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


def test_open_loop_sends_every_scheduled_request_and_replays_the_run(exported_samples, tmp_path, capsys):
    sample = exported_samples["qwen2"]
    first, again = tmp_path / "open.json", tmp_path / "replay.json"
    common = ["bench-serve", "--onnx-dir", str(sample.onnx_dir), "--lora-modules", f"a1={sample.processed['a1']}",
              f"a2={sample.processed['a2']}", "--adapters", "a1", "a2", "base", "--prompt-len", "5",
              "--max-tokens", "4", "--threads", "1", "--quiet"]
    code = main([*common, "--rates", "3,12", "--duration", "1.5", "--length-spread", "0.5", "--slo-ttft", "30",
                 "--json", str(first)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(first.read_text())
    assert [entry["rate"] for entry in report["rates"]] == [3.0, 12.0]
    for entry, schedule in zip(report["rates"], report["schedules"]):
        assert entry["offered"] == len(schedule["schedule"]) > 0
        assert entry["completed"] == entry["offered"] and entry["failed"] == 0 and entry["errors"] == {}
        assert entry["slo_share"] == 1.0 and entry["output_tokens_per_s"] > 0
        assert {request["adapter"] for request in schedule["schedule"]} <= {"a1", "a2", "base"}
    assert report["sustained_rate"] == 12.0
    assert "sustained: 12 requests/s" in capsys.readouterr().out
    assert main([*common, "--requests-file", str(first), "--json", str(again)]) == 0
    replay = json.loads(again.read_text())
    assert replay["schedules"] == report["schedules"], "the same arrivals, adapters and prompts"


def test_open_loop_refuses_an_adapter_the_server_does_not_serve(exported_samples, capsys):
    sample = exported_samples["qwen2"]
    code = main(["bench-serve", "--onnx-dir", str(sample.onnx_dir), "--lora-modules", f"a1={sample.processed['a1']}",
                 "--adapters", "a1", "nope", "--rates", "1", "--duration", "1", "--threads", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1


def test_open_loop_flags_are_checked_before_anything_starts(capsys):
    for flags, words in ((["--rates", "0"], "--rates"), (["--rates", "1", "--length-spread", "1.5"], "--length-spread"),
                         (["--rates", "1", "--adapter-field", "llama-lora", "--onnx-dir", "x"], "llama-lora"),
                         (["--rates", "1", "--compare-offline", "--onnx-dir", "x"], "--compare-offline")):
        assert main(["bench-serve", "--adapters", "base", "--url", "http://127.0.0.1:9", *flags, "--quiet"]
                    if "--onnx-dir" not in flags else ["bench-serve", "--adapters", "base", *flags, "--quiet"]) == 2
        assert words in capsys.readouterr().err


def test_open_loop_refuses_a_rate_that_sends_nothing(exported_samples, capsys):
    sample = exported_samples["qwen2"]
    code = main(["bench-serve", "--onnx-dir", str(sample.onnx_dir), "--adapters", "base", "--rates", "0.001",
                 "--duration", "1", "--threads", "1", "--quiet"])
    assert code == 2
    assert "--duration" in capsys.readouterr().err
