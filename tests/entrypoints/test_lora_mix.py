"""Rows that mix adapters with weights equal the base model with W + Σ wᵢ·(adapter i's merged delta).

The reference merges each adapter on its own with PEFT's ``merge_and_unload`` and adds the weighted
deltas to the base weights in float32; greedy ids must be identical, alone and inside a batch
that also holds single-adapter and base rows.
"""

from __future__ import annotations

import json

import pytest

from edgelora import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.cli import main
from edgelora.errors import UserInputError

MAX_NEW = 8
PROMPT = "Write a short poem about the sea."
MIXES = [{"a1": 0.5, "a2": 0.5}, {"a1": 1.0, "a3": -1.0}]


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _merged_reference(exported, mix: dict[str, float], prompt: list[int]) -> list[int]:
    """Greedy ids of the base model whose weights are W + Σ w·(merged(W, adapter) - W), float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(exported.model_dir, dtype=torch.float32).eval()

    base = load()
    weights = {name: value.clone() for name, value in base.state_dict().items()}
    for name, weight in mix.items():
        merged = PeftModel.from_pretrained(load(), str(exported.adapters[name])).merge_and_unload().state_dict()
        for key, value in merged.items():
            weights[key] += weight * (value - base.state_dict()[key])
    base.load_state_dict(weights)
    with torch.no_grad():
        out = base.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt):].tolist()
    eos = set(exported.spec.eos_token_ids)
    cut = next((i + 1 for i, token in enumerate(out) if token in eos), len(out))
    return out[:cut]


@pytest.fixture(scope="module")
def llm(exported):
    return LLM(exported.onnx_dir, LoraConfig(max_lora_rank=64, max_loras=3,
                                              lora_dir=[str(exported.processed[n]) for n in ("a1", "a2", "a3")]))


def _greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, temperature=0)


@pytest.mark.parametrize("mix", MIXES, ids=["half-half", "plus-minus"])
def test_a_mix_equals_the_weighted_sum_of_merged_deltas(exported, llm, mix):
    """Alone, then in a batch beside a single-adapter row, a base row and the other mix."""
    alone = llm.generate([_messages(PROMPT)], _greedy(), lora_mix=mix)[0]
    assert alone.token_ids == _merged_reference(exported, mix, alone.prompt_token_ids)
    assert alone.lora_mix == mix
    other = next(m for m in MIXES if m != mix)
    ids = {"a1": 1, "a2": 2, "a3": 3}
    batch = llm.generate([_messages(PROMPT)] * 4, _greedy(),
                         lora_request=[None, LoRARequest("a2", ids["a2"], str(exported.processed["a2"])), None, None],
                         lora_mix=[mix, None, None, other])
    assert batch[0].token_ids == alone.token_ids
    assert batch[1].token_ids == llm.generate([_messages(PROMPT)], _greedy(), lora_request=LoRARequest(
        "a2", ids["a2"], str(exported.processed["a2"])))[0].token_ids
    assert batch[2].token_ids == llm.generate([_messages(PROMPT)], _greedy())[0].token_ids
    assert batch[3].token_ids == llm.generate([_messages(PROMPT)], _greedy(), lora_mix=other)[0].token_ids


def test_a_mix_of_one_adapter_at_weight_one_is_that_adapter(exported, llm):
    single = llm.generate([_messages(PROMPT)], _greedy(),
                          lora_request=LoRARequest("a2", 2, str(exported.processed["a2"])))[0]
    mixed = llm.generate([_messages(PROMPT)], _greedy(), lora_mix={"a2": 1.0})[0]
    assert mixed.token_ids == single.token_ids


@pytest.mark.parametrize("mix, fragment", [
    ({}, "lora_mix is empty"),
    ({"a1": float("nan")}, "finite number"),
    ({"a1": float("inf")}, "finite number"),
    ({"a1": "0.5"}, "finite number"),
    ([("a1", 0.5), ("a1", 0.5)], "names 'a1' twice"),
    ({"a1": 1, "a2": 1, "a3": 1, "zz": 1}, "at most 3"),
    ({"zz": 1.0}, "unknown adapter 'zz' in lora_mix"),
])
def test_bad_mixes_are_refused_naming_the_problem(llm, mix, fragment):
    with pytest.raises(UserInputError, match="prompt 0.*" + fragment.replace("(", r"\(")):
        llm.generate([_messages(PROMPT)], _greedy(), lora_mix=[mix])  # one mix per prompt


def test_a_mix_and_an_adapter_together_are_refused(exported, llm):
    with pytest.raises(UserInputError, match="not both"):
        llm.generate([_messages(PROMPT)], _greedy(), lora_request=LoRARequest("a1", 1, str(exported.processed["a1"])),
                     lora_mix={"a2": 1.0})


def _infer(exported, tmp_path, requests: list[dict]) -> tuple[int, dict | None]:
    adapters = {name: str(exported.processed[name]) for name in ("a1", "a2", "a3")}
    source = tmp_path / "input.json"
    source.write_text(json.dumps({"available_lora_weights": adapters, "max_generate_length": MAX_NEW,
                                  "temperature": 0, "top_k": 1, "requests": requests}))
    output = tmp_path / "output.json"
    code = main(["infer", "--quiet", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(source),
                 "--output-file", str(output)])
    return code, json.loads(output.read_text()) if output.is_file() else None


def test_infer_rows_take_a_lora_mix(exported, llm, tmp_path):
    code, written = _infer(exported, tmp_path, [{"messages": _messages(PROMPT), "lora_mix": MIXES[1]},
                                                {"messages": _messages(PROMPT), "lora_name": "a2"}])
    assert code == 0
    first = written["responses"][0]
    assert first["lora_mix"] == MIXES[1] and first["lora_name"] is None
    assert first["output_ids"] == llm.generate([_messages(PROMPT)], _greedy(), lora_mix=MIXES[1])[0].token_ids


def test_infer_refuses_a_repeated_member_with_exit_2(exported, tmp_path, capsys):
    body = {"available_lora_weights": {"a1": str(exported.processed["a1"])},
            "requests": [{"messages": _messages("hi"), "lora_mix": "MIX"}]}
    text = json.dumps(body).replace('"MIX"', '{"a1": 0.5, "a1": 0.5}')  # json.dumps cannot repeat a key
    (tmp_path / "input.json").write_text(text)
    code = main(["infer", "--quiet", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(tmp_path / "input.json"),
                 "--output-file", str(tmp_path / "out.json")])
    assert code == 2
    assert "names 'a1' twice" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_adapters_above_the_chunk_rank_run_as_several_entries_with_the_same_results(exported, llm):
    """Chunk rank 4: a1 (r8) is 2 stack entries, a2 (r16) 4, a3 (r4) 1; every row of a batch mixing
    them, a mix and a base row gives the ids it gives when each adapter is one entry."""
    chunked = LLM(exported.onnx_dir, LoraConfig(max_lora_rank=64, max_loras=3, lora_chunk_rank=4,
                                                 lora_dir=[str(exported.processed[n]) for n in ("a1", "a2", "a3")]))
    requests = [LoRARequest(name, index, str(exported.processed[name])) for index, name in enumerate(("a1", "a2", "a3"), 1)]
    lora = requests + [None, None]
    mixes = [None, None, None, MIXES[0], None]
    got = chunked.generate([_messages(PROMPT)] * 5, _greedy(), lora_request=lora, lora_mix=mixes)
    assert sorted(chunked.engine.adapters.get(n).span for n in ("a1", "a2", "a3")) == [1, 2, 4]
    want = llm.generate([_messages(PROMPT)] * 5, _greedy(), lora_request=lora, lora_mix=mixes)
    assert [out.token_ids for out in got] == [out.token_ids for out in want]
    assert got[3].token_ids == _merged_reference(exported, MIXES[0], got[3].prompt_token_ids)
    alone = chunked.generate([_messages(PROMPT)], _greedy(), lora_request=requests[1])[0]  # one entry of 4 slots
    assert alone.token_ids == want[1].token_ids


def test_prompts_prefilled_in_chunks_equal_the_peft_references(exported):
    """A step budget of 8 tokens: the chat prompt comes in chunks, greedy ids still equal PEFT's."""
    chunked = LLM(exported.onnx_dir, LoraConfig(max_lora_rank=64, max_loras=3,
                                                 lora_dir=[str(exported.processed[n]) for n in ("a1", "a2", "a3")]),
                  max_batch_size=2, max_num_batched_tokens=8)
    single = {"a2": 1.0}
    got = chunked.generate([_messages(PROMPT)] * 2, _greedy(), lora_mix=[MIXES[1], single])
    assert len(got[0].prompt_token_ids) > 16, "the prompt spans several chunks"
    assert chunked.scheduler.stats.prefill_steps >= 2 * 3
    assert got[0].token_ids == _merged_reference(exported, MIXES[1], got[0].prompt_token_ids)
    assert got[1].token_ids == _merged_reference(exported, single, got[1].prompt_token_ids)
