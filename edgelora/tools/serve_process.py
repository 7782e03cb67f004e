"""``edgelora serve`` as a child process on a free loopback port: start, wait for /health, stop.

bench-serve and the tests both run the real server this way. Its output goes to a temporary file,
never a pipe, so a chatty server cannot block on a full pipe nobody reads.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgelora.errors import EdgeLoraError

HOST = "127.0.0.1"


class ServerStartError(EdgeLoraError):
    """The server exited before answering /health, or did not answer in time (its output's tail says why)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def edgelora_command() -> list[str]:
    """This environment's ``edgelora`` console script, else this interpreter's ``-m edgelora``.

    ``python -m`` puts the working directory first on ``sys.path``: started from a source checkout
    it would import the source tree (which has no native build unless installed editable) instead
    of the installed package. The console script imports what is installed.
    """
    script = Path(sys.executable).with_name("edgelora")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgelora"]


@contextlib.contextmanager
def running_server(*args: str, timeout_s: float = 120.0, launcher: list[str] | None = None,
                   cwd: str | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base url, process) once /health answers 200; terminate (then kill) the server on the way out.

    ``launcher``: the command that is ``edgelora`` (default: ``edgelora_command()``);
    ``cwd``: the folder it runs in.
    """
    port = free_port()
    command = [*(launcher or edgelora_command()), "serve", "--host", HOST, "--port", str(port), *args]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        try:
            yield _wait_healthy(f"http://{HOST}:{port}", process, log, timeout_s), process
        finally:
            stop_process(process, 60.0)


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """Terminate (SIGTERM: a graceful stop), then kill if it has not exited after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log, timeout_s: float) -> str:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read().strip().splitlines()[-1:] or ["no output"]
            raise ServerStartError(f"the server exited with {process.returncode}: {tail[0]}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"the server did not answer /health within {timeout_s:.0f} s")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
