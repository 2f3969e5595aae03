"""The federation's view of the data: each site's train and test records, from phantoms or a real dataset.

Real data: load, find duplicates, build case groups (patients + duplicates), put whole case groups on
sites (natural = the dataset's own sites), then split each site by the dataset's official split (test
copies of training cases removed) or, where there is none, by :func:`grouped_split`. Phantoms: site ``i``
images with scanner profile ``i mod P``, planes drawn uniformly or from a per-site Dirichlet, generated
from a seed stream of its own so that one site can be built without the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.core.config import DataConfig
from common.core.errors import ConfigError, DataError
from common.core.records import PLANES, UltrasoundRecord
from common.core.seeding import stream_seed
from common.data.dedup import find_duplicates
from common.data.loaders import load_source
from common.data.partition import case_groups, format_summary, grouped_split, natural_sites, partition, site_summary
from common.phantoms.simulator import SCANNER_PROFILES, make_phantoms

# Tags of the independent seed streams derived from the run seed (np.random.SeedSequence entropy).
_SITE_STREAM, _PUBLIC_STREAM, _QUANTITY_STREAM, _PARTITION_STREAM, _SPLIT_STREAM = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SiteData:
    """One site's private records."""

    name: str
    train: list[UltrasoundRecord]
    test: list[UltrasoundRecord]


@dataclass(frozen=True)
class FederatedData:
    """All sites, plus a report: loader skips, duplicate summary, per-site summary, notes."""

    sites: list[SiteData]
    report: dict[str, Any]


# -- phantoms ---------------------------------------------------------------------------------
def _n_test(n_train: int, test_fraction: float) -> int:
    """Test images so that they make ``test_fraction`` of the site's images (at least one)."""
    return max(1, round(n_train * test_fraction / (1.0 - test_fraction)))


def phantom_site_sizes(cfg: DataConfig, *, seed: int) -> list[int]:
    """Training images per phantom site: ``images_per_site`` each, or q ~ Dir(alpha) shares for ``quantity``."""
    n = cfg.images_per_site
    if cfg.partition != "quantity":
        return [n] * cfg.num_sites
    # Quantity skew (NIID-Bench): q ~ Dir_N(alpha) shares of the same total; at least 4 images per site.
    rng = np.random.default_rng(stream_seed(seed, _QUANTITY_STREAM, cfg.num_sites))
    shares = rng.dirichlet(np.full(cfg.num_sites, cfg.dirichlet_alpha))
    return [max(4, int(round(s * n * cfg.num_sites))) for s in shares]


def phantom_plane_probs(cfg: DataConfig, *, seed: int, site_index: int) -> list[float] | None:
    """Plane distribution of a phantom site: p ~ Dir(alpha) for ``dirichlet``, else ``None`` (uniform)."""
    if cfg.partition != "dirichlet":
        return None
    rng = np.random.default_rng(stream_seed(seed, _SITE_STREAM, site_index, _PARTITION_STREAM))
    return [float(p) for p in rng.dirichlet(np.full(len(PLANES), cfg.dirichlet_alpha))]


def _phantom_site(cfg: DataConfig, seed: int, site_index: int, n_train: int) -> SiteData:
    """Generate one phantom site from its own seed stream and split it by position."""
    profiles = list(SCANNER_PROFILES)
    profile = profiles[site_index % len(profiles)]
    name = f"site{site_index}-{profile}"
    n_test = _n_test(n_train, cfg.test_fraction)
    records = make_phantoms(n_train + n_test, size=cfg.image_size, seed=stream_seed(seed, _SITE_STREAM, site_index),
                            profile=profile, plane_probs=phantom_plane_probs(cfg, seed=seed, site_index=site_index),
                            site=name, id_prefix=name)
    return SiteData(name=name, train=list(records[:n_train]), test=list(records[n_train:]))


def public_phantoms(cfg: DataConfig, *, seed: int) -> list[UltrasoundRecord]:
    """``cfg.public_images`` phantoms spread over all scanner profiles, uniform planes, for the public prior.

    Parameters
    ----------
    cfg:
        Data section of the run config.
    seed:
        Run seed; the public stream is distinct from every site's.

    Returns
    -------
    The records, profile by profile (site ``"public"``).
    """
    cfg.validate()
    profiles = list(SCANNER_PROFILES)
    base, extra = divmod(cfg.public_images, len(profiles))
    out: list[UltrasoundRecord] = []
    for k, profile in enumerate(profiles):
        count = base + (1 if k < extra else 0)
        if count:
            out.extend(make_phantoms(count, size=cfg.image_size, seed=stream_seed(seed, _PUBLIC_STREAM, k),
                                     profile=profile, site="public", id_prefix=f"public-{profile}"))
    return out


# -- real data --------------------------------------------------------------------------------
def _split_site(records: list[UltrasoundRecord], groups: list[list[int]], idx: list[int], cfg: DataConfig,
                seed: int, site: int, official: bool, notes: list[str]) -> tuple[list[int], list[int], int]:
    """Train/test indices of one site: official split minus leaked test cases, else grouped split."""
    local = {g: k for k, g in enumerate(idx)}
    site_groups = [[local[i] for i in grp] for grp in groups if grp[0] in local]
    recs = [records[i] for i in idx]
    if official:
        group_of = {i: g for g, grp in enumerate(site_groups) for i in grp}
        train = [k for k, r in enumerate(recs) if r.extra.get("official_split") == "train"]
        train_groups = {group_of[k] for k in train}
        test_all = [k for k, r in enumerate(recs) if r.extra.get("official_split") == "test"]
        test = [k for k in test_all if group_of[k] not in train_groups]
        if train and test:
            return [idx[k] for k in train], [idx[k] for k in test], len(test_all) - len(test)
        notes.append(f"site {site}: official split leaves one side empty; used a grouped split instead")
    if len(site_groups) < 2:
        notes.append(f"site {site}: a single case group, no test records")
        return list(idx), [], 0
    tr, te = grouped_split(recs, test_fraction=cfg.test_fraction, seed=stream_seed(seed, _SPLIT_STREAM, site),
                           groups=site_groups)
    return [idx[k] for k in tr], [idx[k] for k in te], 0


def _real_federation(cfg: DataConfig, seed: int) -> FederatedData:
    """Load a real dataset and build its sites (see the module docstring)."""
    kw: dict[str, Any] = {} if cfg.source == "hc18" else {"split": "all"}
    loaded = load_source(cfg.source, cfg.root, image_size=cfg.image_size, **kw)
    records = loaded.records
    if not records:
        raise ConfigError(f"data.source={cfg.source!r} at {cfg.root!r} yielded no records:\n"
                          f"{loaded.report.summary()}")
    dups = find_duplicates(records)
    groups = case_groups(records, dups)
    notes: list[str] = []
    if cfg.partition == "natural":
        names, assignment = natural_sites(records, groups)
        if len(names) != cfg.num_sites:
            notes.append(f"natural partition: {len(names)} sites found in the data ({', '.join(names)}); "
                         f"data.num_sites={cfg.num_sites} ignored")
    else:
        assignment = partition(records, kind=cfg.partition, num_sites=cfg.num_sites, alpha=cfg.dirichlet_alpha,
                               seed=stream_seed(seed, _PARTITION_STREAM), groups=groups)
        names = [f"site{i}" for i in range(len(assignment))]
    splits = {r.extra.get("official_split") for r in records}
    official = splits == {"train", "test"}
    sites, leaked, trains, tests = [], 0, [], []
    for s, (name, idx) in enumerate(zip(names, assignment)):
        train, test, removed = _split_site(records, groups, idx, cfg, seed, s, official, notes)
        leaked += removed
        trains.append(train)
        tests.append(test)
        sites.append(SiteData(name=name, train=[records[i] for i in train], test=[records[i] for i in test]))
    train_rows = site_summary(records, trains, names)
    test_rows = site_summary(records, tests, names)
    report = {
        "source": cfg.source, "root": cfg.root, "loader": loaded.report.to_dict(),
        "loader_summary": loaded.report.summary(), "duplicates": dups.to_dict(),
        "duplicates_summary": dups.summary(), "case_groups": len(groups), "partition": cfg.partition,
        "num_sites_requested": cfg.num_sites, "num_sites": len(sites),
        "split": "official" if official else "grouped", "test_leakage_removed": leaked, "notes": notes,
        "train_summary": train_rows, "test_summary": test_rows,
        "table": "train\n" + format_summary(train_rows) + "\ntest\n" + format_summary(test_rows),
    }
    return FederatedData(sites=sites, report=report)


# -- label scope ------------------------------------------------------------------------------
def check_label_scope(sites: list[SiteData], cfg: DataConfig) -> None:
    """Refuse a site whose records have a plane outside the consortium's label scope (``data.planes``).

    Such a record is bad input, not something to skip: the classifier puts no probability outside the scope,
    so it could neither learn nor be scored on it. The error names the site, the planes and their counts, and
    the config key to fix. Checked when the sites are built, before any training.
    """
    scope = set(cfg.plane_scope())
    bad: list[str] = []
    for site in sites:
        for part, records in (("train", site.train), ("test", site.test)):
            counts: dict[str, int] = {}
            for r in records:
                if r.plane not in scope:
                    counts[r.plane_name] = counts.get(r.plane_name, 0) + 1
            if counts:
                bad.append(f"site {site.name!r} {part}: " + ", ".join(f"{n} x {p}" for p, n in sorted(counts.items())))
    if bad:
        names = ",".join(PLANES[k] for k in sorted(scope))
        raise DataError(f"records outside the consortium's label scope data.planes={names!r} "
                        f"(data.source={cfg.source!r}): {'; '.join(bad)}. Add those planes to data.planes "
                        f"(--set data.planes=...; names from {list(PLANES)}, '' for all) or remove the records "
                        f"from the site's data")


# -- entry points -----------------------------------------------------------------------------
def load_federated_data(cfg: DataConfig, *, seed: int) -> FederatedData:
    """Build every site's train/test records for ``cfg`` (phantoms or a real dataset).

    Parameters
    ----------
    cfg:
        Data section of the run config (``source``, ``root``, ``num_sites``, ``partition`` ...).
    seed:
        Run seed; the result is a function of ``(cfg, seed)``.

    Returns
    -------
    :class:`FederatedData`; for ``partition="natural"`` on real data the number of sites is the
    number the dataset has (reported when it differs from ``cfg.num_sites``).
    """
    cfg.validate()
    if cfg.source != "phantom":
        fed = _real_federation(cfg, seed)
        check_label_scope(fed.sites, cfg)
        return fed
    sizes = phantom_site_sizes(cfg, seed=seed)
    sites = [_phantom_site(cfg, seed, i, n) for i, n in enumerate(sizes)]
    check_label_scope(sites, cfg)
    names = [s.name for s in sites]
    train_rows = site_summary([r for s in sites for r in s.train], _ranges([len(s.train) for s in sites]), names)
    test_rows = site_summary([r for s in sites for r in s.test], _ranges([len(s.test) for s in sites]), names)
    report = {
        "source": "phantom", "partition": cfg.partition, "num_sites": len(sites), "train_sizes": sizes,
        "plane_probs": [phantom_plane_probs(cfg, seed=seed, site_index=i) for i in range(len(sites))],
        "train_summary": train_rows, "test_summary": test_rows, "notes": [],
        "table": "train\n" + format_summary(train_rows) + "\ntest\n" + format_summary(test_rows),
    }
    return FederatedData(sites=sites, report=report)


def _ranges(lengths: list[int]) -> list[list[int]]:
    """Consecutive index ranges of the given lengths."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    return [list(range(starts[k], starts[k + 1])) for k in range(len(lengths))]


def load_site(cfg: DataConfig, *, seed: int, site_index: int) -> SiteData:
    """One site's records: for phantoms only that site is generated; real data is loaded and picked.

    Parameters
    ----------
    cfg:
        Data section of the run config.
    seed:
        Run seed (the same as the federation's).
    site_index:
        Index of the site, ``0 <= site_index < number of sites``.

    Returns
    -------
    The same :class:`SiteData` that :func:`load_federated_data` gives for that index.
    """
    cfg.validate()
    if cfg.source == "phantom":
        if not 0 <= site_index < cfg.num_sites:
            raise ConfigError(f"site_index={site_index} is out of range; data.num_sites={cfg.num_sites}")
        site = _phantom_site(cfg, seed, site_index, phantom_site_sizes(cfg, seed=seed)[site_index])
        check_label_scope([site], cfg)
        return site
    sites = _real_federation(cfg, seed).sites
    if not 0 <= site_index < len(sites):
        raise ConfigError(f"site_index={site_index} is out of range; {cfg.source} with partition="
                          f"{cfg.partition!r} has {len(sites)} sites ({', '.join(s.name for s in sites)})")
    check_label_scope([sites[site_index]], cfg)  # a site is told about its own records
    return sites[site_index]
