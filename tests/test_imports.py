"""Imports flow one way: contract <- export <- graph <- adapters <- runtime <- api <- cli."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgelora"
LATER_THAN_SHARED = {"export", "graph", "adapters", "runtime", "api", "infer_file", "bench", "bench_serve", "chat", "cli",
                     "server", "ray"}
# Stage -> stages it must never import. The shared modules (contract, errors, model_spec,
# lora_manifest, processed_adapter, fingerprint, fileio) import no stage at all.
FORBIDDEN = {
    **{shared: LATER_THAN_SHARED for shared in ("contract", "errors", "model_spec", "lora_manifest",
                                                "processed_adapter", "fingerprint", "fileio", "lora_modules")},
    "export": LATER_THAN_SHARED - {"export"},
    "graph": LATER_THAN_SHARED - {"export", "graph"},
    "adapters": LATER_THAN_SHARED - {"export", "graph", "adapters"},
    "runtime": LATER_THAN_SHARED - {"runtime"},  # not even the adapter *processing* stage
    "api": {"infer_file", "bench", "cli", "server", "ray", "export", "graph", "adapters"},
    "server": {"ray", "cli", "bench", "bench_serve", "chat", "infer_file"},  # edgelora.ray builds on the server
}


def test_only_edgelora_ray_imports_ray():
    users = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "ray"
             and any(isinstance(node, (ast.Import, ast.ImportFrom))
                     and any(name == "ray" or name.startswith("ray.") for name in
                             ([alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]))
                     for node in ast.walk(ast.parse(p.read_text())))]
    assert not users


def _imports(path: Path) -> set[str]:
    """Top-level edgelora modules a file imports: ``import edgelora.x``, ``from edgelora.x import``, ``from edgelora import x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "edgelora":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgelora."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("edgelora."))
    return found


def test_import_walker_sees_every_form(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text("import edgelora.runtime.engine\nfrom edgelora.graph import insert_lora\nfrom edgelora import api, cli\n")
    assert _imports(path) == {"runtime", "graph", "api", "cli"}


def test_stages_import_only_earlier_stages():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        stage = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        bad = _imports(path) & FORBIDDEN.get(stage, set())
        if bad:
            problems.append(f"{path.relative_to(PACKAGE)} imports {sorted(bad)}")
    assert not problems


def test_nothing_imports_the_cli():
    users = [p for p in PACKAGE.rglob("*.py") if p.name not in ("cli.py", "__main__.py") and "cli" in _imports(p)]
    assert not users


def test_naming_rule_for_lora_inputs_lives_only_in_contract():
    offenders = [p for p in PACKAGE.rglob("*.py") if p.name != "contract.py" and 'f"lora.layers' in p.read_text()]
    assert not offenders


def test_inference_side_runs_without_torch():
    """A deployment box carries onnxruntime, the tokenizer and our runtime: infer must not import torch."""
    import subprocess
    import sys

    code = ("import sys, edgelora.infer_file, edgelora.api, edgelora.runtime.engine, edgelora.runtime.native; "
            "from edgelora import LLM; "
            "bad = [m for m in ('torch', 'peft') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
