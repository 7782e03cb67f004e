"""Output folders and files appear whole, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from edgelora.fileio import staged_output, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _expected() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_staged_output_moves_files_in_with_default_mode(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.bin").write_bytes(b"b")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.bin").read_bytes() == b"b"
    assert _mode(out / "a.txt") == _expected() and _mode(out / "sub" / "b.bin") == _expected()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_staged_output_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out) as staging:
        (staging / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_mode_and_replace(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and _mode(path) == _expected()
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
