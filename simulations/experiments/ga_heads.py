"""Which frozen public features read GA off a head, privately? Cross-validation on HC18 TRAINING images only.

``python -m simulations.experiments.ga_heads`` reads the HC18 training set (``load_source("hc18", ...,
image_size=64)``; the records carry GA, pixel spacing rescaled to the 64 px image, patient id), splits its patients
into K folds (:func:`grouped_kfold`: no patient is split) and reports GA MAE (days), coverage of the central 90%
Gaussian interval and its mean width (days) on each held-out fold, per extractor (``--settings``: the shipped
``public_cnn``, ``public_size_cnn`` and ``phantom_cnn`` encoders, wavelet scattering), for:

1. ``pixel_size_line``: least squares of GA (weeks) on log pixel spacing, residual std as a constant interval; the
   baseline a model that looks at the image has to beat (in HC18 the spacing alone carries much of GA).
2. ``public_warm_start``: the product's regressor as built (:class:`GARegressor`, ``output="log_hc"``: apparent
   size -> head circumference -> Hadlock GA) with the linear head the encoder folder ships, fitted on public brain
   phantoms (:func:`fit_public_ga_head`): no private image at all. Only where a GA head is shipped.
3. ``nonprivate_h0`` / ``nonprivate_h32``: the product's head (FiLM by spacing, linear or one hidden layer)
   trained without DP (``train_private(ledger=None)``, Adam) on the pooled training folds, from the regressor's
   init (the public head where there is one). The frozen features are computed once per setting and
   :class:`FeatureHead` runs :meth:`GARegressor.forward_features` on them: the trained module is literally the
   product's head.
4. ``dp_fed_eps{10,4,1}``: 3 sites (the training fold's patients split iid, as the hc18 preset's
   ``data.partition=iid``), each training the ``hidden=0`` head with :func:`train_private` (Opacus DP-SGD, Adam,
   the Laplace NLL of :func:`regressor_loss`), each with its own :class:`PrivacyLedger` (epsilon for the whole run,
   delta 1e-5, RDP) over R FedAvg rounds (weighted by site size, only :func:`federated_state` is averaged).
   (lr, local steps) are chosen per outer fold and epsilon by inner patient-grouped CV on the outer training
   fold (1 seed, MAE), never on the reported fold.

Mean and std over (fold, seed); the pixel-size line, the public warm start and the fold assignment are
deterministic. The inner CV spends privacy too (Papernot & Steinke 2022); the figures are a feasibility study, the
DP noise seeds are public (simulation only, not private noise). JSON to
``simulations/benchmarks/results/ga_heads_hc18.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from common.data.loaders import load_source
from common.data.partition import case_groups, partition
from common.data.tensors import records_to_dataset
from common.models.downstream import (
    ENCODER_BACKBONES,
    GARegressor,
    federated_state,
    ga_metrics,
    load_federated_state,
    regressor_loss,
)
from common.privacy.dpsgd import train_private
from common.privacy.ledger import PrivacyLedger
from simulations.experiments.ga_statistics import (
    StatisticsDesign,
    design_from_features,
    fold_into_head,
    public_brain_features,
    public_real_features,
    release_statistics,
    solve_ridge,
    statistics_rows,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "simulations" / "benchmarks" / "results" / "ga_heads_hc18.json"
NONPRIVATE_LR, NONPRIVATE_BATCH = 0.01, 64
NONPRIVATE_CHECKPOINTS = (100, 300)  # cumulative Adam steps; inner CV picks one
COVERAGE = 0.9


# -- folds -------------------------------------------------------------------------------------------------------
def grouped_kfold(groups: Sequence[Sequence[int]], k: int, seed: int) -> list[np.ndarray]:
    """Whole groups (patients) into ``k`` folds of balanced size: largest groups first (random order among equal
    sizes), each to the currently smallest fold. Returns the sorted record indices of each fold."""
    if k < 2 or k > len(groups):
        raise ValueError(f"k={k} folds need 2 <= k <= {len(groups)} groups")
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(groups)), key=lambda g: -len(groups[g]))
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        sizes = np.array([len(f) for f in folds])
        smallest = np.flatnonzero(sizes == sizes.min())
        folds[int(smallest[rng.integers(len(smallest))])].extend(groups[g])
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def _sub_groups(groups: Sequence[Sequence[int]], idx: np.ndarray) -> list[list[int]]:
    """Groups restricted to ``idx``, re-indexed into positions of ``idx`` (empty ones dropped)."""
    pos = {int(i): p for p, i in enumerate(idx)}
    return [g for g in ([pos[i] for i in grp if i in pos] for grp in groups) if g]


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


# -- the product's head on precomputed features -----------------------------------------------------------------
class FeatureHead(nn.Module):
    """The trainable part of a :class:`GARegressor` (FiLM + head + output mapping) on precomputed backbone
    features: ``FeatureHead(reg)(reg.backbone(x), spacing) == reg(x, spacing)``. It holds ``reg`` itself (the
    parameter-free backbone is never called), so the weights it trains are the regressor's."""

    def __init__(self, regressor: GARegressor) -> None:
        super().__init__()
        self.reg = regressor

    def forward(self, h: Tensor, spacing: Tensor, **kw: Any) -> tuple[Tensor, Tensor]:
        return self.reg.forward_features(h, spacing, **kw)


def feature_dataset(feats: Tensor, ga: Tensor, spacing: Tensor) -> TensorDataset:
    """The 4-tuple layout :func:`regressor_loss` reads (features in the image slot, plane unused)."""
    return TensorDataset(feats, torch.zeros(len(feats), dtype=torch.int64), ga, spacing)


@torch.no_grad()
def predict(head: FeatureHead, feats: Tensor, spacing: Tensor) -> tuple[np.ndarray, np.ndarray]:
    head.eval()
    mean, logvar = head(feats, spacing)
    return mean.numpy(), torch.exp(0.5 * logvar).numpy()


def head_metrics(head: FeatureHead, feats: Tensor, ga: Tensor, spacing: Tensor) -> dict[str, float]:
    mean, std = predict(head, feats, spacing)
    out = ga_metrics(mean, std, ga.numpy(), coverage_level=COVERAGE)
    return {k: out[k] for k in ("mae_days", "coverage", "interval_width_days")}


def pixel_size_line(sp_tr: np.ndarray, ga_tr: np.ndarray, sp_te: np.ndarray, ga_te: np.ndarray
                    ) -> dict[str, float]:
    """Least squares GA ~ a + b log(spacing) on the training fold; the residual std as the interval."""
    a = np.stack([np.ones_like(sp_tr), np.log(sp_tr)], 1)
    coef, *_ = np.linalg.lstsq(a, ga_tr, rcond=None)
    std = float(np.sqrt(np.mean((a @ coef - ga_tr) ** 2) * len(ga_tr) / (len(ga_tr) - 2)))
    mean = coef[0] + coef[1] * np.log(sp_te)
    out = ga_metrics(mean, np.full_like(mean, std), ga_te, coverage_level=COVERAGE)
    return {k: out[k] for k in ("mae_days", "coverage", "interval_width_days")}


# -- training ----------------------------------------------------------------------------------------------------
def train_nonprivate(reg: GARegressor, data: TensorDataset, *, checkpoints: Sequence[int], seed: int,
                     evaluate=None) -> list[Any]:
    """Adam without DP from zero init, in chunks up to each cumulative checkpoint; ``evaluate(head)`` after each."""
    reg.load_state_dict(reg.init_state)
    head, done, outs = FeatureHead(reg), 0, []
    for c, stop in enumerate(checkpoints):
        train_private(head, regressor_loss, data, steps=stop - done, batch_size=min(NONPRIVATE_BATCH, len(data)),
                      lr=NONPRIVATE_LR, ledger=None, model_key="regressor", planned_total_steps=checkpoints[-1],
                      optimizer="adam", seed=_seed(seed, c))
        done = stop
        outs.append(evaluate(head) if evaluate is not None else None)
    return outs


def parse_setting(text: str) -> tuple[str, int, int, list[float]]:
    """``"phantom_cnn:10/4/1"``, ``"public_cnn:10/4/1"``, ``"public_size_cnn:10/4/1"`` or
    ``"scattering:J:grid:10/4/1"`` -> (backbone, J, grid, DP epsilons)."""
    parts = text.split(":")
    if parts[0] == "scattering" and len(parts) == 4:
        return "scattering", int(parts[1]), int(parts[2]), [float(e) for e in parts[3].split("/") if e]
    if parts[0] in ENCODER_BACKBONES and len(parts) == 2:
        return parts[0], 2, 4, [float(e) for e in parts[1].split("/") if e]
    raise ValueError(f"setting {text!r}: expected " + ", ".join(f"{b}:EPS/EPS" for b in ENCODER_BACKBONES)
                     + " or scattering:J:GRID:EPS/EPS")


def setting_name(backbone: str, j: int, grid: int) -> str:
    return f"scattering_J{j}_g{grid}_64px" if backbone == "scattering" else f"{backbone}_64px"


def make_regressor(backbone: str, j: int, grid: int, hidden: int, *, flips: bool = True,
                   film: bool = True) -> GARegressor:
    """The product's regressor (a linear head on a shipped encoder starts at its public GA head; ``film=False``: its
    spacing FiLM stays at zero, as ``train.regressor-film=false``); ``init_state`` (a plain attribute) is what every
    training run starts from."""
    torch.manual_seed(0)  # the hidden layer's init is public randomness; the output layer is data-free
    reg = GARegressor(64, 32, backbone=backbone, hidden=hidden, scattering_j=j, scattering_grid=grid, flips=flips,
                      film=film)
    reg.init_state = {k: v.clone() for k, v in reg.state_dict().items()}
    return reg


def federated_dp(models: list[GARegressor], data: list[TensorDataset], *, epsilon: float, lr: float,
                 local_steps: int, rounds: int, batch_size: int, clip: float, seed: int,
                 delta: float = 1e-5, tail_average: float = 0.0,
                 optimizer: str = "adam") -> tuple[FeatureHead, dict[str, Any]]:
    """FedAvg over ``rounds`` of per-site DP-SGD (:func:`train_private`, ``optimizer``) of the regressor head.

    ``models[0]`` is the global model, ``models[1:]`` one per site (reused, reloaded every round); every site has
    its own ledger for the whole run (``planned_total_steps = rounds * local_steps``, as the product plans it).
    What trains is what the models leave trainable (``make_regressor(film=False)``: the head alone).
    """
    glob, sites = models[0], models[1:]
    glob.load_state_dict(glob.init_state)
    ledgers = [PrivacyLedger(target_epsilon=epsilon, target_delta=delta, budget_split={"regressor": 1.0})
               for _ in sites]
    sizes = np.array([len(d) for d in data], dtype=np.float64)
    info: dict[str, Any] = {}
    for r in range(rounds):
        start = federated_state(glob)
        states = []
        for s, (m, d, led) in enumerate(zip(sites, data, ledgers)):
            load_federated_state(m, start)
            res = train_private(FeatureHead(m), regressor_loss, d, steps=local_steps, batch_size=min(batch_size, len(d)),
                                lr=lr, ledger=led, model_key="regressor", planned_total_steps=rounds * local_steps,
                                max_grad_norm=clip, optimizer=optimizer, seed=_seed(seed, s, r, "pub"),
                                noise_seed=_seed(seed, s, r, "noise"), tail_average=tail_average)
            states.append(federated_state(m))
            if r == rounds - 1:
                info[f"site{s}"] = {"n": len(d), "epsilon": round(res.epsilon, 4),
                                    "sigma": round(res.noise_multiplier, 4), "q": round(res.sample_rate, 4),
                                    "steps": led.steps("regressor"), "stopped_by_budget": res.stopped_by_budget}
        w = torch.tensor(sizes / sizes.sum())
        load_federated_state(glob, {k: sum(wi * st[k] for wi, st in zip(w, states)).to(states[0][k].dtype)
                                    for k in states[0]})
    return FeatureHead(glob), info


def federated_statistics(model: GARegressor, data: list[TensorDataset], design: StatisticsDesign, *,
                         epsilon: float, ridge: float, seed: int, delta: float = 1e-5
                         ) -> tuple[FeatureHead, dict[str, Any]]:
    """The product's ``train.regressor-fit=statistics``: every site releases its noisy sufficient statistics once
    (:func:`release_statistics`, its own ledger at ``epsilon`` for the regressor), the sums are solved by ridge and the
    correction folded into the public warm-start head (:func:`fold_into_head`)."""
    model.load_state_dict(model.init_state)
    total, info = None, {}
    for s, d in enumerate(data):
        feats, _, ga, sp = d.tensors
        x, y = statistics_rows(model, design, feats, sp, ga)
        ledger = PrivacyLedger(target_epsilon=epsilon, target_delta=delta, budget_split={"regressor": 1.0})
        rel = release_statistics(ledger, "regressor", x, y, noise_seed=_seed(seed, s, "statistics"))
        total = rel.vector if total is None else total + rel.vector
        info[f"site{s}"] = {"n": len(d), "epsilon": round(rel.epsilon, 4), "sigma": round(rel.noise_multiplier, 4),
                            "noise_std": round(rel.noise_std, 4)}
    w, var = solve_ridge(total, design.row_dim, ridge)
    fold_into_head(model, design, w, var)
    return FeatureHead(model), info


def _site_data(idx: np.ndarray, records: list, feats: Tensor, ga: Tensor, sp: Tensor, seed: int
               ) -> list[TensorDataset]:
    """Split ``idx``'s patients iid into 3 sites (:func:`common.data.partition.partition`, kind ``iid``)."""
    sub = [records[i] for i in idx]
    parts = partition(sub, kind="iid", num_sites=3, seed=seed, groups=case_groups(sub))
    return [feature_dataset(feats[idx[p]], ga[idx[p]], sp[idx[p]]) for p in map(np.asarray, parts)]


# -- one scattering setting --------------------------------------------------------------------------------------
def evaluate_setting(backbone: str, j: int, grid: int, epsilons: Sequence[float], records: list, data: TensorDataset,
                     groups: list[list[int]], folds: list[np.ndarray], s: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    dp_models = [make_regressor(backbone, j, grid, 0, flips=s["flips"], film=s["train_film"]) for _ in range(4)]
    np_models = {h: make_regressor(backbone, j, grid, h, flips=s["flips"]) for h in (0, 32)}
    warm = dp_models[0].public_warm_start
    stat_model = make_regressor(backbone, j, grid, 0, flips=s["flips"], film=False) if s["statistics"] else None
    public = None
    if stat_model is not None:
        public = (public_real_features(stat_model, *s["stat_public"].split(":", 1), plane=s["stat_public_plane"])
                  if s["stat_public"] else public_brain_features(stat_model))
    t0 = time.perf_counter()
    with torch.no_grad():  # frozen: computed once
        feats = torch.cat([dp_models[0].backbone(data.tensors[0][i:i + 256]) for i in range(0, len(data), 256)])
    feat_seconds = time.perf_counter() - t0
    ga, sp = data.tensors[2], data.tensors[3]
    name = setting_name(backbone, j, grid)
    out: dict[str, Any] = {"setting": name, "dim": int(feats.shape[1]), "feature_seconds": round(feat_seconds, 2),
                           "output": dp_models[0].output, "public_warm_start": warm, "folds": []}
    grid_hp = [(lr, ls) for lr in s["lrs"] for ls in s["local_steps"]]
    dp_kw = dict(rounds=s["rounds"], batch_size=s["batch_size"], clip=s["clip"], tail_average=s["tail_average"],
                 optimizer=s["optimizer"])
    n = len(records)
    chosen_once: dict[float, dict[tuple[float, int], float]] = {}  # with select_on_fold: that fold's inner CV
    for f in s["fold_ids"]:
        test = folds[f]
        train = np.setdiff1d(np.arange(n), test)
        inner = grouped_kfold(_sub_groups(groups, train), s["inner_folds"], seed=s["fold_seed"] + f + 1)
        inner = inner[: s["inner_splits"]]
        fold: dict[str, Any] = {"fold": f, "n_train": int(len(train)), "n_test": int(len(test))}
        fold["pixel_size_line"] = pixel_size_line(sp[train].numpy().astype(np.float64), ga[train].numpy(),
                                                  sp[test].numpy().astype(np.float64), ga[test].numpy())
        tr_ds = feature_dataset(feats[train], ga[train], sp[train])
        if warm:  # the shipped public GA head alone: no private image, no privacy cost
            dp_models[0].load_state_dict(dp_models[0].init_state)
            fold["public_warm_start"] = {"per_seed": [head_metrics(FeatureHead(dp_models[0]), feats[test], ga[test],
                                                                   sp[test])]}
        # non-private: the number of steps by inner CV (1 seed), then 3 seeds on the outer fold
        for hidden, reg in np_models.items():
            inner_mae = np.zeros(len(s["nonprivate_checkpoints"]))
            for v, val in enumerate(inner):
                itr, iva = train[np.setdiff1d(np.arange(len(train)), val)], train[val]
                maes = train_nonprivate(reg, feature_dataset(feats[itr], ga[itr], sp[itr]),
                                        checkpoints=s["nonprivate_checkpoints"], seed=_seed("np-inner", f, v, hidden),
                                        evaluate=lambda h: head_metrics(h, feats[iva], ga[iva], sp[iva])["mae_days"])
                inner_mae += np.array(maes) / len(inner)
            best = s["nonprivate_checkpoints"][int(np.argmin(inner_mae))]
            runs = [train_nonprivate(reg, tr_ds, checkpoints=[c for c in s["nonprivate_checkpoints"] if c <= best],
                                     seed=_seed("np-outer", f, seed, hidden),
                                     evaluate=lambda h: head_metrics(h, feats[test], ga[test], sp[test]))[-1]
                    for seed in range(s["seeds"])]
            fold[f"nonprivate_h{hidden}"] = {"per_seed": runs, "steps": best,
                                             "inner_cv_mae": {str(c): round(float(m), 3) for c, m in
                                                              zip(s["nonprivate_checkpoints"], inner_mae)}}
        outer_sites = _site_data(train, records, feats, ga, sp, seed=_seed("sites", f))
        for eps in (epsilons if s["dp_sgd"] else []):
            if s["select_on_fold"] is not None and (eps in chosen_once or f != s["select_on_fold"]):
                if eps not in chosen_once:
                    raise ValueError("--select-on-fold must be the first fold run")
                inner_cv = chosen_once[eps]
            else:
                inner_cv = {}
            for lr, ls in ([] if inner_cv else grid_hp):
                maes = []
                for v, val in enumerate(inner):
                    itr, iva = train[np.setdiff1d(np.arange(len(train)), val)], train[val]
                    sites = _site_data(itr, records, feats, ga, sp, seed=_seed("sites", f, v))
                    head, _ = federated_dp(dp_models, sites, epsilon=eps, lr=lr, local_steps=ls,
                                           seed=_seed("inner", name, f, v, eps, lr, ls), **dp_kw)
                    maes.append(head_metrics(head, feats[iva], ga[iva], sp[iva])["mae_days"])
                inner_cv[(lr, ls)] = float(np.mean(maes))
            chosen_once[eps] = inner_cv
            best_lr, best_ls = min(grid_hp, key=lambda k: inner_cv[k])
            runs, info = [], {}
            for seed in range(s["seeds"]):
                head, info = federated_dp(dp_models, outer_sites, epsilon=eps, lr=best_lr, local_steps=best_ls,
                                          seed=_seed("outer", name, f, eps, seed), **dp_kw)
                runs.append(head_metrics(head, feats[test], ga[test], sp[test]))
            fold[f"dp_fed_eps{eps:g}"] = {"per_seed": runs, "lr": best_lr, "local_steps": best_ls,
                                          "inner_cv_mae": {f"lr={k[0]:g},steps={k[1]}": round(v, 3)
                                                           for k, v in inner_cv.items()},
                                          "inner_cv_fold": f if s["select_on_fold"] is None else s["select_on_fold"],
                                          "sites_last_seed": info}
        if s["statistics"]:
            _statistics_arm(fold, f, name, stat_model, public, epsilons, records, feats, ga, sp, train, test, inner,
                            outer_sites, s)
        out["folds"].append(fold)
        print(f"[{name}] fold {f}: line {fold['pixel_size_line']['mae_days']:.2f} "
              + " ".join(f"{k} {np.mean([r['mae_days'] for r in fold[k]['per_seed']]):.2f}"
                         for k in fold if k.startswith(("nonprivate", "dp_")))
              + f" days MAE ({time.perf_counter() - t_start:.0f}s)", flush=True)
    out["summary"] = summary(out["folds"])
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def _statistics_arm(fold: dict[str, Any], f: int, name: str, model: GARegressor, public: tuple[np.ndarray, np.ndarray],
                    epsilons: Sequence[float], records: list, feats: Tensor, ga: Tensor, sp: Tensor, train: np.ndarray,
                    test: np.ndarray, inner: list[np.ndarray], outer_sites: list[TensorDataset],
                    s: dict[str, Any]) -> None:
    """``dp_stats_eps{e}``: (dims, target scale, ridge) by inner patient-grouped CV on the outer training fold (the
    inner fits averaged over ``statistics_repeats`` noise draws), then ``seeds`` noise draws on the outer fold; the
    sites are the DP-SGD arm's (paired)."""
    designs = {(k, ss, rs, c): design_from_features(public, image_size=model.image_size, dims=k, spacing_scale=ss,
                                                     row_scale=rs, target_scale=c)
               for k in s["stat_dims"] for ss in s["stat_spacing_scales"] for rs in s["stat_row_scales"]
               for c in s["stat_target_scales"]}
    grid_hp = [(*key, r) for key in designs for r in s["stat_ridges"]]
    for eps in epsilons:
        inner_cv: dict[tuple[int, float, float, float, float], list[float]] = {hp: [] for hp in grid_hp}
        for v, val in enumerate(inner):
            itr, iva = train[np.setdiff1d(np.arange(len(train)), val)], train[val]
            sites = _site_data(itr, records, feats, ga, sp, seed=_seed("sites", f, v))
            for *key, r in grid_hp:
                for rep in range(s["statistics_repeats"]):
                    head, _ = federated_statistics(model, sites, designs[tuple(key)], epsilon=eps, ridge=r,
                                                   seed=_seed("stats-inner", name, f, v, eps, rep))
                    inner_cv[(*key, r)].append(head_metrics(head, feats[iva], ga[iva], sp[iva])["mae_days"])
        mean_cv = {hp: float(np.mean(m)) for hp, m in inner_cv.items()}
        k, ss, rs, c, r = min(grid_hp, key=lambda hp: mean_cv[hp])
        runs, info = [], {}
        for seed in range(s["seeds"]):
            head, info = federated_statistics(model, outer_sites, designs[(k, ss, rs, c)], epsilon=eps, ridge=r,
                                              seed=_seed("stats-outer", name, f, eps, seed))
            runs.append(head_metrics(head, feats[test], ga[test], sp[test]))
        fold[f"dp_stats_eps{eps:g}"] = {"per_seed": runs, "dims": k, "spacing_scale": ss, "row_scale": rs,
                                        "target_scale": c, "ridge": r,
                                        "inner_cv_mae": {f"dims={a},spacing={b:g},rows={e:g},scale={g:g},ridge={h:g}":
                                                         round(m, 3) for (a, b, e, g, h), m in mean_cv.items()},
                                        "sites_last_seed": info}


METRICS = ("mae_days", "coverage", "interval_width_days")


def summary(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over (fold, seed) of each method and metric (the pixel-size line: over folds)."""
    out: dict[str, Any] = {}
    for key in [k for k in folds[0] if k == "pixel_size_line" or k.startswith(("nonprivate", "dp_", "public_"))]:
        rows = [[fo[key]] if key == "pixel_size_line" else fo[key]["per_seed"] for fo in folds]
        out[key] = {m: {"mean": float(np.mean([[r[m] for r in rs] for rs in rows])),
                        "std": float(np.std([[r[m] for r in rs] for rs in rows]))} for m in METRICS}
        if key.startswith("dp_stats"):
            out[key]["chosen"] = [f"dims={fo[key]['dims']},spacing={fo[key]['spacing_scale']:g},"
                                  f"rows={fo[key]['row_scale']:g},"
                                  f"scale={fo[key]['target_scale']:g},"
                                  f"ridge={fo[key]['ridge']:g}" for fo in folds]
        elif key.startswith("dp_"):
            out[key]["chosen"] = [f"lr={fo[key]['lr']:g},steps={fo[key]['local_steps']}" for fo in folds]
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| features | method | MAE (days) | 90% coverage | interval width (days) | chosen (per fold) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for key, v in r["summary"].items():
            cells = [f"{v[m]['mean']:.{3 if m == 'coverage' else 2}f} ± {v[m]['std']:.{3 if m == 'coverage' else 2}f}"
                     for m in METRICS]
            chosen = ""
            if key.startswith("dp_"):
                chosen = ", ".join(v["chosen"])
            elif key.startswith("nonprivate"):
                chosen = ", ".join(f"{fo[key]['steps']} steps" for fo in r["folds"])
            lines.append(f"| {r['setting']} | {key} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def load_training(root: str) -> tuple[list, TensorDataset, list[list[int]]]:
    """HC18 training images only (the loader reads ``training_set``; HC18's test set has no GA labels)."""
    records = load_source("hc18", root, image_size=64).records
    data = records_to_dataset(records, image_size=64)
    if not (torch.isfinite(data.tensors[2]).all() and torch.isfinite(data.tensors[3]).all()):
        raise RuntimeError("every HC18 training record should have GA and pixel spacing")
    return records, data, case_groups(records)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hc18"))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold-ids", default="", help="which outer folds to run (default: all)")
    p.add_argument("--inner-folds", type=int, default=3)
    p.add_argument("--inner-splits", type=int, default=3, help="inner folds actually used (compute limit)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fold-seed", type=int, default=0)
    p.add_argument("--select-on-fold", type=int, default=None,
                   help="choose DP (lr, steps) by inner CV on this outer fold's training set only, reuse elsewhere")
    p.add_argument("--lrs", default="0.02,0.05,0.1")
    p.add_argument("--local-steps", default="25,50")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--tail-average", type=float, default=0.0,
                   help="fraction of each site's local DP steps whose iterates are averaged (train_private)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="the sites' DP optimiser")
    p.add_argument("--freeze-film", action="store_true",
                   help="DP arms train the head alone; the spacing FiLM stays at its zero init")
    p.add_argument("--settings", default="public_cnn:10/4/1,phantom_cnn:10/4/1,scattering:2:4:10/4/1",
                   help="comma-separated BACKBONE:eps/eps/... (phantom_cnn, public_cnn, public_size_cnn) or "
                        "scattering:J:grid:eps/...")
    p.add_argument("--single-view", action="store_true",
                   help="encoder features of the image alone (default: averaged over its four flips, as the product)")
    p.add_argument("--statistics", action="store_true",
                   help="add the arm dp_stats_eps{e}: the head fitted once from the sites' noisy sufficient "
                        "statistics (train.regressor-fit=statistics)")
    p.add_argument("--no-dp-sgd", action="store_true", help="leave out the DP-SGD arms (dp_fed_eps{e})")
    p.add_argument("--stat-dims", default="1,2,4,8")
    p.add_argument("--stat-spacing-scales", default="0.25,0.5,1")
    p.add_argument("--stat-row-scales", default="1,2")
    p.add_argument("--stat-target-scales", default="0.2,0.3,0.5")
    p.add_argument("--stat-ridges", default="10,30,100,300")
    p.add_argument("--stat-public", default="",
                   help="SOURCE:DIR of a public real dataset whose features give the design's directions "
                        "(default: public brain phantoms)")
    p.add_argument("--stat-public-plane", default="fetal_brain", help="that dataset's plane to use ('all': every one)")
    p.add_argument("--stat-repeats", type=int, default=2, help="noise draws per inner-CV fit of the statistics arm")
    p.add_argument("--note", default="")
    p.add_argument("--machine-note", default="", help="what else ran on the machine (wall times depend on it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    records, data, groups = load_training(args.data)
    folds = grouped_kfold(groups, args.folds, seed=args.fold_seed)
    s = {"folds": args.folds, "fold_ids": [int(v) for v in args.fold_ids.split(",")] if args.fold_ids
         else list(range(args.folds)), "inner_folds": args.inner_folds,
         "inner_splits": min(args.inner_splits, args.inner_folds), "seeds": args.seeds, "fold_seed": args.fold_seed,
         "select_on_fold": args.select_on_fold, "lrs": [float(v) for v in args.lrs.split(",")],
         "local_steps": [int(v) for v in args.local_steps.split(",")], "rounds": args.rounds,
         "batch_size": args.batch_size, "clip": args.clip, "tail_average": args.tail_average,
         "optimizer": args.optimizer, "train_film": not args.freeze_film,
         "nonprivate_checkpoints": list(NONPRIVATE_CHECKPOINTS),
         "flips": not args.single_view, "statistics": args.statistics, "dp_sgd": not args.no_dp_sgd,
         "stat_dims": [int(v) for v in args.stat_dims.split(",")],
         "stat_spacing_scales": [float(v) for v in args.stat_spacing_scales.split(",")],
         "stat_row_scales": [float(v) for v in args.stat_row_scales.split(",")],
         "stat_target_scales": [float(v) for v in args.stat_target_scales.split(",")],
         "stat_ridges": [float(v) for v in args.stat_ridges.split(",")], "statistics_repeats": args.stat_repeats,
         "stat_public": args.stat_public,
         "stat_public_plane": None if args.stat_public_plane == "all" else args.stat_public_plane}
    settings = [parse_setting(v) for v in args.settings.split(",")]
    results = [evaluate_setting(b, j, g, eps, records, data, groups, folds, s) for b, j, g, eps in settings]
    report = {
        "study": "GA regressor head on frozen public features (log-HC output, public phantom warm start where shipped)"
                 " vs the pixel-size line, patient-grouped CV on "
                 "the HC18 TRAINING images only",
        "data": f"hc18 training_set ({len(records)} images, {len(groups)} patients), 64 px, pixel spacing rescaled "
                "to the fitted image; folds group whole patients (grouped_kfold, balanced sizes)",
        "settings": {**s, "extractors": [f"{setting_name(b, j, g)}, DP eps {eps}" for b, j, g, eps in settings],
                     "delta": 1e-5,
                     "accountant": "rdp", "coverage_level": COVERAGE, "sites": "3, training patients split iid "
                     "(common.data.partition.partition kind=iid, fixed per fold)",
                     "dp": "train_private (Opacus, functorch per-sample grads, settings.optimizer, fresh optimizer "
                           "state each round), one PrivacyLedger per site for the whole run, planned_total_steps = "
                           "rounds * local_steps; FedAvg weighted by site size of federated_state; DP head hidden=0",
                     "dp_selection": "(lr, local steps) minimising inner-CV MAE, 1 seed, per outer fold and epsilon",
                     "nonprivate": f"from the regressor's init (the public GA head where shipped), "
                                   f"train_private(ledger=None), Adam lr={NONPRIVATE_LR}, batch {NONPRIVATE_BATCH}, "
                                   f"steps in {list(NONPRIVATE_CHECKPOINTS)} by inner-CV MAE (1 seed)",
                     "pixel_size_line": "OLS of GA weeks on log(spacing mm), residual std (n-2) as constant sigma",
                     "noise_seed": "derived from public run seeds (simulation only: not private noise)",
                     "compute_note": args.note},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads": 1, "processes": 1,
                    "note": args.machine_note},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(results))
    print(f"wrote {out} ({report['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
