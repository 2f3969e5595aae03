"""Should a downstream head train on the shared release too? A paired check on TRAINING splits only.

``python -m simulations.experiments.release_in_heads --data african RUN_DIR [RUN_DIR ...] --out OUT.json``
``python -m simulations.experiments.release_in_heads --data hc18 RUN_DIR [RUN_DIR ...] --out OUT.json``

``train.release-models`` decides which heads a site trains on the release besides its own images. This study
decides it by cross-validation: for every finished run folder (its ``release/``), on the same folds, sites and noise
seeds, the preset's federated DP head is trained on each site's real training images alone (``real``) and on them
plus the whole release (``real+release``, every site pools it, as ``local_train`` does), and both are scored on the
held-out fold. The paired difference (mean, std, how many pairs better or worse) is what counts.

- ``african``: the African TRAINING split, 5 plane-stratified case-grouped folds x 3 seeds
  (:mod:`simulations.experiments.dp_gap`'s features, public FETAL_PLANES_DB warm start, Adam 0.1, clip 1) in the
  product's shape: 3 rounds x 50 local steps, batch 16, epsilon 3.9 per site (the preset's 0.39 of 10). The
  ``real`` arm's accuracy is also reported after every round (does the federated head degrade over rounds?).
- ``hc18``: the HC18 training images, 5 patient-grouped folds x 3 seeds (:mod:`simulations.experiments.ga_heads`:
  ``public_size_cnn``, 3 sites iid, 3 rounds x 200 local steps, batch 64, lr 0.003, epsilon 4). A synthetic image
  carries no pixel spacing (the generator is not conditioned on it); the product's regressor reads the missing
  spacing as it does at inference.

Caveat written into the JSON: a release's generator was fine-tuned on every training image of its run, the held-out
fold's included, which favours the release if anything. DP noise seeds are public (simulation, not private noise).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.active_learning.release import load_release_records
from common.core.atomic_io import write_text_atomic
from common.data.tensors import records_to_dataset
from common.models import features as fx
from simulations.experiments import extractors as ex
from simulations.experiments import ga_heads as gh
from simulations.experiments.dp_gap import public_head

ROOT = Path(__file__).resolve().parents[2]
FOLDS, SEEDS = 5, 3
AFRICAN = {"epsilon": 3.9, "rounds": 3, "local_steps": 50, "batch_size": 16, "lr": 0.1, "clip": 1.0}
HC18 = {"epsilon": 4.0, "rounds": 3, "local_steps": 200, "batch_size": 64, "lr": 0.003, "clip": 1.0}


def _release(run_dir: Path) -> list:
    records = load_release_records(run_dir / "release")
    if not records:
        raise FileNotFoundError(f"{run_dir}/release has no released image: pass a finished run folder with a release")
    return records


def paired(out: dict[str, list[float]], lower_is_better: bool) -> dict[str, Any]:
    """Mean and std per arm and of the paired difference ``real+release - real``."""
    d = np.array(out["real+release"]) - np.array(out["real"])
    better = d < 0 if lower_is_better else d > 0
    worse = d > 0 if lower_is_better else d < 0
    return {**{arm: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for arm, v in out.items()},
            "paired_difference": {"mean": float(d.mean()), "std": float(d.std()), "better": int(better.sum()),
                                  "worse": int(worse.sum()), "pairs": len(d)}}


def compare(folds: Sequence[np.ndarray], releases: dict[str, Any],
            train_and_score: Callable[[int, np.ndarray, int, Any], float], *, lower_is_better: bool
            ) -> dict[str, dict[str, Any]]:
    """Every (fold, seed): the real-only arm once (``release=None``), then each run's release arm with the same
    fold, sites and noise seed; per run, :func:`paired` of the two arms."""
    real: list[float] = []
    plus: dict[str, list[float]] = {run: [] for run in releases}
    for f, test in enumerate(folds):
        for seed in range(SEEDS):
            real.append(train_and_score(f, test, seed, None))
            for run, release in releases.items():
                plus[run].append(train_and_score(f, test, seed, release))
    out = {run: paired({"real": real, "real+release": plus[run]}, lower_is_better) for run in releases}
    for run, result in out.items():
        print(f"{run}: {json.dumps(result['paired_difference'])}", flush=True)
    return out


def african(run_dirs: Sequence[Path], data: Path) -> dict[str, Any]:
    images, labels, sites, groups = ex._load({"data": str(data)})
    extractor = fx.PhantomEncoderExtractor(ROOT / "common" / "assets" / "public-encoder")
    stats = fx.phantom_statistics(extractor, n_per_profile=40)
    feats = stats.apply(extractor(images), unit_norm=True)
    warm, _ = public_head(extractor, stats, data / "fetal_planes_db")
    folds = ex.grouped_stratified_folds(labels, groups, FOLDS, seed=0)
    s = AFRICAN
    kw = dict(epsilon=s["epsilon"], lr=s["lr"], rounds=s["rounds"], local_steps=s["local_steps"], clip=s["clip"],
              batch_size=s["batch_size"], init=warm)
    releases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for run in run_dirs:
        recs = _release(run)
        ry = np.array([r.plane for r in recs])
        if ry.max() >= ex.NUM_CLASSES:
            raise ValueError(f"{run}/release has planes outside the African scope")
        releases[str(run)] = (stats.apply(extractor(np.stack([r.image for r in recs])), unit_norm=True), ry)
    per_round = np.zeros((FOLDS, SEEDS, s["rounds"]))

    def train_and_score(f: int, test: np.ndarray, seed: int, release: tuple[np.ndarray, np.ndarray] | None) -> float:
        tr = np.setdiff1d(np.arange(len(labels)), test)
        x, y, s_of = feats[tr], labels[tr], sites[tr]
        if release is None:  # the real arm also records its accuracy after every round
            def score(r: int, head: torch.nn.Linear) -> None:
                per_round[f, seed, r] = ex.accuracy(head, feats[test], labels[test])
        else:  # every site pools the whole release, as local_train does
            score = None
            names = sorted(set(s_of.tolist()))
            rf, ry = release
            x = np.concatenate([x] + [rf] * len(names))
            y = np.concatenate([y] + [ry] * len(names))
            s_of = np.concatenate([s_of] + [np.array([n] * len(ry)) for n in names])
        head, _ = ex.federated_dp(x, y, s_of, seed=ex._seed("g", f, seed), on_round=score, **kw)
        return ex.accuracy(head, feats[test], labels[test])

    results = compare(folds, releases, train_and_score, lower_is_better=False)
    for run, (_, ry) in releases.items():
        results[run] = {"released": len(ry), "planes": np.bincount(ry, minlength=ex.NUM_CLASSES).tolist(),
                        **results[run]}
    flat = per_round.reshape(-1, s["rounds"])
    return {"metric": "plane accuracy on the held-out fold", "settings": s, "runs": results,
            "real_per_round": {"mean": flat.mean(0).tolist(), "std": flat.std(0).tolist(),
                               "public_head_alone": ex.accuracy(warm, feats, labels)}}


def hc18(run_dirs: Sequence[Path], data: Path) -> dict[str, Any]:
    records, dataset, groups = gh.load_training(str(data))
    folds = gh.grouped_kfold(groups, FOLDS, seed=0)
    models = [gh.make_regressor("public_size_cnn", 2, 4, 0) for _ in range(4)]
    backbone = models[0].backbone
    with torch.no_grad():
        feats = torch.cat([backbone(dataset.tensors[0][i:i + 256]) for i in range(0, len(dataset), 256)])
        releases = {}
        for run in run_dirs:
            rel = records_to_dataset(_release(run), image_size=64)
            # the layout of gh.feature_dataset: features, plane (unused), GA, spacing (NaN: not conditioned on)
            releases[str(run)] = (backbone(rel.tensors[0]), torch.zeros(len(rel), dtype=torch.int64),
                                  rel.tensors[2], rel.tensors[3])
    ga, sp = dataset.tensors[2], dataset.tensors[3]
    s = HC18

    def train_and_score(f: int, test: np.ndarray, seed: int, release: tuple[torch.Tensor, ...] | None) -> float:
        train = np.setdiff1d(np.arange(len(records)), test)
        site_data = gh._site_data(train, records, feats, ga, sp, seed=gh._seed("sites", f))
        if release is not None:  # every site pools the whole release, as local_train does
            site_data = [TensorDataset(*(torch.cat([a, b]) for a, b in zip(d.tensors, release))) for d in site_data]
        head, _ = gh.federated_dp(models, site_data, epsilon=s["epsilon"], lr=s["lr"], local_steps=s["local_steps"],
                                  rounds=s["rounds"], batch_size=s["batch_size"], clip=s["clip"],
                                  seed=gh._seed("rel", f, seed))
        return gh.head_metrics(head, feats[test], ga[test], sp[test])["mae_days"]

    results = compare(folds, releases, train_and_score, lower_is_better=True)
    for run, release in releases.items():
        results[run] = {"released": len(release[0]), **results[run]}
    return {"metric": "GA MAE (days) on the held-out patients", "settings": s, "runs": results}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("african", "hc18"), required=True)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders with a release/")
    p.add_argument("--data-root", type=Path, default=None,
                   help="african: the folder holding african_fetal_planes/ and fetal_planes_db/ (default "
                        "../shared/data); hc18: the HC18 folder (default ../shared/data/hc18)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    shared = ROOT.parent / "shared" / "data"
    t0 = time.perf_counter()
    if a.data == "african":
        result = african(a.runs, a.data_root or shared)
    else:
        result = hc18(a.runs, a.data_root or shared / "hc18")
    result = {"study": f"release in the {a.data} preset's DP head: paired CV on the training split", **result,
              "folds": FOLDS, "seeds": SEEDS, "wall_seconds": round(time.perf_counter() - t0, 1),
              "caveat": "each release's generator was fine-tuned on every training image of its run (the held-out "
                        "fold's too), which favours the release if anything; DP noise seeds are public"}
    write_text_atomic(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
