"""Privacy-audit math for a released synthetic image set: pure functions on arrays and JSON records.

Parts: image distances and the memorisation criterion of Carlini et al. (2023); distance to closest record
(DCR); the canaries of the one-run audit of Steinke, Nasr & Jagielski (2023); the DP certificate, which
recomputes every accounted epsilon from the ledger's own (noise multiplier, sampling rate, steps).
Images are ``uint8`` ``[N, H, W]`` (or float in [-1, 1], ``[N, H, W]`` / ``[N, 1, H, W]``); distances are on
the [0, 1] intensity scale. Attack metrics, the Steinke bound and the torch-side scores live in
:mod:`common.analysis.audit_mia`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from common.privacy.distributed_dp import central_and_local_epsilon, plan_from_record

# Carlini et al. 2023, CIFAR-10 experiments: l(x^, x; S) = l2(x^, x) / (alpha * mean_{y in S} l2(x^, y)), S the
# n nearest training images, alpha = 0.5, n = 50. We report the ratio d_1 / mean(d_2..d_{n+1}) (S without the
# nearest itself, so that a copy does not dilute its own reference; ratio ~ alpha * l) and flag a near-copy when
# it is below 1/3 (our threshold: the nearest is 3x closer than the typical neighbour).
CARLINI_ALPHA = 0.5
CARLINI_N_NEIGHBORS = 50
NEAR_COPY_RATIO = 1.0 / 3.0
# Tiled l2 (Carlini et al. 2023, Stable Diffusion experiments): a 4 x 4 grid of non-overlapping tiles; the
# distance is the largest per-tile normalised l2, so that a copy must match everywhere, not only on average.
TILE_GRID = 4
EXACT_COPY_DISTANCE = 1.0 / 255.0  # below one grey level RMS in every tile: a pixel copy up to rounding
HIGH_CORRELATION = 0.95  # second criterion (ours): pixel Pearson correlation with one private image


# -- images and distances -------------------------------------------------------------------------------
def as_unit_images(images: np.ndarray) -> np.ndarray:
    """``uint8`` (0..255) or float ([-1, 1]) images ``[N, H, W]`` / ``[N, 1, H, W]`` as float64 in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"images must be [N, H, W] or [N, 1, H, W]; got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip((arr.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _pairwise_rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distance ``[Na, Nb]`` between rows of ``a [Na, d]`` and ``b [Nb, d]`` (the normalised l2)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0) / a.shape[1])


def tiled_l2(a: np.ndarray, b: np.ndarray, *, grid: int = TILE_GRID, chunk: int = 256) -> np.ndarray:
    """Tiled normalised l2 ``[Na, Nb]``: the maximum over a ``grid x grid`` tiling of per-tile RMS distances.

    Parameters
    ----------
    a, b: image sets (see :func:`as_unit_images`) of the same height and width.
    grid: tiles per side (1 gives the plain normalised l2 ``||x - y||_2 / sqrt(d)``).
    chunk: rows of ``a`` per block (memory bound).

    Returns
    -------
    float64 ``[Na, Nb]`` in [0, 1].
    """
    ua, ub = as_unit_images(a), as_unit_images(b)
    if ua.shape[1:] != ub.shape[1:]:
        raise ValueError(f"image sizes differ: {ua.shape[1:]} vs {ub.shape[1:]}; resize one set first")
    h, w = ua.shape[1:]
    if grid < 1 or grid > min(h, w):
        raise ValueError(f"grid={grid} must be in [1, {min(h, w)}] for {h}x{w} images")
    rows, cols = np.array_split(np.arange(h), grid), np.array_split(np.arange(w), grid)
    out = np.zeros((ua.shape[0], ub.shape[0]))
    for r in rows:
        for c in cols:
            tb = ub[:, r][:, :, c].reshape(ub.shape[0], -1)
            for s in range(0, ua.shape[0], chunk):
                ta = ua[s:s + chunk, r][:, :, c].reshape(-1, tb.shape[1])
                np.maximum(out[s:s + chunk], _pairwise_rms(ta, tb), out=out[s:s + chunk])
    return out


def pixel_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation ``[Na, Nb]`` of flattened images (constant images correlate 0 with anything)."""
    fa, fb = (as_unit_images(x).reshape(len(x), -1) for x in (a, b))
    return cosine_similarity(fa - fa.mean(1, keepdims=True), fb - fb.mean(1, keepdims=True))


def cosine_similarity(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Cosine similarity ``[Na, Nb]`` between feature rows (zero vectors give 0)."""
    na = np.linalg.norm(fa, axis=1, keepdims=True)
    nb = np.linalg.norm(fb, axis=1, keepdims=True)
    return (fa / np.where(na > 0, na, 1.0)) @ (fb / np.where(nb > 0, nb, 1.0)).T


# -- memorisation scan ----------------------------------------------------------------------------------
def memorization_scan(released: np.ndarray, private: np.ndarray, *, grid: int = TILE_GRID,
                      n_neighbors: int = CARLINI_N_NEIGHBORS, ratio_threshold: float = NEAR_COPY_RATIO,
                      features: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Nearest private image of every released image and the Carlini et al. (2023) extraction ratio.

    Parameters
    ----------
    released, private: image sets of one size (``[Nr, H, W]``, ``[Np, H, W]``), ``Np >= 1``.
    grid: tiling of :func:`tiled_l2`.
    n_neighbors: ``n`` of the adaptive criterion (the paper's 50), capped at ``Np - 1``.
    ratio_threshold: flag when ``d_1 / mean(d_2 .. d_{n+1}) < ratio_threshold``.
    features: optional ``(released_features, private_features)`` for a feature-space cosine similarity.

    Returns
    -------
    Arrays over released images: ``nearest`` (index), ``distance`` (tiled l2 ``d_1``), ``ratio`` (NaN when
    ``Np == 1``), ``near_copy`` (ratio below the threshold, or an exact copy), ``exact_copy`` (tiled l2 below
    one grey level), ``correlation`` (Pearson with the nearest),
    ``max_correlation`` and ``max_correlation_index`` (over all private images), and ``feature_cosine``
    (with the nearest; NaN without features).
    """
    if len(private) == 0 or len(released) == 0:
        raise ValueError("memorization_scan needs at least one released and one private image")
    d = tiled_l2(released, private, grid=grid)
    n = min(int(n_neighbors), d.shape[1] - 1)
    srt = np.sort(d, axis=1)[:, : n + 1]
    nearest = d.argmin(axis=1)
    d1 = srt[:, 0]
    ratio = d1 / np.maximum(srt[:, 1:].mean(axis=1), 1e-12) if n >= 1 else np.full(len(d1), np.nan)
    corr = pixel_correlation(released, private)
    rows = np.arange(len(d1))
    feat = np.full(len(d1), np.nan)
    if features is not None:
        feat = cosine_similarity(np.asarray(features[0], float), np.asarray(features[1], float))[rows, nearest]
    exact = d1 < EXACT_COPY_DISTANCE
    return {"nearest": nearest, "distance": d1, "ratio": ratio, "exact_copy": exact,
            "near_copy": (np.nan_to_num(ratio, nan=np.inf) < ratio_threshold) | exact,
            "correlation": corr[rows, nearest], "max_correlation": corr.max(axis=1),
            "max_correlation_index": corr.argmax(axis=1), "feature_cosine": feat}


# -- distance to closest record -------------------------------------------------------------------------
def distance_to_closest(queries: np.ndarray, reference: np.ndarray, *, grid: int = TILE_GRID) -> np.ndarray:
    """For each query image, the tiled l2 to its closest reference image ``[Nq]``."""
    if len(reference) == 0:
        raise ValueError("distance_to_closest needs at least one reference image")
    return tiled_l2(queries, reference, grid=grid).min(axis=1)


def closer_to_members_share(released: np.ndarray, members: np.ndarray, nonmembers: np.ndarray, *,
                            grid: int = TILE_GRID, n_perm: int = 2000, seed: int = 0) -> dict[str, float]:
    """Share of released images whose nearest real image is a member, with a label-permutation p-value.

    Holdout test of Platzer & Reutterer (2021): if the generator does not depend on which images were members,
    the member/non-member labels of the real images are exchangeable, and the share is distributed as under a
    random relabelling (same set sizes). The permutation p-value is exact under that null and, unlike a binomial
    test over released images, is not fooled by "hub" real images that are the nearest of many released images.
    """
    d = tiled_l2(released, np.concatenate([np.asarray(members), np.asarray(nonmembers)]), grid=grid)
    counts = np.bincount(d.argmin(axis=1), minlength=d.shape[1]).astype(float)
    nm, nr = len(members), len(released)
    share = counts[:nm].sum() / nr
    rng = np.random.default_rng(seed)
    perm = np.array([counts[rng.permutation(len(counts))[:nm]].sum() / nr for _ in range(n_perm)])
    return {"share": share, "expected": nm / len(counts), "p_value": (1 + (perm >= share - 1e-12).sum()) / (1 + n_perm),
            "n_released": float(nr), "distinct_nearest": float((counts > 0).sum()), "n_permutations": float(n_perm)}


# -- canaries (Steinke, Nasr & Jagielski 2023) -------------------------------------------------------------
def make_canaries(m: int, *, size: int, seed: int, cells: int = 8, base: np.ndarray | None = None,
                  patch: int = 8) -> np.ndarray:
    """``m`` distinctive canaries ``uint8 [m, size, size]``: random black/white block patterns.

    Without ``base``: each canary is a whole ``cells x cells`` block pattern (out of distribution, far from every
    scan and from each other). With ``base`` (``[m, size, size]`` images, e.g. fresh phantoms from the site's
    distribution): each base image gets a ``patch x patch`` pixel stamp of a random ``patch``-cell binary pattern
    at a random position, so the canary is in distribution (learned like a scan, keyed by its own conditions)
    yet carries a detail only a model that saw it can denoise.
    """
    if m < 1 or size % cells or not 1 <= patch <= size:
        raise ValueError(f"need m >= 1, size divisible by cells, 1 <= patch <= size; got m={m}, size={size}, "
                         f"cells={cells}, patch={patch}")
    rng = np.random.default_rng(seed)
    if base is None:
        bits = rng.integers(0, 2, (m, cells, cells), dtype=np.uint8) * 255
        return np.kron(bits, np.ones((size // cells, size // cells), dtype=np.uint8))
    out = np.array(base, dtype=np.uint8, copy=True)
    if out.shape != (m, size, size):
        raise ValueError(f"base must be [{m}, {size}, {size}] uint8 images; got {out.shape}")
    for c in out:
        r, k = rng.integers(0, size - patch + 1, 2)
        c[r:r + patch, k:k + patch] = rng.integers(0, 2, (patch, patch), dtype=np.uint8) * 255
    return out


def canary_inclusion(m: int, *, seed: int, p: float = 0.5) -> np.ndarray:
    """Independent inclusion flags ``bool [m]``, each true with probability ``p`` (Steinke et al. 2023: 1/2)."""
    return np.random.default_rng(seed).random(m) < p


# -- DP certificate ----------------------------------------------------------------------------------------
def _rdp_orders() -> list[float]:
    """Opacus' default RDP orders plus the ledger's own (:data:`common.privacy.ledger.RDP_ORDERS`): any order gives a
    valid bound, so the minimum over more orders is the tightest valid epsilon an honest RDP ledger can report."""
    from opacus.accountants import RDPAccountant

    from common.privacy.ledger import RDP_ORDERS

    return sorted(set(RDPAccountant.DEFAULT_ALPHAS) | set(RDP_ORDERS))


def compose_epsilon(histories: Sequence[tuple[float, float, int]], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of several (sigma, q, steps) DP-SGD histories composed in one fresh Opacus accountant."""
    hist = [(float(s), float(q), int(n)) for s, q, n in histories if int(n) > 0]
    if not hist:
        return 0.0
    from opacus.accountants import create_accountant  # lazy: only the certificate needs it

    acc = create_accountant(mechanism=accountant)
    acc.history = hist
    kwargs: dict[str, Any] = {"alphas": _rdp_orders()} if accountant == "rdp" else {}
    return float(acc.get_epsilon(delta=delta, **kwargs))


def recompute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                      accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` DP-SGD steps at (sigma, q), recomputed independently of the ledger's own numbers."""
    return compose_epsilon([(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)


def ledger_history(entry: Mapping[str, Any]) -> tuple[list[tuple[float, float, int]], str]:
    """The (sigma, q, steps) segments of one model's ledger summary, and where they came from.

    A summary carries the accountant's whole ``history`` (the sample rate changes between rounds when released
    images join a DP dataset); an older summary only its plan's (sigma, q) and the step count, one segment.
    """
    steps = int(entry.get("steps") or 0)
    if entry.get("history") is not None:
        hist = [(float(s), float(q), int(n)) for s, q, n in entry["history"]]
        if sum(n for _, _, n in hist) != steps:
            raise ValueError(f"history has {sum(n for _, _, n in hist)} steps, the summary says {steps}")
        return hist, "history"
    sigma, q = entry.get("noise_multiplier"), entry.get("sample_rate")
    return ([(float(sigma), float(q), steps)] if sigma and q and steps else []), "summary (sigma, q, steps)"


def check_ledger_model(entry: Mapping[str, Any], *, rel_tol: float = 1e-3) -> dict[str, Any]:
    """One model's ledger summary with its epsilon recomputed from its (sigma, q, steps) history and a verdict.

    ``consistent``: the reported epsilon is at least the recomputed one (a ledger may be conservative, e.g. a
    coarser RDP order grid, never optimistic); ``slack`` = reported - recomputed; ``recomputed_from`` says whether
    the full history or (older ledgers) the one-segment summary was used.
    """
    out = dict(entry)
    steps = int(entry.get("steps") or 0)
    reported = float(entry.get("epsilon") or 0.0)
    if steps == 0:
        out.update(recomputed_epsilon=0.0, slack=reported, consistent=True)
        return out
    try:
        hist, source = ledger_history(entry)
    except (TypeError, ValueError) as err:
        out.update(recomputed_epsilon=None, consistent=False, note=f"malformed ledger history: {err}")
        return out
    if not hist:
        out.update(recomputed_epsilon=None, consistent=False, note="steps without noise multiplier/sample rate")
        return out
    eps = compose_epsilon(hist, delta=float(entry["delta"]), accountant=str(entry.get("accountant", "rdp")))
    out.update(recomputed_epsilon=eps, slack=reported - eps, consistent=reported >= eps * (1 - rel_tol),
               recomputed_from=source)
    if not out["consistent"]:
        out["note"] = (f"reported epsilon {reported:.4g} < {eps:.4g} recomputed from the {source} {hist} "
                       "(the ledger under-reports, or sigma/q changed during the run without a recorded history)")
    distributed = entry.get("distributed")
    if isinstance(distributed, Mapping) and out["consistent"]:  # example-level distributed DP: the history is central
        try:
            n = int(distributed["num_sites"])
            local = compose_epsilon([(s / n**0.5, q, k) for s, q, k in hist], delta=float(entry["delta"]),
                                    accountant=str(entry.get("accountant", "rdp")))
            reported_local = float(distributed["local_epsilon"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            out.update(consistent=False, note=f"malformed distributed entry: {err}")
            return out
        out["recomputed_local_epsilon"] = local
        if reported_local < local * (1 - rel_tol):
            out.update(consistent=False, note=f"reported local epsilon {reported_local:.4g} < {local:.4g} recomputed "
                                              f"from the central history with {n} sites' noise shares")
    if entry.get("private_noise") is False:
        out["consistent"] = False
        out["note"] = ("DP noise was seeded from the public run seed (privacy.insecure-reproducible-noise, or a "
                       "ledger older than site-secret noise): anyone with the seed can remove it; no DP guarantee")
    return out


# The ledger entry of a site's distributed-DP shares (secure aggregation, common.privacy.distributed_dp).
DISTRIBUTED_KEY = "distributed"


def check_distributed(entry: Mapping[str, Any], *, rel_tol: float = 1e-6) -> dict[str, Any]:
    """A site's distributed-DP figures recomputed from the plan they state: the local epsilon (its own shares,
    against the server colluding with every other site) and, when present, the central one is not below the
    figure with every site's share in every round so far (the least it can be)."""
    out = dict(entry)
    try:
        plan = plan_from_record(entry)
        local = plan.local_epsilon(int(entry["rounds"]))
        floor = plan.central_epsilon([plan.num_sites] * int(entry["rounds"]))
    except (KeyError, TypeError, ValueError) as err:
        out.update(consistent=False, note=f"malformed distributed-DP entry: {err}")
        return out
    reported = float(entry.get("local_epsilon") or 0.0)
    central = entry.get("central_epsilon")
    ok = reported >= local * (1 - rel_tol) and (central is None or float(central) >= floor * (1 - rel_tol))
    out.update(recomputed_local_epsilon=local, central_epsilon_floor=floor, consistent=ok)
    if not ok:
        out["note"] = (f"reported local {reported:.4g} / central {central} below the recomputed {local:.4g} / "
                       f"{floor:.4g} from the stated plan")
    return out


def _history_or_empty(entry: Mapping[str, Any]) -> list[tuple[float, float, int]]:
    try:
        return ledger_history(entry)[0]
    except (TypeError, ValueError):
        return []  # reported as a problem by check_ledger_model


def dp_certificate(rounds: Sequence[Mapping[str, Any]], *, release_records: Sequence[Mapping[str, Any]] = (),
                   max_listed: int = 50) -> dict[str, Any]:
    """What the DP guarantee covers: per site and model, composed over all rounds, checked against the release.

    Parameters
    ----------
    rounds:
        ``round.json`` records of every checkpoint (``{"round", "ledger": {site: {model: summary}}, ...}``), any
        order; the ledger is cumulative (one accountant per site and model for the whole run).
    release_records:
        ``metadata.jsonl`` records of the release (``source_site``, ``round``, ``privacy``, ``memorization_checked``).
    max_listed:
        At most this many image ids per listed problem.

    Returns
    -------
    ``{"dp", "sites", "history", "release", "covered", "not_covered", "problems"}``: per site, every model's
    reported and recomputed epsilon, the site total by basic composition (sum of epsilons and deltas, what the
    ledger enforces) and the joint RDP/PRV composition at the same delta.
    """
    rounds = sorted(rounds, key=lambda r: int(r.get("round", 0)))
    by_round = {int(r.get("round", 0)): _with_votes(r) for r in rounds}
    latest = by_round[max(by_round)] if by_round else {}
    problems: list[str] = []
    sites: dict[str, Any] = {}
    for site, models in sorted(latest.items()):
        models = dict(models)
        distributed = models.pop(DISTRIBUTED_KEY, None)  # secure aggregation's distributed DP: its own figures
        checked = {m: check_ledger_model(e) for m, e in sorted(models.items())}
        used = {m: e for m, e in checked.items() if int(e.get("steps") or 0) > 0}
        delta = sum(float(e["delta"]) for e in used.values())
        acc = next((str(e.get("accountant", "rdp")) for e in used.values()), "rdp")
        joint = compose_epsilon([seg for e in used.values() for seg in _history_or_empty(e)], delta=delta,
                                accountant=acc) if used else 0.0
        sites[site] = {"models": checked, "epsilon_basic": sum(float(e.get("epsilon") or 0) for e in used.values()),
                       "epsilon_basic_recomputed": sum(float(e.get("recomputed_epsilon") or 0) for e in used.values()),
                       "delta_basic": delta, "epsilon_joint": joint, "accountant": acc}
        problems += [f"{site}/{m}: {e['note']}" for m, e in checked.items() if not e.get("consistent", True)]
        if distributed is not None:
            sites[site]["distributed"] = check_distributed(distributed)
            if not sites[site]["distributed"]["consistent"]:
                problems.append(f"{site}/{DISTRIBUTED_KEY}: {sites[site]['distributed']['note']}")
    history: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for rnd, ledger in by_round.items():
        for site, models in ledger.items():
            for m, e in models.items():
                if m == DISTRIBUTED_KEY:
                    continue
                history.setdefault(site, {}).setdefault(m, []).append((rnd, float(e.get("epsilon") or 0.0)))
    for site, models in history.items():
        for m, pts in models.items():
            if any(b[1] < a[1] - 1e-9 for a, b in zip(pts, pts[1:])):
                problems.append(f"{site}/{m}: cumulative epsilon decreases between rounds {pts} (accountant reset?)")
    release = _release_claims(release_records, by_round, problems, max_listed)
    release["private_evolution"] = evolution_claims(release_records, by_round, problems, max_listed)
    covered = ["checkpoint weights (generator, classifier, regressor): post-processing of the DP-SGD models"] \
        if latest else []
    n_sampled = release["n_images"] - release["memorization_checked"] - release["private_evolution"]["n_images"]
    if latest and n_sampled > 0:
        covered.append(f"{n_sampled} released images sampled from the DP generator without reading private data "
                       "(post-processing)")
    not_covered = ["per-round evaluation metrics in round.json/metrics.jsonl (accuracy, losses, num-examples on each "
                   "site's private test split) are released without noise"]
    if release["private_evolution"]["n_images"]:
        covered.append(f"{release['private_evolution']['n_images']} released images selected by private evolution: "
                       "the sites' noisy vote histograms (Gaussian mechanism, accounted as q=1 steps of each site's "
                       "'votes' ledger key), each image's certificate recomputed from the vote histories")
    if release["memorization_checked"]:
        not_covered.append(f"{release['memorization_checked']} released images passed a memorisation filter that read "
                           "private images: that selection is not covered by DP")
    if release["n_images"]:
        not_covered.append("the labels (plane, GA) the images were sampled at: covered only if the sampler drew them "
                           "independently of private data; the release records do not say where they came from")
    if release["unclaimed"]:
        not_covered.append(f"{release['unclaimed']} released images carry no finite epsilon")
    if not latest:
        not_covered.insert(0, "no privacy ledger found: the checkpoint was trained without DP (epsilon = infinity)")
    return {"dp": bool(latest), "sites": sites, "history": history, "release": release, "covered": covered,
            "not_covered": not_covered, "problems": problems}


def _with_votes(record: Mapping[str, Any]) -> dict[str, Any]:
    """A round's ledger (from the training replies) with the votes its private-evolution query spent after them.

    The votes of round r follow its training, so the training replies report them only from round r+1 on; the
    query's own record (``active_learning.private_evolution.votes_privacy``) has them at round r. The newer of the two
    (more votes) counts.
    """
    ledger = {site: dict(models) for site, models in dict(record.get("ledger") or {}).items()}
    pe = dict((record.get("active_learning") or {}).get("private_evolution") or {})
    for site, votes in dict(pe.get("votes_privacy") or {}).items():
        have = ledger.setdefault(site, {}).get("votes") or {}
        if int(votes.get("steps") or 0) >= int(have.get("steps") or 0):
            ledger[site]["votes"] = {k: v for k, v in votes.items() if k not in ("model", "noise_std")}
    return ledger


def evolution_claims(records: Sequence[Mapping[str, Any]], by_round: Mapping[int, Mapping[str, Any]],
                     problems: list[str], max_listed: int = 50) -> dict[str, Any]:
    """Check every private-evolution image's certificate: each site's votes epsilon recomputed from the history it
    lists, the per-site sum with the generator's, the image's epsilon as their maximum, and no site claiming fewer
    votes than that round's ledger spent."""
    bad: list[str] = []
    n = 0
    for rec in records:
        priv = dict(rec.get("privacy") or {})
        if priv.get("model") != "private-evolution":
            continue
        n += 1
        rid, rnd = str(rec.get("id")), int(rec.get("round", 0))
        mech = dict(priv.get("mechanisms") or {})
        votes, gen = dict(mech.get("votes") or {}), dict(mech.get("generator") or {})
        per_site = dict(priv.get("per_site") or {})
        ok = True
        for site, entry in votes.items():
            try:
                hist = [(float(s_), float(q), int(k)) for s_, q, k in entry.get("history") or []]
                eps = compose_epsilon(hist, delta=float(entry["delta"]), accountant=str(entry.get("accountant", "rdp")))
            except (TypeError, ValueError, KeyError):
                ok = False
                continue
            claimed = float((per_site.get(site) or {}).get("epsilon") or 0.0)
            generator = float((gen.get(site) or {}).get("epsilon") or 0.0)
            spent = float(((by_round.get(rnd) or {}).get(site) or {}).get("votes", {}).get("epsilon") or 0.0)
            if float(entry.get("epsilon") or 0.0) < eps * (1 - 1e-3) or claimed < eps + generator - 1e-6 \
                    or float(entry.get("epsilon") or 0.0) < spent - 1e-6:
                ok = False
        if per_site and float(priv.get("epsilon") or 0.0) < max(float(v.get("epsilon") or 0) for v in
                                                                per_site.values()) - 1e-9:
            ok = False
        if not ok:
            bad.append(rid)
    if bad:
        problems.append(f"{len(bad)} private-evolution images carry a certificate their vote histories or their "
                        f"round's ledger do not support: {bad[:max_listed]}")
    return {"n_images": n, "inconsistent": bad[:max_listed]}


def _release_claims(records: Sequence[Mapping[str, Any]], by_round: Mapping[int, Mapping[str, Any]],
                    problems: list[str], max_listed: int) -> dict[str, Any]:
    """Group the release's per-image privacy claims and compare each with the ledger of its site and round."""
    groups: dict[str, dict[str, Any]] = {}
    under, unclaimed, mem, under_scoring = [], [], [], []
    for rec in records:
        priv = dict(rec.get("privacy") or {})
        site, rnd = str(rec.get("source_site")), int(rec.get("round", 0))
        eps = priv.get("epsilon")
        key = f"{site}@round{rnd}"
        g = groups.setdefault(key, {"site": site, "round": rnd, "images": 0, "claimed_epsilon": set(),
                                    "ledger_epsilon_by_site": {}})
        g["images"] += 1
        g["claimed_epsilon"].add(None if eps is None else float(eps))
        ledger = by_round.get(rnd, {})
        g["ledger_epsilon_by_site"] = {s: float((m.get(str(priv.get("model", "generator"))) or {}).get("epsilon") or 0)
                                       for s, m in ledger.items()}
        if rec.get("memorization_checked"):
            mem.append(str(rec.get("id")))
        if eps is None or not math.isfinite(float(eps)):
            unclaimed.append(str(rec.get("id")))
        elif site in g["ledger_epsilon_by_site"] and float(eps) < g["ledger_epsilon_by_site"][site] - 1e-6:
            under.append(str(rec.get("id")))
        scoring = priv.get("scoring")
        if isinstance(scoring, Mapping):  # the distributed classifier that scored it: no figure below the ledger's
            central, local = central_and_local_epsilon((ledger.get(site) or {}).get("classifier") or {})
            if (float(scoring.get("central_epsilon", -1.0)) < central - 1e-6
                    or float(scoring.get("local_epsilon", -1.0)) < local - 1e-6):
                under_scoring.append(str(rec.get("id")))
    for g in groups.values():
        g["claimed_epsilon"] = sorted(g["claimed_epsilon"], key=lambda x: -1.0 if x is None else x)
        # The global generator mixes every site's update: an image is (eps_s, delta_s)-DP towards each site s.
        g["max_epsilon_over_sites"] = max(g["ledger_epsilon_by_site"].values(), default=None)
    if under:
        problems.append(f"{len(under)} images claim a smaller epsilon than their site's ledger at their round: "
                        f"{under[:max_listed]}")
    if under_scoring:
        problems.append(f"{len(under_scoring)} images claim a smaller central or local epsilon for the distributed "
                        f"classifier that scored them than their site's ledger at their round: "
                        f"{under_scoring[:max_listed]}")
    return {"n_images": len(records), "groups": groups, "under_claimed": under[:max_listed],
            "under_claimed_scoring": under_scoring[:max_listed],
            "unclaimed": len(unclaimed), "memorization_checked": len(mem), "memorization_checked_ids": mem[:max_listed]}
