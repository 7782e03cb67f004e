"""edgelora chat: answers equal LLM.generate of the same conversation, commands, context trimming, Ctrl-C.

The tiny sample has random weights: answers are gibberish, but greedy answers are deterministic,
so each one is compared exactly with the offline API on the messages the chat should have sent.
The loop runs on fake terminals (in-process) and once on a real pseudo-terminal (a subprocess).
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from edgelora import cli
from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.entrypoints.chat import Chat, ChatOptions, chat_loop, terminal_safe

MAX_TOKENS = 12
LONG_QUESTION = "Write a short poem about the sea."  # greedy on the tiny sample: no EOS before 2000 tokens


class FakeStream(io.StringIO):
    """stdin / stdout / stderr of a terminal (isatty True) or of a pipe; counts writes."""

    def __init__(self, text: str = "", tty: bool = True):
        super().__init__(text)
        self.tty = tty
        self.writes = 0

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture(scope="module")
def sample(exported_samples):
    return exported_samples["qwen2"]


class Offline:
    """Greedy answers of LLM.generate for a conversation, with an adapter or the base model."""

    def __init__(self, sample):
        self.llm = LLM(sample.onnx_dir, lora_config=LoraConfig(max_loras=1, max_cpu_loras=3))
        self.tokenizer = self.llm.tokenizer
        self._requests = {name: LoRARequest(name, index + 1, str(path))
                          for index, (name, path) in enumerate(sample.processed.items())}

    def __call__(self, messages: list[dict], adapter: str | None = None, max_tokens: int = MAX_TOKENS) -> str:
        lora = self._requests[adapter] if adapter else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        return self.llm.generate(messages, params, lora_request=lora)[0].text


@pytest.fixture(scope="module")
def offline(sample) -> Offline:
    return Offline(sample)


def make_chat(sample, **overrides) -> Chat:
    options = dict(lora_modules=dict(sample.processed), temperature=0.0, max_tokens=MAX_TOKENS, num_threads=2)
    return Chat(ChatOptions(onnx_dir=sample.onnx_dir, **{**options, **overrides}))


def converse(chat: Chat, lines: list[str], stdout_tty: bool = False) -> tuple[str, str]:
    """Run the loop over these typed lines; return (stdout, stderr)."""
    stdin, stdout, stderr = FakeStream("".join(line + "\n" for line in lines)), FakeStream(tty=stdout_tty), FakeStream()
    chat_loop(chat, stdin, stdout, stderr)
    return stdout.getvalue(), stderr.getvalue()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_piped_question_is_answered_like_generate(sample, offline):
    command = [sys.executable, "-m", "edgelora", "chat", "--onnx-dir", str(sample.onnx_dir), "--system",
               "Answer briefly.", "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--threads", "2"]
    result = subprocess.run(command, input="hello there\n", capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    expected = offline([{"role": "system", "content": "Answer briefly."}, user("hello there")])
    assert result.stdout == expected + "\n"


def test_answer_streams_in_pieces(sample):
    chat = make_chat(sample)
    pieces = []
    answer = chat.ask("hello", pieces.append, lambda text: None)
    assert len(pieces) > 1
    assert "".join(pieces) == answer.text


def test_lora_command_switches_the_next_answer(sample, offline):
    chat = make_chat(sample)
    stdout, stderr = converse(chat, ["hello", "/lora a1", "how are you", "/quit"])
    first = offline([user("hello")])
    conversation = [user("hello"), assistant(first), user("how are you")]
    second = offline(conversation, "a1")
    assert second != offline(conversation)  # the adapter changes the answer
    assert stdout == "> " + first + "\n" + "> " + "> " + second + "\n" + "> "
    assert "(adapter: a1)" in stderr


def test_lora_option_picks_the_first_adapter(sample, offline):
    chat = make_chat(sample, lora="a2")
    stdout, _ = converse(chat, ["hello", "/lora", "hello again", "/quit"])
    first = offline([user("hello")], "a2")
    second = offline([user("hello"), assistant(first), user("hello again")])
    assert stdout == "> " + first + "\n" + "> " + "> " + second + "\n" + "> "


def test_loras_lists_the_adapters(sample):
    _, stderr = converse(make_chat(sample, lora="a3"), ["/loras", "/quit"])
    assert "adapters: a1, a2, a3; in use: a3" in stderr


def test_unknown_lora_keeps_chatting(sample, offline):
    chat = make_chat(sample)
    stdout, stderr = converse(chat, ["/lora zz", "hello", "/quit"])
    assert "unknown adapter 'zz'; known: a1, a2, a3" in stderr
    assert chat.adapter is None
    assert stdout == "> > " + offline([user("hello")]) + "\n> "


def test_reset_clears_the_history(sample, offline):
    chat = make_chat(sample)
    stdout, stderr = converse(chat, ["hello", "/reset", "how are you", "/quit"])
    assert stdout == "> " + offline([user("hello")]) + "\n> > " + offline([user("how are you")]) + "\n> "
    assert "(history cleared)" in stderr


def test_quit_ends_the_chat_before_later_lines(sample):
    chat = make_chat(sample)
    stdout, _ = converse(chat, ["/quit", "hello"])
    assert stdout == "> "
    assert chat.history == []


def test_end_of_input_ends_the_chat(sample):
    stdout, _ = converse(make_chat(sample), [])
    assert stdout == "> \n"


def test_ctrl_c_at_the_prompt_ends_the_chat(sample):
    class Interrupted(FakeStream):
        def readline(self, *args) -> str:
            raise KeyboardInterrupt

    stdout = FakeStream(tty=False)
    chat_loop(make_chat(sample), Interrupted(), stdout, FakeStream())
    assert stdout.getvalue() == "> \n"


def test_ctrl_c_stops_the_answer_and_keeps_it(sample, offline):
    class InterruptOnAnswer(FakeStream):
        """Sends this process SIGINT when the first piece of the answer is written."""

        def write(self, text: str) -> int:
            if text not in ("> ", "\n") and not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    chat = make_chat(sample, max_tokens=2000)
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN when run in the background
    stdin, stdout, stderr = FakeStream(LONG_QUESTION + "\n/quit\n"), InterruptOnAnswer(tty=False), FakeStream()
    chat_loop(chat, stdin, stdout, stderr)
    assert "(stopped" in stderr.getvalue()
    assert chat.scheduler.stats.generated_tokens < 10  # of 2000
    partial = chat.history[1]["content"]
    assert partial and offline([user(LONG_QUESTION)], max_tokens=20).startswith(partial)
    assert stdout.getvalue() == "> " + partial + "\n> "
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back: Ctrl-C at the prompt exits again
    chat.options.max_tokens = MAX_TOKENS  # the same conversation goes on, with short answers
    stdout, _ = converse(chat, ["hello", "/quit"])
    assert stdout == "> " + offline([user(LONG_QUESTION), assistant(partial), user("hello")]) + "\n> "


def test_long_history_drops_the_oldest_turns(sample, offline):
    first = offline([user("hello")])
    tokenizer = offline.tokenizer
    limit = len(tokenizer.prompt_ids([user("hello"), assistant(first), user("hi you")])) + MAX_TOKENS
    chat = make_chat(sample, max_model_len=limit)
    stdout, stderr = converse(chat, ["hello", "hi you", "and you", "/quit"])
    assert "oldest turn" in stderr and "to fit the context" in stderr
    kept = chat.history[:-2]
    assert kept[0] != user("hello")  # the first question was dropped
    assert len(tokenizer.prompt_ids(kept + [user("and you")])) + MAX_TOKENS <= limit
    assert stdout.endswith("> " + offline(kept + [user("and you")]) + "\n> ")


def test_question_too_long_for_the_context_is_skipped(sample, offline):
    limit = len(offline.tokenizer.prompt_ids([user("hi")])) + MAX_TOKENS
    chat = make_chat(sample, max_model_len=limit)
    stdout, stderr = converse(chat, ["many words " * 20, "hi", "/quit"])
    assert "does not fit the context" in stderr
    assert stdout == "> > " + offline([user("hi")]) + "\n> "


def test_control_characters_do_not_reach_the_terminal(sample):
    assert terminal_safe("a\x1b[2Jb\n\tc\r") == "a\ufffd[2Jb\n\tc\ufffd"
    stdout, _ = converse(make_chat(sample, max_tokens=64), ["hello", "/quit"], stdout_tty=True)
    assert not any(char < " " and char not in "\n\t" for char in stdout)


def _read_some(fd: int, seen: bytearray, timeout_s: float = 30.0) -> None:
    """Append the next bytes the pty gives to ``seen``."""
    ready, _, _ = select.select([fd], [], [], timeout_s)
    assert ready, f"nothing within {timeout_s} s; got {bytes(seen)[-400:]!r}"
    try:
        chunk = os.read(fd, 4096)
    except OSError:  # the child closed the terminal
        chunk = b""
    assert chunk, f"the terminal closed; got {bytes(seen)[-400:]!r}"
    seen += chunk


def _read_until(fd: int, marker: bytes, seen: bytearray, start: int, timeout_s: float = 30.0) -> int:
    """Read the pty into ``seen`` until ``marker`` appears at or after ``start``; return the index just after it."""
    deadline = time.monotonic() + timeout_s
    while (found := seen.find(marker, start)) < 0:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout_s} s; got {bytes(seen[start:])[-400:]!r}"
        _read_some(fd, seen, left)
    return found + len(marker)


def test_ctrl_c_in_a_terminal_stops_the_answer_not_the_chat(sample):
    master, slave = os.openpty()
    command = [sys.executable, "-m", "edgelora", "chat", "--onnx-dir", str(sample.onnx_dir), "--temperature", "0",
               "--max-tokens", "2000", "--threads", "2"]
    child = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                             env={**os.environ, "TERM": "dumb", "INPUTRC": os.devnull})
    os.close(slave)
    seen = bytearray()
    try:
        at = _read_until(master, b"> ", seen, 0)
        os.write(master, LONG_QUESTION.encode() + b"\n")
        at = _read_until(master, LONG_QUESTION.encode() + b"\r\n", seen, at)  # the terminal echoes the typed line
        while len(seen) == at:  # wait for the first bytes of the answer
            _read_some(master, seen)
        child.send_signal(signal.SIGINT)
        at = _read_until(master, b"(stopped", seen, at)
        _read_until(master, b"> ", seen, at)
        assert child.poll() is None  # still chatting
        os.write(master, b"/quit\n")
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)


@pytest.mark.parametrize("flags, message", [
    (["--lora-modules", "a1"], "--lora-modules 'a1': expected NAME=PATH"),
    (["--lora-modules", "a1=/no/such/adapter"], "adapter 'a1': /no/such/adapter: no processed_adapter_model"),
    (["--lora", "zz"], "--lora 'zz' is not one of the --lora-modules (none given)"),
    (["--temperature", "-1"], "invalid temperature -1.0"),
])
def test_bad_flags_exit_2_with_one_line(sample, capsys, flags, message):
    assert cli.main(["chat", "--onnx-dir", str(sample.onnx_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_empty_stdin_exits_2(sample, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeStream("\n", tty=False))
    assert cli.main(["chat", "--onnx-dir", str(sample.onnx_dir), "--threads", "2"]) == 2
    assert "no question on stdin" in capsys.readouterr().err
