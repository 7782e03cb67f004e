"""The engine's guarantees: stale stage outputs refused, logits only where sampled, unused cache
positions never reach the logits, per-row length budgets, failures classified right."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgelora import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.cli import main
from edgelora.errors import RuntimeFailure, UserInputError
from edgelora.formats import contract
from edgelora.runtime.config import EngineConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.scheduler import GenerationRequest, Scheduler

PROMPTS = ["Hello", "Write a short poem about the sea.", "def add(a, b):"]


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


def _greedy(onnx_dir, processed, max_tokens=8) -> list[list[int]]:
    llm = LLM(onnx_dir, LoraConfig(max_loras=2, max_cpu_loras=2))
    requests = [LoRARequest("a2", 1, str(processed["a2"])), None, LoRARequest("a1", 2, str(processed["a1"]))]
    return [out.token_ids for out in llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0),
                                                  requests)]


# -- stale outputs of an earlier export ---------------------------------------------------------


def test_lora_model_of_another_export_is_refused(exported_samples, tmp_path, capsys):
    """lora_model.onnx + manifest of the llama export beside the qwen2 export: one line naming insert-lora."""
    qwen2, llama = exported_samples["qwen2"], exported_samples["llama"]
    folder = tmp_path / "mixed"
    shutil.copytree(qwen2.onnx_dir, folder)
    for name in (contract.LORA_MODEL_ONNX, contract.LORA_MANIFEST):
        shutil.copy(llama.onnx_dir / name, folder / name)
    with pytest.raises(UserInputError, match="re-run 'edgelora insert-lora --onnx-dir"):
        Engine(folder)
    input_file = tmp_path / "in.json"
    input_file.write_text('{"temperature": 0, "requests": [{"messages": [{"role": "user", "content": "hi"}]}]}')
    code = main(["infer", "--onnx-dir", str(folder), "--input-file", str(input_file),
                 "--output-file", str(tmp_path / "out.json"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "insert-lora" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.json").exists()


def test_changed_weights_of_the_same_size_are_refused(qwen2, tmp_path):
    """Same file sizes, other weights: a silent run on garbage without the fingerprint."""
    folder = tmp_path / "reweighted"
    shutil.copytree(qwen2.onnx_dir, folder)
    data = bytearray((folder / contract.MODEL_ONNX_DATA).read_bytes())
    data[: 1 << 16] = bytes(1 << 16)
    (folder / contract.MODEL_ONNX_DATA).write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="earlier export"):
        Engine(folder)


def test_manifest_of_another_insert_lora_run_is_refused(exported_samples, tmp_path):
    qwen2, llama = exported_samples["qwen2"], exported_samples["llama"]
    folder = tmp_path / "halves"
    shutil.copytree(qwen2.onnx_dir, folder)
    shutil.copy(llama.onnx_dir / contract.LORA_MODEL_ONNX, folder / contract.LORA_MODEL_ONNX)
    with pytest.raises(UserInputError, match="different insert-lora runs"):
        Engine(folder)


def test_export_removes_later_stages_files(qwen2, tmp_path):
    from edgelora.export import ExportOptions, export_model

    folder = tmp_path / "again"
    shutil.copytree(qwen2.onnx_dir, folder)
    export_model(qwen2.model_dir, folder, ExportOptions(progress=False))
    assert not (folder / contract.LORA_MODEL_ONNX).exists() and not (folder / contract.LORA_MANIFEST).exists()
    assert (folder / "lora_weights").is_dir(), "processed adapters are tied to shapes only and stay"
    with pytest.raises(UserInputError, match="insert-lora"):
        Engine(folder)


# -- logits only at the sampled positions ---------------------------------------------------------


def test_runtime_binds_logits_of_the_kept_positions_only(qwen2, monkeypatch):
    import onnxruntime as ort

    shapes = []
    original = ort.IOBinding.bind_ortvalue_output

    def spy(binding, name, value):
        if name == contract.LOGITS:
            shapes.append(tuple(value.shape()))
        return original(binding, name, value)

    monkeypatch.setattr(ort.IOBinding, "bind_ortvalue_output", spy)
    _greedy(qwen2.onnx_dir, qwen2.processed, max_tokens=3)
    assert shapes and all(shape == (3, 1, qwen2.spec.vocab_size) for shape in shapes), shapes


# -- unused cache positions ---------------------------------------------------------------------


def test_nan_in_unused_cache_positions_never_reaches_the_logits(qwen2, monkeypatch):
    from edgelora.runtime import kv_cache

    clean = _greedy(qwen2.onnx_dir, qwen2.processed)
    original_init = kv_cache.KVCache.__init__

    def poisoned_init(cache, *args, **kwargs):
        original_init(cache, *args, **kwargs)
        for buffer in cache._host:
            buffer[...] = np.nan  # what a reused row or an uninitialised device buffer may hold

    monkeypatch.setattr(kv_cache.KVCache, "__init__", poisoned_init)
    llm = LLM(qwen2.onnx_dir, LoraConfig(max_loras=2, max_cpu_loras=2))
    llm.scheduler.config.kv_cache_initial_len = 1  # grown positions (zeros by construction) get used, too
    requests = [LoRARequest("a2", 1, str(qwen2.processed["a2"])), None,
                LoRARequest("a1", 2, str(qwen2.processed["a1"]))]
    poisoned = [out.token_ids for out in llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0), requests)]
    assert poisoned == clean


def test_clear_rows_zeroes_only_those_rows(qwen2):
    from edgelora.runtime.kv_cache import KVCache
    from edgelora.runtime.session import Device

    cache = KVCache(qwen2.spec, 3, max_len=8, device=Device("cpu"))
    for buffer in cache.host_buffers():
        buffer[...] = np.nan
    cache.clear_rows([0, 2])
    for buffer in cache.host_buffers():
        assert (buffer[[0, 2]] == 0).all() and np.isnan(buffer[1]).all()


# -- lengths --------------------------------------------------------------------------------------


def test_each_row_is_budgeted_with_its_own_prompt(qwen2):
    """A long prompt with a short budget and a short prompt with a long one share a batch."""
    engine = Engine(qwen2.onnx_dir, EngineConfig(max_loras=1, max_cpu_loras=1))
    engine.spec.max_position_embeddings = 64
    scheduler = Scheduler(engine)
    rng = np.random.default_rng(0)
    rows = [GenerationRequest(rng.integers(0, 100, 10).tolist(), None,
                              SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)),
            GenerationRequest(rng.integers(0, 100, 40).tolist(), None,
                              SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))]
    results = scheduler.run_to_completion(rows, ["row 0", "row 1"])
    assert [len(r.output_ids) for r in results] == [50, 2]
    with pytest.raises(UserInputError, match="row 1: prompt \\(40 tokens\\) \\+ max tokens \\(30\\) exceeds the 64"):
        scheduler.run_to_completion([rows[0], GenerationRequest(rows[1].prompt_ids, None, SamplingParams(max_tokens=30))],
                                    ["row 0", "row 1"])
    assert not scheduler.has_unfinished_requests(), "a refused call queues nothing"


def test_api_names_the_over_long_prompt(qwen2):
    llm = LLM(qwen2.onnx_dir)
    limit = qwen2.spec.max_position_embeddings
    with pytest.raises(UserInputError, match="prompt 1: prompt"):
        llm.generate(["Hello", "Hello"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=limit)])


# -- failures that are not the user's ---------------------------------------------------------------


def test_onnx_runtime_failure_during_a_run_is_not_a_user_error(qwen2, tmp_path, capsys, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    def fail(session, binding):
        raise RuntimeException("Failed to allocate memory for requested buffer of size 123456789")

    monkeypatch.setattr("onnxruntime.InferenceSession.run_with_iobinding", fail)
    with pytest.raises(RuntimeFailure, match="ONNX Runtime failed during a model step"):
        _greedy(qwen2.onnx_dir, qwen2.processed, max_tokens=2)
    input_file = tmp_path / "in.json"
    input_file.write_text('{"temperature": 0, "requests": [{"messages": [{"role": "user", "content": "hi"}]}]}')
    code = main(["infer", "--onnx-dir", str(qwen2.onnx_dir), "--input-file", str(input_file),
                 "--output-file", str(tmp_path / "out.json"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "ONNX Runtime failed" in err and "not an input problem" in err and "internal error" not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out.json").exists()


def test_unloadable_graph_is_a_user_error(qwen2, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(qwen2.onnx_dir, folder)
    (folder / contract.LORA_MODEL_ONNX).write_bytes(b"not a model")
    with pytest.raises(UserInputError, match="ONNX Runtime cannot load it"):
        Engine(folder)


def test_cuda_tests_skip_without_a_cuda_build(monkeypatch):
    """conftest's gate: a CUDA provider alone is not enough, the runtime must be built with CUDA."""
    import conftest
    import onnxruntime as ort

    from edgelora.runtime import native

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(native, "with_cuda", lambda: False)
    assert conftest.cuda_available() is False
    monkeypatch.setattr(native, "with_cuda", lambda: True)
    assert conftest.cuda_available() is True
