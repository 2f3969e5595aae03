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

from common.active_learning.release import load_release_records
from common.active_learning.vote_query import vote_embedder
from common.analysis.image_metrics import kernel_inception_distance
from common.analysis.metrics import frechet_distance
from common.core.config import RunConfig
from common.data.sites import load_site
from common.federated.round_metrics import failed_replies
from common.models.features import fit_softmax
from simulations.config_args import count_sites

L2 = 1e-3  # the probes' weight decay (fixed, not tuned on the test images)
MATCHED_N = 32  # images in the size-matched figures: below every acquisition and private-evolution release at round 3
# measured so far (36-72 images on the African and phantom presets; private evolution's smallest: 41 at 64 px)
MATCHED_DRAWS = 20
MATCHED_SEED = 0


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


def _probe(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, planes: list[int]
           ) -> float | None:
    """Accuracy on (test_z, test_y) of a softmax fitted on (train_z, train_y), over the in-scope planes."""
    if len(train_y) == 0 or len(set(train_y.tolist())) < 2:
        return None
    index = {p: i for i, p in enumerate(planes)}
    keep = np.isin(train_y, planes)
    head = fit_softmax(torch.from_numpy(train_z[keep]), torch.tensor([index[int(p)] for p in train_y[keep]]),
                       num_classes=len(planes), l2=L2)
    with torch.no_grad():
        pred = head(torch.from_numpy(test_z)).argmax(1).numpy()
    return float(np.mean(np.array(planes)[pred] == test_y))


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
    pooled = [r for s in sites for r in s.train]  # the reference a release is read against: train on real
    real_pooled = _probe(embed(np.stack([r.image for r in pooled])), np.array([r.plane for r in pooled]), test_z,
                         test_y, planes)
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
            row.update(by_site=by_site, sites_not_worse=sum(
                v["real"] is not None and v["real_plus_synthetic"] is not None
                and v["real_plus_synthetic"] >= v["real"] for v in by_site.values()), sites=len(by_site))
        out.append(row)
    return out


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
