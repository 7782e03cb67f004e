"""The package as users install it: a built wheel in a fresh venv, run from anywhere.

* ``pip install edgelora`` alone (the base install): ``quantize`` works, and a command that needs
  an extra says which one in one line (exit 2) instead of an internal error.
* a non-editable install started as ``edgelora serve --ray`` from the root of the source tree:
  Ray puts the driver's working directory on every replica's ``sys.path``, where the unbuilt
  ``edgelora/`` would shadow the installed package.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import onnx
import pytest
from server_process import running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel users get from ``pip install .`` (built once; scikit-build-core reuses build/)."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), str(ROOT)],
                   check=True, capture_output=True, timeout=PIP_TIMEOUT_S)
    return next(folder.glob("edgelora-*.whl"))


def _venv(folder: Path, *install: str) -> Path:
    """A fresh venv with ``pip install *install``; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    subprocess.run([str(folder / "bin" / "pip"), "install", "-q", *install], check=True, capture_output=True,
                   timeout=PIP_TIMEOUT_S)
    return folder / "bin"


def _run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_quantize_runs_from_the_base_install_and_missing_extras_are_named(wheel, exported_samples, tmp_path):
    sample = exported_samples["qwen2"]
    bin_dir = _venv(tmp_path / "base", str(wheel))
    assert _run([bin_dir / "python", "-c", "import torch"], tmp_path).returncode != 0, "the base install has no torch"

    result = _run([bin_dir / "edgelora", "quantize", "--onnx-dir", sample.onnx_dir, "--output-dir", tmp_path / "q4"],
                  tmp_path)
    assert result.returncode == 0, result.stderr
    graph = onnx.load(str(tmp_path / "q4" / "model.onnx"), load_external_data=False).graph
    assert "MatMulNBits" in {node.op_type for node in graph.node}

    for command, extra in ((["export", "--model-dir", sample.model_dir, "--output-dir", tmp_path / "x"], "export"),
                           (["serve", "--onnx-dir", sample.onnx_dir], "serve")):
        result = _run([bin_dir / "edgelora", *command], tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert f"pip install 'edgelora[{extra}]'" in lines[0] and "internal error" not in lines[0]


def test_serve_ray_from_the_source_roots_folder_serves_the_installed_package(wheel, exported_samples, tmp_path):
    """A non-editable install (its dependencies borrowed from this venv, after its own site-packages), started
    from the repository root, whose edgelora/ has no native runtime built into it."""
    assert not list((ROOT / "edgelora").glob("_runtime*.so")), "the source tree must be unbuilt for this test"
    venv = tmp_path / "installed"
    bin_dir = _venv(venv, "--no-deps", str(wheel))
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sample = exported_samples["qwen2"]
    with running_server("--ray", "--replicas", "1", "--threads", "1", "--onnx-dir", str(sample.onnx_dir),
                        "--served-model-name", "base", "--lora-modules", f"a1={sample.processed['a1']}",
                        launcher=[str(bin_dir / "edgelora")], cwd=str(ROOT), timeout_s=240) as (url, _):
        response = httpx.post(f"{url}/v1/completions", json={"model": "a1", "prompt": "Hello", "max_tokens": 4,
                                                             "temperature": 0}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
