"""Does the active-learning loop help? The same federation with three selection arms, side by side.

    python -m simulations.experiments.al_loop --preset demo --prior shipped --out runs/al-loop [--set k=v ...]
    python -m simulations.experiments.al_loop --preset demo --data african --data-root DIR --out runs/al-loop-african

Arms (identical seeds, data, privacy and rounds; only the coordinator differs):
- ``none``: no queries, no synthetic data;
- ``random``: queries every round, random selection (no quality threshold, no balancing): the baseline;
- ``acquisition``: queries every round with the configured acquisition (quality threshold, plane x GA balancing,
  k-center greedy inside bins by default).
Arms already finished in ``--out`` with the same config are reused, so an interrupted comparison resumes.
Per round, the held-out plane accuracy / macro-F1 and GA MAE (days) are the sites' evaluation of the global
downstream models on their test splits (no model or selection step sees them), pooled by example count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.round_metrics import round_summary
from simulations.cli import add_data_arguments, build_config, count_sites
from simulations.launcher import finished_as, run_simulation

ARMS: dict[str, dict[str, object]] = {
    "none": {"federation.al-every": 0},
    "random": {"federation.al-every": 1, "federation.al-acquisition": "random", "federation.al-balance": False,
               "federation.al-quality-threshold": 0.0},
    "acquisition": {"federation.al-every": 1},
}


def summarise(run_dir: Path) -> list[dict[str, Any]]:
    """Per-round pooled held-out metrics of one run."""
    return [round_summary(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def to_markdown(table: dict[str, list[dict[str, Any]]]) -> str:
    """One row per (arm, round)."""
    lines = ["| arm | round | plane acc | macro-F1 | GA MAE (days) | release |", "|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for arm, rows in table.items():
        for r in rows:
            lines.append(f"| {arm} | {r['round']} | {fmt(r['plane_accuracy'])} | {fmt(r['plane_macro_f1'])} | "
                         f"{fmt(r['ga_mae_days'])} | {r['release_size']} |")
    return "\n".join(lines)


def plot_arms(table: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Held-out plane accuracy, GA MAE and release size per round, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.viz import plot_series

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("plane_accuracy", "ga_mae_days", "release_size"),
                              ("plane accuracy (held-out)", "GA MAE, days (held-out)", "release size")):
        for arm, rows in table.items():
            plot_series(ax, [r["round"] for r in rows], [r[key] for r in rows], label=arm)
        ax.set_title(title)
        ax.set_xlabel("active-learning round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    """Run the arms and write ``al_loop.json``, ``al_loop.md`` and ``al_loop.png``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--prior", default="shipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/al-loop")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_data_arguments(p)
    args = p.parse_args()
    out = Path(args.out).resolve()
    table: dict[str, list[dict[str, Any]]] = {}
    for arm in args.arms.split(","):
        sets = [*args.set, " ".join(f"{k}={v}" for k, v in ARMS[arm].items())]
        cfg = build_config(args.preset, sets, run_dir=str(out / arm), data=args.data, data_root=args.data_root,
                           seed=args.seed, prior=args.prior)
        if finished_as(out / arm, cfg):
            print(f"[al-loop] {arm}: reusing the finished run in {out / arm} (same config)", flush=True)
        else:
            result = run_simulation(cfg, num_sites=count_sites(cfg), echo=False)
            if result.returncode != 0:
                raise SystemExit(f"arm {arm!r} failed; see {result.log_file}")
        table[arm] = summarise(out / arm)
        print(f"[al-loop] {arm}: {table[arm]}", flush=True)
    (out / "al_loop.json").write_text(json.dumps({"arms": ARMS, "table": table, "argv": vars(args)}, indent=2))
    (out / "al_loop.md").write_text(to_markdown(table) + "\n")
    plot_arms(table, out / "al_loop.png")
    print(to_markdown(table))


if __name__ == "__main__":
    main()
