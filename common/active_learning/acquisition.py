"""Acquisition math of the active-learning coordinator: what to ask the sites for, and what to keep.

Pure functions on arrays (no Flower, no torch). Selection composes: a quality threshold, then balancing
across plane x GA bins, and inside each bin an ordering (top uncertainty, k-center greedy for diversity,
or random, the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS, PLANES

Ordering = Literal["uncertainty", "kcenter", "random"]
GA_BIN_EDGES: tuple[float, ...] = (GA_MIN_WEEKS, 20.0, 26.0, 32.0, GA_MAX_WEEKS)  # 4 GA bins (weeks)


def ga_bin(ga_weeks: np.ndarray) -> np.ndarray:
    """Index of the GA bin of each value (clipped into the first/last bin)."""
    inner = np.asarray(GA_BIN_EDGES[1:-1])
    return np.searchsorted(inner, np.asarray(ga_weeks, dtype=float), side="right")


def condition_bins(plane: np.ndarray, ga_weeks: np.ndarray) -> np.ndarray:
    """Flat bin id ``plane * n_ga_bins + ga_bin``."""
    n_ga = len(GA_BIN_EDGES) - 1
    return np.asarray(plane, dtype=int) * n_ga + ga_bin(ga_weeks)


def num_bins() -> int:
    """Number of plane x GA bins."""
    return len(PLANES) * (len(GA_BIN_EDGES) - 1)


def kcenter_greedy(features: np.ndarray, k: int, *, existing: np.ndarray | None = None,
                   rng: np.random.Generator | None = None) -> list[int]:
    """Core-set selection (Sener & Savarese 2018): repeatedly add the point farthest from the chosen centers.

    Parameters
    ----------
    features:
        ``(n, d)`` candidate features.
    k:
        Budget; at most ``min(k, n)`` indices are returned.
    existing:
        ``(m, d)`` features already in the set (the release); when empty, the first center is drawn with ``rng``
        (or index 0 without one).
    """
    feats = np.asarray(features, dtype=np.float64)
    n = len(feats)
    k = min(int(k), n)
    if k <= 0:
        return []
    if existing is not None and len(existing):
        dist = _min_dist(feats, np.asarray(existing, dtype=np.float64))
        chosen: list[int] = []
    else:
        first = int(rng.integers(n)) if rng is not None else 0
        chosen = [first]
        dist = np.linalg.norm(feats - feats[first], axis=1)
    while len(chosen) < k:
        dist_masked = dist.copy()
        dist_masked[chosen] = -np.inf
        nxt = int(np.argmax(dist_masked))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(feats - feats[nxt], axis=1))
    return chosen


def _min_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :]
    return np.sqrt(np.maximum(d2, 0.0)).min(axis=1)


def novelty(features: np.ndarray, bank: np.ndarray | None) -> np.ndarray:
    """Distance of each candidate to its nearest neighbour in ``bank`` (the released set); +inf if empty."""
    if bank is None or len(bank) == 0:
        return np.full(len(features), np.inf)
    return _min_dist(np.asarray(features, dtype=np.float64), np.asarray(bank, dtype=np.float64))


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of class probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def balanced_quota(bins: np.ndarray, k: int, target: np.ndarray) -> dict[int, int]:
    """How many to take from each bin so the selection follows ``target`` proportions as closely as supply allows.

    Largest-remainder apportionment of ``k`` over the bins present; a bin's unmet quota (too few candidates)
    is redistributed to the others in proportion to their targets.
    """
    bins = np.asarray(bins, dtype=int)
    supply = {int(b): int((bins == b).sum()) for b in np.unique(bins)}
    quota = {b: 0 for b in supply}
    remaining = min(int(k), len(bins))
    while remaining > 0:
        open_bins = [b for b in supply if quota[b] < supply[b]]
        weights = np.array([max(float(target[b]), 0.0) for b in open_bins])
        if weights.sum() <= 0:
            weights = np.ones(len(open_bins))
        share = weights / weights.sum() * remaining
        base = np.floor(share).astype(int)
        order = np.argsort(-(share - base), kind="stable")
        base[order[: remaining - base.sum()]] += 1
        for b, extra in zip(open_bins, base):
            take = min(int(extra), supply[b] - quota[b])
            quota[b] += take
            remaining -= take
    return quota


@dataclass(frozen=True)
class Selection:
    """Chosen candidate indices, with the reason recorded for each."""

    indices: list[int]
    reasons: list[str]


def select(
    *,
    k: int,
    bins: np.ndarray,
    quality: np.ndarray,
    uncertainty: np.ndarray,
    features: np.ndarray,
    ordering: Ordering,
    quality_threshold: float = 0.0,
    balance: bool = True,
    target: np.ndarray | None = None,
    existing: np.ndarray | None = None,
    rng: np.random.Generator,
) -> Selection:
    """Quality filter -> per-bin quota (``balance``) -> order inside each bin; returns at most ``k`` indices.

    ``ordering="random"`` with ``balance=False`` and ``quality_threshold=0`` is the random baseline.
    """
    n = len(bins)
    ok = np.flatnonzero(np.asarray(quality) >= quality_threshold)
    if len(ok) == 0:
        return Selection([], [])
    tgt = np.ones(num_bins()) if target is None else np.asarray(target, dtype=float)
    if balance:
        quota = balanced_quota(bins[ok], k, tgt)
    else:
        quota = {-1: min(k, len(ok))}
    chosen: list[int] = []
    reasons: list[str] = []
    for b, q in sorted(quota.items()):
        if q == 0:
            continue
        pool = ok if b == -1 else ok[bins[ok] == b]
        if ordering == "uncertainty":
            picked = pool[np.argsort(-np.asarray(uncertainty)[pool], kind="stable")[:q]].tolist()
            why = "top uncertainty"
        elif ordering == "kcenter":
            ex = None if existing is None else existing
            local = kcenter_greedy(np.asarray(features)[pool], q, existing=ex, rng=rng)
            picked = pool[local].tolist()
            ex_picked = np.asarray(features)[picked]
            existing = ex_picked if existing is None else np.concatenate([existing, ex_picked])
            why = "k-center (farthest from the set)"
        else:
            picked = rng.choice(pool, size=q, replace=False).tolist()
            why = "random"
        chosen += picked
        scope = "" if b == -1 else f" in bin {PLANES[b // (len(GA_BIN_EDGES) - 1)]}/GA{b % (len(GA_BIN_EDGES) - 1)}"
        reasons += [f"{why}{scope}" + (f"; quality>={quality_threshold:g}" if quality_threshold > 0 else "")] * len(picked)
    assert len(chosen) <= min(k, n)  # quota sums to at most k by construction
    return Selection(chosen, reasons)


def plan_conditions(
    release_bins: np.ndarray,
    n: int,
    *,
    rng: np.random.Generator,
    bin_uncertainty: np.ndarray | None = None,
    planes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Conditions (plane, GA weeks) to request next, drawn where the release is thin or the models unsure.

    Weight of a bin = (deficit vs a uniform share of the release so far + 1) x (1 + normalised uncertainty),
    over the bins of ``planes`` only (the consortium's plane scope; ``None`` = every plane).
    """
    n_ga = len(GA_BIN_EDGES) - 1
    in_scope = np.zeros(num_bins(), dtype=bool)
    for p in range(len(PLANES)) if planes is None else planes:
        if not 0 <= int(p) < len(PLANES):
            raise ValueError(f"plane index {p} is out of range 0..{len(PLANES) - 1}")
        in_scope[int(p) * n_ga:(int(p) + 1) * n_ga] = True
    if not in_scope.any():
        raise ValueError("planes is empty: give at least one plane to request")
    counts = np.bincount(np.asarray(release_bins, dtype=int), minlength=num_bins()).astype(float)
    expected = (counts[in_scope].sum() + n) / in_scope.sum()
    weight = np.maximum(expected - counts, 0.0) + 1.0
    if bin_uncertainty is not None:
        u = np.where(in_scope, np.asarray(bin_uncertainty, dtype=float), 0.0)
        weight = weight * (1.0 + u / (u.max() + 1e-12))
    weight[~in_scope] = 0.0
    chosen = rng.choice(num_bins(), size=n, p=weight / weight.sum())
    plane = chosen // n_ga
    lo = np.asarray(GA_BIN_EDGES)[chosen % n_ga]
    hi = np.asarray(GA_BIN_EDGES)[chosen % n_ga + 1]
    ga = rng.uniform(lo, hi)
    return plane.astype(np.int64), ga.astype(np.float32)


def bin_uncertainty(bins: np.ndarray, uncertainty: np.ndarray) -> np.ndarray | None:
    """Mean uncertainty score per plane x GA bin of scored samples; a bin with none gets the highest mean seen.

    What :func:`plan_conditions` weighs by ("where the downstream models are least certain"); ``None`` when there
    are no scored samples yet.
    """
    bins = np.asarray(bins, dtype=int)
    u = np.asarray(uncertainty, dtype=float)
    if bins.shape != u.shape:
        raise ValueError(f"bins {bins.shape} and uncertainty {u.shape} must have the same shape")
    keep = np.isfinite(u)
    if not keep.any():
        return None
    sums = np.bincount(bins[keep], weights=u[keep], minlength=num_bins())
    counts = np.bincount(bins[keep], minlength=num_bins())
    means = np.divide(sums, counts, out=np.zeros(num_bins()), where=counts > 0)
    means[counts == 0] = means[counts > 0].max()
    return means


def bin_summary(bins: Sequence[int]) -> dict[str, int]:
    """Counts per plane (for logs)."""
    n_ga = len(GA_BIN_EDGES) - 1
    out: dict[str, int] = {}
    for b in bins:
        name = PLANES[int(b) // n_ga]
        out[name] = out.get(name, 0) + 1
    return out
