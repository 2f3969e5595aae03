"""The site's ClientApp module loads without the models: in a deployment every message starts a fresh ClientApp
process, and three of SecAgg+'s four stages never reach a handler (client.app's module docstring)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "opacus")


def test_loading_the_client_app_imports_no_model_library() -> None:
    # Prepare: a fresh interpreter, as a SuperNode's flwr-clientapp process is
    code = ("import sys, client.app; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # Assert: the app and its SecAgg+ mod load; torch, diffusers and Opacus wait for a handler that needs them
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "none"


def test_every_import_inside_a_handler_resolves() -> None:
    # Prepare: the function-level imports of the ClientApp's modules (they run only when a message needs them)
    lazy = []
    for path in (ROOT / "client" / "app.py", ROOT / "client" / "secure.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                lazy += [(node.module, alias.name) for node in ast.walk(fn) if isinstance(node, ast.ImportFrom)
                         for alias in node.names]
                lazy += [(alias.name, None) for node in ast.walk(fn) if isinstance(node, ast.Import)
                         for alias in node.names]
    # Execute / Assert: each module imports and holds each name
    assert len(lazy) >= 15
    for module, name in lazy:
        assert module is not None
        loaded = importlib.import_module(module)
        assert name is None or hasattr(loaded, name), f"{module} has no {name}"
