"""The component benchmarks run end to end on the tiny sample and write the figures they print
(no speed asserts: figures come from benchmark runs, never from tests)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


def test_prefill_logits_compares_every_and_last_position(qwen2, tmp_path):
    out = tmp_path / "prefill.json"
    assert _script("prefill_logits").main(["--onnx-dir", str(qwen2.onnx_dir), "--batch", "2", "--prompt-len", "6",
                                           "--repeats", "1", "--rounds", "1", "--threads", "1", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    vocab = qwen2.spec.vocab_size
    assert summary["every"]["logits_bytes"] == 2 * 6 * vocab * 4 and summary["last"]["logits_bytes"] == 2 * vocab * 4
    assert summary["every"]["prefill_ms"] > 0 and summary["last"]["peak_rss_bytes"] > 0


def test_cold_adapter_load_times_first_second_and_reload(qwen2, tmp_path):
    out = tmp_path / "cold.json"
    adapters = [str(qwen2.processed[name]) for name in ("a1", "a2")]
    assert _script("cold_adapter_load").main(["--onnx-dir", str(qwen2.onnx_dir), "--adapters", *adapters,
                                              "--trials", "1", "--threads", "1", "--json", str(out)]) == 0
    medians = json.loads(out.read_text())["median_ms"]
    assert set(medians) == {"register", "first", "second", "reload", "touch_fresh_slot_bytes"}
    assert all(value > 0 for value in medians.values())


def test_sampler_cost_reports_every_setting(tmp_path):
    out = tmp_path / "sampler.json"
    assert _script("sampler_cost").main(["--vocab", "4096", "--steps", "2", "--rounds", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())


def test_quant_quality_compares_quantized_logits_with_float(qwen2, tmp_path):
    from edgelora.graph.quantize import QuantizeOptions, quantize_export

    int8 = tmp_path / "q8"
    quantize_export(qwen2.onnx_dir, int8, QuantizeOptions(mode="int8"))
    out = tmp_path / "quality.json"
    assert _script("quant_quality").main(["--float-dir", str(qwen2.onnx_dir), "--quantized-dir", str(int8),
                                          str(qwen2.onnx_dir), "--tokens", "40", "--json", str(out)]) == 0
    quantized, itself = json.loads(out.read_text())
    assert quantized["quantization"].startswith("int8") and 0 < quantized["mean_abs"] < quantized["max_abs"]
    assert itself["max_abs"] == 0 and itself["top1_agreement"] == 1.0, "the float model against itself"


def test_long_prompt_stall_reports_gaps_per_budget(qwen2, tmp_path):
    out = tmp_path / "stall.json"
    adapters = [str(qwen2.processed[name]) for name in ("a1", "a2")]
    assert _script("long_prompt_stall").main(["--onnx-dir", str(qwen2.onnx_dir), "--adapters", *adapters,
                                              "--prompt-len", "40", "--budgets", "0,16", "--rounds", "1",
                                              "--context", "32", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["none"]["chunk_steps"] == 0 and result["summary"]["16"]["chunk_steps"] == 3
    assert set(result["step_shapes_ms"]) == {"decode", "chunk", "decode_with_chunk"}


def test_serve_stall_measures_a_real_server(qwen2, tmp_path):
    out = tmp_path / "serve_stall.json"
    adapters = [str(qwen2.processed[name]) for name in ("a1", "a2")]
    assert _script("serve_stall").main(["--onnx-dir", str(qwen2.onnx_dir), "--adapters", *adapters,
                                        "--prompt-tokens", "60", "--stream-tokens", "40", "--json", str(out),
                                        "--", "--max-num-batched-tokens", "16"]) == 0
    result = json.loads(out.read_text())
    assert result["prompt_tokens"] >= 60 and result["ttft_s"] > 0 and result["longest_stream_gap_s"] > 0


def test_attention_forms_times_each_form(tmp_path):
    out = tmp_path / "forms.json"
    assert _script("attention_forms").main(["--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--threads", "1",
                                            "--repeats", "1", "--cases", "1:4:3:16,2:1:5:8,2:3:2:8",
                                            "--json", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [case["ms"]["gqa"] is None for case in cases] == [False, False, True]  # GQA refuses the third
    assert all(case["ms"]["decode"] > 0 and case["ms"]["several"] > 0 for case in cases)


def test_decode_ab_alternates_exports(qwen2, tmp_path):
    out = tmp_path / "ab.json"
    folder = str(qwen2.onnx_dir)
    assert _script("decode_ab").main(["--onnx-dirs", f"{folder},{folder}", "--adapter", f"a1={qwen2.processed['a1']}",
                                      "--config=-:4", "--config", "a1,-:8", "--steps", "4", "--block", "2",
                                      "--skip", "1", "--threads", "1", "--json", str(out)]) == 0
    configs = json.loads(out.read_text())["configs"]
    assert [(config["rows"], config["context"]) for config in configs] == [("-", 4), ("a1,-", 8)]
    assert all(len(config["median_ms"]) == 2 and min(config["median_ms"]) > 0 for config in configs)


def test_step_profile_splits_decode_and_prefill_time(qwen2, tmp_path):
    out = tmp_path / "profile.json"
    adapter = f"a1={qwen2.processed['a1']}"
    assert _script("step_profile").main(["--onnx-dir", str(qwen2.onnx_dir), "--adapter", adapter, "--rows", "a1,-",
                                         "--context", "4", "--steps", "2", "--threads", "1", "--json", str(out)]) == 0
    decode = json.loads(out.read_text())
    assert decode["steps"] == 2 and decode["nodes_per_step"] > 0 and decode["by_group_ms_per_step"]["lora"] > 0
    assert _script("step_profile").main(["--onnx-dir", str(qwen2.onnx_dir), "--prefill", "--prompt-len", "9",
                                         "--chunk", "4", "--threads", "1", "--json", str(out)]) == 0
    prefill = json.loads(out.read_text())
    assert prefill["steps"] == 3 and prefill["by_group_ms_per_step"]["attention"] > 0


def test_compare_names_every_missing_piece_before_it_runs(qwen2, tmp_path, capsys):
    """Nothing is measured when a piece is missing: each is one line, and the exit is 2 (no work dir made)."""
    a1, a2 = qwen2.adapters["a1"], qwen2.adapters["a2"]
    work = tmp_path / "work"
    common = ["--hf-dir", str(qwen2.model_dir), "--onnx-dir", str(qwen2.onnx_dir), "--adapter", f"A={a1}",
              "--adapter", f"B={a2}", "--work-dir", str(work), "--out-dir", str(tmp_path / "out"),
              "--genai-python", str(tmp_path / "no-venv" / "python"), "--llama-dir", str(tmp_path / "no-llama")]
    assert _script("compare").main([*common, "--adapter", f"C={tmp_path / 'missing'}"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any("--adapter C=" in line and "not a PEFT folder" in line for line in lines)
    assert any("onnxruntime-genai: no working python" in line for line in lines)
    assert any("llama.cpp: no" in line and "build_llama_cpp.sh" in line for line in lines)
    assert not work.exists()
    # --skip-missing leaves the peers out, but a piece every engine needs still stops the run.
    assert _script("compare").main([*common, "--adapter", f"C={tmp_path / 'missing'}", "--skip-missing"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "missing:" in line] == [line for line in lines if "--adapter C=" in line]


def _compare_args(qwen2, tmp_path, *extra: str) -> list[str]:
    a1, a2, a3 = (qwen2.adapters[name] for name in ("a1", "a2", "a3"))
    return ["--hf-dir", str(qwen2.model_dir), "--onnx-dir", str(qwen2.onnx_dir), "--adapter", f"A={a1}",
            "--adapter", f"B={a2}", "--adapter", f"C={a3}", "--prompt-len", "6", "--max-tokens", "4",
            "--prefill-lens", "9", "--threads", "1", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(tmp_path / "out"), "--name", "run", *extra]


def test_compare_interleaves_long_lived_engines_round_by_round(qwen2, tmp_path, monkeypatch, capsys):
    """Real runners (edgelora float32 and PEFT) stay up; each runs once per round, the order rotating, and every
    round's rates, bandwidth probe, ids and versions reach the report."""
    compare = _script("compare")
    monkeypatch.setattr(compare, "_memory_probe", lambda *args: {})
    assert compare.main(_compare_args(qwen2, tmp_path, "--engines", "float32,peft", "--rounds", "3")) == 0
    order = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("round ")]
    assert order == ["float32", "peft", "peft", "float32", "float32", "peft"]
    data = json.loads((tmp_path / "out" / "run.json").read_text())
    for key in ("float32", "peft"):
        run = data["runs"][key]
        assert run["skipped"] is None and len(run["bandwidth_gb_s"]) == 3 and run["version"]
        assert all(len(run["columns"][name]["tokens_per_s"]) == 3 for name, _ in compare.FIXED_COLUMNS)
        assert len(run["columns"]["prefill 9"]["tokens_per_s"]) == 3
    assert data["runs"]["float32"]["columns"]["b4 A,B,C,base"]["tokens"] == \
        data["runs"]["peft"]["columns"]["b4 A,B,C,base"]["tokens"]
    report = (tmp_path / "out" / "run.md").read_text()
    assert "Prompt speed" in report and "Mixed batch vs groups in turn" in report and "peft: 18/18 rows (median 4 leading ids shared)" in report


def test_compare_keeps_the_rounds_measured_when_an_engine_dies(qwen2, tmp_path, monkeypatch):
    """An engine that dies mid-run is reported as such; the others' rounds and its own earlier rounds stay."""
    compare = _script("compare")
    monkeypatch.setattr(compare, "_memory_probe", lambda *args: {})
    real = compare._commands

    def with_a_dying_peer(args, folders, workload_path):
        commands = real(args, folders, workload_path)
        script = ("import json, sys\nprint('@ready', flush=True)\nsys.stdin.readline()\n"
                  "print('@round 0 ' + json.dumps({'b1 base': 5.0}), flush=True)\nsys.stdin.readline()\n"
                  "sys.exit('dies in round 2')")
        commands["peft"] = [sys.executable, "-c", script]
        return commands

    monkeypatch.setattr(compare, "_commands", with_a_dying_peer)
    assert compare.main(_compare_args(qwen2, tmp_path, "--engines", "float32,peft", "--rounds", "2")) == 0
    data = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "dies in round 2" in data["runs"]["peft"]["skipped"]
    assert data["runs"]["peft"]["columns"]["b1 base"]["tokens_per_s"] == [5.0]
    assert len(data["runs"]["float32"]["columns"]["b1 base"]["tokens_per_s"]) == 2


def test_compare_writes_what_it_has_when_interrupted(qwen2, tmp_path, monkeypatch):
    compare = _script("compare")

    def interrupted(workers, rounds, threads):
        workers[0].run.add_round({"b1 base": 10.0})
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "_interleave", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare.main(_compare_args(qwen2, tmp_path, "--engines", "float32"))
    assert "| edgelora float32 | 10.0 (10.0–10.0) |" in (tmp_path / "out" / "run-partial.md").read_text()
    assert json.loads((tmp_path / "out" / "run-partial.json").read_text())["runs"]["float32"]["columns"]


def test_serve_compare_names_missing_pieces_before_it_starts_a_server(qwen2, tmp_path, capsys):
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "x1").symlink_to(qwen2.adapters["a1"])
    code = _script("serve_compare").main([
        "--onnx-dir", str(qwen2.onnx_dir), "--hf-dir", str(qwen2.model_dir), "--adapters-dir", str(peft),
        "--count", "2", "--llama-dir", str(tmp_path / "no-llama"), "--vllm-python", str(tmp_path / "no-python"),
        "--work-dir", str(tmp_path / "work")])
    assert code == 2
    err = capsys.readouterr().err
    assert "1 PEFT folders, --count 2" in err and "llama.cpp:" in err and "vLLM: no python" in err
    assert not (tmp_path / "work").exists()


def _peer_module(name: str):
    sys.path.insert(0, str(BENCHMARKS / "peers"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_peer_workload_reads_prompt_speed_columns_and_keeps_base_columns_for_a_plain_model(tmp_path):
    peer_input = _peer_module("peer_input")
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"prompts": [[1, 2], [3, 4]], "max_tokens": 4,
                                "columns": [{"name": "b1 base", "rows": [None]}, {"name": "b2 A", "rows": ["A", "A"]}],
                                "prefill": [{"name": "prefill 3", "prompt": [5, 6, 7]}]}))
    workload = peer_input.load_workload(path, {"A"}, 10)
    assert [c.name for c in workload.columns] == ["b1 base", "b2 A"] and workload.longest_prefill == 3
    assert peer_input.column_names(workload) == ["b1 base", "b2 A", "prefill 3"]
    plain = peer_input.load_workload(path, set(), 10, base_only=True)
    assert [c.name for c in plain.columns] == ["b1 base"]
    with pytest.raises(peer_input.InputError, match="prefill"):
        peer_input.load_workload(path, {"A"}, 6)  # token id 7 is outside a vocabulary of 6


def test_a_driven_runner_announces_readiness_and_each_round_with_its_rates(monkeypatch, capsys):
    import io

    peer_input = _peer_module("peer_input")
    samples = peer_input.Samples(["b1 base"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("round\nround\ndone\nround\n"))
    for index in peer_input.rounds_to_run(99, True, samples):
        samples.add("b1 base", 10.0 + index, [[index]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["@ready", '@round 0 {"b1 base": 10.0}', '@round 1 {"b1 base": 11.0}']
    assert samples.notes() == ["greedy tokens differed between rounds in: ['b1 base']"]
    assert list(peer_input.rounds_to_run(2, False, samples)) == [0, 1]


def test_llama_groups_in_turn_count_every_further_groups_prefill():
    llama = _peer_module("llama_cpp")
    row = llama.RowResult([1, 2], prompt_ms=1000.0, predicted_ms=2000.0, predicted_n=2)
    # Two groups answered at t=10 and t=13: prefills [7, 8] and [10, 11], decodes [8, 10] and [11, 13].
    first, second = (llama.prefill_intervals(t, [row]) for t in (10.0, 13.0))
    assert first == (7.0, 8.0) and second == (10.0, 11.0)
    decodes = llama.decode_intervals(10.0, [row]) + llama.decode_intervals(13.0, [row])
    assert llama.union_length(decodes) == 4.0 and llama.union_length(decodes + [second]) == 5.0
    workload = llama.Workload(((1,),), 4, (llama.Column("b1 B", ("B",)), llama.Column("b2 A,B", ("A", "B"))))
    assert llama.merged_workload(workload, "B").columns == (llama.Column("b1 B", (None,)),)
    with pytest.raises(llama.InputError, match="--merged A"):
        llama.merged_workload(workload, "A")


def test_host_memory_reports_resident_bytes_per_host_ready_adapter(qwen2, tmp_path):
    out = tmp_path / "host.json"
    folder = qwen2.processed["a1"].parent
    assert _script("host_memory").main(["--onnx-dir", str(qwen2.onnx_dir), "--adapters-dir", str(folder),
                                        "--count", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert len(figures["rss_mb"]) == 3 and figures["file_mb"] > 0 and figures["host_copy_mb"] > 0
    assert _script("host_memory").main(["--onnx-dir", str(qwen2.onnx_dir), "--adapters-dir", str(folder),
                                        "--count", "999"]) == 2


def test_many_adapters_serves_a_large_root_on_demand_as_infer_answers(tmp_path):
    """A small run of the 10,000-adapter benchmark: builds its own sample, both roots, every answer compared."""
    out = tmp_path / "many.json"
    assert _script("many_adapters").main(["--work-dir", str(tmp_path / "work"), "--count", "12", "--baseline", "2",
                                          "--serve", "6", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["answers_equal"] == 6 and figures["online"]["on_demand_loads"] == 6
    assert figures["online"]["listed"] == 13 and set(figures["online"]["escape_status"].values()) == {404}
    assert figures["startup_s"]["large"] > 0 and figures["rss_ready_mb"]["baseline"] > 0


def test_slot_pressure_compares_many_adapters_over_few_slots_with_few(qwen2, tmp_path):
    folder = tmp_path / "adapters"
    for index, name in enumerate(("a1", "a2", "a3"), start=1):
        shutil.copytree(qwen2.processed[name], folder / f"d{index}")
    out = tmp_path / "slots.json"
    assert _script("slot_pressure").main([
        "--onnx-dir", str(qwen2.onnx_dir), "--adapters-dir", str(folder), "--slots", "1", "--few", "1", "--many", "3",
        "--rate", "6", "--duration", "1.5", "--repeats", "2", "--prompt-len", "8", "--max-tokens", "4",
        "--max-num-seqs", "2", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert len(figures["runs"]["few"]) == len(figures["runs"]["many"]) == 2
    assert figures["runs"]["many"][0]["distinct_adapters"] > 1 and figures["runs"]["few"][0]["distinct_adapters"] == 1
    assert len(figures["ttft_p99_ratio_per_round"]) == 2 and figures["many_over_few"]["ttft_p99_ms"] > 0


def test_prefix_cache_benchmark_times_first_and_second_request_and_an_open_loop(qwen2, tmp_path):
    out = tmp_path / "prefix.json"
    assert _script("prefix_cache").main([
        "--onnx-dir", str(qwen2.onnx_dir), "--adapter", f"a1={qwen2.processed['a1']}", "--prefix-len", "100",
        "--repeats", "1", "--rate", "4", "--duration", "1", "--rounds", "1", "--prompt-len", "8", "--max-tokens", "4",
        "--threads", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["answers_equal"] and set(figures["second_over_first"]) == {"on", "off"}
    assert set(figures["open_loop"]["median"]) == {"on", "off"}


def test_grammar_cost_times_steps_with_and_without_masks(qwen2, tmp_path):
    out = tmp_path / "grammar.json"
    assert _script("grammar_cost").main(["--onnx-dir", str(qwen2.onnx_dir), "--batch", "4", "--max-tokens", "6",
                                         "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["constrained_rows"] == 2 and figures["mask_us_per_row"] > 0
    assert figures["steps"]["none"] == figures["steps"]["half"] > 0


def test_gpu_check_runs_every_check_on_the_host_pool_and_skips_cleanly_without_a_gpu(tmp_path, monkeypatch):
    script = _script("gpu_check")
    out = tmp_path / "cpu.json"
    assert script.main(["--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "passed" and len(report["checks"]) == 8
    assert report["checks"]["copy_into_slot"]["gb_per_s"] > 0

    def no_cupy(*_args, **_kwargs):
        raise script.Skip("CuPy is not installed (it reads the pool's device memory)")

    monkeypatch.setattr(script, "CudaReader", no_cupy)
    skipped = tmp_path / "cuda.json"
    assert script.main(["--json", str(skipped)]) == 0
    assert json.loads(skipped.read_text())["status"] == "skipped"
    assert script.main(["--json", str(skipped), "--require-gpu"]) == 2


def test_gpu_check_fails_when_a_slot_holds_the_wrong_bytes(tmp_path, monkeypatch):
    """The checks compare with independently made expectations: a pool that pads badly is caught."""
    script = _script("gpu_check")
    monkeypatch.setattr(script, "padded", lambda array, capacity: np.ones((capacity, array.shape[1]), array.dtype))
    out = tmp_path / "bad.json"
    assert script.main(["--device", "cpu", "--json", str(out)]) == 1
    checks = json.loads(out.read_text())["checks"]
    assert not checks["slots_hold_their_adapter_padded_with_zeros_after_growth"]["ok"]
