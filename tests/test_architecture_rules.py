"""The layers (CONTRACT "Layers", STYLE principle 1), checked on the source itself.

- `pipelines/` (the core) imports no front end, no deployment and no web, Ray, HTTP-client
  or `spaces` library;
- front ends do not import each other, and the page and the API reach the core only
  through its interface, never its engine, registry or model internals;
- no import cycles among the project's modules (imports under `TYPE_CHECKING` ignored).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "frontends", "deployments")
WEB_AND_REMOTE = (
    "gradio",
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "requests",
    "spaces",
    "ray",
    "huggingface_hub",
)
CORE_INTERNALS = (
    "pipelines.engine",
    "pipelines.model_manager",
    "pipelines.service",
    "pipelines.jobs",
    "pipelines.folders.registry",
    "pipelines.lora",
    "pipelines.generation",
    "pipelines.loading",
)
"""What the page and the API must not touch: they are clients of `pipelines.interface`."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {"app": PROJECT / "app.py"}
    for package in PACKAGES:
        for path in (PROJECT / package).rglob("*.py"):
            found[module_name(path)] = path
    return found


def _in_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, module: str) -> set[str]:
    """Every module `path` imports at run time (anywhere in the file, TYPE_CHECKING
    blocks excepted), as absolute dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _in_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path, name) if m in modules and m != name}
    return graph


def test_core_imports_no_front_end_deployment_or_web_library() -> None:
    offences = []
    for name, path in project_modules().items():
        if not name.startswith("pipelines"):
            continue
        for imported in imports_of(path, name):
            root = imported.split(".")[0]
            if root in ("frontends", "deployments", "app", *WEB_AND_REMOTE):
                offences.append(f"{name} imports {imported}")
    assert offences == []


def test_front_ends_do_not_import_each_other_or_core_internals() -> None:
    offences = []
    for name, path in project_modules().items():
        parts = name.split(".")
        if parts[0] != "frontends" or len(parts) < 2:
            continue
        own = parts[1]
        for imported in imports_of(path, name):
            other = imported.split(".")
            if other[0] == "frontends" and len(other) > 1 and other[1] != own:
                offences.append(f"{name} imports {imported}")
            if own in ("page", "api") and imported.startswith(CORE_INTERNALS):
                offences.append(f"{name} reaches into {imported}")
    assert offences == []


def test_no_import_cycles() -> None:
    graph = project_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == []


def test_the_checker_sees_a_planted_cycle_and_a_forbidden_import(tmp_path: Path) -> None:
    """Negative control: the same functions flag what they must."""
    planted = tmp_path / "x.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "import gradio\n"
        "if TYPE_CHECKING:\n    import ray\n"
        "def f():\n    from frontends.api import routes\n"
    )
    found = imports_of(planted, "pipelines.x")
    assert "gradio" in found and "frontends.api.routes" in found and "ray" not in found


def test_pipelines_imports_no_web_framework_at_run_time() -> None:
    script = (
        "import sys, importlib, pkgutil, pipelines\n"
        "for m in pkgutil.walk_packages(pipelines.__path__, 'pipelines.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('gradio', 'fastapi', 'starlette', 'uvicorn', 'spaces', 'ray', 'frontends', "
        "'deployments'))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


def test_app_import_has_no_side_effects() -> None:
    script = "import app, sys; print('torch' in sys.modules, 'gradio' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]


def test_only_entry_points_set_torch_threads() -> None:
    """A library must not change process-wide state: `torch.set_num_threads` is called
    only by `pipelines.settings.apply_threads`, and that only by app.main, the CLI's main,
    the Ray replica and the ZeroGPU worker (each its own process)."""
    callers = []
    for name, path in project_modules().items():
        text = path.read_text()
        if "set_num_threads(" in text and name != "pipelines.settings":
            callers.append(name)
        if "apply_threads(" in text and name != "pipelines.settings":
            callers.append(f"{name}: apply_threads")
    assert sorted(callers) == [
        "app: apply_threads",
        "deployments.ray.scaleout: apply_threads",
        "deployments.zerogpu: apply_threads",
        "frontends.cli.__main__: apply_threads",
    ]
