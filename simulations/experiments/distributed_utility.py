"""Does distributed DP (noise once in the secure sum) give the federated plane classifier more utility than per-site DP?

``python -m simulations.experiments.distributed_utility`` reads the African fetal planes *training* split only (never
the test split), the 5 plane-stratified, case-grouped folds of :mod:`simulations.experiments.extractors`, the
shipped public encoder's frozen features and the public warm start of :mod:`simulations.experiments.dp_gap`
(FETAL_PLANES_DB head), and compares on the held-out folds, at the same epsilon (delta 1e-5, example-level unit),
over 3 noise seeds:

- ``per_site_dpsgd``: the product's default: FedAvg of per-site DP-SGD heads, every site's own ledger at ``epsilon``
  (:func:`simulations.experiments.extractors.federated_dp`, the dp_gap settings: Adam 0.1, 6 rounds x 50 local
  steps, q = 1/3, clip 1, public warm start). Its epsilon holds against everyone, the server included.
- ``distributed_example``: DP-FedSGD with the distributed discrete Gaussian (Kairouz et al. 2021): every round each
  site sums its per-example clipped gradients (clip 1, all its examples), scales them to SecAgg+'s integer grid,
  adds its discrete-Gaussian share ``sigma_share = z Delta / sqrt(N)`` and the sum (mod 2**22) carries the noise
  ``z Delta`` once; the server takes an Adam step on the noisy sum. ``z`` is calibrated so that the central
  epsilon (against the server, who sees only the sum) is ``epsilon`` after the run's rounds; each site's local
  epsilon (the server and every other site colluding) is reported beside it.
- ``per_site_fedsgd``: the same algorithm, but every site adds the whole noise ``z`` itself (its epsilon holds
  against everyone): it isolates "noise once in the sum" from the change of algorithm.
- ``nonprivate`` (pooled logistic regression) and ``public_head_alone``: ceiling and floor.

The FedSGD arms choose (rounds, learning rate) by 3-fold grouped inner cross-validation on each outer training
portion (a small grid, the same for both); the DP-SGD arm keeps the product's settings. Noise here is seeded from
public run seeds (a simulation, not private noise). Writes
``simulations/benchmarks/results/distributed_utility.json`` and prints a markdown table.

The product's ``privacy.distributed-dp`` today is the **site-level** mechanism on top of per-site DP-SGD
(:mod:`common.privacy.distributed_dp`); this study measures the example-level variant that would replace the
per-site noise.
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
from common.models import features as fx
from common.privacy.distributed_dp import (
    MODULUS,
    DistributedPlan,
    central_rho,
    epsilon_to_zcdp,
    local_rho,
    zcdp_to_epsilon,
)
from simulations.experiments import extractors as ex
from simulations.experiments.dp_gap import public_head

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "simulations" / "benchmarks" / "results" / "distributed_utility.json"
EPSILONS = (10.0, 4.0, 2.0, 1.0)
DELTA = 1e-5
CLIP = 1.0
MAX_EXAMPLES = 256  # public cap of examples a site uses per round (sets the integer scale)
GRID = tuple((r, lr) for r in (5, 10, 20, 40, 80) for lr in (0.03, 0.1, 0.3))  # (rounds, Adam learning rate)


def noise_multiplier(epsilon: float, rounds: int) -> float:
    """``z`` such that ``rounds`` Gaussian releases of noise ``z * sensitivity`` compose to (epsilon, DELTA) (zCDP)."""
    return math.sqrt(rounds / (2 * epsilon_to_zcdp(epsilon, DELTA)))


def clipped_gradient_sum(head: nn.Linear, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Sum over examples of the cross-entropy gradient of ``[W | b]``, each example's clipped to L2 norm ``CLIP``."""
    with torch.no_grad():
        err = torch.softmax(head(x), dim=1) - onehot
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        norms = err.norm(dim=1) * xa.norm(dim=1)
        scale = (CLIP / (norms + 1e-12)).clamp(max=1.0)
        return (err * scale[:, None]).T @ xa  # [K, d + 1]


def secure_noisy_sum(vectors: Sequence[np.ndarray], plan: DistributedPlan, rng: np.random.Generator) -> np.ndarray:
    """What the server decodes from SecAgg+: every site's vector encoded by the product's example-level plan (its
    integer grid plus its discrete-Gaussian share, mod M, :meth:`DistributedPlan.encode`), summed mod M and decoded
    (:meth:`DistributedPlan.decode` gives the mean over sites; times the sites, the noisy sum)."""
    total = sum(plan.encode(np.asarray(v, np.float64), rng)[0] for v in vectors)
    return plan.decode(np.mod(total, MODULUS), len(vectors)) * len(vectors)


def fedsgd(x: np.ndarray, y: np.ndarray, sites: np.ndarray, *, epsilon: float, rounds: int, lr: float, seed: int,
           init: nn.Linear, mode: str) -> tuple[nn.Linear, dict[str, Any]]:
    """DP-FedSGD of a softmax head; ``mode`` ``"distributed"`` (discrete-Gaussian shares summed mod M) or
    ``"per_site"`` (each site adds the whole Gaussian noise)."""
    head = nn.Linear(x.shape[1], ex.NUM_CLASSES).double()
    head.load_state_dict({k: v.double() for k, v in init.state_dict().items()})
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    names = sorted(set(sites.tolist()))
    n_sites = len(names)
    data = {}
    for s in names:
        m = sites == s
        if m.sum() > MAX_EXAMPLES:
            raise ValueError(f"site {s} has {m.sum()} examples, over the public cap {MAX_EXAMPLES}")
        data[s] = (torch.from_numpy(x[m]).double(), nn.functional.one_hot(torch.from_numpy(y[m]), ex.NUM_CLASSES)
                   .double())
    dim = ex.NUM_CLASSES * (x.shape[1] + 1)
    z = noise_multiplier(epsilon, rounds)
    rng = np.random.default_rng(ex._seed(seed, mode, "noise") % 2**63)
    # the product's example-level plan (privacy.distributed-classifier): integer grid with 8 noise std of headroom,
    # sensitivity of one example = its clipped row plus rounding (<= 1 per coordinate)
    plan = DistributedPlan(clip=CLIP, noise_multiplier=z, num_sites=n_sites, dim=dim, rounds=rounds, delta=DELTA,
                           unit="example", max_examples=MAX_EXAMPLES)
    scale, sensitivity, sigma_share = plan.scale, plan.sensitivity, plan.sigma_share
    wraps = 0
    for _ in range(rounds):
        if mode == "distributed":
            vectors = [clipped_gradient_sum(head, *data[s]).numpy().ravel() for s in names]
            wraps += int((np.abs(sum(vectors)) * scale + 8 * z * sensitivity >= MODULUS / 2).sum())
            noisy = secure_noisy_sum(vectors, plan, rng)
        else:
            noisy = sum(clipped_gradient_sum(head, *data[s]).numpy().ravel()
                        + z * CLIP * rng.standard_normal(dim) for s in names)
        g = torch.from_numpy(noisy.reshape(ex.NUM_CLASSES, -1) / (n_sites * 32.0))  # public constant normalisation
        head.weight.grad, head.bias.grad = g[:, :-1].clone(), g[:, -1].clone()
        opt.step()
    if mode == "distributed":
        rho_c = rounds * central_rho(sensitivity, sigma_share, n_sites, dim)
        info = {"central_epsilon": zcdp_to_epsilon(rho_c, DELTA),
                "local_epsilon": zcdp_to_epsilon(rounds * local_rho(sensitivity, sigma_share), DELTA),
                "noise_multiplier": z, "scale": scale, "coordinates_near_wrap": wraps}
    else:
        info = {"site_epsilon": zcdp_to_epsilon(rounds / (2 * z * z), DELTA), "noise_multiplier": z}
    return head.float(), info


def choose(x: np.ndarray, y: np.ndarray, sites: np.ndarray, groups: list[list[int]], *, epsilon: float, seed: int,
           init: nn.Linear, mode: str) -> tuple[int, float]:
    """(rounds, lr) of :data:`GRID` with the best mean accuracy over 3 grouped inner folds of the training portion."""
    inner = ex.grouped_stratified_folds(y, groups, 3, seed=1)
    best, best_acc = GRID[0], -1.0
    for rounds, lr in GRID:
        accs = []
        for i, val in enumerate(inner):
            tr = np.setdiff1d(np.arange(len(y)), val)
            head, _ = fedsgd(x[tr], y[tr], sites[tr], epsilon=epsilon, rounds=rounds, lr=lr, init=init, mode=mode,
                             seed=ex._seed("inner", seed, i, rounds, lr))
            accs.append(ex.accuracy(head, x[val], y[val]))
        if np.mean(accs) > best_acc:
            best, best_acc = (rounds, lr), float(np.mean(accs))
    return best


def _features(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]], nn.Linear, int]:
    """The training split's public-encoder features, labels, sites and case groups; the public warm start."""
    images, labels, sites, groups = ex._load({"data": str(data)})
    folder = ROOT / "common" / "assets" / "public-encoder"
    extractor = fx.PhantomEncoderExtractor(folder)
    stats = fx.phantom_statistics(extractor, n_per_profile=40)
    feats = stats.apply(extractor(images), unit_norm=True)
    warm, n_public = public_head(extractor, stats, data / "fetal_planes_db")
    return feats, labels, sites, groups, warm, n_public


def choose_for_product(data: Path, epsilon: float, seeds: int) -> dict[str, Any]:
    """The product's ``privacy.distributed-steps`` x rounds and ``distributed-lr``: :func:`choose`'s grouped inner CV
    on the whole African training split at the classifier's central ``epsilon``, once per noise seed."""
    feats, labels, sites, groups, warm, _ = _features(data)
    picks = [choose(feats, labels, sites, groups, epsilon=epsilon, seed=s, init=warm, mode="distributed")
             for s in range(seeds)]
    return {"epsilon": epsilon, "chosen_rounds_lr": [list(p) for p in picks]}


def product_shapes(data: Path, epsilon: float, seeds: int) -> dict[str, Any]:
    """The two product modes of the African preset's classifier, in their product shapes, on the held-out folds:
    per-site DP-SGD (3 rounds x ``train.downstream-steps`` 50, batch 16, Adam 0.1, the public warm start) and
    ``privacy.distributed-classifier`` (``privacy.distributed-steps`` 7 x 3 rounds, Adam 0.1), both at ``epsilon``;
    per fold and seed, and their paired difference."""
    from common.core.config import RunConfig

    cfg = RunConfig.from_flat({"preset": "demo"})
    t, pr = cfg.train, cfg.privacy
    feats, labels, sites, groups, warm, _ = _features(data)
    folds = ex.grouped_stratified_folds(labels, groups, 5, seed=0)
    acc = {"per_site_dpsgd": np.full((seeds, len(folds)), np.nan), "distributed": np.full((seeds, len(folds)), np.nan)}
    for f, test in enumerate(folds):
        tr = np.setdiff1d(np.arange(len(labels)), test)
        for seed in range(seeds):
            head, _ = ex.federated_dp(feats[tr], labels[tr], sites[tr], epsilon=epsilon, lr=t.downstream_lr,
                                      rounds=cfg.federation.num_rounds, local_steps=t.downstream_steps,
                                      clip=pr.max_grad_norm, batch_size=t.downstream_batch_size,
                                      seed=ex._seed("product", f, seed), init=warm)
            acc["per_site_dpsgd"][seed, f] = ex.accuracy(head, feats[test], labels[test])
            head, _ = fedsgd(feats[tr], labels[tr], sites[tr], epsilon=epsilon, init=warm, mode="distributed",
                             rounds=pr.distributed_steps * cfg.federation.num_rounds, lr=pr.distributed_lr,
                             seed=ex._seed("product", f, seed))
            acc["distributed"][seed, f] = ex.accuracy(head, feats[test], labels[test])
    d = acc["distributed"] - acc["per_site_dpsgd"]
    arms = {k: {"mean": float(v.mean()), "seed_std": float(v.mean(1).std()), "per_seed": v.mean(1).round(4).tolist()}
            for k, v in acc.items()}
    return {"epsilon": epsilon, "arms": arms, "paired_gain": float(d.mean()),
            "paired_gain_seed_std": float(d.mean(1).std()), "better_pairs": int((d > 0).sum()), "worse_pairs": int((d < 0).sum()),
            "beats_by_more_than_seed_spread": bool(d.mean() > max(a["seed_std"] for a in arms.values()))}


def run(data: Path, seeds: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    feats, labels, sites, groups, warm, n_public = _features(data)
    folds = ex.grouped_stratified_folds(labels, groups, 5, seed=0)
    # acc[arm][seed][fold]
    acc: dict[str, np.ndarray] = {}
    chosen: dict[str, list] = {}
    privacy: dict[str, list] = {}

    def put(arm: str, seed: int, f: int, value: float) -> None:
        acc.setdefault(arm, np.full((seeds, len(folds)), np.nan))[seed, f] = value

    for f, test in enumerate(folds):
        tr = np.setdiff1d(np.arange(len(labels)), test)
        xtr, ytr, s_tr, xte, yte = feats[tr], labels[tr], sites[tr], feats[test], labels[test]
        sub, _ = ex._sub_groups(groups, tr)
        nonprivate = ex.accuracy(ex.fit_logreg(xtr, ytr, 1e-4), xte, yte)  # no noise: the same for every seed
        public_alone = ex.accuracy(warm, xte, yte)
        for seed in range(seeds):
            put("nonprivate", seed, f, nonprivate)
            put("public_head_alone", seed, f, public_alone)
            for eps in EPSILONS:
                head, _ = ex.federated_dp(xtr, ytr, s_tr, epsilon=eps, lr=0.1, rounds=6, local_steps=50, clip=1.0,
                                             seed=ex._seed("g", f, seed), init=warm)
                put(f"per_site_dpsgd_eps{eps:g}", seed, f, ex.accuracy(head, xte, yte))
                for mode, arm in (("distributed", "distributed_example"), ("per_site", "per_site_fedsgd")):
                    rounds, lr = choose(xtr, ytr, s_tr, sub, epsilon=eps, seed=ex._seed(f, seed), init=warm,
                                        mode=mode)
                    head, info = fedsgd(xtr, ytr, s_tr, epsilon=eps, rounds=rounds, lr=lr, init=warm, mode=mode,
                                        seed=ex._seed("outer", f, seed))
                    put(f"{arm}_eps{eps:g}", seed, f, ex.accuracy(head, xte, yte))
                    chosen.setdefault(f"{arm}_eps{eps:g}", []).append([rounds, lr])
                    privacy.setdefault(f"{arm}_eps{eps:g}", []).append(info)
        print(f"fold {f} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    arms = {}
    for k, v in acc.items():
        per_seed = v.mean(axis=1)
        arms[k] = {"mean": float(v.mean()), "seed_std": float(per_seed.std()), "fold_std": float(v.mean(0).std()),
                   "per_seed": per_seed.round(4).tolist()}
    gains = {}
    for eps in EPSILONS:
        d = acc[f"distributed_example_eps{eps:g}"] - acc[f"per_site_dpsgd_eps{eps:g}"]
        base = arms[f"per_site_dpsgd_eps{eps:g}"]
        dist = arms[f"distributed_example_eps{eps:g}"]
        gains[f"eps{eps:g}"] = {"gain": float(d.mean()), "gain_seed_std": float(d.mean(1).std()),
                                "largest_seed_std": max(base["seed_std"], dist["seed_std"]),
                                "beats_by_more_than_seed_spread": bool(d.mean() > max(base["seed_std"],
                                                                                      dist["seed_std"]))}
    summary_privacy = {}
    for k, infos in privacy.items():
        keys = [key for key in infos[0] if isinstance(infos[0][key], (int, float))]
        summary_privacy[k] = {key: [float(min(i[key] for i in infos)), float(max(i[key] for i in infos))]
                              for key in keys}
    return {"public_images_for_init": n_public, "arms": arms, "gain_distributed_over_per_site_dpsgd": gains,
            "chosen_rounds_lr": chosen, "privacy_min_max": summary_privacy,
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def markdown(res: dict[str, Any]) -> str:
    lines = ["| epsilon | per-site DP-SGD (product) | per-site FedSGD | distributed FedSGD (DDG) | gain | beats seed "
             "spread |", "|---|---|---|---|---|---|"]
    a = res["arms"]
    for eps in EPSILONS:
        cell = [f"{a[f'{arm}_eps{eps:g}']['mean']:.3f} ± {a[f'{arm}_eps{eps:g}']['seed_std']:.3f}"
                for arm in ("per_site_dpsgd", "per_site_fedsgd", "distributed_example")]
        g = res["gain_distributed_over_per_site_dpsgd"][f"eps{eps:g}"]
        lines.append(f"| {eps:g} | " + " | ".join(cell) + f" | {g['gain']:+.3f} | {g['beats_by_more_than_seed_spread']} |")
    lines.append(f"\nnon-private {a['nonprivate']['mean']:.3f}; public head alone {a['public_head_alone']['mean']:.3f}"
                 " (mean over 5 folds; ± = std over seeds of the fold-mean)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--choose", type=float, default=None, metavar="EPSILON",
                   help="only choose the product's DP-FedSGD steps and rate at this central epsilon (inner CV on the "
                        "whole training split, per seed) and write them to --out")
    p.add_argument("--product", type=float, default=None, metavar="EPSILON",
                   help="only compare the product's two classifier modes in their product shapes at this epsilon "
                        "(held-out folds of the training split) and write them to --out")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.product is not None:
        doc = {"study": "distributed_utility --product", "data": "African fetal planes, training split only "
               "(5 case-grouped folds)", **product_shapes(Path(a.data), a.product, a.seeds)}
        write_text_atomic(Path(a.out), json.dumps(doc, indent=1) + "\n")
        print(json.dumps({k: v for k, v in doc.items() if k != "data"}, indent=1))
        return 0
    if a.choose is not None:
        doc = {"study": "distributed_utility --choose", "data": "African fetal planes, training split only",
               "grid_rounds_lr": [list(g) for g in GRID], **choose_for_product(Path(a.data), a.choose, a.seeds)}
        write_text_atomic(Path(a.out), json.dumps(doc, indent=1) + "\n")
        print(doc["chosen_rounds_lr"])
        return 0
    res = run(Path(a.data), a.seeds)
    doc = {"study": "distributed_utility", "data": "African fetal planes, training split only (5 case-grouped folds)",
           "settings": {"epsilons": list(EPSILONS), "delta": DELTA, "seeds": a.seeds, "clip": CLIP,
                        "max_examples_per_site": MAX_EXAMPLES, "grid_rounds_lr": [list(g) for g in GRID],
                        "per_site_dpsgd": "Adam 0.1, 6 rounds x 50 local steps, q = 1/3, clip 1, public warm start",
                        "accounting": "FedSGD arms: zCDP composed over rounds, Bun-Steinke conversion; DP-SGD arm: "
                                      "the product ledger's accountant"},
           "machine": {"threads": 1, "python": platform.python_version(), "state": "shared (another job running)"},
           **res}
    write_text_atomic(Path(a.out), json.dumps(doc, indent=1) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
