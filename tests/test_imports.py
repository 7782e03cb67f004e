"""Imports flow one way, folder by folder:

    errors, formats/  <-  export/  <-  graph/  <-  adapters/        (the toolchain stages)
    errors, formats/  <-  runtime/                                   (never a toolchain stage)
    runtime/, formats/ (+ adapters/ for the server's run-time loads)  <-  entrypoints/
    entrypoints/  <-  tools/  <-  cli.py, dependencies.py, __main__.py (and the re-export shims)

Inside entrypoints/: api <- infer_file, chat, server <- ray. Nothing imports the CLI, and only
entrypoints/ray imports Ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgelora"
GROUPED = {"formats", "entrypoints", "tools"}  # folders whose modules are units of their own
RANK = {"errors": 0, "formats": 0, "export": 1, "graph": 2, "adapters": 3, "runtime": 4, "entrypoints": 5,
        "tools": 6, "dependencies": 7, "cli": 7, "__main__": 8, "__init__": 8, "api": 8, "ray": 8, "_runtime": 0}
# unit -> units it must never import, beyond what the ranks forbid
FORBIDDEN = {
    "runtime": {"export", "graph", "adapters"},  # not even the adapter *processing* stage
    "entrypoints.api": {"entrypoints.infer_file", "entrypoints.chat", "entrypoints.server", "entrypoints.ray",
                        "export", "graph", "adapters"},
    "entrypoints.infer_file": {"entrypoints.chat", "entrypoints.server", "entrypoints.ray", "export", "graph"},
    "entrypoints.chat": {"entrypoints.infer_file", "entrypoints.server", "entrypoints.ray", "export", "graph"},
    "entrypoints.server": {"entrypoints.ray", "entrypoints.chat", "entrypoints.infer_file", "export", "graph"},
    "entrypoints.ray": {"entrypoints.chat", "entrypoints.infer_file", "export", "graph"},
}


def _unit(parts: list[str]) -> str:
    """The unit of a module path below edgelora: ``runtime``, ``formats.contract``, ``entrypoints.server``, ``cli``."""
    head = parts[0].removesuffix(".py")
    if head in GROUPED and len(parts) > 1 and parts[1] != "__init__.py":
        return f"{head}.{parts[1].removesuffix('.py')}"
    return head


def _imports(path: Path) -> set[str]:
    """Units a file imports, in every form: ``import edgelora.x.y``, ``from edgelora.x import y``, ``from edgelora import x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "edgelora"
                                                                 or node.module.startswith("edgelora.")):
            module = node.module.split(".")[1:]
            if not module or (module[0] in GROUPED and len(module) == 1):
                found.update(_unit(module + [alias.name]) for alias in node.names)
            else:
                found.add(_unit(module))
        elif isinstance(node, ast.Import):
            found.update(_unit(alias.name.split(".")[1:]) for alias in node.names if alias.name.startswith("edgelora."))
    return found


def _rank(unit: str) -> int:
    return RANK[unit.split(".")[0]]


def test_import_walker_sees_every_form(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text("import edgelora.runtime.engine\nfrom edgelora.graph import insert_lora\nfrom edgelora import cli\n"
                    "from edgelora.formats import contract\nfrom edgelora.entrypoints.server.app import create_app\n")
    assert _imports(path) == {"runtime", "graph", "cli", "formats.contract", "entrypoints.server"}


def test_every_folder_imports_only_what_its_layer_may():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(list(path.relative_to(PACKAGE).parts))
        for imported in _imports(path) - {unit}:
            if _rank(imported) > _rank(unit) or imported in FORBIDDEN.get(unit, set()) \
                    or imported in FORBIDDEN.get(unit.split(".")[0], set()):
                problems.append(f"{path.relative_to(PACKAGE)} ({unit}) imports {imported}")
    assert not problems


def test_the_rules_catch_an_upward_import(tmp_path):
    """The check above is not vacuous: a runtime module importing the server, or graph the runtime, is caught."""
    for unit, imported in (("runtime", "entrypoints.server"), ("graph", "runtime"), ("runtime", "adapters"),
                           ("entrypoints.api", "entrypoints.server"), ("formats.contract", "export")):
        assert _rank(imported) > _rank(unit) or imported in FORBIDDEN.get(unit, set()) \
            or imported in FORBIDDEN.get(unit.split(".")[0], set()), (unit, imported)


def test_only_entrypoints_ray_imports_ray():
    def imports_ray(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(name == "ray" or name.startswith("ray.") for name in names):
                return True
        return False

    users = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if imports_ray(p)]
    assert users and all(user.parts[:2] == ("entrypoints", "ray") for user in users), users


def test_nothing_imports_the_cli():
    users = [p for p in PACKAGE.rglob("*.py") if p.name not in ("cli.py", "__main__.py") and "cli" in _imports(p)]
    assert not users


def test_naming_rule_for_lora_inputs_lives_only_in_contract():
    offenders = [p for p in PACKAGE.rglob("*.py") if p.name != "contract.py" and 'f"lora.layers' in p.read_text()]
    assert not offenders


def test_public_imports_keep_working():
    """What the README shows, from before the folders were grouped by role."""
    from edgelora import LLM, LoraConfig, LoRARequest, SamplingParams
    from edgelora.api import LLM as OldLLM
    from edgelora.entrypoints.api import LLM as NewLLM
    from edgelora.runtime import Engine, EngineConfig, Scheduler, SchedulerConfig

    assert LLM is OldLLM is NewLLM and all((LoraConfig, LoRARequest, SamplingParams, Engine, EngineConfig, Scheduler,
                                            SchedulerConfig))


def test_inference_side_runs_without_torch():
    """A deployment box carries onnxruntime, the tokenizer and our runtime: infer must not import torch."""
    import subprocess
    import sys

    code = ("import sys, edgelora.entrypoints.infer_file, edgelora.entrypoints.api, edgelora.runtime.engine, "
            "edgelora.runtime.native; from edgelora import LLM; "
            "bad = [m for m in ('torch', 'peft') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
