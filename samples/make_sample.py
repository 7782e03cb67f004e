"""Make a local sample: a tiny HF decoder with random weights, a trained tokenizer, three PEFT adapters.

Nothing comes from a model hub. The folders are exactly what users have on disk (config.json,
model.safetensors, tokenizer.json + tokenizer_config.json or chat_template.jinja,
generation_config.json; adapter_config.json + adapter_model.safetensors), so the toolchain reads
them through its real loading code.

    python samples/make_sample.py --output-dir /tmp/sample [--family qwen2|llama] [--size tiny|bench] [--vocab N]

Families differ on purpose: qwen2 has tied embeddings, its chat template in
tokenizer_config.json and 4 heads over 2 KV heads; llama is untied, keeps its template in
chat_template.jinja and has 6 heads (not a power of two) over 2 KV heads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Text the tokenizer learns its merges from and the demo prompts draw on.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Adapters change how a small language model answers without touching its base weights.",
    "Write a short poem about the sea and the wind.",
    "What is the capital of France? Paris is the capital of France.",
    "Translate to German: good morning, how are you today?",
    "Summarize the following text in one sentence.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Numbers: one two three four five six seven eight nine ten 0123456789.",
    "def add(a, b):\n    return a + b\n",
    "Customers ask about invoices, shipping, refunds and opening hours.",
]

# Qwen2.5's shape, tools included: function signatures in the system turn inside <tools></tools>, the
# assistant's calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>, results as <tool_response>
# in a user turn. Without tools it renders exactly as before.
QWEN2_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% else %}{{ 'You are a helpful assistant.\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nFunction signatures are within <tools></tools>:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nTo call a function, answer with:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% else %}"
    "{% if loop.first and message['role'] != 'system' and not tools %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class FamilyRecipe:
    """What makes one sample family different: special tokens, template home, model shape."""

    model_type: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    template: str
    template_in_file: bool  # chat_template.jinja instead of tokenizer_config.json
    shapes: dict = field(default_factory=dict)  # size -> config fields


RECIPES = {
    "qwen2": FamilyRecipe(
        model_type="qwen2",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        template=QWEN2_TEMPLATE, template_in_file=False,
        shapes={
            "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, tie_word_embeddings=True),
            # Qwen2.5-0.5B's shape with a small vocabulary, for benchmarks.
            "bench": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          intermediate_size=4864, tie_word_embeddings=True),
        },
    ),
    "llama": FamilyRecipe(
        model_type="llama",
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>",
        template=LLAMA_TEMPLATE, template_in_file=True,
        shapes={
            "tiny": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=8, intermediate_size=96, tie_word_embeddings=False),
        },
    ),
}


@dataclass(frozen=True)
class AdapterRecipe:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False


# The three adapters every sample carries: different ranks, targets and scalings.
ADAPTERS = {
    "a1": AdapterRecipe(8, 16, ("q_proj", "v_proj")),
    "a2": AdapterRecipe(16, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "a3": AdapterRecipe(4, 4, ("k_proj", "o_proj", "down_proj"), use_rslora=True),
}


# Benchmark adapters (issue: "one adapter (r=16, all modules)" and four different ones for a mixed batch).
BENCH_ADAPTERS = {f"b{index}": AdapterRecipe(16, 32, ADAPTERS["a2"].targets) for index in range(1, 5)}
# FACTS.md measured peers on a 0.5B shape with this vocabulary; the same size keeps figures comparable.
BENCH_VOCAB = 2717


@dataclass
class Sample:
    family: str
    model_dir: Path
    adapters: dict[str, Path]


def train_tokenizer(recipe: FamilyRecipe, out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE trained on CORPUS, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(recipe.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": recipe.bos,
        "eos_token": recipe.eos,
        "pad_token": recipe.pad,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if recipe.template_in_file:
        (out_dir / "chat_template.jinja").write_text(recipe.template)
    else:
        config["chat_template"] = recipe.template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_model(family: str, out_dir: Path, size: str = "tiny", seed: int = 0, vocab_size: int = 512,
               model_vocab: int | None = None) -> Path:
    """A randomly initialised decoder saved like a hub checkpoint, with its tokenizer.

    ``model_vocab`` widens the embedding and lm_head past the trained tokenizer's ids (the extra
    rows are never produced by the tokenizer): it gives a real vocabulary's memory and FLOPs.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    recipe = RECIPES[family]
    if size not in recipe.shapes:
        raise SystemExit(f"--size {size} is not available for {family} (have: {', '.join(recipe.shapes)})")
    train_tokenizer(recipe, out_dir, vocab_size)
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in recipe.special_tokens}
    vocab = tokenizer.get_vocab_size() if size != "bench" else max(tokenizer.get_vocab_size(), BENCH_VOCAB)
    vocab = max(vocab, model_vocab or 0)
    config = AutoConfig.for_model(
        recipe.model_type,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # Larger than the usual 0.02 so tiny random models have clear greedy margins.
        initializer_range=0.02 if size == "bench" else 0.15,
        bos_token_id=ids.get(recipe.bos) if recipe.bos else None,
        eos_token_id=ids[recipe.eos],
        pad_token_id=ids[recipe.pad],
        **recipe.shapes[size],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    GenerationConfig(eos_token_id=[ids[recipe.eos], ids[recipe.pad]], bos_token_id=config.bos_token_id,
                     pad_token_id=ids[recipe.pad]).save_pretrained(out_dir)
    return out_dir


def make_adapter(model_dir: Path, out_dir: Path, recipe: AdapterRecipe, seed: int) -> Path:
    """A PEFT LoRA adapter with random, non-zero lora_B, as if it had been trained.

    Weights are rounded to float16-representable values so that process-lora's float16 storage
    is exact and graph-vs-PEFT comparisons measure the graph, not the storage rounding.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
                        use_rslora=recipe.use_rslora, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
            if "lora_" in name:
                parameter.copy_(parameter.half().float())
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_sample(out_dir: Path, family: str = "qwen2", size: str = "tiny", adapters: bool = True,
                model_vocab: int | None = None) -> Sample:
    """Model in OUT/model, adapters in OUT/adapters/{a1,a2,a3} (bench size: b1..b4, r16 on all seven)."""
    out_dir = Path(out_dir)
    model_dir = make_model(family, out_dir / "model", size, model_vocab=model_vocab)
    made = {}
    if adapters:
        for index, (name, recipe) in enumerate((BENCH_ADAPTERS if size == "bench" else ADAPTERS).items()):
            made[name] = make_adapter(model_dir, out_dir / "adapters" / name, recipe, seed=100 + index)
    return Sample(family, model_dir, made)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, type=Path,
                        help="folder to create (model/ and adapters/ inside)")
    parser.add_argument("--family", choices=sorted(RECIPES), default="qwen2", help="architecture of the sample model")
    parser.add_argument("--size", choices=("tiny", "bench"), default="tiny",
                        help="tiny: a few hundred KB for tests and the demo; bench: Qwen2.5-0.5B's shape (qwen2 only)")
    parser.add_argument("--vocab", type=int, default=None, metavar="N",
                        help=f"model vocabulary size (at least the tokenizer's; bench default {BENCH_VOCAB}); "
                             "151936 is Qwen2.5's, where the tied lm_head is a quarter of the 0.5B model's weights")
    parser.add_argument("--no-adapters", "--no_adapters", dest="no_adapters", action="store_true",
                        help="make only the base model")
    args = parser.parse_args(argv)
    if args.vocab is not None and args.vocab < 1:
        parser.error("--vocab must be a positive number")
    sample = make_sample(args.output_dir, args.family, args.size, adapters=not args.no_adapters, model_vocab=args.vocab)
    print(f"model: {sample.model_dir}")
    for name, path in sample.adapters.items():
        print(f"adapter {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
