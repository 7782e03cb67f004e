"""``edgelora chat``: a conversation in the terminal, streamed as it is generated, adapters switched by name.

    edgelora chat --onnx-dir llm_onnx --lora-modules caps=llm_onnx/lora_weights/caps --lora caps
    echo "What is LoRA?" | edgelora chat --onnx-dir llm_onnx --temperature 0

Each turn is one request on the step scheduler (one row): the whole conversation goes through the
model's chat template again, so what the model sees is exactly what ``LLM.generate`` of the same
messages sees. A conversation that no longer leaves ``max_tokens`` of room in the context drops
its oldest user/assistant pairs (the system message stays) and says so.

Streams: stdout carries the conversation (the ``> `` prompt and the answers); stderr carries what
edgelora says (notes, replies to commands). With stdin not a terminal, all of stdin is one
question and stdout gets the answer alone, then a newline. Ctrl-C during an answer stops it after
the current model step (the partial answer stays in the history); Ctrl-C or Ctrl-D at the prompt
ends the chat.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from edgelora.errors import UserInputError
from edgelora.formats import contract
from edgelora.formats.processed_adapter import resolve_adapter_path
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler
from edgelora.runtime.tokenizer import ChatTokenizer

PROMPT = "> "
COMMANDS = ("/lora NAME switches adapter (/lora alone: the base model), /loras lists them, "
            "/reset clears the history, /quit exits")


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class ChatOptions:
    """What ``edgelora chat`` was started with. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    onnx_dir: Path
    lora_modules: dict[str, Path] = field(default_factory=dict)  # name -> processed adapter folder
    lora: str | None = None  # adapter of the first answer; None: the base model
    system: str | None = None  # system message at the head of the conversation
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None  # the same seed for every answer; None: a fresh one each time
    max_model_len: int | None = None  # None: the model's positions
    max_lora_rank: int = contract.MAX_LORA_RANK
    device: str = "cpu"
    num_threads: int | None = None

    def sampling(self) -> SamplingParams:
        """Each answer's sampling (chat's defaults: temperature 0.7, top_p 0.9, 256 tokens)."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed)

    def validate(self) -> None:
        """Every problem at once, before the model is loaded."""
        problems = [f"invalid {problem}" for problem in self.sampling().problems()]
        if self.lora is not None and self.lora not in self.lora_modules:
            problems.append(f"--lora {self.lora!r} is not one of the --lora-modules ({_names(self.lora_modules)})")
        for name, path in self.lora_modules.items():
            try:
                resolve_adapter_path(path)
            except UserInputError as exc:
                problems.append(f"adapter {name!r}: {exc}")
        if problems:
            raise UserInputError("; ".join(problems))


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    dropped_turns: int  # oldest user/assistant pairs dropped to make room for it


class Chat:
    """One conversation: the model, its adapters, the history, the adapter in use."""

    def __init__(self, options: ChatOptions):
        options.validate()
        self.options = options
        engine = Engine(options.onnx_dir, EngineConfig(
            max_lora_rank=options.max_lora_rank, max_loras=1, max_cpu_loras=max(1, len(options.lora_modules)),
            device=options.device, num_threads=options.num_threads))
        for name, path in options.lora_modules.items():
            engine.adapters.add(name, path)
        self.tokenizer = ChatTokenizer(options.onnx_dir)
        self.scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1, max_model_len=options.max_model_len),
                                   self.tokenizer)
        self.adapter = options.lora
        self.history: list[dict] = []  # user/assistant pairs, oldest first; the system message is not in it
        self._turns = 0

    def use(self, name: str | None) -> None:
        """Answer with this adapter from the next question on (None: the base model); the history stays."""
        if name is not None and name not in self.options.lora_modules:
            if not self.options.lora_modules:
                raise UserInputError(f"unknown adapter {name!r}: no adapters were given (--lora-modules NAME=PATH)")
            raise UserInputError(f"unknown adapter {name!r}; known: {_names(self.options.lora_modules)} "
                                 "(/lora alone: the base model)")
        self.adapter = name

    def reset(self) -> None:
        self.history = []

    def describe_adapters(self) -> str:
        in_use = self.adapter or "base"
        if not self.options.lora_modules:
            return f"no adapters (start with --lora-modules NAME=PATH); in use: {in_use}"
        return f"adapters: {_names(self.options.lora_modules)}; in use: {in_use}"

    def messages(self, question: str, history: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.options.system}] if self.options.system else []
        return system + (self.history if history is None else history) + [{"role": "user", "content": question}]

    def ask(self, question: str, write: Callable[[str], None], note: Callable[[str], None],
            should_stop: Callable[[], bool] = lambda: False) -> Answer:
        """Answer the question after the conversation so far, handing each new piece of text to ``write``.

        ``should_stop`` is polled between model steps; once true the request is aborted and the
        answer so far is kept. Raises UserInputError when the question alone does not fit.
        """
        prompt_ids, kept = self._fit(question)
        dropped = (len(self.history) - len(kept)) // 2
        if dropped:
            note("(dropped the oldest turn to fit the context)" if dropped == 1
                 else f"(dropped the {dropped} oldest turns to fit the context)")
        self.history = kept
        options = self.options
        request_id = f"turn-{self._turns}"
        self._turns += 1
        self.scheduler.add_request(request_id, GenerationRequest(prompt_ids, self.adapter, options.sampling()))
        pieces: list[str] = []
        aborted = False
        while True:
            if not aborted and should_stop():
                self.scheduler.abort_request(request_id)
                aborted = True
            for update in self.scheduler.step():  # one row: every update is this request's
                if update.new_text:
                    pieces.append(update.new_text)
                    write(update.new_text)
                if update.finished:
                    if update.finish_reason == "error":
                        raise UserInputError(f"adapter {self.adapter!r}: {update.error}")
                    text = "".join(pieces)
                    self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
                    return Answer(text, update.finish_reason, dropped)

    def _fit(self, question: str) -> tuple[list[int], list[dict]]:
        """Prompt ids and the history they keep: the oldest pairs dropped until the answer has room."""
        limit = self.scheduler.max_model_len
        kept = list(self.history)
        while True:
            prompt_ids = self.tokenizer.prompt_ids(self.messages(question, kept))
            if len(prompt_ids) + self.options.max_tokens <= limit:
                return prompt_ids, kept
            if not kept:
                raise UserInputError(f"the question does not fit the context: {len(prompt_ids)} prompt tokens + "
                                     f"{self.options.max_tokens} max tokens > {limit} positions "
                                     "(--max-tokens, --max-model-len); not sent")
            kept = kept[2:]


def run_chat(options: ChatOptions, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None) -> None:
    """The ``edgelora chat`` command: a conversation on a terminal, one answer when stdin is not one."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    chat = Chat(options)
    if stdin.isatty():
        chat_loop(chat, stdin, stdout, stderr)
    else:
        answer_once(chat, stdin, stdout)


def answer_once(chat: Chat, stdin: TextIO, stdout: TextIO) -> None:
    """All of stdin is one question; stdout gets the answer alone (raw text, streamed) and a newline."""
    question = stdin.read().strip()
    if not question:
        raise UserInputError("no question on stdin")
    chat.ask(question, _writer(stdout, lambda text: text), lambda text: None)
    stdout.write("\n")
    stdout.flush()


def chat_loop(chat: Chat, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    """Prompt, answer, repeat until /quit, Ctrl-D or Ctrl-C at the prompt."""
    read = _line_reader(stdin, stdout)
    write = _writer(stdout, terminal_safe if stdout.isatty() else (lambda text: text))

    def say(text: str) -> None:
        stderr.write(text + "\n")
        stderr.flush()

    say(f"edgelora chat: {chat.options.onnx_dir}, adapter {chat.adapter or 'base'}; {COMMANDS}; "
        "Ctrl-C stops an answer")
    while True:
        try:
            line = read(PROMPT)
        except KeyboardInterrupt:
            line = None
        if line is None:  # Ctrl-D or Ctrl-C at the prompt: end on a fresh line
            stdout.write("\n")
            stdout.flush()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(chat, line, say):
                return
            continue
        with _CtrlCStops() as ctrl_c:
            try:
                answer = chat.ask(line, write, say, lambda: ctrl_c.pressed)
            except UserInputError as exc:  # this question only; the chat goes on
                say(str(exc))
                continue
        stdout.write("\n")
        stdout.flush()
        if answer.finish_reason == "abort":
            say("(stopped; the partial answer stays in the history, /reset clears it)")


def terminal_safe(text: str) -> str:
    """Control characters other than newline and tab shown as U+FFFD, so model output cannot drive the terminal."""
    return "".join("\ufffd" if unicodedata.category(char) == "Cc" and char not in "\n\t" else char for char in text)


def _command(chat: Chat, line: str, say: Callable[[str], None]) -> bool:
    """Run one /command; False when the chat should end."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        chat.reset()
        say("(history cleared)")
    elif name == "/loras":
        say(chat.describe_adapters())
    elif name == "/lora":
        try:
            chat.use(argument or None)
        except UserInputError as exc:
            say(str(exc))
        else:
            say(f"(adapter: {chat.adapter or 'base'})")
    elif name == "/help":
        say(COMMANDS)
    else:
        say(f"unknown command {name}; {COMMANDS}")
    return True


def _line_reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str | None]:
    """A function that shows the prompt and returns the next line (None at end of input)."""
    if stdin is sys.stdin and stdout is sys.stdout:
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (importing it gives input() line editing and history)

        def read_terminal(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None
        return read_terminal

    def read_stream(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return line.rstrip("\n") if line else None
    return read_stream


def _writer(stdout: TextIO, shown: Callable[[str], str]) -> Callable[[str], None]:
    def write(text: str) -> None:
        stdout.write(shown(text))
        stdout.flush()
    return write


class _CtrlCStops:
    """While inside, Ctrl-C (SIGINT) sets ``pressed`` instead of raising KeyboardInterrupt mid-step.

    A KeyboardInterrupt inside a model step could leave the scheduler's rows half updated; a flag
    polled between steps stops the answer cleanly. Only the main thread can take signals, so
    elsewhere Ctrl-C keeps its usual meaning.
    """

    def __init__(self):
        self.pressed = False
        self._previous = None

    def __enter__(self) -> _CtrlCStops:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _press(self, signum, frame) -> None:
        self.pressed = True


def _names(modules: dict[str, Path]) -> str:
    return ", ".join(modules) if modules else "none given"
