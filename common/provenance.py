"""Code version for artifact sidecars."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """``git describe --always --dirty`` of this checkout, or ``"unknown"`` outside one."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
