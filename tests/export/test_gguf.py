"""Which file ``--model-dir`` / ``--gguf-file`` name (the conversion itself: tests/test_demo.py)."""

from __future__ import annotations

import pytest

from edgelora.errors import UserInputError
from edgelora.export.gguf import find_gguf


def test_a_gguf_file_a_folder_holding_one_or_a_named_one(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "model.Q4_0.gguf").write_bytes(b"GGUF")
    assert find_gguf(one / "model.Q4_0.gguf") == one / "model.Q4_0.gguf"
    assert find_gguf(one) == one / "model.Q4_0.gguf"
    (one / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserInputError, match="2 .gguf files; pick one with --gguf-file"):
        find_gguf(one)
    assert find_gguf(one, "model.Q8_0.gguf") == one / "model.Q8_0.gguf"
    with pytest.raises(UserInputError, match="--gguf-file nope.gguf: no such file"):
        find_gguf(one, "nope.gguf")


def test_a_hugging_face_folder_is_not_a_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path) is None
    with pytest.raises(UserInputError, match="expected a folder or a .gguf file"):
        find_gguf(tmp_path / "config.json")
