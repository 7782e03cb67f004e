"""The command line: every flag explained, one-line errors, the console script installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgelora.cli import build_parser, main

COMMANDS = {
    "export": ["--model_dir", "--output_dir", "--dtype"],
    "insert-lora": ["--onnx_dir", "--target_modules"],
    "process-lora": ["--input_dir", "--output_dir", "--onnx_dir", "--dtype"],
    "merge-lora": ["--model_dir", "--lora_dir", "--output_dir", "--overwrite"],
    "infer": ["--onnxDir", "--inputFile", "--outputFile", "--maxLoraRank", "--maxBatchSize", "--device"],
    "bench": ["--onnxDir", "--adapters", "--batch", "--prompt-len", "--new-tokens", "--json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in COMMANDS[command]:
        assert flag in text
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        assert action.help, f"{command} {action.option_strings} has no help"


def test_missing_required_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model_dir", "x"])
    assert exit_info.value.code == 2
    assert "--output_dir" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "edgelora", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_bad_input_from_a_subprocess_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgelora", "insert-lora", "--onnx_dir", str(tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
