"""The phantom preset's downstream table: extractor x {public head alone, non-private, federated DP} for the plane
classifier and the GA regressor, on the sites' held-out phantoms, over seeds.

``python -m simulations.experiments.phantom_heads [--preset demo] [--seeds 3]`` builds the preset's phantom
federation (:func:`common.data.sites.load_federated_data`: its sites, scanner profiles, label skew and test split)
once per seed (a seed is a fresh federation and fresh DP noise), computes each frozen extractor's features of the
product's own models (:class:`DownstreamSpec`: the classifier and regressor the run builds, public warm starts
included), and reports on the union of the sites' test images:

- classifier: the shipped public head alone (``public_cnn`` only), non-private pooled softmax
  (:func:`common.models.features.fit_softmax`, L2 1e-4), and federated DP-SGD at each epsilon
  (:func:`simulations.experiments.extractors.federated_dp`: the product's Opacus step in closed form, one ledger
  per site, from the classifier's init: the public head where shipped);
- regressor: the public GA head alone, non-private Adam from it (pooled), and federated DP-SGD at each epsilon
  (:func:`simulations.experiments.ga_heads.federated_dp`: Opacus :func:`train_private`, one ledger per site).

The DP settings are fixed in advance, not tuned on these phantoms: the classifier's from the African extractor
study (Adam 0.1, 6 rounds x 50 local steps, q = 1/3), the regressor's from the HC18 study's inner CV (``--reg-lr``,
``--reg-steps``, ``--reg-batch``). Epsilon is each model's own budget per site. JSON to
``simulations/benchmarks/results/phantom_heads.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.core.records import PLANES
from common.data.sites import load_federated_data
from common.data.tensors import records_to_dataset
from common.models.downstream import DownstreamSpec, GARegressor
from common.models.features import fit_softmax
from simulations.config_args import build_config
from simulations.experiments import extractors as ex
from simulations.experiments import ga_heads as gh

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "simulations" / "benchmarks" / "results" / "phantom_heads.json"
EXTRACTORS = ("phantom_cnn", "public_cnn", "scattering")
EPSILONS = (10.0, 4.0, 1.0)


def _features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([backbone(images[i:i + 256]) for i in range(0, len(images), 256)])


def _accuracy(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def study_seed(preset: str, seed: int, extractors: Sequence[str], epsilons: Sequence[float], s: dict[str, Any]
               ) -> dict[str, dict[str, dict[str, float]]]:
    """Every arm of every extractor for one phantom federation; ``{extractor: {arm: metrics}}``."""
    cfg = build_config(preset, [], seed=seed)
    fed = load_federated_data(cfg.data, seed=seed)
    size = cfg.data.image_size
    site_sets = [records_to_dataset(site.train, image_size=size) for site in fed.sites]
    test = records_to_dataset([r for site in fed.sites for r in site.test], image_size=size)
    x_tr = torch.cat([d.tensors[0] for d in site_sets])
    y_tr = torch.cat([d.tensors[1] for d in site_sets]).long()
    ga_tr, sp_tr = torch.cat([d.tensors[2] for d in site_sets]), torch.cat([d.tensors[3] for d in site_sets])
    site_of = np.concatenate([np.full(len(d), k) for k, d in enumerate(site_sets)])
    x_te, y_te, ga_te, sp_te = test.tensors[0], test.tensors[1].long(), test.tensors[2], test.tensors[3]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in extractors:
        spec = DownstreamSpec(image_size=size, backbone=name, hidden=0, planes=None)
        torch.manual_seed(0)
        clf, reg = spec.classifier(), spec.regressor()
        arms: dict[str, dict[str, float]] = {}
        f_tr, f_te = _features(clf.backbone, x_tr), _features(clf.backbone, x_te)
        warm_clf = getattr(clf.backbone, "public_head", None) is not None
        if warm_clf:
            arms["clf_public_head"] = {"accuracy": _accuracy(clf.head, f_te, y_te)}
        arms["clf_nonprivate"] = {"accuracy": _accuracy(
            fit_softmax(f_tr, y_tr, num_classes=len(PLANES), l2=1e-4), f_te, y_te)}
        for eps in epsilons:
            head, _ = ex.federated_dp(f_tr.numpy(), y_tr.numpy(), site_of, epsilon=eps, lr=0.1, rounds=6,
                                      local_steps=50, clip=1.0, seed=ex._seed("phantom", name, seed, eps),
                                      init=clf.head if warm_clf else None, num_classes=len(PLANES))
            arms[f"clf_dp_eps{eps:g}"] = {"accuracy": _accuracy(head, f_te, y_te)}
        # the regressor's backbone is the same frozen extractor (same kind and size): the same features
        g_tr, g_te = f_tr, f_te
        reg.init_state = {k: v.clone() for k, v in reg.state_dict().items()}
        if reg.public_warm_start:
            arms["reg_public_head"] = gh.head_metrics(gh.FeatureHead(reg), g_te, ga_te, sp_te)
        gh.train_nonprivate(reg, gh.feature_dataset(g_tr, ga_tr, sp_tr), checkpoints=(300,),
                            seed=gh._seed("phantom-np", name, seed))
        arms["reg_nonprivate"] = gh.head_metrics(gh.FeatureHead(reg), g_te, ga_te, sp_te)
        models = [_copy(reg, spec) for _ in range(4)]
        sites = [gh.feature_dataset(g_tr[site_of == k], ga_tr[site_of == k], sp_tr[site_of == k])
                 for k in range(len(site_sets))]
        for eps in epsilons:
            head, _ = gh.federated_dp(models, sites, epsilon=eps, lr=s["reg_lr"], local_steps=s["reg_steps"],
                                      rounds=6, batch_size=s["reg_batch"], clip=1.0,
                                      seed=gh._seed("phantom-dp", name, seed, eps))
            arms[f"reg_dp_eps{eps:g}"] = gh.head_metrics(head, g_te, ga_te, sp_te)
        out[name] = arms
        print(f"[phantom_heads] seed {seed} {name}: " + ", ".join(
            f"{k} {v.get('accuracy', v.get('mae_days')):.3f}" for k, v in arms.items()), flush=True)
    out["_data"] = {"sites": {"n_train": [len(d) for d in site_sets], "n_test": int(len(test))}}  # type: ignore
    return out


def _copy(reg: GARegressor, spec: DownstreamSpec) -> GARegressor:
    """A fresh regressor of ``spec`` whose every training run starts at ``reg``'s init (the public GA head)."""
    m = spec.regressor()
    m.load_state_dict(reg.init_state)
    m.init_state = reg.init_state
    return m


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every (extractor, arm, metric)."""
    out: dict[str, Any] = {}
    for name in [k for k in per_seed[0] if not k.startswith("_")]:
        out[name] = {}
        for arm in per_seed[0][name]:
            out[name][arm] = {m: {"mean": float(np.mean([r[name][arm][m] for r in per_seed])),
                                  "std": float(np.std([r[name][arm][m] for r in per_seed]))}
                              for m in per_seed[0][name][arm]}
    return out


def markdown(summary: dict[str, Any], epsilons: Sequence[float]) -> str:
    def cell(arms: dict[str, Any], arm: str, metric: str, digits: int) -> str:
        v = arms.get(arm, {}).get(metric)
        return "—" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    eps = [f"eps{e:g}" for e in epsilons]
    lines = ["| extractor | model | public head alone | non-private | " + " | ".join(f"DP ε = {e:g}" for e in epsilons)
             + " |", "|---|---|---|---|" + "---|" * len(epsilons)]
    for name, arms in summary.items():
        lines.append(f"| {name} | classifier (accuracy) | {cell(arms, 'clf_public_head', 'accuracy', 3)} | "
                     f"{cell(arms, 'clf_nonprivate', 'accuracy', 3)} | "
                     + " | ".join(cell(arms, f"clf_dp_{e}", "accuracy", 3) for e in eps) + " |")
        lines.append(f"| {name} | regressor (GA MAE, days) | {cell(arms, 'reg_public_head', 'mae_days', 1)} | "
                     f"{cell(arms, 'reg_nonprivate', 'mae_days', 1)} | "
                     + " | ".join(cell(arms, f"reg_dp_{e}", "mae_days", 1) for e in eps) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--extractors", default=",".join(EXTRACTORS))
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    p.add_argument("--reg-lr", type=float, default=0.01)
    p.add_argument("--reg-steps", type=int, default=25)
    p.add_argument("--reg-batch", type=int, default=64)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    s = {"reg_lr": a.reg_lr, "reg_steps": a.reg_steps, "reg_batch": a.reg_batch}
    extractors = [v for v in a.extractors.split(",") if v]
    epsilons = [float(v) for v in a.epsilons.split(",") if v]
    per_seed = [study_seed(a.preset, seed, extractors, epsilons, s) for seed in range(a.seeds)]
    summary = summarise(per_seed)
    report = {
        "study": "phantom preset: frozen extractors x {public head alone, non-private pooled, federated DP} for the "
                 "plane classifier and GA regressor, on the union of the sites' held-out phantoms",
        "settings": {"preset": a.preset, "seeds": a.seeds, "epsilons": epsilons, "delta": 1e-5,
                     "classifier_dp": "extractors.federated_dp: Adam 0.1, 6 rounds x 50 local steps, q = 1/3, clip 1",
                     "regressor_dp": f"ga_heads.federated_dp: Adam {a.reg_lr}, 6 rounds x {a.reg_steps} local steps, "
                                     f"batch {a.reg_batch}, clip 1, Laplace NLL of log HC",
                     "regressor_nonprivate": "Adam 0.01, batch 64, 300 steps, pooled, from the regressor's init",
                     "command": "python -m simulations.experiments.phantom_heads " + " ".join(argv or sys.argv[1:])},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "torch_threads": 1,
                    "note": "2 CPU cores shared with other jobs"},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "data": per_seed[0]["_data"],
        "summary": summary,
        "per_seed": [{k: v for k, v in r.items() if not k.startswith("_")} for r in per_seed],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(summary, epsilons))
    print(f"wrote {out} ({report['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
