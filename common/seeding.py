"""Deterministic seeds derived from the run seed and a path of names (site, round, model)."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *path: str | int) -> int:
    """A 31-bit seed for ``path`` under ``seed``; stable across processes and Python versions."""
    words = [int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:4], "little") for p in path]
    return int(np.random.SeedSequence([seed, *words]).generate_state(1)[0] & 0x7FFFFFFF)
