"""Output folders and files appear whole, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from edgelora.formats.fileio import staged_output, write_text_atomic


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


def test_staged_output_removes_stale_files_of_later_stages(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "derived.onnx").write_text("from an older run")
    (out / "kept.txt").write_text("unrelated")
    with staged_output(out, stale=("derived.onnx", "never_there.json")) as staging:
        (staging / "base.onnx").write_text("new")
        assert (out / "derived.onnx").exists(), "nothing changes before the stage succeeds"
    assert sorted(p.name for p in out.iterdir()) == ["base.onnx", "kept.txt"]


def test_permission_problems_are_user_errors(tmp_path, monkeypatch):
    """A folder the user cannot write is theirs to fix: UserInputError (exit 2), not an internal error."""
    import tempfile

    from edgelora.errors import UserInputError

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserInputError, match="cannot write .*Permission denied"), staged_output(tmp_path / "out"):
        pass
    with pytest.raises(UserInputError, match="cannot write .*Permission denied"):
        write_text_atomic(tmp_path / "f.json", "x")


def test_process_lora_into_an_unwritable_folder_exits_2(exported_samples, tmp_path, capsys, monkeypatch):
    import os

    from edgelora.cli import main

    qwen2 = exported_samples["qwen2"]
    real_replace = os.replace

    def refuse(source, target):
        if str(target).startswith(str(tmp_path / "out")):
            raise PermissionError(13, "Permission denied", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", refuse)
    code = main(["process-lora", "--input-dir", str(qwen2.adapters["a1"]), "--output-dir", str(tmp_path / "out"),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Permission denied" in err and "internal error" not in err and len(err.splitlines()) == 1


def test_check_writable_file(tmp_path):
    from edgelora.errors import UserInputError
    from edgelora.formats.fileio import check_writable_file

    check_writable_file(tmp_path / "new.json", "--output-file")
    with pytest.raises(UserInputError, match="is a folder"):
        check_writable_file(tmp_path, "--output-file")
    with pytest.raises(UserInputError, match="does not exist"):
        check_writable_file(tmp_path / "missing" / "x.json", "--output-file")
