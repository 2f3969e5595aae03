"""The product itself on a data preset, over seeds: Flower runs of ``difusal simulate``, summarised per round.

``python -m simulations.benchmarks.preset_runs --data african --data-root ../shared/data/african_fetal_planes
--seeds 0,1,2 --out simulations/benchmarks/results/preset_african64.json`` runs ``difusal simulate --preset demo
--prior shipped --data african ... --seed S --no-report`` once per seed (sequentially, each into
``runs/preset-<data>-s<S>``) and writes one JSON: per run and round the pooled held-out plane accuracy, GA MAE and
90 % coverage (where the data has GA), the round's wall time and each site's epsilon per model; then the mean and
std over seeds per round. ``--summarise RUN_DIR [RUN_DIR ...]`` summarises runs that already finished instead
(their ``config.json`` must agree on preset, data source and image size).

What it measures is what a consortium gets: the checkpoint's own models, scored on the sites' held-out images
(``data.test-fraction`` of each site, never trained on). A different seed is a different site split and fresh DP
noise, so the spread over seeds is the run-to-run spread a user sees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.federated.round_metrics import failed_replies, pooled
from simulations.benchmarks._common import machine_info

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("plane-accuracy", "ga-mae-days", "ga-coverage")


def read_run(run_dir: Path) -> dict[str, Any]:
    """One finished run folder: its config facts and per-round metrics."""
    metrics = run_dir / "metrics.jsonl"
    config = run_dir / "config.json"
    if not metrics.is_file() or not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder (needs config.json and metrics.jsonl)")
    cfg = json.loads(config.read_text())
    cfg = cfg.get("config", cfg)  # the run folder wraps the RunConfig dict
    rounds = []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        ev = rec.get("evaluate", {})
        eps: dict[str, dict[str, float]] = {}
        for site in rec.get("sites", []):
            eps[site["name"]] = {model: round(float(p["epsilon"]), 3) for model, p in site.get("privacy", {}).items()}
        pooled_metrics = {m: ev[m] if m in ev else pooled(rec.get("sites", []), m) for m in METRICS}
        rounds.append({"round": rec["round"], "wall_s": rec.get("wall_s"), "failed_sites": failed_replies(rec),
                       **{m: v for m, v in pooled_metrics.items() if v is not None},
                       "held_out_images": int(sum(s.get("evaluation", {}).get("num-examples", 0)
                                                  for s in rec.get("sites", []))),
                       "epsilon_per_site": eps})
    if not rounds:
        raise ValueError(f"{metrics} has no round: the run did not finish a round")
    return {"run_dir": str(run_dir), "seed": cfg.get("seed"), "pixel_size_line": pixel_line_of(cfg),
            "preset": cfg.get("preset"),
            "data_source": cfg["data"]["source"], "image_size": cfg["data"]["image_size"],
            "target_epsilon": cfg["privacy"]["target_epsilon"], "budget_split": {
                k: cfg["privacy"][f"budget_{k}"] for k in ("generator", "classifier", "regressor")},
            "backbone": cfg["train"]["downstream_backbone"], "rounds": rounds}


def pixel_line_of(cfg_dict: dict[str, Any]) -> dict[str, float] | None:
    """The GA reference on the run's own split: a straight line of GA on log pixel spacing, fitted (non-privately,
    as a yardstick) on every site's training images and scored on their held-out images; ``None`` without GA."""
    from common.core.config import RunConfig
    from common.data.sites import load_site
    from simulations.config_args import count_sites
    from simulations.experiments.ga_heads import pixel_size_line

    if cfg_dict["data"]["source"] != "hc18":  # the one source whose images carry GA and pixel spacing
        return None
    cfg = RunConfig.from_dict(cfg_dict)
    sites = [load_site(cfg.data, seed=cfg.seed, site_index=i) for i in range(count_sites(cfg))]

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        recs = [r for s in sites for r in getattr(s, split) if r.ga_weeks is not None and r.pixel_spacing_mm]
        return (np.array([r.pixel_spacing_mm for r in recs], dtype=np.float64),
                np.array([r.ga_weeks for r in recs], dtype=np.float64))

    return pixel_size_line(*arrays("train"), *arrays("test"))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over runs (seeds) per round of every metric the runs report.

    A run in which a site failed in any round (a crash, or the machine running out of memory) measured a smaller
    federation than the others: it is left out of the means and listed under ``excluded`` with its first failure.
    """
    keys = {(r["preset"], r["data_source"], r["image_size"]) for r in runs}
    if len(keys) != 1:
        raise ValueError(f"the runs mix presets, data or image sizes: {sorted(keys)}; summarise like with like")
    excluded = {r["run_dir"]: next(f for x in r["rounds"] for f in x.get("failed_sites", []))
                for r in runs if any(x.get("failed_sites") for x in r["rounds"])}
    runs = [r for r in runs if r["run_dir"] not in excluded]
    if not runs:
        raise ValueError(f"every run had a failed site, nothing to summarise: {excluded}")
    out: dict[str, Any] = {"excluded": excluded} if excluded else {}
    n_rounds = min(len(r["rounds"]) for r in runs)
    for i in range(n_rounds):
        row: dict[str, Any] = {}
        for m in (*METRICS, "wall_s"):
            vals = [r["rounds"][i][m] for r in runs if r["rounds"][i].get(m) is not None]
            if vals:
                row[m] = _stat(vals)
        out[f"round_{i + 1}"] = row
    lines = [r["pixel_size_line"]["mae_days"] for r in runs if r.get("pixel_size_line")]
    if lines:
        out["pixel_size_line_ga_mae_days"] = _stat(lines)
    return out


def paired(runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round and metric, ``runs`` minus ``baseline`` seed by seed (the seeds both hold): each seed's difference,
    their mean, min and max, and the larger of the two arms' seed stds (what "beyond the seed spread" compares to)."""
    base = {r["seed"]: r for r in baseline}
    pairs = [(r, base[r["seed"]]) for r in runs if r["seed"] in base]
    if not pairs:
        raise ValueError("no seed is in both the runs and the baseline")
    out: dict[str, Any] = {"seeds": [r["seed"] for r, _ in pairs]}
    for i in range(min(min(len(a["rounds"]), len(b["rounds"])) for a, b in pairs)):
        row = {}
        for m in METRICS:
            if all(a["rounds"][i].get(m) is not None and b["rounds"][i].get(m) is not None for a, b in pairs):
                d = [a["rounds"][i][m] - b["rounds"][i][m] for a, b in pairs]
                spread = max(float(np.std([x["rounds"][i][m] for x, _ in pairs], ddof=1)),
                             float(np.std([y["rounds"][i][m] for _, y in pairs], ddof=1))) if len(d) > 1 else 0.0
                row[m] = {"per_seed": [round(x, 4) for x in d], "mean": round(float(np.mean(d)), 4),
                          "min": round(min(d), 4), "max": round(max(d), 4), "largest_seed_std": round(spread, 4)}
        out[f"round_{i + 1}"] = row
    return out


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value) and count, rounded for the report."""
    a = np.asarray(values, dtype=float)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)), 4) if len(a) > 1 else 0.0,
            "n": len(a)}


def launch(data: str, data_root: str, seed: int, extra: Sequence[str], name: str = "", prior: str = "shipped"
           ) -> Path:
    """Run the product once (into ``runs/preset-<data>[-<name>]-s<seed>``) from ``prior``; returns its run folder."""
    run_dir = ROOT / "runs" / f"preset-{data}{'-' + name if name else ''}-s{seed}"
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "demo", "--prior", prior,
           "--data", data, "--data-root", data_root, "--seed", str(seed), "--run-dir", str(run_dir), "--no-report",
           *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="african")
    p.add_argument("--data-root", default="")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", action="append", default=[], help="extra --set KEY=VALUE for every run")
    p.add_argument("--prior", default="shipped", help="the prior folder every run starts from (default: the shipped "
                   "one at the run's image size)")
    p.add_argument("--name", default="", help="names the run folders (runs/preset-<data>-<name>-s<seed>), so that "
                   "arms with different --set do not share one")
    p.add_argument("--summarise", nargs="+", type=Path, help="summarise these finished run folders instead")
    p.add_argument("--baseline", nargs="+", type=Path, help="finished run folders of a baseline arm: adds each seed's "
                   "difference (these runs minus the baseline's run of the same seed)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--note", default="", help="machine state and anything else a reader needs")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.summarise:
        dirs = list(args.summarise)
        command = " ".join(["python -m simulations.benchmarks.preset_runs", *(argv or sys.argv[1:])])
    else:
        if not args.data_root:
            p.error("--data-root is needed to launch runs (the dataset folder in its published layout)")
        extra = [x for kv in args.set for x in ("--set", kv)]
        dirs = [launch(args.data, args.data_root, int(s), extra, args.name, args.prior) for s in args.seeds.split(",")]
        command = " ".join(["python -m simulations.benchmarks.preset_runs", *(argv or sys.argv[1:])])
    runs = [read_run(d) for d in dirs]
    report = {"benchmark": "preset_runs", "command": command, "machine": machine_info(), "note": args.note,
              "runs": runs, "summary": summarise(runs), "seconds": round(time.perf_counter() - t0, 1)}
    if args.baseline:
        base = [read_run(d) for d in args.baseline]
        report["baseline"] = {"runs": base, "summary": summarise(base)}
        report["paired"] = paired(runs, base)
        for name, row in report["paired"].items():
            if name != "seeds":
                print("paired", name, " ".join(f"{m} {v['mean']:+.3f} [{v['min']:+.3f}, {v['max']:+.3f}] (largest "
                                               f"seed std {v['largest_seed_std']:.3f})" for m, v in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, row in report["summary"].items():
        if name == "excluded":
            for run_dir, why in row.items():
                print(f"excluded {run_dir}: a site failed ({why})")
            continue
        if "mean" in row:
            print(name, f"{row['mean']:.3f} ± {row['std']:.3f} (n={row['n']})")
            continue
        print(name, " ".join(f"{m} {v['mean']:.3f} ± {v['std']:.3f} (n={v['n']})" for m, v in row.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
