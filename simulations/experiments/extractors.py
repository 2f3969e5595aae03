"""Which frozen feature extractor should the private plane classifier stand on? Cross-validation on TRAINING data.

``python -m simulations.experiments.extractors`` reads the African fetal planes *training* split only
(``<data>/african_fetal_planes/train``; no test split is ever opened), groups its images into cases (same patient,
or byte/near-identical copies under another patient id: :func:`common.data.partition.case_groups` over
:func:`common.data.dedup.find_duplicates`) and splits the cases into K plane-stratified folds. For every extractor of
:mod:`common.models.features` (features standardised with phantom statistics, then scaled to unit norm per image):

- non-private pooled: multinomial logistic regression on all training folds (L2 weight chosen by inner grouped CV);
- federated DP: the 5 countries of the training folds are 5 sites; each trains a softmax head with DP-SGD through
  :func:`common.privacy.dpsgd.train_private`, charged to its own :class:`common.privacy.ledger.PrivacyLedger`
  (epsilon in {10, 4, 1} for the whole run, delta 1e-5, RDP; the ledger composes every round); the server averages
  the heads (FedAvg, unweighted) for R rounds. The learning rate and the local steps per round are chosen per
  outer fold and epsilon by inner grouped CV on the outer training folds (one seed), never on the fold that is
  reported; clip, rounds and sampling rate are fixed and written to the JSON. The DP-SGD steps are computed in
  closed form (:func:`linear_dp_sgd`: the same mechanism and accountant as Opacus, checked by a test).

Accuracy on each held-out fold, mean and std over (fold, seed); ``simulations/benchmarks/results/extractors.json``
and a markdown table on stdout. The inner CV spends privacy too (hyperparameter search on private data is not free,
Papernot & Steinke 2022); the figures are a feasibility study, not a deployable accounting of that search.
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from common.core.atomic_io import write_text_atomic
from common.core.records import PLANES
from common.data.dedup import find_duplicates
from common.data.loaders import load_source
from common.data.partition import case_groups
from common.models import features as fx
from common.privacy.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "simulations" / "benchmarks" / "results" / "extractors.json"
DEFAULT_ENCODER = ROOT / "runs" / "phantom-encoder"
PRIOR_GENERATOR = ROOT / "common" / "assets" / "prior-demo" / "generator"
EXTRACTORS = ("scattering_J2_g4", "scattering_J2_g4_32px", "phantom_cnn", "unet_encoder", "scattering_J2_g2",
              "pixels16", "scattering_J3_g2")
NUM_CLASSES = 4  # the African set has brain, abdomen, femur, thorax: PLANES indices 0..3
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3)  # unit-norm features: weaker penalties than usual (CV picks)


def build_extractor(name: str, encoder: Path) -> fx.FeatureExtractor:
    """One of :data:`EXTRACTORS` (the phantom encoder is trained into ``encoder`` first when missing)."""
    if name == "pixels16":
        return fx.PixelExtractor(16)
    if name == "scattering_J2_g2":
        return fx.Scattering(J=2, L=8, size=64, grid=2)
    if name == "scattering_J2_g4":
        return fx.Scattering(J=2, L=8, size=64, grid=4)
    if name == "scattering_J3_g2":
        return fx.Scattering(J=3, L=8, size=64, grid=2)
    if name == "scattering_J2_g4_32px":  # what the product's backbone computes on 32 px images
        return fx.Scattering(J=2, L=8, size=32, grid=4)
    if name == "phantom_cnn":
        return fx.PhantomEncoderExtractor(fx.train_phantom_encoder(encoder))
    if name == "unet_encoder":
        return fx.UNetEncoderExtractor(PRIOR_GENERATOR, timestep=20, grid=1)
    raise ValueError(f"unknown extractor {name!r}; choose from {EXTRACTORS}")


# -- folds -------------------------------------------------------------------------------------------------------
def grouped_stratified_folds(labels: np.ndarray, groups: Sequence[Sequence[int]], k: int, seed: int, *,
                             num_classes: int = NUM_CLASSES) -> list[np.ndarray]:
    """Assign whole groups to ``k`` folds, greedily balancing per-class counts (largest groups first); ``labels`` lie
    in ``0 .. num_classes - 1``.

    Returns the record indices of each fold; no group is split.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    order = sorted(order, key=lambda g: -len(groups[g]))
    counts = np.zeros((k, num_classes))
    target = np.bincount(labels, minlength=num_classes) / k
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        hist = np.bincount(labels[list(groups[g])], minlength=num_classes)
        # the increase of the squared distance to the per-class target (not its value after the move, which keeps
        # filling a fold already at its target rather than an empty one); ties go to the smaller fold
        cost = [((counts[f] + hist - target) ** 2 - (counts[f] - target) ** 2).sum() + 1e-3 * len(folds[f])
                for f in range(k)]
        best = int(np.argmin(cost))
        counts[best] += hist
        folds[best].extend(groups[g])
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def _sub_groups(groups: Sequence[Sequence[int]], idx: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Groups restricted to ``idx``, re-indexed into positions of ``idx``."""
    pos = {int(i): p for p, i in enumerate(idx)}
    out = [[pos[i] for i in g if i in pos] for g in groups]
    return [g for g in out if g], idx


# -- heads -------------------------------------------------------------------------------------------------------
def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float) -> nn.Linear:
    """Non-private multinomial logistic regression over the four African planes (:func:`fx.fit_softmax`)."""
    return fx.fit_softmax(torch.from_numpy(x), torch.from_numpy(y), num_classes=NUM_CLASSES, l2=l2)


def accuracy(head: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _per_example_ce(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def linear_dp_sgd(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                  ledger: PrivacyLedger, planned_total_steps: int, clip: float, generator: torch.Generator,
                  model_key: str = "classifier", optimizer: str = "sgd") -> float:
    """DP-SGD of a softmax head in closed form: what :func:`common.privacy.dpsgd.train_private` does with Opacus
    (Poisson rate ``q = 1/ceil(N/batch_size)``, per-example gradients of weight and bias clipped jointly to ``clip``,
    summed, Gaussian noise ``sigma * clip``, divided by the expected batch ``q * N``, then the ``optimizer`` step
    (``"sgd"`` or ``"adam"``, torch's, on the privatized gradient, as Opacus' ``DPOptimizer`` wraps it)), with the
    per-example gradients written out (``(p - y) x^T``) instead of hooked. Sigma comes from ``ledger.plan`` and every
    step is charged to the ledger's accountant, exactly as Opacus does. ~50x faster on CPU; a test checks it against
    ``train_private``. Returns the noise multiplier."""
    n = x.shape[0]
    q = 1.0 / math.ceil(n / batch_size)
    sigma = ledger.plan(model_key, sample_rate=q, planned_total_steps=planned_total_steps).noise_multiplier
    accountant = ledger.accountant_for(model_key)
    onehot = F.one_hot(y, head.out_features).to(x.dtype)
    expected = max(1, int(n * q))  # as Opacus: int(len(dataset) * sample_rate)
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer](head.parameters(), lr=lr)
    for _ in range(steps):
        take = torch.rand(n, generator=generator) < q
        xb, yb = x[take], onehot[take]
        with torch.no_grad():
            err = torch.softmax(head(xb), dim=1) - yb  # [b, K]: d loss / d logits
            norms = torch.sqrt((err.pow(2).sum(1)) * (xb.pow(2).sum(1) + 1.0))  # ||err x^T||_F joint with bias err
            scale = (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
            gw = (err * scale).T @ xb + sigma * clip * torch.randn(head.weight.shape, generator=generator)
            gb = (err * scale).sum(0) + sigma * clip * torch.randn(head.bias.shape, generator=generator)
        head.weight.grad, head.bias.grad = gw / expected, gb / expected
        opt.step()
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return sigma


def federated_dp(x: np.ndarray, y: np.ndarray, sites: np.ndarray, *, epsilon: float, lr: float, rounds: int,
                 local_steps: int, clip: float, seed: int, delta: float = 1e-5, batch_fraction: float = 1 / 3,
                 optimizer: str = "adam", init: nn.Linear | None = None, num_classes: int = NUM_CLASSES,
                 batch_size: int | None = None, on_round: Callable[[int, nn.Linear], None] | None = None
                 ) -> tuple[nn.Linear, dict[str, Any]]:
    """FedAvg of per-site DP-SGD softmax heads (:func:`linear_dp_sgd`, the product's Opacus step in closed form);
    every site has its own ledger for the whole run. The global head starts at zero, or at ``init`` (a head fitted
    on public data only: a public warm start). ``num_classes``: the head's outputs (the African set's 4). The
    expected batch is ``batch_fraction`` of each site's examples, or ``batch_size`` (capped at the site's size: the
    product's ``train.downstream-batch-size``) where given. ``on_round(r, global_head)`` sees the global head after
    every round r = 0, 1, ..."""
    dim = x.shape[1]
    global_head = nn.Linear(dim, num_classes)
    nn.init.zeros_(global_head.weight)
    nn.init.zeros_(global_head.bias)
    if init is not None:
        global_head.load_state_dict(init.state_dict())
    names = sorted(set(sites.tolist()))
    data = {s: TensorDataset(torch.from_numpy(x[sites == s]), torch.from_numpy(y[sites == s])) for s in names}
    ledgers = {s: PrivacyLedger(target_epsilon=epsilon, target_delta=delta, budget_split={"classifier": 1.0})
               for s in names}
    info: dict[str, Any] = {}
    for r in range(rounds):
        states = []
        for s in names:
            head = nn.Linear(dim, num_classes)
            head.load_state_dict(global_head.state_dict())
            n = len(data[s])
            batch = min(batch_size, n) if batch_size else max(1, math.ceil(n * batch_fraction))
            gen = torch.Generator().manual_seed(_seed(seed, s, r, "noise") % 2**63)
            sigma = linear_dp_sgd(head, *data[s].tensors, steps=local_steps, batch_size=batch, lr=lr,
                                  ledger=ledgers[s], planned_total_steps=rounds * local_steps, clip=clip,
                                  generator=gen, optimizer=optimizer)
            q = 1.0 / math.ceil(n / batch)
            states.append(head.state_dict())
            if r == rounds - 1:
                info[s] = {"n": n, "epsilon": round(ledgers[s].epsilon("classifier"), 4), "sigma": round(sigma, 4),
                           "q": round(q, 4), "steps": ledgers[s].steps("classifier")}
        global_head.load_state_dict({k: torch.stack([st[k] for st in states]).mean(0) for k in states[0]})
        if on_round is not None:
            on_round(r, global_head)
    return global_head, info


# -- one extractor -----------------------------------------------------------------------------------------------
def evaluate_extractor(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """All folds, epsilons and seeds for one extractor (runs in a worker process)."""
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    images, labels, sites, groups = _load(settings)
    extractor = build_extractor(name, Path(settings["encoder"]))
    stats = fx.phantom_statistics(extractor, n_per_profile=settings["stats_per_profile"])
    t0 = time.perf_counter()
    raw = extractor(images)
    sec_per_image = (time.perf_counter() - t0) / len(images)
    feats = stats.apply(raw, unit_norm=True)
    assert feats.shape == (len(images), extractor.dim)
    folds = grouped_stratified_folds(labels, groups, settings["folds"], seed=settings["fold_seed"])
    out: dict[str, Any] = {"name": name, "extractor": extractor.name, "dim": extractor.dim, "seconds_per_image": sec_per_image,
                           "stats_images": stats.n_images, "folds": []}
    common = dict(rounds=settings["rounds"], clip=settings["clip"])
    grid = [(lr, ls) for lr in settings["lrs"] for ls in settings["local_steps"]]
    for f, test_idx in enumerate(folds):
        train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
        xtr, ytr, str_ = feats[train_idx], labels[train_idx], sites[train_idx]
        xte, yte = feats[test_idx], labels[test_idx]
        inner_groups, _ = _sub_groups(groups, train_idx)
        inner = grouped_stratified_folds(ytr, inner_groups, settings["inner_folds"], seed=settings["fold_seed"] + f + 1)
        fold: dict[str, Any] = {"fold": f, "n_train": int(len(train_idx)), "n_test": int(len(test_idx))}
        # non-private pooled: L2 by inner CV
        inner_l2 = {}
        for l2 in L2_GRID:
            accs = []
            for val in inner:
                tr = np.setdiff1d(np.arange(len(ytr)), val)
                accs.append(accuracy(fit_logreg(xtr[tr], ytr[tr], l2), xtr[val], ytr[val]))
            inner_l2[l2] = float(np.mean(accs))
        best_l2 = max(L2_GRID, key=lambda v: inner_l2[v])
        fold["nonprivate"] = {"accuracy": accuracy(fit_logreg(xtr, ytr, best_l2), xte, yte), "l2": best_l2,
                              "inner_cv": {str(k): round(v, 4) for k, v in inner_l2.items()}}
        for eps in settings["epsilons"]:
            inner_cv: dict[tuple[float, int], float] = {}
            for lr, ls in grid:
                accs = []
                for v, val in enumerate(inner):
                    tr = np.setdiff1d(np.arange(len(ytr)), val)
                    head, _ = federated_dp(xtr[tr], ytr[tr], str_[tr], epsilon=eps, lr=lr, local_steps=ls,
                                           seed=_seed("inner", name, f, v, eps, lr, ls), **common)
                    accs.append(accuracy(head, xtr[val], ytr[val]))
                inner_cv[(lr, ls)] = float(np.mean(accs))
            best_lr, best_ls = max(grid, key=lambda v: inner_cv[v])
            runs, site_info = [], {}
            for s in range(settings["seeds"]):
                head, site_info = federated_dp(xtr, ytr, str_, epsilon=eps, lr=best_lr, local_steps=best_ls,
                                               seed=_seed("outer", name, f, eps, s), **common)
                runs.append(accuracy(head, xte, yte))
            fold[f"dp_eps{eps:g}"] = {"accuracy_per_seed": runs, "lr": best_lr, "local_steps": best_ls,
                                      "inner_cv": {f"lr={k[0]:g},steps={k[1]}": round(v, 4)
                                                   for k, v in inner_cv.items()},
                                      "sites_last_seed": site_info}
        out["folds"].append(fold)
        print(f"[{name}] fold {f}: nonprivate {fold['nonprivate']['accuracy']:.3f} "
              + " ".join(f"eps{e:g} {np.mean(fold[f'dp_eps{e:g}']['accuracy_per_seed']):.3f}"
                         for e in settings["epsilons"]) + f" ({time.perf_counter() - t_start:.0f}s)", flush=True)
    out["summary"] = _summary(out["folds"], settings["epsilons"])
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def _summary(folds: list[dict[str, Any]], epsilons: Sequence[float]) -> dict[str, Any]:
    np_acc = [f["nonprivate"]["accuracy"] for f in folds]
    out = {"nonprivate_pooled": {"mean": float(np.mean(np_acc)), "std_over_folds": float(np.std(np_acc))}}
    for eps in epsilons:
        per = np.array([f[f"dp_eps{eps:g}"]["accuracy_per_seed"] for f in folds])  # [folds, seeds]
        out[f"dp_fed_eps{eps:g}"] = {"mean": float(per.mean()), "std_over_fold_seed": float(per.std()),
                                     "std_over_folds_of_seed_means": float(per.mean(1).std()),
                                     "std_over_seeds_of_fold_means": float(per.mean(0).std())}
    return out


def _load(settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
    """The African TRAINING split only: images, planes, countries and case groups (patient + duplicates)."""
    root = Path(settings["data"]) / "african_fetal_planes"
    result = load_source("african", root, image_size=64, split="train")
    records = result.records
    if any(r.extra.get("official_split") != "train" for r in records):
        raise RuntimeError("a non-training record was loaded; this study must never see the test split")
    groups = case_groups(records, find_duplicates(records))
    labels = np.array([r.plane for r in records], dtype=np.int64)
    if labels.max() >= NUM_CLASSES:
        raise RuntimeError(f"unexpected plane in the African set: {sorted({PLANES[i] for i in labels})}")
    return (np.stack([r.image for r in records]), labels, np.array([r.site for r in records]), groups)


def markdown(results: list[dict[str, Any]], epsilons: Sequence[float]) -> str:
    head = ("| extractor | dim | ms/image | non-private pooled | "
            + " | ".join(f"DP fed eps={e:g}" for e in epsilons) + " |")
    lines = [head, "|" + "---|" * (4 + len(epsilons))]
    for r in results:
        s = r["summary"]
        cells = [f"{s['nonprivate_pooled']['mean']:.3f} ± {s['nonprivate_pooled']['std_over_folds']:.3f}"]
        cells += [f"{s[f'dp_fed_eps{e:g}']['mean']:.3f} ± {s[f'dp_fed_eps{e:g}']['std_over_fold_seed']:.3f}"
                  for e in epsilons]
        lines.append(f"| {r['extractor']} | {r['dim']} | {1000 * r['seconds_per_image']:.2f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def _report(settings: dict[str, Any], jobs: int, results: list[dict[str, Any]], names: Sequence[str],
            wall: float) -> dict[str, Any]:
    return {
        "study": "frozen feature extractor choice for the DP plane classifier, CV on the African TRAINING split only",
        "data": "african_fetal_planes/train (217 images, 5 countries = 5 sites, 4 planes); case groups = patient "
                "ids joined with exact/near duplicates; folds stratified by plane, grouped by case",
        "settings": {**settings, "delta": 1e-5, "accountant": "rdp",
                     "optimizer": "adam (fresh state every round, as at a site)",
                     "sample_rate": "1/3 (Poisson, expected batch ceil(n_site/3))", "aggregation": "FedAvg, unweighted",
                     "head": "linear softmax, zero init", "features": "phantom-standardised, unit L2 norm per image",
                     "nonprivate_l2_grid": list(L2_GRID),
                     "dp_selection": "(lr, local steps) by inner grouped CV, 1 seed",
                     "dp_engine": "closed-form softmax DP-SGD (linear_dp_sgd; equal to Opacus' step, tested)",
                     "noise_seed": "derived from public run seeds (simulation only: not private noise)"},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads_per_worker": 1, "jobs": jobs,
                    "note": "2 CPU cores shared with other jobs (helpers and test runs)"},
        "wall_seconds": round(wall, 1),
        "complete": len(results) == len(names),
        "extractors_requested": list(names),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--extractors", default=",".join(EXTRACTORS))
    p.add_argument("--encoder", default=str(DEFAULT_ENCODER), help="phantom encoder folder (trained if missing)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--inner-folds", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fold-seed", type=int, default=0)
    p.add_argument("--epsilons", default="10,4,1")
    p.add_argument("--lrs", default="0.1,0.2", help="Adam learning rates to choose from")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", default="25,50", help="local DP-SGD steps per round to choose from")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--stats-per-profile", type=int, default=40)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    settings = {"data": args.data, "encoder": args.encoder, "folds": args.folds, "inner_folds": args.inner_folds,
                "seeds": args.seeds, "fold_seed": args.fold_seed,
                "epsilons": [float(e) for e in args.epsilons.split(",")],
                "lrs": [float(v) for v in args.lrs.split(",")], "rounds": args.rounds,
                "local_steps": [int(v) for v in args.local_steps.split(",")], "clip": args.clip, "stats_per_profile": args.stats_per_profile}
    names = [n for n in args.extractors.split(",") if n]
    if "phantom_cnn" in names:  # train (or reuse) the encoder once, before the workers start
        fx.train_phantom_encoder(Path(args.encoder))
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(evaluate_extractor, name, settings): name for name in names}
        for future in as_completed(futures):  # the JSON is rewritten after every extractor: a cut run keeps them
            results.append(future.result())
            results.sort(key=lambda r: names.index(r["name"]))
            report = _report(settings, args.jobs, results, names, time.perf_counter() - t0)
            write_text_atomic(out, json.dumps(report, indent=2))
    print(markdown(results, settings["epsilons"]))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
