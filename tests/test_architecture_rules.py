"""STYLE principle 1: the engine is a library; importing it pulls in no web framework."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_pipelines_imports_no_web_framework() -> None:
    script = (
        "import sys, importlib, pkgutil, pipelines\n"
        "for m in pkgutil.iter_modules(pipelines.__path__):\n"
        "    importlib.import_module('pipelines.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('gradio', 'fastapi', 'starlette', 'uvicorn', 'spaces', 'ray'))\n"
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
