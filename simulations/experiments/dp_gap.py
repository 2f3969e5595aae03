"""Where does the DP gap of the federated plane classifier come from? Arms on frozen features, TRAINING data only.

``python -m simulations.experiments.dp_gap --encoder DIR [--encoder DIR ...]`` reads the African fetal planes
*training* split (never the test split), the same 5 plane-stratified, case-grouped folds as
:mod:`simulations.experiments.extractors`, and for each phantom-encoder folder compares, on the held-out folds
(mean and std over 5 folds x 3 seeds), at epsilon in {10, 4, 2, 1} per site (the classifier's whole budget, as in the
extractor study):

- ``dpsgd``: FedAvg of per-site DP-SGD softmax heads (:func:`simulations.experiments.extractors.federated_dp`,
  zero init; Adam 0.1, 6 rounds x 50 local steps, sampling rate 1/3: the settings the extractor study's inner CV
  chose most often for the phantom encoder);
- ``dpsgd_public_init``: the same, the global head starting at a softmax head fitted on PUBLIC labelled real scans
  (the FETAL_PLANES_DB images of the four African planes, another country and scanner: no site's data);
- ``prototypes``: one Gaussian-mechanism release per site of its per-class feature sums (features with a constant
  coordinate appended and rescaled to unit norm, so one image changes one row by norm 1), summed by the server;
  a nearest-class-mean classifier (cosine). Accounted as one step of sampling rate 1 in the site's ledger.
- ``nonprivate``: pooled logistic regression (L2 1e-4), the ceiling of a linear head on these features.

The settings are fixed in advance (no selection on the reported folds); they came from the extractor study's
inner CV. Writes ``simulations/benchmarks/results/dp_gap.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from common.core.atomic_io import write_text_atomic
from common.data.loaders import load_source
from common.models import features as fx
from common.privacy.ledger import PrivacyLedger
from simulations.experiments import extractors as ex

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "simulations" / "benchmarks" / "results" / "dp_gap.json"
EPSILONS = (10.0, 4.0, 2.0, 1.0)  # 2: the classifier's default share (0.2) of a site's eps = 10


def dp_class_sums(x: np.ndarray, y: np.ndarray, *, num_classes: int, ledger: PrivacyLedger | None,
                  rng: np.random.Generator, model_key: str = "classifier") -> np.ndarray:
    """One site's per-class sums of ``[x / sqrt 2, 1 / sqrt 2]`` (unit-norm rows: one image moves one row by at most
    1, the L2 sensitivity under add/remove) plus Gaussian noise ``sigma * I``, sigma from ``ledger``'s budget for
    one release at sampling rate 1 (charged to its accountant). ``ledger=None``: no noise (non-private)."""
    if not np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4):
        raise ValueError("dp_class_sums needs unit-norm feature rows (the sensitivity bound assumes it)")
    z = np.concatenate([x, np.ones((len(x), 1))], axis=1) / math.sqrt(2.0)
    sums = np.zeros((num_classes, z.shape[1]))
    np.add.at(sums, y, z)
    if ledger is None:
        return sums
    sigma = ledger.plan(model_key, sample_rate=1.0, planned_total_steps=1).noise_multiplier
    if ledger.would_exceed(model_key, noise_multiplier=sigma, sample_rate=1.0):
        raise RuntimeError(f"the {model_key!r} budget is spent: no further release")
    ledger.accountant_for(model_key).step(noise_multiplier=sigma, sample_rate=1.0)
    return sums + sigma * rng.standard_normal(sums.shape)


def prototype_predict(sums: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Nearest class mean by cosine: class means are the feature part of the (noisy) sums; counts cancel."""
    mu = sums[:, :-1]
    mu = mu / np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-8)
    return (x @ mu.T).argmax(axis=1)


def federated_prototypes(x: np.ndarray, y: np.ndarray, sites: np.ndarray, *, epsilon: float | None, seed: int,
                         delta: float = 1e-5) -> np.ndarray:
    """Every site releases :func:`dp_class_sums` once (its own ledger); the server adds them."""
    total = None
    for s in sorted(set(sites.tolist())):
        ledger = None if epsilon is None else PrivacyLedger(target_epsilon=epsilon, target_delta=delta,
                                                            budget_split={"classifier": 1.0})
        m = sites == s
        part = dp_class_sums(x[m], y[m], num_classes=ex.NUM_CLASSES, ledger=ledger,
                             rng=np.random.default_rng(ex._seed(seed, s, "proto") % 2**63))
        total = part if total is None else total + part
    return total


def public_head(extractor: fx.FeatureExtractor, stats: fx.FeatureStats, fpdb: Path) -> tuple[nn.Linear, int]:
    """A softmax head on PUBLIC labelled scans (FETAL_PLANES_DB, the African set's four planes only)."""
    records = [r for r in load_source("fetal_planes_db", fpdb, image_size=64).records if r.plane < ex.NUM_CLASSES]
    if not records:
        raise RuntimeError(f"no FETAL_PLANES_DB image of the four African planes under {fpdb}")
    x = stats.apply(extractor(np.stack([r.image for r in records])), unit_norm=True)
    return ex.fit_logreg(x, np.array([r.plane for r in records]), 1e-4), len(records)


def study_encoder(folder: Path, data: Path, seeds: int) -> dict[str, Any]:
    """Every arm for one encoder folder."""
    t0 = time.perf_counter()
    images, labels, sites, groups = ex._load({"data": str(data)})
    extractor = fx.PhantomEncoderExtractor(folder)
    stats = fx.phantom_statistics(extractor, n_per_profile=40)
    feats = stats.apply(extractor(images), unit_norm=True)
    warm, n_public = public_head(extractor, stats, data / "fetal_planes_db")
    folds = ex.grouped_stratified_folds(labels, groups, 5, seed=0)
    meta = json.loads((folder / "encoder.json").read_text())
    out: dict[str, Any] = {"encoder": str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder),
                           "encoder_config": meta.get("config"), "encoder_data": meta.get("data"),
                           "public_images_for_init": n_public,
                           "public_head_alone": ex.accuracy(warm, feats, labels)}
    arms: dict[str, list[float]] = {}
    for f, test in enumerate(folds):
        tr = np.setdiff1d(np.arange(len(labels)), test)
        xtr, ytr, s_tr, xte, yte = feats[tr], labels[tr], sites[tr], feats[test], labels[test]
        arms.setdefault("nonprivate", []).append(ex.accuracy(ex.fit_logreg(xtr, ytr, 1e-4), xte, yte))
        for seed in range(seeds):
            sums = federated_prototypes(xtr, ytr, s_tr, epsilon=None, seed=seed)
            arms.setdefault("prototypes_nonprivate", []).append(float((prototype_predict(sums, xte) == yte).mean()))
            for eps in EPSILONS:
                sums = federated_prototypes(xtr, ytr, s_tr, epsilon=eps, seed=ex._seed("p", f, seed))
                arms.setdefault(f"prototypes_eps{eps:g}", []).append(
                    float((prototype_predict(sums, xte) == yte).mean()))
                for arm, init in (("dpsgd", None), ("dpsgd_public_init", warm)):
                    head, _ = ex.federated_dp(xtr, ytr, s_tr, epsilon=eps, lr=0.1, rounds=6, local_steps=50,
                                              clip=1.0, seed=ex._seed("g", f, seed), init=init)
                    arms.setdefault(f"{arm}_eps{eps:g}", []).append(ex.accuracy(head, xte, yte))
        print(f"[{folder.name}] fold {f} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    out["arms"] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in arms.items()}
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(results: Sequence[dict[str, Any]]) -> str:
    cols = ["nonprivate", "prototypes_nonprivate"] + [f"{a}_eps{e:g}" for e in EPSILONS
                                                      for a in ("dpsgd", "dpsgd_public_init", "prototypes")]
    lines = ["| encoder | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['encoder']} | " + " | ".join(
            f"{r['arms'][c]['mean']:.3f} ± {r['arms'][c]['std']:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--encoder", action="append", default=[], help="phantom encoder folder (repeatable)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    encoders = [Path(e) for e in (a.encoder or [str(ROOT / "common" / "assets" / "phantom-encoder")])]
    t0 = time.perf_counter()
    results = [study_encoder(e.resolve(), Path(a.data), a.seeds) for e in encoders]
    doc = {"study": "dp_gap", "data": "African fetal planes, training split only (5 case-grouped folds)",
           "settings": {"epsilons": list(EPSILONS), "delta": 1e-5, "seeds": a.seeds, "dpsgd": "Adam 0.1, 6 rounds x "
                        "50 local steps, q = 1/3, clip 1, FedAvg unweighted", "nonprivate_l2": 1e-4,
                        "noise_seed": "derived from public run seeds (simulation only: not private noise)"},
           "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version()},
           "wall_seconds": round(time.perf_counter() - t0, 1), "results": results}
    write_text_atomic(Path(a.out), json.dumps(doc, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
