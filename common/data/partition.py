"""Case groups, site partitions (natural, IID, Dirichlet label skew, quantity skew) and grouped splits.

Every partition moves whole *case groups*: the connected components of "same patient" and "duplicate
image" links, so that no patient and no copy of an image sits in two sites or on both sides of a
train/test split. The label- and quantity-skew schemes follow Li et al. 2022, "Federated learning on
non-IID data silos: an experimental study" (NIID-Bench): per-class site proportions p_k ~ Dir_N(alpha)
for label skew, site sizes q ~ Dir_N(alpha) for quantity skew.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from common.core.records import PLANES, UltrasoundRecord
from common.data.dedup import DuplicateReport, connected_components

PARTITION_KINDS = ("natural", "iid", "dirichlet", "quantity")
_MAX_TRIES = 200  # Dirichlet redraws until no site is empty (NIID-Bench redraws the same way)


def case_groups(records: Sequence[UltrasoundRecord], duplicates: DuplicateReport | None = None
                ) -> list[list[int]]:
    """Union-find over patient ids (within a source) and duplicate links: the units every split moves.

    Parameters
    ----------
    records:
        The records.
    duplicates:
        Report of :func:`common.data.dedup.find_duplicates` on the same sequence, or ``None``.

    Returns
    -------
    Groups of indices (each sorted; groups ordered by first index) covering every record once.
    """
    n = len(records)
    if duplicates is not None and duplicates.n_records != n:
        raise ValueError(f"duplicate report covers {duplicates.n_records} records but {n} were given; "
                         f"run find_duplicates on the same record list")
    first: dict[tuple[str, str], int] = {}
    edges = [(i, first.setdefault((r.source, r.patient_id), i)) for i, r in enumerate(records)]
    edges += list(duplicates.links()) if duplicates is not None else []
    return connected_components(n, edges)


def _majority(values: Sequence[Any]) -> Any:
    """Most common value; ties go to the smallest (deterministic)."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def natural_sites(records: Sequence[UltrasoundRecord], groups: list[list[int]] | None = None
                  ) -> tuple[list[str], list[list[int]]]:
    """Sites as the data names them (``record.site``); a group spanning sites goes to its majority site.

    Returns
    -------
    Site names (sorted) and, for each, its record indices.
    """
    groups = case_groups(records) if groups is None else groups
    by_site: dict[str, list[int]] = {}
    for group in groups:
        by_site.setdefault(_majority([records[i].site for i in group]), []).extend(group)
    names = sorted(by_site)
    return names, [sorted(by_site[s]) for s in names]


def _check_groups(n: int, groups: list[list[int]]) -> None:
    """Groups must cover ``range(n)`` exactly once."""
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(n)):
        raise ValueError(f"groups must cover every record index 0..{n - 1} exactly once; got {len(flat)} "
                         f"indices for {n} records (pass groups=case_groups(records, duplicates))")


def _assign_by_quota(order: Sequence[int], sizes: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Walk groups in ``order``; a group goes to the site whose cumulative share covers its midpoint."""
    bounds = np.cumsum(shares) / shares.sum() * sizes[list(order)].sum()
    mid = np.cumsum(sizes[list(order)]) - sizes[list(order)] / 2.0
    sites = np.searchsorted(bounds, mid, side="right")
    return np.minimum(sites, len(shares) - 1)


def partition(records: Sequence[UltrasoundRecord], *, kind: str, num_sites: int, seed: int,
              alpha: float = 0.5, groups: list[list[int]] | None = None) -> list[list[int]]:
    """Split records among sites, moving whole case groups.

    Parameters
    ----------
    records:
        The records.
    kind:
        ``"natural"`` (by ``record.site``; ``num_sites`` is ignored, the count found is returned, sites
        in sorted name order), ``"iid"`` (shuffled, balanced sizes), ``"dirichlet"`` (label skew over
        planes, p_k ~ Dir(alpha)) or ``"quantity"`` (sizes q ~ Dir(alpha), labels mixed).
    num_sites:
        Number of sites (``kind != "natural"``).
    seed:
        Seed of the shuffles and Dirichlet draws.
    alpha:
        Dirichlet concentration (small: strong skew).
    groups:
        Case groups (default: :func:`case_groups` without duplicates).

    Returns
    -------
    One sorted list of record indices per site; the lists are disjoint, cover every record and no
    site is empty.
    """
    if kind not in PARTITION_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; choose one of {list(PARTITION_KINDS)}")
    groups = case_groups(records) if groups is None else groups
    _check_groups(len(records), groups)
    if kind == "natural":
        return natural_sites(records, groups)[1]
    if num_sites < 1:
        raise ValueError(f"num_sites={num_sites!r} must be >= 1")
    if num_sites > len(groups):
        raise ValueError(f"cannot give {num_sites} sites a case group each: only {len(groups)} case groups "
                         f"(patients merged with their duplicates); use fewer sites")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0")
    rng = np.random.default_rng(seed)
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    site_of = np.empty(len(groups), dtype=np.int64)
    if kind == "iid":
        # Largest groups first (random order among equal sizes), each to the currently smallest site.
        order = sorted(rng.permutation(len(groups)), key=lambda g: -sizes[g])
        load = np.zeros(num_sites)
        for g in order:
            site = int(np.flatnonzero(load == load.min())[rng.integers((load == load.min()).sum())])
            site_of[g] = site
            load[site] += sizes[g]
    else:
        labels = np.array([_majority([records[i].plane for i in g]) for g in groups])
        for _ in range(_MAX_TRIES):
            if kind == "quantity":
                order = rng.permutation(len(groups))
                site_of[order] = _assign_by_quota(order, sizes, rng.dirichlet(np.full(num_sites, alpha)))
            else:  # label skew: each plane's groups split by their own p_k ~ Dir(alpha)
                for label in np.unique(labels):
                    members = rng.permutation(np.flatnonzero(labels == label))
                    site_of[members] = _assign_by_quota(members, sizes,
                                                        rng.dirichlet(np.full(num_sites, alpha)))
            if len(np.unique(site_of)) == num_sites:
                break
        else:
            raise ValueError(f"{kind} partition left a site empty in {_MAX_TRIES} draws (alpha={alpha}, "
                             f"{len(groups)} case groups, {num_sites} sites); raise alpha or lower num_sites")
    return [sorted(i for g in np.flatnonzero(site_of == s) for i in groups[g]) for s in range(num_sites)]


def grouped_split(records: Sequence[UltrasoundRecord], *, test_fraction: float, seed: int,
                  groups: list[list[int]] | None = None) -> tuple[list[int], list[int]]:
    """Train/test split by case group, stratified by each group's majority plane.

    Parameters
    ----------
    records:
        The records.
    test_fraction:
        Target share of records in the test side, in (0, 1).
    seed:
        Seed of the shuffle.
    groups:
        Case groups (default: :func:`case_groups` without duplicates).

    Returns
    -------
    Sorted train and test indices; both non-empty when there are at least two case groups.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must lie strictly between 0 and 1")
    groups = case_groups(records) if groups is None else groups
    _check_groups(len(records), groups)
    rng = np.random.default_rng(seed)
    strata: dict[int, list[int]] = {}
    for g, group in enumerate(groups):
        strata.setdefault(_majority([records[i].plane for i in group]), []).append(g)
    in_test = np.zeros(len(groups), dtype=bool)
    for label in sorted(strata):
        members = [strata[label][k] for k in rng.permutation(len(strata[label]))]
        target = test_fraction * sum(len(groups[g]) for g in members)
        taken = 0
        for g in members:  # greedy: take a group while it brings the stratum closer to its target
            if abs(taken + len(groups[g]) - target) < abs(taken - target):
                in_test[g] = True
                taken += len(groups[g])
    if len(groups) >= 2 and (in_test.all() or not in_test.any()):
        flip = int(rng.integers(len(groups)))  # tiny inputs: make sure both sides exist
        in_test[flip] = not in_test[flip]
    test = sorted(i for g in np.flatnonzero(in_test) for i in groups[g])
    train = sorted(i for g in np.flatnonzero(~in_test) for i in groups[g])
    return train, test


def site_summary(records: Sequence[UltrasoundRecord], assignment: list[list[int]], names: Sequence[str]
                 ) -> list[dict[str, Any]]:
    """Per-site counts: images, patients, images per plane, GA range (``None`` when unknown).

    Parameters
    ----------
    records:
        The records.
    assignment:
        Record indices per site (as from :func:`partition`).
    names:
        Site names, one per entry of ``assignment``.

    Returns
    -------
    One JSON-safe dict per site.
    """
    if len(names) != len(assignment):
        raise ValueError(f"{len(names)} names for {len(assignment)} sites")
    rows = []
    for name, idx in zip(names, assignment):
        recs = [records[i] for i in idx]
        ga = [r.ga_weeks for r in recs if r.ga_weeks is not None]
        planes = Counter(r.plane_name for r in recs)
        rows.append({"site": str(name), "images": len(recs),
                     "patients": len({(r.source, r.patient_id) for r in recs}),
                     "planes": {p: planes.get(p, 0) for p in PLANES},
                     "ga_min": round(min(ga), 2) if ga else None, "ga_max": round(max(ga), 2) if ga else None})
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table of :func:`site_summary` rows."""
    short = {p: p.replace("fetal_", "").replace("maternal_", "")[:7] for p in PLANES}
    width = max([4] + [len(r["site"]) for r in rows])
    head = f"{'site':<{width}} {'images':>6} {'patients':>8} " + " ".join(f"{short[p]:>7}" for p in PLANES)
    lines = [head + "  GA weeks"]
    for r in rows:
        ga = "-" if r["ga_min"] is None else f"{r['ga_min']:.1f}-{r['ga_max']:.1f}"
        lines.append(f"{r['site']:<{width}} {r['images']:>6} {r['patients']:>8} "
                     + " ".join(f"{r['planes'][p]:>7}" for p in PLANES) + f"  {ga}")
    return "\n".join(lines)
