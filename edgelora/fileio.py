"""Output folders that are written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (tempfile makes them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def staged_output(output_dir: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``output_dir``; on success move its files in, else drop it.

    Files already in ``output_dir`` that the stage does not write are left alone; files it writes
    replace older ones by rename, so a reader never sees a half-written file.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        yield staging
        output_dir.mkdir(parents=True, exist_ok=True)
        mode = _file_mode()
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(mode)
        for item in sorted(staging.iterdir()):
            target = output_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp_name, _file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
