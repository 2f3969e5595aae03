"""Deterministic, independent seed streams derived from the run seed."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np


def stream_seed(seed: int, *words: int) -> int:
    """A 31-bit seed of the stream ``(seed, *words)``; distinct word paths give independent streams."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(1)[0] & 0x7FFFFFFF)


def derive_seed(seed: int, *path: str | int) -> int:
    """:func:`stream_seed` for a path of names (site, round, model): each part is hashed to a 32-bit word."""
    return stream_seed(seed, *(int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:4], "little") for p in path))


def secret_seed(secret: bytes, *path: str | int) -> int:
    """A 63-bit seed for ``path`` keyed by ``secret`` (HMAC-SHA256): unpredictable without the secret.

    The seeds of private randomness (DP-SGD's Poisson sampling and noise) come from here, keyed by a site's own
    secret; :func:`derive_seed` is for public randomness only (splits, phantoms, public sampling).
    """
    if len(secret) < 16:
        raise ValueError(f"a secret of {len(secret)} bytes is too short to key private noise; use 32 random bytes")
    msg = "\x1f".join(str(p) for p in path).encode()
    return int.from_bytes(hmac.new(secret, msg, hashlib.sha256).digest()[:8], "little") & ((1 << 63) - 1)
