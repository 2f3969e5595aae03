"""Non-private reference for the plane classifier on real scans: a small CNN, local vs FedAvg vs pooled.

``python -m simulations.benchmarks.reference_cnn`` reads the African fetal planes *training* split only
(``<data-root>/african_fetal_planes/train``, 217 images, 5 countries = 5 sites, 4 planes; no test split is ever
opened), groups the images into cases (:func:`common.data.partition.case_groups` over
:func:`common.data.dedup.find_duplicates`) and splits the cases into K grouped, plane-stratified folds
(:func:`simulations.experiments.extractors.grouped_stratified_folds`). On every outer fold the project's own
end-to-end CNN (:class:`common.models.downstream.PlaneClassifier`, ``backbone="cnn"``, width 16, 64 px, 4 in-scope
planes) is trained without privacy, with Adam and a light augmentation at every step (:func:`augment_batch`), under
three regimes:

- ``local``: every country trains alone on its training-fold images and is scored on its own test-fold images
  (mean over countries, and pooled = all local predictions counted together);
- ``fedavg``: the 5 countries federate, R rounds of E local steps (fresh Adam every round, as at a site), the
  server averages the state dicts (size-weighted by default, or unweighted);
- ``pooled``: one model on all training-fold images.

Every model gets the same number of optimiser steps (local model: ``steps``; FedAvg: ``rounds * local_steps``
per site = ``steps``; pooled: ``steps``). Nothing is chosen on the test fold: fixed hyperparameters, fixed step
count, the last iterate is scored. Accuracy mean and std over (fold, seed) go to
``simulations/benchmarks/results/reference_cnn_african.json`` (rewritten after every fold) and a markdown table to
stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data.dedup import find_duplicates
from common.data.loaders import load_source
from common.data.partition import case_groups
from common.data.tensors import records_to_dataset
from common.models.downstream import PlaneClassifier
from simulations.experiments.extractors import grouped_stratified_folds

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "simulations" / "benchmarks" / "results" / "reference_cnn_african.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "african_fetal_planes"
PLANES_IN_SCOPE = (0, 1, 2, 3)  # brain, abdomen, femur, thorax
IMAGE_SIZE = 64
WIDTH = 16
REGIMES = ("local", "fedavg", "pooled")


# -- augmentation ------------------------------------------------------------------------------------------------
def augment_batch(x: Tensor, gen: torch.Generator, *, rotation_deg: float = 15.0, scale: tuple[float, float] = (0.9, 1.1),
                  shift: float = 0.08, contrast: tuple[float, float] = (0.8, 1.2), brightness: float = 0.1) -> Tensor:
    """Light random augmentation of a batch ``[B,1,H,W]`` in ``[-1,1]`` (returns the same shape, in ``[-1,1]``).

    Random affine (rotation +-``rotation_deg``, isotropic scale in ``scale``, shift +-``shift`` of the side),
    horizontal flip with probability 1/2, contrast (around the image mean) and brightness (+-``brightness`` of the
    [0,1] range) jitter. Pixels moved in from outside are black. Every draw comes from ``gen`` (deterministic).
    """
    n = x.shape[0]

    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = u(-rotation_deg, rotation_deg) * (math.pi / 180.0)
    inv_scale = 1.0 / u(*scale)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    tx, ty = u(-2 * shift, 2 * shift), u(-2 * shift, 2 * shift)  # affine_grid coordinates span 2 per side
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    y = F.grid_sample((x + 1.0) / 2.0, grid, align_corners=False, padding_mode="zeros")
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    c = u(*contrast).view(n, 1, 1, 1).to(x.dtype)
    b = u(-brightness, brightness).view(n, 1, 1, 1).to(x.dtype)
    y = ((y - mean) * c + mean + b).clamp(0.0, 1.0)
    return y * 2.0 - 1.0


# -- training ----------------------------------------------------------------------------------------------------
def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def new_model(seed: int) -> PlaneClassifier:
    """The project's CNN plane classifier, initialised from ``seed``."""
    torch.manual_seed(seed)
    return PlaneClassifier(image_size=IMAGE_SIZE, width=WIDTH, planes=PLANES_IN_SCOPE, backbone="cnn")


def train_steps(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, batch_size: int, lr: float,
                gen: torch.Generator) -> nn.Module:
    """``steps`` Adam steps (fresh optimiser state) on augmented minibatches drawn without replacement per step."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    b = min(batch_size, n)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:b]
        loss = F.cross_entropy(model(augment_batch(x[idx], gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def average_states(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
                   ) -> dict[str, Tensor]:
    """FedAvg of state dicts: the (normalised) weighted mean of every floating entry; others taken from the first."""
    if not states:
        raise ValueError("average_states needs at least one state")
    w = torch.tensor([1.0] * len(states) if weights is None else [float(v) for v in weights], dtype=torch.float64)
    if len(w) != len(states) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights {list(w.tolist())} do not fit {len(states)} states")
    w = w / w.sum()
    out: dict[str, Tensor] = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = sum(float(wi) * s[key].to(torch.float64) for wi, s in zip(w, states))
            out[key] = acc.to(ref.dtype)  # type: ignore[union-attr]
        else:
            out[key] = ref.clone()
    return out


def fedavg(sites: Sequence[tuple[Tensor, Tensor]], *, rounds: int, local_steps: int, batch_size: int, lr: float,
           weighting: str, seed: int) -> nn.Module:
    """FedAvg over ``sites`` ((images, labels) each): every round each site starts from the global state, takes
    ``local_steps`` Adam steps (fresh optimiser), the server averages (``weighting`` "size" or "unweighted")."""
    if weighting not in ("size", "unweighted"):
        raise ValueError(f"weighting={weighting!r} must be 'size' or 'unweighted'")
    global_model = new_model(_seed(seed, "init"))
    weights = [float(len(y)) for _, y in sites] if weighting == "size" else None
    gens = [torch.Generator().manual_seed(_seed(seed, "site", k)) for k in range(len(sites))]
    for _ in range(rounds):
        states = []
        for (x, y), gen in zip(sites, gens):
            local = new_model(0)
            local.load_state_dict(global_model.state_dict())
            train_steps(local, x, y, steps=local_steps, batch_size=batch_size, lr=lr, gen=gen)
            states.append(local.state_dict())
        global_model.load_state_dict(average_states(states, weights))
    return global_model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 128]).argmax(1) for i in range(0, len(x), 128)])


# -- study -------------------------------------------------------------------------------------------------------
def load_train(root: Path) -> tuple[Tensor, Tensor, np.ndarray, list[list[int]]]:
    """The African TRAINING split only: images [-1,1], planes, countries and case groups (patient + duplicates)."""
    records = load_source("african", root, image_size=IMAGE_SIZE, split="train").records
    bad = [r.image_id for r in records if r.extra.get("official_split") != "train"]
    if bad:
        raise RuntimeError(f"non-training records were loaded ({bad[:3]}); this study must never see the test split")
    if not records:
        raise RuntimeError(f"no training records under {root}")
    groups = case_groups(records, find_duplicates(records))
    data = records_to_dataset(records, image_size=IMAGE_SIZE)
    x, y = data.tensors[0], data.tensors[1]
    if int(y.max()) >= len(PLANES_IN_SCOPE):
        raise RuntimeError("unexpected plane outside brain/abdomen/femur/thorax in the African set")
    return x, y, np.array([r.site for r in records]), groups


def run_fold(x: Tensor, y: Tensor, sites: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray, *, seed: int,
             fold: int, args: argparse.Namespace) -> dict[str, Any]:
    """The three regimes on one outer fold and seed."""
    countries = sorted(set(sites.tolist()))
    tr = {c: train_idx[sites[train_idx] == c] for c in countries}
    te = {c: test_idx[sites[test_idx] == c] for c in countries}
    out: dict[str, Any] = {"fold": fold, "seed": seed, "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
                           "per_country_sizes": {c: [int(len(tr[c])), int(len(te[c]))] for c in countries}}

    def per_country(pred: Tensor) -> dict[str, float]:
        pos = {int(i): p for p, i in enumerate(test_idx)}
        return {c: float((pred[[pos[int(i)] for i in te[c]]] == y[te[c]]).float().mean()) for c in countries
                if len(te[c])}

    # (a) local
    t0 = time.perf_counter()
    correct, total, accs = 0, 0, {}
    for c in (countries if "local" in args.regimes else []):
        if len(tr[c]) == 0 or len(te[c]) == 0:
            continue
        model = new_model(_seed(seed, fold, "local", c))
        gen = torch.Generator().manual_seed(_seed(seed, fold, "local-data", c))
        train_steps(model, x[tr[c]], y[tr[c]], steps=args.steps, batch_size=args.site_batch, lr=args.lr, gen=gen)
        hit = predict(model, x[te[c]]) == y[te[c]]
        accs[c] = float(hit.float().mean())
        correct, total = correct + int(hit.sum()), total + int(len(hit))
    if accs:
        out["local"] = {"mean_over_countries": float(np.mean(list(accs.values()))), "pooled": correct / total,
                        "per_country": accs, "seconds": time.perf_counter() - t0}
    if "fedavg" in args.regimes:
        _fedavg(out, x, y, countries, tr, test_idx, per_country, seed=seed, fold=fold, args=args)
    if "pooled" in args.regimes:
        _pooled(out, x, y, train_idx, test_idx, per_country, seed=seed, fold=fold, args=args)
    return out


def _fedavg(out: dict[str, Any], x: Tensor, y: Tensor, countries: list[str], tr: Mapping[str, np.ndarray],
            test_idx: np.ndarray, per_country: Any, *, seed: int, fold: int, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    fed_sites = [(x[tr[c]], y[tr[c]]) for c in countries if len(tr[c])]
    model = fedavg(fed_sites, rounds=args.rounds, local_steps=args.steps // args.rounds, batch_size=args.site_batch,
                   lr=args.lr, weighting=args.weighting, seed=_seed(seed, fold, "fedavg"))
    pred = predict(model, x[test_idx])
    out["fedavg"] = {"accuracy": float((pred == y[test_idx]).float().mean()), "per_country": per_country(pred),
                     "seconds": time.perf_counter() - t0}


def _pooled(out: dict[str, Any], x: Tensor, y: Tensor, train_idx: np.ndarray, test_idx: np.ndarray,
            per_country: Any, *, seed: int, fold: int, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    model = new_model(_seed(seed, fold, "pooled"))
    gen = torch.Generator().manual_seed(_seed(seed, fold, "pooled-data"))
    train_steps(model, x[train_idx], y[train_idx], steps=args.steps, batch_size=args.batch, lr=args.lr, gen=gen)
    pred = predict(model, x[test_idx])
    out["pooled"] = {"accuracy": float((pred == y[test_idx]).float().mean()), "per_country": per_country(pred),
                     "seconds": time.perf_counter() - t0}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float]:
        a = np.array(values, dtype=float)
        return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}

    ran = [k for k in REGIMES if all(k in r for r in runs)]
    out: dict[str, Any] = {}
    if "local" in ran:
        out["local_mean_over_countries"] = stat([r["local"]["mean_over_countries"] for r in runs])
        out["local_pooled"] = stat([r["local"]["pooled"] for r in runs])
    for k in ("fedavg", "pooled"):
        if k in ran:
            out[k] = stat([r[k]["accuracy"] for r in runs])
    out["wall_seconds"] = {k: float(sum(r[k]["seconds"] for r in runs)) for k in ran}
    return out


def markdown(summary: dict[str, Any], n_folds: int, n_seeds: int) -> str:
    s = summary
    wall = s["wall_seconds"]
    rows = [(name, s[key], wall.get(regime) if show else None) for name, key, regime, show in (
        ("local (mean over countries)", "local_mean_over_countries", "local", True),
        ("local (pooled predictions)", "local_pooled", "local", False),
        ("FedAvg (5 countries)", "fedavg", "fedavg", True),
        ("pooled (centralised)", "pooled", "pooled", True)) if key in s]
    lines = ["| regime | accuracy mean ± std | n (folds x seeds) | wall s |", "|---|---|---|---|"]
    for name, st, sec in rows:
        lines.append(f"| {name} | {st['mean']:.3f} ± {st['std']:.3f} | {n_folds} x {n_seeds} = {st['n']} | "
                     f"{'' if sec is None else f'{sec:.0f}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding train/African_train.csv")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="training seeds per fold (3 would take ~3x the default time)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of every model (FedAvg: rounds x local)")
    p.add_argument("--rounds", type=int, default=15, help="FedAvg rounds (local steps = steps // rounds)")
    p.add_argument("--batch", type=int, default=32, help="pooled batch size")
    p.add_argument("--site-batch", type=int, default=16, help="batch size at a site (local and FedAvg)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weighting", choices=("size", "unweighted"), default="size")
    p.add_argument("--regimes", default=",".join(REGIMES), help="which of local,fedavg,pooled to train")
    args = p.parse_args(argv)
    args.regimes = [r for r in args.regimes.split(",") if r]
    if not args.regimes or set(args.regimes) - set(REGIMES):
        p.error(f"--regimes {','.join(args.regimes)}: choose one or more of {','.join(REGIMES)}")
    if args.steps % args.rounds:
        p.error(f"--steps {args.steps} must be a multiple of --rounds {args.rounds}")
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    x, y, sites, groups = load_train(Path(args.data_root))
    folds = grouped_stratified_folds(y.numpy(), groups, args.folds, args.fold_seed)
    settings = {"data_root": args.data_root, "split": "train only", "folds": args.folds, "fold_seed": args.fold_seed,
                "seeds": args.seeds, "steps_per_model": args.steps, "fedavg_rounds": args.rounds,
                "fedavg_local_steps": args.steps // args.rounds, "pooled_batch": args.batch,
                "site_batch": args.site_batch, "lr": args.lr, "optimizer": "Adam (fresh state per model / per round)",
                "fedavg_weighting": args.weighting, "regimes": args.regimes, "model": f"PlaneClassifier(backbone='cnn', width={WIDTH}, "
                f"image_size={IMAGE_SIZE}, planes={PLANES_IN_SCOPE}) GroupNorm CNN, trained end to end, non-private",
                "augmentation": "every step: affine rotation +-15 deg, scale 0.9-1.1, shift +-8% of side, hflip p=0.5, "
                                "contrast 0.8-1.2 around image mean, brightness +-0.1 (of [0,1]); black fill",
                "selection": "none on the test fold: fixed hyperparameters and step count, last iterate scored"}
    report: dict[str, Any] = {
        "study": "non-private reference CNN for the plane classifier: local vs FedAvg vs pooled, CV on the African "
                 "TRAINING split only",
        "data": f"african_fetal_planes/train ({len(y)} images, {len(set(sites.tolist()))} countries = sites, "
                f"{len(set(y.tolist()))} planes); {len(groups)} case groups (patient ids joined with exact/near "
                "duplicates); folds grouped by case, stratified by plane",
        "settings": settings,
        "reduced": {
            "seeds": f"{args.seeds} training seed(s) per fold (3 asked if compute allows; the default run is sized to "
                     "~30 min on 1 thread of a shared 2-core machine, and 3 seeds would take ~3x)",
            "steps": f"{args.steps} steps per model (the suggested 400-600 pooled steps did not fit the cap with 11 "
                     "models per fold: 5 local + 5 FedAvg sites + 1 pooled)",
            "site_batch": f"sites (local, FedAvg) use batch {args.site_batch} instead of {args.batch} to halve their "
                          "cost (a site holds ~30-40 training-fold images)",
        },
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads": 1, "note": "2 CPU cores shared with a long-running study"},
        "folds": [{"n": int(len(f)), "planes": np.bincount(y.numpy()[f], minlength=4).tolist(),
                   "countries": {c: int((sites[f] == c).sum()) for c in sorted(set(sites.tolist()))}} for f in folds],
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        for k, test_idx in enumerate(folds):
            train_idx = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != k]))
            run = run_fold(x, y, sites, train_idx, test_idx, seed=seed, fold=k, args=args)
            report["runs"].append(run)
            report["summary"] = summarise(report["runs"])
            report["complete"] = len(report["runs"]) == args.folds * args.seeds
            report["wall_seconds"] = round(time.perf_counter() - t_all, 1)
            out.write_text(json.dumps(report, indent=2))
            scores = {"local": run.get("local", {}).get("mean_over_countries"),
                      "fedavg": run.get("fedavg", {}).get("accuracy"), "pooled": run.get("pooled", {}).get("accuracy")}
            print(f"seed {seed} fold {k}: " + " ".join(f"{r} {v:.3f}" for r, v in scores.items() if v is not None)
                  + f" ({report['wall_seconds']:.0f}s)", file=sys.stderr, flush=True)
    print(markdown(report["summary"], args.folds, args.seeds))
    print(f"wrote {out} ({report['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
