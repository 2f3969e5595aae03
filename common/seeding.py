"""Deterministic, independent seed streams derived from the run seed."""

from __future__ import annotations

import hashlib

import numpy as np


def stream_seed(seed: int, *words: int) -> int:
    """A 31-bit seed of the stream ``(seed, *words)``; distinct word paths give independent streams."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(1)[0] & 0x7FFFFFFF)


def derive_seed(seed: int, *path: str | int) -> int:
    """:func:`stream_seed` for a path of names (site, round, model): each part is hashed to a 32-bit word."""
    return stream_seed(seed, *(int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:4], "little") for p in path))
