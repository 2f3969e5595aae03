"""Does the active-learning loop help? The same federation with three selection arms, side by side.

    python -m simulations.experiments.al_loop --preset demo --prior shipped --out runs/al-loop [--set k=v ...]
    python -m simulations.experiments.al_loop --preset demo --data african --data-root DIR --out runs/al-loop-african
    python -m simulations.experiments.al_loop --combine runs/al-loop runs/al-loop-seed1 --out runs/al-loop-seeds

Arms (identical seeds, data, privacy and rounds; only the coordinator differs):
- ``none``: no queries, no synthetic data;
- ``random``: queries every round, random selection (no quality threshold, no balancing): the baseline;
- ``acquisition``: queries every round with the configured acquisition (quality threshold, plane x GA balancing,
  k-center greedy inside bins by default);
- ``private-evolution``: every round, ``federation.pe-iterations`` votes of the sites' private images on a population
  of phantom-simulator (and/or DP-generator) candidates select the release; the votes take 0.2 of the site budget
  from the generator's share, so every arm spends the same total epsilon per site.
The arms simulate the same hospitals: every arm's sites get the site secrets of the first arm (they key the DP
noise), so the arms draw the same private noise and differ only by the coordinator.
Arms already finished in ``--out`` with the same config are reused, so an interrupted comparison resumes.
Per round, the held-out plane accuracy / macro-F1 and GA MAE (days) are the sites' evaluation of the global
downstream models on their test splits (no model or selection step sees them), pooled by example count.
``--combine`` reads the ``al_loop.json`` of comparisons run with different ``--seed`` (each seed draws other sites,
data and noise) and tabulates each arm's difference to ``none`` per seed: how large an effect is against the
seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.core.run_layout import RunLayout
from common.federated.round_metrics import round_summary
from common.privacy.site_state import SECRET_FILE, copy_site_secrets
from simulations.config_args import add_data_arguments, build_config, count_sites
from simulations.experiments.release_quality import MATCHED_N, release_quality
from simulations.launcher import finished_as, run_simulation

QUALITY_KEYS = ("fd", "kid", "synthetic_only", "real_only_smallest", "real_plus_synthetic_smallest", "fd_matched",
                "synthetic_only_matched", "by_site", "sites_not_worse", "sites")

ARMS: dict[str, dict[str, object]] = {
    "none": {"federation.al-every": 0},
    "random": {"federation.al-every": 1, "federation.al-acquisition": "random", "federation.al-balance": False,
               "federation.al-quality-threshold": 0.0},
    "acquisition": {"federation.al-every": 1},
    # the sites' noisy votes select the release (server/evolution.py); the same site total epsilon, of which the
    # votes take a share from the generator's (0.6 -> 0.4 + 0.2 votes): matched total epsilon per site
    "private-evolution": {"federation.al-every": 1, "federation.pe-iterations": 3, "privacy.budget-generator": 0.4,
                          "privacy.budget-votes": 0.2},
    # variant (not in the default --arms): half the population from the shared DP generator, varied with SDEdit
    "private-evolution-generator": {"federation.al-every": 1, "federation.pe-iterations": 3,
                                    "privacy.budget-generator": 0.4, "privacy.budget-votes": 0.2,
                                    "federation.pe-source": "both"},
}
# control (not in the default --arms): the same evolution with votes drowned in noise (sigma 1e4, so the selection
# is random among the same phantom proposals): what the votes add beyond the simulator itself
ARMS["private-evolution-novote"] = {**ARMS["private-evolution"], "privacy.vote-noise-multiplier": 1e4}
# variant (not in the default --arms): each private image votes for its 2 nearest candidates (of its plane), the
# histogram's sensitivity sqrt(2): twice the votes for sqrt(2) times the noise
ARMS["private-evolution-top2"] = {**ARMS["private-evolution"], "federation.pe-votes-per-image": 2}
# variant (not in the default --arms): a private image votes for its nearest candidate of any plane (the offline
# study, pe_offline.py on the African training split, found a lower FD than class-aware votes in 13 of 15 folds x seeds)
ARMS["private-evolution-any-plane"] = {**ARMS["private-evolution"], "federation.pe-class-aware": False}
# variant (not in the default --arms): every candidate from the shared DP generator (SDEdit variations, no phantoms)
# and votes among every plane: the votes select among the same kind of images acquisition releases
ARMS["private-evolution-generator-any-plane"] = {**ARMS["private-evolution"], "federation.pe-source": "generator",
                                                 "federation.pe-class-aware": False}
# variant (not in the default --arms): every candidate from the shared DP generator, class-aware votes (a private
# image votes among the candidates of its own plane)
ARMS["private-evolution-generator-only"] = {**ARMS["private-evolution"], "federation.pe-source": "generator"}
DEFAULT_ARMS = ("none", "random", "acquisition", "private-evolution")


def secret_source(out: Path, arms: list[str]) -> Path:
    """The arm folder whose site secrets every arm gets: the first of ``arms``, then of :data:`ARMS`, that has any
    (arms finished by an earlier call into the same ``--out`` count, so an arm added later simulates the same
    hospitals, with the same DP noise); ``arms[0]`` when none has trained yet."""
    for arm in dict.fromkeys([*arms, *ARMS]):
        if any((out / arm / "sites").glob(f"*/{SECRET_FILE}")):
            return out / arm
    return out / arms[0]


def summarise(run_dir: Path) -> list[dict[str, Any]]:
    """Per-round pooled held-out metrics of one run."""
    return [round_summary(json.loads(line)) for line in RunLayout(run_dir).metrics.read_text().splitlines()]


def to_markdown(table: dict[str, list[dict[str, Any]]]) -> str:
    """One row per (arm, round): the federation's held-out metrics, then the release's (release_quality.py)."""
    lines = ["| arm | round | plane acc | macro-F1 | GA MAE (days) | release | FD | KID | synth-only acc | "
             f"smallest: real | smallest: real+synth | FD at {MATCHED_N} | synth-only at {MATCHED_N} | "
             "sites not worse with it |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for arm, rows in table.items():
        for r in rows:
            lines.append(f"| {arm} | {r['round']} | {fmt(r['plane_accuracy'])} | {fmt(r['plane_macro_f1'])} | "
                         f"{fmt(r['ga_mae_days'])} | {r['release_size']} | {fmt(r.get('fd'))} | {fmt(r.get('kid'))} | "
                         f"{fmt(r.get('synthetic_only'))} | {fmt(r.get('real_only_smallest'))} | "
                         f"{fmt(r.get('real_plus_synthetic_smallest'))} | {fmt(r.get('fd_matched'))} | "
                         f"{fmt(r.get('synthetic_only_matched'))} | "
                         + (f"{r['sites_not_worse']} of {r['sites']} |" if r.get("sites") else "- |"))
    return "\n".join(lines)


def across_seeds(tables: list[dict[str, list[dict[str, Any]]]], baseline: str = "none",
                 keys: tuple[str, ...] = ("plane_accuracy", "ga_mae_days")) -> list[dict[str, Any]]:
    """Per (arm, round): the metric over seeds and the paired difference to ``baseline`` (same seed, same round).

    Only seeds whose comparison holds the arm and the baseline count; ``n`` says how many did.
    """
    arms = [a for a in dict.fromkeys(a for t in tables for a in t) if a != baseline]
    out: list[dict[str, Any]] = []
    for arm in arms:
        # per seed that ran both: round -> (arm's row, baseline's row)
        paired = [{r["round"]: (r, b) for r in t[arm] for b in t[baseline] if b["round"] == r["round"]}
                  for t in tables if arm in t and baseline in t]
        for rnd in sorted({rnd for seed in paired for rnd in seed}):
            row: dict[str, Any] = {"arm": arm, "round": rnd}
            for key in keys:
                pairs = [(a.get(key), b.get(key)) for a, b in (seed[rnd] for seed in paired if rnd in seed)
                         if a.get(key) is not None and b.get(key) is not None]
                row[key] = _spread([a for a, _ in pairs])
                row[f"{key}_vs_{baseline}"] = _spread([a - b for a, b in pairs])
            out.append(row)
    return out


def _spread(vals: list[float]) -> dict[str, Any] | None:
    return {"n": len(vals), "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)} if vals else None


def seeds_markdown(rows: list[dict[str, Any]], baseline: str = "none") -> str:
    """One row per (arm, round): mean [min, max] over seeds of the metric and of its difference to the baseline."""
    def fmt(s: dict[str, Any] | None, digits: int, sign: str = "") -> str:
        def f(x: float) -> str:  # round first so that -0.0000001 prints as +0.000, not -0.000
            return f"{{:{sign}.{digits}f}}".format(round(x, digits) + 0.0)

        return "-" if s is None else f"{f(s['mean'])} [{f(s['min'])}, {f(s['max'])}]"

    lines = [f"| arm | round | seeds | plane acc | vs {baseline} | GA MAE (days) | vs {baseline} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = max((r[k]["n"] for k in ("plane_accuracy", "ga_mae_days") if r[k]), default=0)
        lines.append(f"| {r['arm']} | {r['round']} | {n} | {fmt(r['plane_accuracy'], 3)} | "
                     f"{fmt(r[f'plane_accuracy_vs_{baseline}'], 3, '+')} | {fmt(r['ga_mae_days'], 1)} | "
                     f"{fmt(r[f'ga_mae_days_vs_{baseline}'], 1, '+')} |")
    return "\n".join(lines)


def combine(dirs: list[Path], out: Path) -> list[dict[str, Any]]:
    """Write ``al_loop_seeds.{json,md}`` in ``out`` from the comparisons in ``dirs`` (one per seed)."""
    tables, seeds, setups = [], [], []
    for d in dirs:
        f = d / "al_loop.json"
        if not f.is_file():
            raise SystemExit(f"{f} not found: run the comparison first (python -m simulations.experiments.al_loop "
                             f"--seed N --out {d})")
        doc = json.loads(f.read_text())
        tables.append(doc["table"])
        argv = doc.get("argv") or {}
        seeds.append(argv.get("seed"))
        setups.append({k: v for k, v in argv.items() if k not in ("seed", "out", "arms", "combine")})
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"the comparisons share a seed ({seeds}): combine runs made with different --seed")
    for d, setup in zip(dirs[1:], setups[1:]):
        if setup != setups[0]:
            diff = sorted(k for k in setup.keys() | setups[0].keys() if setup.get(k) != setups[0].get(k))
            raise SystemExit(f"{d} was run with other settings than {dirs[0]} ({', '.join(diff)} differ): "
                             "combine only comparisons that differ in --seed")
    rows = across_seeds(tables)
    out.mkdir(parents=True, exist_ok=True)
    (out / "al_loop_seeds.json").write_text(json.dumps({"sources": [str(d) for d in dirs], "seeds": seeds,
                                                        "rows": rows}, indent=2))
    (out / "al_loop_seeds.md").write_text(seeds_markdown(rows) + "\n")
    if all("acquisition" in t for t in tables):  # the releases against the acquisition release, paired per seed
        release_rows = across_seeds(tables, baseline="acquisition", keys=RELEASE_KEYS)
        (out / "al_loop_seeds_release.json").write_text(json.dumps({"seeds": seeds, "rows": release_rows}, indent=2))
        (out / "al_loop_seeds_release.md").write_text(release_markdown(release_rows) + "\n")
    return rows


RELEASE_KEYS = ("fd", "synthetic_only", "real_plus_synthetic_smallest", "fd_matched", "synthetic_only_matched")


def release_markdown(rows: list[dict[str, Any]], baseline: str = "acquisition") -> str:
    """Per (arm, round): each release metric, mean [min, max] over seeds, and its paired difference to ``baseline``."""
    def f(s: dict[str, Any] | None, sign: str = "") -> str:
        return "-" if s is None else "{0} [{1}, {2}] (n={3})".format(
            *(f"{{:{sign}.3f}}".format(round(s[k], 3) + 0.0) for k in ("mean", "min", "max")), s["n"])

    head = " | ".join(f"{k} | vs {baseline}" for k in RELEASE_KEYS)
    lines = [f"| arm | round | {head} |", "|---|---|" + "---|---|" * len(RELEASE_KEYS)]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['round']} | "
                     + " | ".join(f"{f(r[k])} | {f(r[f'{k}_vs_{baseline}'], '+')}" for k in RELEASE_KEYS) + " |")
    return "\n".join(lines)


def plot_arms(table: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Held-out plane accuracy, GA MAE and release size per round, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.core.viz import plot_series

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
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--combine", nargs="+", type=Path, metavar="DIR",
                   help="no runs: tabulate finished comparisons (one per --seed) against each other into --out")
    p.add_argument("--no-release-quality", action="store_true",
                   help="skip the per-round release metrics (simulations/experiments/release_quality.py)")
    add_data_arguments(p)
    args = p.parse_args()
    out = Path(args.out).resolve()
    if args.combine:
        print(seeds_markdown(combine(args.combine, out)))
        return
    table: dict[str, list[dict[str, Any]]] = {}
    arms = args.arms.split(",")
    for arm in arms:
        copy_site_secrets(secret_source(out, arms), out / arm)  # nothing to copy before the first arm has trained
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
        if not args.no_release_quality:  # FD/KID to real test, synthetic-only and real+synthetic probes, per round
            quality = {q["round"]: q for q in release_quality(out / arm)}
            for row in table[arm]:
                row.update({k: v for k, v in quality.get(row["round"], {}).items() if k in QUALITY_KEYS})
        print(f"[al-loop] {arm}: {table[arm]}", flush=True)
    (out / "al_loop.json").write_text(json.dumps({"arms": ARMS, "table": table, "argv": vars(args)}, indent=2))
    (out / "al_loop.md").write_text(to_markdown(table) + "\n")
    plot_arms(table, out / "al_loop.png")
    print(to_markdown(table))


if __name__ == "__main__":
    main()
