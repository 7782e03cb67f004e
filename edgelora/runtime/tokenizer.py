"""Prompts as transformers builds them: the model's own tokenizer and chat template, without torch."""

from __future__ import annotations

import logging
from pathlib import Path

from edgelora.errors import UserInputError

log = logging.getLogger(__name__)


class ChatTokenizer:
    """``apply_chat_template(messages, add_generation_prompt=True)`` then encode, exactly as HF does."""

    def __init__(self, model_dir: Path):
        # PreTrainedTokenizerFast reads tokenizer.json + tokenizer_config.json + chat_template.jinja
        # without importing torch; AutoTokenizer imports torch when it is installed.
        if (Path(model_dir) / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast as tokenizer_class
        else:
            from transformers import AutoTokenizer as tokenizer_class
        try:
            self._tokenizer = tokenizer_class.from_pretrained(str(model_dir))
        except (OSError, ValueError, TypeError) as exc:
            raise UserInputError(f"{model_dir}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from exc
        if not self._tokenizer.chat_template:
            raise UserInputError(f"{model_dir}: the tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")

    @property
    def template(self) -> str | None:
        return self._tokenizer.chat_template if isinstance(self._tokenizer.chat_template, str) else None

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        from jinja2 import TemplateError

        try:
            encoded = self._tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                          tokenize=True, return_dict=True)
        except TemplateError as exc:
            raise UserInputError(f"the chat template refused these messages: {exc}") from exc
        return list(encoded["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def info(self) -> dict:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (lm-eval reads it)."""
        tokenizer = self._tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                "model_max_length": tokenizer.model_max_length, "chat_template": tokenizer.chat_template,
                "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                "unk_token": tokenizer.unk_token, "add_bos_token": getattr(tokenizer, "add_bos_token", None),
                "add_eos_token": getattr(tokenizer, "add_eos_token", None)}

    @property
    def hf(self):
        """The transformers tokenizer (structured output builds llguidance's view of it)."""
        return self._tokenizer

    def token_text(self, token: int) -> str:
        """One token's own text (special tokens included), for logprobs; cached."""
        cache = self.__dict__.setdefault("_token_texts", {})
        if token not in cache:
            cache[token] = self._tokenizer.decode([token], skip_special_tokens=False)
        return cache[token]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
