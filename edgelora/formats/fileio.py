"""Output folders that are written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgelora.errors import UserInputError


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (tempfile makes them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """Permission and disk problems with an output location are the user's to fix: one line, exit 2."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)) \
                or exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise UserInputError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise


@contextlib.contextmanager
def staged_output(output_dir: Path, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder beside ``output_dir``; on success move its files in, else drop it.

    Files already in ``output_dir`` that the stage does not write are left alone, except the
    ``stale`` ones (outputs of later stages derived from what this stage replaces), which are
    removed; files it writes replace older ones by rename, so a reader never sees a half-written file.
    """
    output_dir = Path(output_dir)
    with _writing(output_dir):
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        yield staging
        with _writing(output_dir):
            output_dir.mkdir(parents=True, exist_ok=True)
            mode = _file_mode()
            for path in staging.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    path.chmod(mode)
            for name in stale:  # first: a crash in between leaves no stale file behind
                with contextlib.suppress(FileNotFoundError):
                    (output_dir / name).unlink()
            for item in sorted(staging.iterdir()):
                target = output_dir / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable_file(path: Path, flag: str) -> None:
    """Before any work: ``path`` can be created or replaced (its folder exists and takes files)."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{flag} {path}: is a folder; give a file name")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise UserInputError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserInputError(f"{flag} {path}: not writable")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    path = Path(path)
    with _writing(path):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with _writing(path):
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.chmod(tmp_name, _file_mode())
            os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
