"""OpenAI's request and response shapes (with vLLM's extensions), as pydantic models.

Requests mirror the fields OpenAI documents plus vLLM's ``top_k``, ``min_tokens``,
``ignore_eos``, ``return_token_ids`` and ``cache_salt``. Nothing is silently ignored: a field that
would change the answer and is not implemented is a 400 naming it (``UNSUPPORTED_FIELDS``, unless
it holds its no-op default), a field nobody documents is a 400 too, and the few that real clients
send and that change nothing are accepted by name (``IGNORED_FIELDS``, each with why). Errors
always have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgelora.errors import EdgeLoraError, UserInputError
from edgelora.runtime.grammar import GrammarSpec, spec_from_fields
from edgelora.runtime.sampling import MAX_LOGPROBS, SamplingParams


def _omit_none(value: Any) -> bool:
    return value is None


class ApiError(EdgeLoraError):
    """An HTTP error in OpenAI's shape; routes raise it, one handler turns it into a response."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code)).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests --------------------------------------------------------------------------------------
# Sent by real clients and changing nothing in an answer: accepted, ignored, and why.
IGNORED_FIELDS = {
    "user": "the caller's end-user id, for its own abuse tracking",
    "safety_identifier": "the caller's end-user id (OpenAI's newer name for user)",
    "metadata": "tags for OpenAI's stored completions; nothing is stored",
    "store": "OpenAI's stored completions; nothing is stored",
    "service_tier": "OpenAI's processing tier; there is one",
    "prompt_cache_key": "OpenAI's cache-routing hint; the prefix cache keys by tenant, adapter and cache_salt",
    "parallel_tool_calls": "meaningful only with tools, which are refused",
}

# Would change the answer and are not implemented: a 400 naming them, unless they hold the value that
# changes nothing (null, or the one given here).
UNSUPPORTED_FIELDS = {
    "functions": ([], "function calling is not supported"),
    "function_call": ("none", "function calling is not supported"),
    "top_logprobs": (0, "top_logprobs belongs to chat; completions take logprobs: N"),
    "best_of": (1, "best_of is not supported"),
    "suffix": ("", "suffix (insertion) is not supported"),
    "min_p": (0, "min_p is not supported"),
    "use_beam_search": (False, "beam search is not supported"),
    "length_penalty": (1, "length_penalty (beam search) is not supported"),
    "audio": ({}, "audio output is not supported"),
    "modalities": (["text"], "only text output is supported"),
    "prediction": ({}, "predicted outputs are not supported"),
    "reasoning_effort": ("", "reasoning_effort is not supported"),
    "web_search_options": ({}, "web search is not supported"),
}


def refused_message_fields(messages: list[ChatMessage]) -> tuple[str, str, str] | None:
    """Like ``refused_fields``, for chat messages (``param`` names the message: messages[2].tool_calls)."""
    for index, message in enumerate(messages):
        for name, value in (message.model_extra or {}).items():
            if name in MESSAGE_IGNORED or (name in MESSAGE_UNSUPPORTED and not value):
                continue
            why = MESSAGE_UNSUPPORTED.get(name)
            where = f"messages[{index}].{name}"
            if why is not None:
                return where, f"{where}: {why}", "unsupported_parameter"
            return where, f"Unrecognized message field: {where}", "unknown_parameter"
    return None


def refused_fields(extra: dict[str, Any] | None) -> tuple[str, str, str] | None:
    """The first extra field to refuse: (name, message, code), or None when every one may pass."""
    for name, value in (extra or {}).items():
        if name in IGNORED_FIELDS:
            continue
        if name in UNSUPPORTED_FIELDS:
            default, why = UNSUPPORTED_FIELDS[name]
            if value is None or value == default:
                continue
            return name, f"{name}: {why}", "unsupported_parameter"
        return name, f"Unrecognized request argument supplied: {name}", "unknown_parameter"
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields completions and chat share (any other lands in ``model_extra``: ``refused_fields`` judges it)."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: OpenAI's default, 1.0
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None  # vLLM: 0 or -1 switch the filter off
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)  # choices per prompt, each a request of its own
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a string) -> -100..100 added to its logit
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)  # vLLM's; 1 = off
    # structured output (runtime/grammar.py): OpenAI's response_format, vLLM's structured_outputs and guided_*
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    # vLLM's: the prefix cache shares KV only between requests with the same salt (within one tenant)
    cache_salt: str | None = None
    # edgelora: several adapters with weights for this request ({"a": 0.7, "b": -0.3}; model = the base name)
    lora_mix: dict[str, Any] | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError("top_k must be -1, 0 (off) or a positive number")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.strip().isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias of token {token}: {bias} is outside -100..100")
        return value


    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [stop for stop in stops if stop]

    def grammar(self) -> GrammarSpec | None:
        """The grammar the answer must match, if any (UserInputError naming the field when malformed)."""
        return spec_from_fields(self.response_format, self.structured_outputs, guided_json=self.guided_json,
                                guided_regex=self.guided_regex, guided_choice=self.guided_choice)

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The request's sampling with the server's defaults: OpenAI's temperature 1.0 and top_p 1.0, vLLM's
        top_k -1 (off), ``max_tokens`` None = the rest of the context."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else float(self.temperature),
            top_k=0 if self.top_k is None or self.top_k < 0 else self.top_k,
            top_p=1.0 if self.top_p is None else float(self.top_p), seed=self.seed, stop=self.stop_list(),
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            logit_bias={int(token): float(bias) for token, bias in (self.logit_bias or {}).items()},
            presence_penalty=float(self.presence_penalty or 0), frequency_penalty=float(self.frequency_penalty or 0),
            repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            grammar=self.grammar())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    # Text, token ids, or a list of texts or of token-id lists: one answer (n of them) per prompt.
    prompt: str | list[int] | list[str] | list[list[int]]
    # None: the rest of the context (as vLLM does for chat); 0 only with echo (prompt logprobs, nothing generated)
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # each token's and this many alternatives
    echo: bool = False  # the prompt comes back before the answer (with its logprobs when logprobs is given)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


# A message's fields beside role and content: accepted and ignored (why), or refused until tools land.
MESSAGE_IGNORED = {"name": "a participant's name; the supported chat templates do not render it",
                   "refusal": "the openai client sends an assistant turn back with it (null)",
                   "annotations": "the openai client sends an assistant turn back with it"}
MESSAGE_UNSUPPORTED = {"function_call": "function calling is not supported (use tool_calls)",
                       "audio": "audio is not supported"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None

    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call it answers

    def as_template_input(self) -> dict:
        """What the chat template reads: role, plain-text content, and an assistant turn's calls with their
        arguments as objects (transformers' convention; OpenAI sends them as JSON text)."""
        content = "".join(part.text for part in self.content) if isinstance(self.content, list) else self.content
        rendered: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                function = dict(call.get("function") or {})
                arguments = function.get("arguments", {})
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments or "{}")
                    except ValueError as exc:
                        raise UserInputError(f"tool_calls: arguments of {function.get('name')!r} are not JSON") from exc
                calls.append({"type": "function", "id": call.get("id"), "function": {**function,
                                                                                     "arguments": arguments}})
            rendered["tool_calls"] = calls
        if self.tool_call_id is not None:
            rendered["tool_call_id"] = self.tool_call_id
        return rendered


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # None: the rest of the context, as vLLM
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # alternatives per token (with logprobs)
    tools: list[dict[str, Any]] | None = None  # rendered by the model's chat template (server/tools.py)
    tool_choice: str | dict[str, Any] | None = None  # auto (default), none, required, or a named function

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)


# -- responses -------------------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "edgelora"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
    # OpenAI's list paging, present when the request gave ``limit``: pass ``last_id`` as ``after``
    has_more: bool | None = Field(default=None, exclude_if=_omit_none)
    first_id: str | None = Field(default=None, exclude_if=_omit_none)
    last_id: str | None = Field(default=None, exclude_if=_omit_none)


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: per token its text, logprob (null for the first prompt token), top
    alternatives {text: logprob} and the text offset where it starts."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's return_token_ids; absent unless asked for
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)
    token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = Field(default=None, exclude_if=_omit_none)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class DeltaMessage(BaseModel):
    role: str | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, exclude_if=_omit_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class CompletionChunk(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event in the form OpenAI streams use."""
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
