"""Does the synthetic data help, and how good is it? Evaluate a run folder, or sweep epsilon.

``python -m simulations.experiments.downstream evaluate RUN_DIR`` writes ``RUN_DIR/evaluation/``:
``downstream.json`` + ``downstream.md`` (the protocol of :mod:`common.analysis.evaluation`) and ``image_metrics.json``.
``python -m simulations.experiments.downstream curve --preset smoke --out DIR`` runs one federation per
epsilon in {1, 4, 10, none} through Flower, evaluates each and writes ``DIR/privacy_utility.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.analysis.evaluation import (
    EvalSettings,
    RunInputs,
    load_run,
    markdown_table,
    regression_metrics,
    run_protocol,
    train_model,
)
from common.analysis.image_metrics import (
    feature_set_metrics,
    load_lpips,
    lpips_distance,
    lpips_diversity,
    nearest_neighbours,
)
from common.core.seeding import derive_seed
from common.data.tensors import has_ga, records_to_dataset
from common.models.downstream import GARegressor, PlaneClassifier, predict_ga, predict_planes
from simulations.config_args import add_data_arguments

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EPSILONS: tuple[float | None, ...] = (1.0, 4.0, 10.0, None)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# -- image metrics of a run --------------------------------------------------------------------------------
@torch.no_grad()
def _features(model: PlaneClassifier | GARegressor, images: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model.features(images[i:i + 256]) for i in range(0, len(images), 256)]).double().numpy()


def image_quality(inputs: RunInputs, settings: EvalSettings, *, lpips_model: torch.nn.Module | None,
                  lpips_error: str = "", knn_k: int = 3, max_pairs: int = 24) -> dict[str, Any]:
    """FD, KID, precision/recall, diversity, plane agreement, nearest real neighbours (and LPIPS) of the release.

    Feature space: the penultimate layer of a plane classifier trained here (no DP, never released) on the
    pooled real train split of the run. Where that split holds a single plane (HC18: heads only) a classifier has
    nothing to learn and its features say nothing, so the image embedding of a GA regressor trained the same way
    is used instead. The reference real set is that train split; the real test split against it gives the value
    two real samples reach (the floor to read the synthetic numbers against).
    """
    cfg, size = inputs.cfg, inputs.cfg.data.image_size
    train_recs = [r for s in inputs.sites for r in s.train]
    test_recs = [r for s in inputs.sites for r in s.test]
    train = records_to_dataset(train_recs, image_size=size)
    width = cfg.train.downstream_width
    by_ga = train.tensors[1].unique().numel() < 2 and has_ga(train)
    torch.manual_seed(derive_seed(settings.seed, "feature-net"))
    net: PlaneClassifier | GARegressor = (GARegressor(size, width) if by_ga else
                                          PlaneClassifier(image_size=size, width=width, planes=cfg.data.plane_scope()))
    train_model(net, "regressor" if by_ga else "classifier", train, settings,
                seed=derive_seed(settings.seed, "feature-net-sgd"))
    space = (f"GA-regressor image embedding ({4 * width}-d; GARegressor width {width}, {settings.steps} non-DP "
             f"steps on the pooled real train split, {len(train)} images, seed {settings.seed}; the split holds one "
             "plane, on which a plane classifier learns nothing)" if by_ga else
             f"plane-classifier penultimate layer ({4 * width}-d; PlaneClassifier width {width}, {settings.steps} "
             f"non-DP steps on the pooled real train split, {len(train)} images, seed {settings.seed})")
    out: dict[str, Any] = {"feature_space": space, "n_synthetic": len(inputs.synthetic), "n_real_train": len(train),
                           "n_real_test": len(test_recs)}
    f_train = _features(net, train.tensors[0])
    test = records_to_dataset(test_recs, image_size=size) if test_recs else None
    if test is not None and len(test) > knn_k:
        f_test = _features(net, test.tensors[0])
        out["real_test_vs_real_train"] = feature_set_metrics(f_train, f_test, feature_space=space, k=knn_k)
        if isinstance(net, GARegressor):  # the feature net's own held-out error, as the classifier's accuracy below
            mean, std = predict_ga(net, test.tensors[0], test.tensors[3])
            out["real_test_ga_mae_days"] = regression_metrics(mean.numpy(), std.numpy(), test.tensors[2].numpy(),
                                                              coverage_level=settings.coverage_level)["mae_days"]
        else:
            out["real_test_plane_accuracy"] = float((predict_planes(net, test.tensors[0]).argmax(1)
                                                     == test.tensors[1]).float().mean())
        _, d_test = nearest_neighbours(f_test, f_train)
        out["median_nn_distance_real_test_to_train"] = float(np.median(d_test))
    if not inputs.synthetic:
        out["note"] = "the run released no synthetic image"
        return out
    syn = records_to_dataset(inputs.synthetic, image_size=size)
    f_syn = _features(net, syn.tensors[0])
    if len(syn) > knn_k:
        out["synthetic_vs_real_train"] = feature_set_metrics(f_train, f_syn, feature_space=space, k=knn_k)
    else:
        out["note"] = f"{len(syn)} synthetic images: set metrics need more than k={knn_k}"
    if isinstance(net, PlaneClassifier):
        # Conditional fidelity: does a real-trained classifier see the plane the image was generated for?
        out["synthetic_plane_agreement"] = float((predict_planes(net, syn.tensors[0]).argmax(1) == syn.tensors[1])
                                                 .float().mean())
    idx, dist = nearest_neighbours(f_syn, f_train)
    out["median_nn_distance_synthetic_to_train"] = float(np.median(dist))
    order = np.argsort(dist)[:max_pairs]  # closest pairs first: the ones to inspect for copying
    out["nearest_real_pairs"] = [
        {"synthetic_id": inputs.synthetic[i].image_id, "plane": inputs.synthetic[i].plane_name,
         "ga_weeks": inputs.synthetic[i].ga_weeks, "real_id": train_recs[idx[i]].image_id,
         "real_site": train_recs[idx[i]].site, "feature_distance": float(dist[i])} for i in order]
    if lpips_model is None:
        out["lpips"] = None
        out["lpips_unavailable"] = lpips_error or "LPIPS not requested"
    else:
        syn_u8 = np.stack([r.image for r in inputs.synthetic])
        real_u8 = np.stack([r.image for r in train_recs])
        out["lpips"] = {
            "backbone": "AlexNet ImageNet (torchvision) + LPIPS v0.1 linear heads",
            "diversity_synthetic": lpips_diversity(lpips_model, syn_u8, seed=settings.seed) if len(syn_u8) > 1 else None,
            "diversity_real_train": lpips_diversity(lpips_model, real_u8, seed=settings.seed),
            "mean_to_nearest_real": float(lpips_distance(lpips_model, syn_u8, real_u8[idx]).mean()),
        }
    return out


def evaluate_run(run_dir: Path, settings: EvalSettings, *, lpips: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol and the image metrics on ``run_dir``; write ``run_dir/evaluation/``."""
    t0 = time.perf_counter()
    inputs = load_run(Path(run_dir))
    result = run_protocol(inputs, settings, log=log)
    lpips_model, lpips_error = None, ""
    if lpips:
        try:
            lpips_model = load_lpips(device=settings.device)
        except FileNotFoundError as err:
            lpips_error = str(err)
            log(f"LPIPS skipped: {err}")
    images = image_quality(inputs, settings, lpips_model=lpips_model, lpips_error=lpips_error)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(run_dir) / "evaluation"
    _write_json(out / "downstream.json", result)
    _write_json(out / "image_metrics.json", images)
    (out / "downstream.md").write_text(
        f"# Downstream protocol: {Path(run_dir).name}\n\n" + markdown_table(result)
        + f"\nPrior for dp-real+prior: {result['prior_source']}. Synthetic images: {result['n_synthetic']}. "
        + f"Test: {result['test_data']}.\n")
    log(f"wrote {out} in {result['wall_s']} s")
    return {"downstream": result, "image_metrics": images}


def saved_evaluation(run_dir: Path, settings: EvalSettings) -> dict[str, Any] | None:
    """The evaluation written by :func:`evaluate_run` for ``run_dir`` when it used ``settings``, else ``None``.

    Lets an interrupted curve go on without re-running finished evaluations (each is tens of CPU minutes).
    """
    out = Path(run_dir) / "evaluation"
    try:
        down = json.loads((out / "downstream.json").read_text())
        images = json.loads((out / "image_metrics.json").read_text())
    except FileNotFoundError:
        return None
    return {"downstream": down, "image_metrics": images} if down.get("settings") == asdict(settings) else None


# -- privacy-utility curve ---------------------------------------------------------------------------------
def _eps_label(eps: float | None) -> str:
    return "none" if eps is None else f"{eps:g}"


def curve_rows(eps: float | None, evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten one epsilon's evaluation into table rows (one per arm, plus the image metrics)."""
    img = evaluation["image_metrics"].get("synthetic_vs_real_train", {})
    rows = []
    for arm in evaluation["downstream"]["arms"]:
        if "pooled" not in arm:
            continue
        p = arm["pooled"]
        rows.append({"epsilon": _eps_label(eps), "arm": arm["arm"],
                     **{k: p[k] for k in ("accuracy", "macro_f1", "mae_days", "coverage")},
                     "fd": img.get("fd"), "kid": img.get("kid"), "precision": img.get("precision"),
                     "recall": img.get("recall")})
    return rows


def privacy_utility_curve(out_dir: Path, *, preset: str, epsilons: Sequence[float | None], sets: Sequence[str],
                          settings: EvalSettings, seed: int = 0, timeout_s: float = 1800.0, data: str = "",
                          data_root: str = "", prior: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """One federation per epsilon (same preset, seed, prior and overrides), each evaluated; the collected table."""
    from simulations.config_args import build_config, count_sites
    from simulations.launcher import finished_as, run_simulation

    out_dir = Path(out_dir).resolve()
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for eps in epsilons:
        run_dir = out_dir / f"eps-{_eps_label(eps)}"
        cfg = build_config(preset, [*sets, f"privacy.target-epsilon={_eps_label(eps)}"], run_dir=str(run_dir),
                           data=data, data_root=data_root, seed=seed, prior=prior)
        if not finished_as(run_dir, cfg):
            t0 = time.perf_counter()
            # The SuperLink starts `flower-superexec` by name: put this interpreter's bin folder on PATH.
            path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
            # cpus_per_site as an int: Flower's simulation config stores num-cpus as an integer.
            res = run_simulation(cfg, num_sites=count_sites(cfg), echo=False, timeout_s=timeout_s,
                                 extra_env={"PATH": path, "OMP_NUM_THREADS": str(torch.get_num_threads())},
                                 cpus_per_site=1)
            if res.returncode != 0:
                raise RuntimeError(f"federation at epsilon={_eps_label(eps)} failed (rc {res.returncode}); see "
                                   f"{res.log_file}")
            log(f"epsilon={_eps_label(eps)}: federation done in {time.perf_counter() - t0:.0f} s")
        evaluation = saved_evaluation(run_dir, settings)
        if evaluation is None:
            evaluation = evaluate_run(run_dir, settings, lpips=False, log=log)
        else:
            log(f"epsilon={_eps_label(eps)}: reusing {run_dir / 'evaluation'} (same settings)")
        rows += curve_rows(eps, evaluation)
        runs[_eps_label(eps)] = str(run_dir)
    result = {"preset": preset, "data": data or "phantom", "prior": prior or "fresh init", "seed": seed,
              "overrides": list(sets),
              "settings": settings.__dict__, "runs": runs,
              "rows": rows}
    _write_json(out_dir / "privacy_utility.json", result)
    (out_dir / "privacy_utility.md").write_text(curve_markdown(rows))
    plot_curve(rows, out_dir / "privacy_utility.png")
    return result


def curve_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of the privacy-utility curve as a markdown table."""
    def f(x: Any, d: int = 3) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"
    head = "| epsilon | arm | accuracy | macro-F1 | GA MAE (d) | coverage | FD | KID | precision | recall |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['epsilon']} | {r['arm']} | {f(r['accuracy'])} | {f(r['macro_f1'])} | {f(r['mae_days'], 1)} | "
        f"{f(r['coverage'], 2)} | {f(r['fd'], 2)} | {f(r['kid'], 3)} | {f(r['precision'], 2)} | {f(r['recall'], 2)} |\n"
        for r in rows)


def plot_curve(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Pooled accuracy and GA MAE against epsilon, one line per arm ("none" plotted at the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["epsilon"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = {r["epsilon"]: r for r in rows if r["arm"] == arm}
        xs = [i for i, e in enumerate(labels) if e in mine]
        for ax, key in zip(axes, ("accuracy", "mae_days")):
            ax.plot(xs, [mine[labels[i]][key] for i in xs], marker="o", label=arm)
    for ax, title in zip(axes, ("plane accuracy (pooled test)", "GA MAE, days (pooled test)")):
        ax.set_xticks(range(len(labels)), [f"eps {e}" for e in labels])
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _default_prior(preset: str) -> str:
    """'shipped' when ``common/assets/prior-<preset>`` exists (the curve fine-tunes from the prior), else ''."""
    from common.models.bundle import shipped_prior_folder

    return "shipped" if (shipped_prior_folder(preset) / "generator").is_dir() else ""


def _parse_eps(text: str) -> list[float | None]:
    return [None if t.strip().lower() in ("none", "inf") else float(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    from simulations.launcher import set_offline_env

    set_offline_env()
    p = argparse.ArgumentParser(prog="python -m simulations.experiments.downstream", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("evaluate", "curve"):
        sp = sub.add_parser(name)
        sp.add_argument("--steps", type=int, default=EvalSettings.steps, help="training steps per model")
        sp.add_argument("--batch-size", type=int, default=EvalSettings.batch_size)
        sp.add_argument("--eval-seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared small machine more threads oversubscribe)")
        if name == "evaluate":
            sp.add_argument("run_dir", type=Path)
            sp.add_argument("--no-lpips", action="store_true", help="skip LPIPS even if AlexNet weights are cached")
        else:
            sp.add_argument("--preset", default="smoke")
            sp.add_argument("--out", type=Path, required=True)
            sp.add_argument("--eps", default="1,4,10,none", help="comma-separated epsilons; 'none' = no DP")
            sp.add_argument("--set", action="append", default=["federation.al-every=1"], metavar="KEY=VALUE")
            sp.add_argument("--seed", type=int, default=0)
            add_data_arguments(sp)
            sp.add_argument("--prior", default=None,
                            help="'shipped', a prior folder, or '' (fresh init); default: 'shipped' when the preset has "
                                 "a shipped prior (common/assets/prior-<preset>), else ''")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    settings = EvalSettings(steps=args.steps, batch_size=args.batch_size, prior_steps=args.steps, seed=args.eval_seed)
    if args.command == "evaluate":
        res = evaluate_run(args.run_dir, settings, lpips=not args.no_lpips)
        print(markdown_table(res["downstream"]))
        return 0
    res = privacy_utility_curve(args.out, preset=args.preset, epsilons=_parse_eps(args.eps), sets=args.set,
                                settings=settings, seed=args.seed, data=args.data, data_root=args.data_root,
                                prior=_default_prior(args.preset) if args.prior is None else args.prior)
    print(curve_markdown(res["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
