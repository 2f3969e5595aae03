"""Code version for artifact sidecars."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """``git describe --always --dirty`` of the checkout this code came from, or ``"unknown"`` outside one.

    The launcher runs the Flower app from a staged copy outside the checkout (inside the run folder, which may sit in
    another repository): it writes the checkout's version into the copy as ``common/_staged_version.py``, read here.
    """
    try:
        from common._staged_version import CODE_VERSION  # type: ignore[import-not-found]

        return str(CODE_VERSION)
    except ImportError:
        pass
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
