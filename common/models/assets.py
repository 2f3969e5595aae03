"""Where the shipped weights live: ``$DIFUSAL_ASSETS`` or the project's ``common/assets``.

Flower's app bundle (FAB) carries only text files, so an app run from a FAB finds the shipped weights through
:data:`ASSETS_ENV` (the launchers set it to the project's ``common/assets``).
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ASSETS_ENV = "DIFUSAL_ASSETS"


def asset_folder(name: str) -> Path:
    """The shipped folder ``name`` (``prior-demo``, ``phantom-encoder``); it may not exist."""
    return Path(os.environ.get(ASSETS_ENV, ASSETS)) / name
