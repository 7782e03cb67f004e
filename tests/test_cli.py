"""The command line: every flag explained, one-line errors, the console script installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgelora.cli import build_parser, main

COMMANDS = {
    "export": ["--model-dir", "--output-dir", "--dtype"],
    "insert-lora": ["--onnx-dir", "--target-modules"],
    "process-lora": ["--input-dir", "--output-dir", "--onnx-dir", "--dtype"],
    "merge-lora": ["--model-dir", "--lora-dir", "--output-dir", "--overwrite"],
    "infer": ["--onnx-dir", "--input-file", "--output-file", "--max-lora-rank", "--max-batch-size", "--device"],
    "bench": ["--onnx-dir", "--adapters", "--batch", "--prompt-len", "--max-tokens", "--json"],
}
# The reference tools' spellings, accepted but not shown in --help.
ALIASES = {
    "infer": {"--onnxDir": "onnx_dir", "--onnx_dir": "onnx_dir", "--inputFile": "input_file",
              "--outputFile": "output_file", "--maxLoraRank": "max_lora_rank", "--maxBatchSize": "max_batch_size",
              "--max-num-seqs": "max_batch_size"},
    "export": {"--model_dir": "model_dir", "--output_dir": "output_dir", "--modelDir": "model_dir"},
    "bench": {"--new-tokens": "max_tokens", "--onnxDir": "onnx_dir"},
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


@pytest.mark.parametrize("command", sorted(ALIASES))
def test_reference_spellings_are_accepted_but_not_listed(command, capsys):
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    required = {"infer": ["--onnx-dir", "o", "--input-file", "i", "--output-file", "f"],
                "export": ["--model-dir", "m", "--output-dir", "o"], "bench": ["--onnx-dir", "o", "--adapters", "a"]}
    for alias, dest in ALIASES[command].items():
        value = "7" if dest.startswith("max") else "x"
        args = parser.parse_args([command, *required[command], alias, value])
        assert str(getattr(args, dest)) == value, alias
    help_text = subparser.format_help()
    for alias in ALIASES[command]:
        assert alias not in help_text.split("Flags are also accepted")[0], f"{alias} is listed in --help"


def test_missing_required_flag_exits_2(capsys):
    assert main(["export", "--model-dir", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--output-dir" in err and len(err.splitlines()) == 1, "a usage error is one line, no usage dump"


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "edgelora", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_bad_input_from_a_subprocess_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgelora", "insert-lora", "--onnx-dir", str(tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_lora_modules_given_twice_add_up():
    from edgelora.cli import build_parser

    for command in (["serve", "--onnx-dir", "x"], ["bench-serve", "--adapters", "a"]):
        args = build_parser().parse_args([*command, "--lora-modules", "a=1", "b=2", "--lora-modules", "c=3"])
        assert args.lora_modules == ["a=1", "b=2", "c=3"]
