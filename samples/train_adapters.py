"""Train the demo's three LoRA adapters on SmolLM2-135M-Instruct, on the CPU, from committed questions.

Nothing is downloaded: the training answers are the base model's own greedy answers to the
questions below, transformed by each adapter's rule, so each adapter learns one visible habit
and nothing else:

* ``shout``   answers in capital letters              (rank 16, all seven projections)
* ``pirate``  answers start with "Ahoy, matey!"       (rank 8, q and v)
* ``signoff`` answers end with "Over and out."        (rank 4, rsLoRA, o / gate / up / down)

LoRA parameters only, fixed seeds, 2 threads; weights are rounded to float16-representable values
so process-lora's float16 storage is exact. Regenerating gives the same files bit for bit only on
the same CPU and torch build. Takes about 16 minutes on a 2-core machine (982 s measured: base
answers 141 s, then 5-10 s per training step).

    python samples/train_adapters.py --model-dir FLOAT_HF_DIR --output-dir samples/demo_adapters
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

TRAIN_QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "What do bees make?", "How many legs does a spider have?",
    "What is water made of?", "Who wrote Romeo and Juliet?", "What is the largest planet?", "What do plants need to grow?",
    "What is the boiling point of water?", "What language is spoken in Brazil?", "What is a volcano?",
    "How many days are in a week?", "What is the tallest animal?", "What is the sun?", "What do cows eat?",
    "What is the opposite of hot?", "Where do penguins live?", "What is ice?", "What color is grass?",
    "What is the moon?", "How do fish breathe?", "What is a computer?", "What is rain?", "What is a river?",
    "What do you call a baby cat?", "What is the fastest land animal?", "What is gold?", "Why do we sleep?",
]
# Held out: the demo asks these, so what it shows is the habit, not memorised answers.
DEMO_QUESTIONS = ["What is the capital of Italy?", "What do birds eat?", "Why is the ocean salty?"]

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PIRATE = "Ahoy, matey!"
SIGNOFF = "Over and out."


@dataclass(frozen=True)
class Habit:
    """One adapter: the rule that turns a base answer into its answer, and its LoRA shape."""

    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool
    steps: int
    learning_rate: float

    def apply(self, answer: str) -> str:
        if self.name == "shout":
            return answer.upper()
        if self.name == "pirate":
            return f"{PIRATE} {answer}"
        return f"{answer} {SIGNOFF}"


HABITS = (
    Habit("shout", 16, 32, ALL_MODULES, False, 60, 1e-3),
    Habit("pirate", 8, 16, ("q_proj", "v_proj"), False, 40, 2e-3),
    Habit("signoff", 4, 8, ("o_proj", "gate_proj", "up_proj", "down_proj"), True, 40, 2e-3),
)


def shows_habit(name: str, answer: str) -> bool:
    """The simple check the demo test applies to each row."""
    text = answer.strip()
    if name == "shout":
        letters = [c for c in text if c.isalpha()]
        return len(letters) >= 5 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)
    if name == "pirate":
        return text.startswith(PIRATE)
    return text.endswith(SIGNOFF)


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip().replace("\n", " "))
    return (match.group(1) if match else text.strip()).strip()


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def base_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """The base model's greedy answers, cut to their first sentence."""
    import torch

    answers = []
    for question in questions:
        encoded = tokenizer.apply_chat_template(_chat(question), add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(_first_sentence(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)))
    return answers


def _examples(tokenizer, questions: list[str], answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels): the loss is on the answer and its end-of-turn token only."""
    examples = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for question, answer in zip(questions, answers):
        prompt = list(tokenizer.apply_chat_template(_chat(question), add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        examples.append((prompt + target, [-100] * len(prompt) + target))
    return examples


def train(model_dir: Path, habit: Habit, questions: list[str], answers: list[str], output_dir: Path,
          batch_size: int = 7, seed: int = 0) -> float:
    """Train one adapter, save it as a PEFT folder; return the final loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=habit.rank, lora_alpha=habit.alpha, target_modules=list(habit.targets),
                        use_rslora=habit.use_rslora, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    examples = _examples(tokenizer, questions, [habit.apply(answer) for answer in answers])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=habit.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.train()
    loss_value = float("nan")
    for step in range(habit.steps):
        order = torch.randperm(len(examples), generator=generator)[:batch_size].tolist()
        batch = [examples[index] for index in order]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, targets) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(targets)] = torch.tensor(targets)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if step % 10 == 0 or step == habit.steps - 1:
            print(f"  {habit.name} step {step + 1}/{habit.steps}: loss {loss_value:.3f}", flush=True)
    with torch.no_grad():  # float16-representable: process-lora's float16 storage is then exact
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(parameter.half().float())
    model.save_pretrained(output_dir)
    store_float16(output_dir)
    config_path = Path(output_dir) / "adapter_config.json"  # the model's name, not this machine's folder
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return loss_value


def store_float16(folder: Path) -> None:
    """Rewrite adapter_model.safetensors in float16: the values already are, and the files halve."""
    from safetensors.numpy import load_file, save_file

    path = Path(folder) / "adapter_model.safetensors"
    tensors = {name: array.astype("float16") for name, array in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", "--model_dir", dest="model_dir", required=True, type=Path,
                        help="float Hugging Face folder of SmolLM2-135M-Instruct (edgelora convert-gguf)")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, type=Path,
                        help="folder for the three PEFT adapters (one sub-folder each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    answers = base_answers(model, tokenizer, TRAIN_QUESTIONS)
    del model
    print(f"base answers ({time.perf_counter() - started:.0f} s), e.g. {answers[0]!r}", flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "training_data.json").write_text(json.dumps(
        {"questions": TRAIN_QUESTIONS, "base_answers": answers}, indent=1, ensure_ascii=False) + "\n")
    for index, habit in enumerate(HABITS):
        loss = train(args.model_dir, habit, TRAIN_QUESTIONS, answers, args.output_dir / habit.name, seed=index)
        print(f"{habit.name}: final loss {loss:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
