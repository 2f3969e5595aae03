"""How good is a run's release as data? Per round: FD/KID to the real test images, synthetic-only accuracy (beside
train-on-real: the same probe on every site's real training images pooled), and what the release adds to each
site's real images (``by_site``; ``sites_not_worse`` counts the sites it does not hurt), the smallest site's
singled out.

All in one frozen public feature space (the run's vote embedder, :func:`common.active_learning.vote_query.vote_embedder`:
the frozen downstream backbone, phantom_cnn or public_cnn). Private evolution's votes select in that same space, so
FD/KID there favour it; the accuracies are the fairer read. The probes are non-private logistic regressions
(:func:`common.models.features.fit_softmax`) on those features: a measurement of the release's value as training data,
not a DP claim (the federation's own DP models are al_loop's ``plane acc``). The real test images are the sites'
held-out splits; nothing in the run saw them.

FD and the synthetic-only accuracy depend on how many images the release has, not only on what they look like: FD's
plug-in estimate falls as a release grows (one acquisition release on the African preset measured 0.86 / 0.75 / 0.71
at 24 / 48 / 72 images, in a 192-dimensional space), and a probe trained on more images scores higher. Arms whose
releases differ in size (private evolution keeps fewer images than acquisition) are therefore also compared at a
fixed size: ``fd_matched`` and ``synthetic_only_matched`` are the means over :data:`MATCHED_DRAWS` random subsets of
:data:`MATCHED_N` released images (a fixed public seed), ``None`` for a smaller release.

The ``*_cv`` figures make the probes' choices by cross-validation on their own training rows (never the test
images): ``weight_cv`` is the weight a site would give a released image beside one of its own (0 leaves the release
out), chosen on 3 plane-stratified, case-grouped folds of the site's own images (``real_plus_synthetic_cv``,
``sites_not_worse_cv``); ``synthetic_only_cv`` and ``real_pooled_cv`` use the L2 weight chosen the same way.

    python -m simulations.experiments.release_quality RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.active_learning.release import load_release_records
from common.active_learning.vote_query import vote_embedder
from common.analysis.image_metrics import kernel_inception_distance
from common.analysis.metrics import frechet_distance
from common.core.config import RunConfig
from common.data.partition import case_groups
from common.data.sites import load_site
from common.federated.round_metrics import failed_replies
from common.models.features import fit_softmax
from simulations.config_args import count_sites
from simulations.experiments.extractors import _sub_groups, grouped_stratified_folds

L2 = 1e-3  # the probes' weight decay (fixed, not tuned on the test images)
MATCHED_N = 32  # images in the size-matched figures: below every acquisition and private-evolution release at round 3
# measured so far (36-72 images on the African and phantom presets; private evolution's smallest: 41 at 64 px)
MATCHED_DRAWS = 20
MATCHED_SEED = 0
# The cross-validated variants (``*_cv``): every choice made on the probe's own training rows, never the test images.
SYNTHETIC_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)  # a released image's weight beside a site's own (1 = the plain pool)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
CV_FOLDS = 3
CV_SEED = 0


def subset_mean(z: np.ndarray, y: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], float | None], *,
                n: int = MATCHED_N, draws: int = MATCHED_DRAWS, seed: int = MATCHED_SEED) -> float | None:
    """Mean of ``fn(z[s], y[s])`` over ``draws`` random subsets ``s`` of ``n`` rows (without replacement); a set of
    exactly ``n`` rows is scored once, a smaller one gives ``None`` (draws where ``fn`` gives ``None`` are left out)."""
    if len(z) != len(y):
        raise ValueError(f"features and labels differ in length: {len(z)} and {len(y)}")
    if len(z) < n:
        return None
    rng = np.random.default_rng(seed)
    subsets = [np.arange(len(z))] if len(z) == n else [rng.choice(len(z), size=n, replace=False) for _ in range(draws)]
    vals = [v for v in (fn(z[s], y[s]) for s in subsets) if v is not None]
    return float(np.mean(vals)) if vals else None


def _fit(train_z: np.ndarray, train_y: np.ndarray, planes: list[int], *, l2: float = L2,
         weight: np.ndarray | None = None) -> torch.nn.Linear | None:
    """A softmax over the in-scope ``planes`` fitted on (train_z, train_y) (rows weighted by ``weight``), ``None``
    when the training rows hold fewer than two planes."""
    keep = np.isin(train_y, planes)
    if len(set(train_y[keep].tolist())) < 2:
        return None
    index = {p: i for i, p in enumerate(planes)}
    return fit_softmax(torch.from_numpy(train_z[keep]), torch.tensor([index[int(p)] for p in train_y[keep]]),
                       num_classes=len(planes), l2=l2,
                       weight=None if weight is None else torch.from_numpy(weight[keep].astype(train_z.dtype)))


def _probe(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, planes: list[int], *,
           l2: float = L2, weight: np.ndarray | None = None) -> float | None:
    """Accuracy on (test_z, test_y) of :func:`_fit`'s softmax, over the in-scope planes."""
    head = _fit(train_z, train_y, planes, l2=l2, weight=weight)
    if head is None:
        return None
    with torch.no_grad():
        pred = head(torch.from_numpy(test_z)).argmax(1).numpy()
    return float(np.mean(np.array(planes)[pred] == test_y))


def _cv_nll(z: np.ndarray, y: np.ndarray, groups: list[list[int]], planes: list[int], *, l2: float = L2,
            extra: tuple[np.ndarray, np.ndarray, float] | None = None) -> float:
    """Held-out cross-entropy of :func:`_fit`'s softmax, mean over :data:`CV_FOLDS` plane-stratified folds of (z, y)
    that never split a group; ``extra`` = (z, y, weight) rows join every fold's training rows at that weight (a
    weight of 0 leaves them out). Only (z, y) is ever held out. Rows outside ``planes`` are ignored."""
    keep = np.flatnonzero(np.isin(y, planes))
    index = {p: i for i, p in enumerate(planes)}
    labels = np.array([index[int(p)] for p in y[keep]])
    folds = grouped_stratified_folds(labels, _sub_groups(groups, keep)[0], CV_FOLDS, seed=CV_SEED,
                                     num_classes=len(planes))
    losses = []
    for fold in folds:
        train = np.setdiff1d(np.arange(len(keep)), fold)
        tz, ty, tw = z[keep][train], y[keep][train], np.ones(len(train))
        if extra is not None and extra[2] > 0:
            tz, ty = np.concatenate([tz, extra[0]]), np.concatenate([ty, extra[1]])
            tw = np.concatenate([tw, np.full(len(extra[1]), extra[2])])
        head = _fit(tz, ty, planes, l2=l2, weight=tw)
        if head is None or len(fold) == 0:
            continue
        with torch.no_grad():
            losses.append(float(F.cross_entropy(head(torch.from_numpy(z[keep][fold])),
                                                torch.from_numpy(labels[fold]))))
    if not losses:
        raise ValueError(f"no cross-validation fold could be fitted on {len(keep)} images of planes {planes}")
    return float(np.mean(losses))


def choose_l2(z: np.ndarray, y: np.ndarray, groups: list[list[int]], planes: list[int]) -> float:
    """The probe's L2 from :data:`L2_GRID` with the lowest :func:`_cv_nll` on its own training rows (ties: the
    first)."""
    nll = [_cv_nll(z, y, groups, planes, l2=l2) for l2 in L2_GRID]
    return L2_GRID[int(np.argmin(nll))]


def choose_synthetic_weight(z: np.ndarray, y: np.ndarray, groups: list[list[int]], syn_z: np.ndarray,
                            syn_y: np.ndarray, planes: list[int]) -> float:
    """The weight of a released image relative to one of the site's own, from :data:`SYNTHETIC_WEIGHTS` (0 = leave
    the release out), with the lowest :func:`_cv_nll` on the site's own real images (ties: the smaller weight)."""
    nll = [_cv_nll(z, y, groups, planes, extra=(syn_z, syn_y, w)) for w in SYNTHETIC_WEIGHTS]
    return SYNTHETIC_WEIGHTS[int(np.argmin(nll))]


def release_quality(run_dir: Path) -> list[dict[str, Any]]:
    """Per query round of the run in ``run_dir``: the release up to that round against the real test images."""
    doc = json.loads((run_dir / "config.json").read_text())
    cfg = RunConfig.from_dict(doc.get("config", doc))
    torch.set_num_threads(1)
    embed = vote_embedder(cfg)
    sites = [load_site(cfg.data, seed=cfg.seed, site_index=i) for i in range(count_sites(cfg))]
    test = [r for s in sites for r in s.test]
    test_z, test_y = embed(np.stack([r.image for r in test])), np.array([r.plane for r in test])
    smallest = min(sites, key=lambda s: len(s.train))
    planes = list(cfg.data.plane_scope())
    # every site's own real images (#16: real + synthetic >= real alone at every site), the smallest's among them
    site_real = {s.name: (embed(np.stack([r.image for r in s.train])), np.array([r.plane for r in s.train]))
                 for s in sites}
    site_alone = {name: _probe(z, y, test_z, test_y, planes) for name, (z, y) in site_real.items()}
    real_only = site_alone[smallest.name]
    site_groups = {s.name: case_groups(s.train) for s in sites}
    pooled = [r for s in sites for r in s.train]  # the reference a release is read against: train on real
    pooled_z, pooled_y = embed(np.stack([r.image for r in pooled])), np.array([r.plane for r in pooled])
    real_pooled = _probe(pooled_z, pooled_y, test_z, test_y, planes)
    l2_real = choose_l2(pooled_z, pooled_y, case_groups(pooled), planes)
    real_pooled_cv = _probe(pooled_z, pooled_y, test_z, test_y, planes, l2=l2_real)
    records = load_release_records(run_dir / "release") if (run_dir / "release" / "metadata.jsonl").is_file() else []
    out = []
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # site replies that failed up to a round (a crash, or the machine out of memory): a release from fewer sites
    failed, seen = {}, 0
    for rec in recs:
        seen += len(failed_replies(rec))
        failed[rec["round"]] = seen
    done = [rec["round"] for rec in recs]
    for rnd in done:
        upto = records[: len(_rounds(run_dir, rnd))]  # rounds append in order: the first records are the earliest
        row: dict[str, Any] = {"round": rnd, "release_size": len(upto), "real_only_smallest": real_only,
                               "smallest_site": smallest.name, "smallest_n": len(smallest.train),
                               "real_pooled": real_pooled, "real_pooled_n": len(pooled),
                               "real_pooled_cv": real_pooled_cv, "l2_real": l2_real,
                               "failed_site_replies": failed[rnd]}
        if len(upto) >= 2:
            z, y = embed(np.stack([r.image for r in upto])), np.array([r.plane for r in upto])
            kid = kernel_inception_distance(test_z, z, num_subsets=20, subset_size=min(len(z), len(test_z)))
            by_site = {name: {"n": len(sy), "real": site_alone[name],
                              "real_plus_synthetic": _probe(np.concatenate([sz, z]), np.concatenate([sy, y]), test_z,
                                                            test_y, planes)}
                       for name, (sz, sy) in site_real.items()}
            row.update(fd=frechet_distance(test_z, z), kid=kid.kid, synthetic_only=_probe(z, y, test_z, test_y, planes),
                       real_plus_synthetic_smallest=by_site[smallest.name]["real_plus_synthetic"],
                       matched_n=MATCHED_N,
                       fd_matched=subset_mean(z, y, lambda zs, _: frechet_distance(test_z, zs)),
                       synthetic_only_matched=subset_mean(z, y, lambda zs, ys: _probe(zs, ys, test_z, test_y, planes)))
            for name, (sz, sy) in site_real.items():  # each site weighs the release by its own images' CV
                w = choose_synthetic_weight(sz, sy, site_groups[name], z, y, planes)
                by_site[name].update(weight_cv=w, real_plus_synthetic_cv=site_alone[name] if w == 0 else _probe(
                    np.concatenate([sz, z]), np.concatenate([sy, y]), test_z, test_y, planes,
                    weight=np.concatenate([np.ones(len(sy)), np.full(len(y), w)])))
            l2_syn = _cv_or_none(lambda: choose_l2(z, y, [[i] for i in range(len(y))], planes))
            row.update(by_site=by_site, sites=len(by_site),
                       sites_not_worse=_not_worse(by_site, "real_plus_synthetic"),
                       sites_not_worse_cv=_not_worse(by_site, "real_plus_synthetic_cv"), l2_synthetic=l2_syn,
                       synthetic_only_cv=None if l2_syn is None else _probe(z, y, test_z, test_y, planes, l2=l2_syn))
        out.append(row)
    return out


def _not_worse(by_site: dict[str, dict[str, Any]], key: str) -> int:
    """How many sites score at least as well with the release (``by_site[...][key]``) as on their own images."""
    return sum(v["real"] is not None and v[key] is not None and v[key] >= v["real"] for v in by_site.values())


def _cv_or_none(choice: Callable[[], float]) -> float | None:
    """``choice()``, or ``None`` when a release too small for the folds leaves none of them fittable."""
    try:
        return choice()
    except ValueError:
        return None


def _rounds(run_dir: Path, upto: int) -> list[int]:
    """The release's record rounds that are <= ``upto`` (metadata.jsonl order is the release order)."""
    rounds = [json.loads(line)["round"] for line in (run_dir / "release" / "metadata.jsonl").read_text().splitlines()
              if line.strip()] if (run_dir / "release" / "metadata.jsonl").is_file() else []
    return [r for r in rounds if r <= upto]


def main() -> None:
    """Print each run's per-round release quality as JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    for run in p.parse_args().runs:
        for row in release_quality(run):
            print(json.dumps({"run": str(run), **row}))


if __name__ == "__main__":
    main()
