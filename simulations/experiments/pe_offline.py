"""Can private votes pick phantoms that look like the private scans, at a consortium's data scale? (issue 17)

Private evolution's release is selected by noisy vote counts. Whether the votes can select anything depends on
their signal-to-noise ratio: a candidate expects about ``N / M`` votes (N private images, M candidates of the
population; class-aware votes split both by plane), while the summed histogram carries noise of std
``sigma * sqrt(sites)``. This study runs the coordinator's evolution exactly as the product does
(:class:`common.active_learning.evolution.Population` with phantom proposals, ``next_generation``,
``select_release``; every site's votes through :func:`common.privacy.votes.private_vote` with its own ledger, the
votes' share of the preset's budget), without Flower and without the DP generator, so that it can compare
configurations quickly:

- ``product``: the African preset's private-evolution arm (population 24, 3 votes per query round, 3 query rounds);
- ``noiseless``: the same with votes without noise (not private: the ceiling of phantom proposals under votes);
- ``no_signal``: the same with votes drowned in noise (sigma 1e4: random selection among the same proposals);
- variants that trade candidates and votes for signal (fewer candidates, fewer votes per query round).

Data: the African planes' TRAINING split only (never its test split), 5 case-grouped folds
(:func:`simulations.experiments.extractors.grouped_stratified_folds`): the sites (countries) of the other four folds
vote; the held-out fold's real images score the release. Per (fold, seed) and configuration: release size, FD to the
held-out real images at a fixed size (:func:`simulations.experiments.release_quality.subset_mean`), and the
accuracy on them of a non-private probe trained on the release alone (as ``release_quality``), all in the vote
embedder's feature space (the preset's ``public_cnn``).

    python -m simulations.experiments.pe_offline --data-root ../shared/data/african_fetal_planes --out JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.active_learning.evolution import Population, run_votes, select_release
from common.active_learning.vote_query import vote_embedder
from common.analysis.metrics import frechet_distance
from common.core.atomic_io import write_text_atomic
from common.core.seeding import derive_seed
from common.privacy.site_state import SiteStateStore
from common.privacy.votes import private_vote
from simulations.config_args import build_config
from simulations.experiments.al_loop import ARMS
from simulations.experiments.extractors import _load, grouped_stratified_folds
from simulations.experiments.release_quality import _probe, subset_mean

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "simulations" / "benchmarks" / "results" / "pe_offline_african.json"
MATCHED = 24  # the FD and probe size: every configuration's release reaches it (3 query rounds)
# name -> (population, votes per query round, noise multiplier override: None = the ledger's plan, class-aware votes)
CONFIGS: dict[str, tuple[int, int, float | None, bool]] = {
    "product": (24, 3, None, True),
    "noiseless": (24, 3, 0.0, True),
    "no_signal": (24, 3, 1e4, True),
    "one_vote_per_round": (24, 1, None, True),
    "population_8": (8, 3, None, True),
    "population_8_one_vote": (8, 1, None, True),
    "population_48": (48, 3, None, True),
    "not_class_aware": (24, 3, None, False),
}


def evolve(cfg: Any, private: dict[str, tuple[np.ndarray, np.ndarray]], embed: Any, *, population: int,
           votes_per_round: int, noise: float | None, rounds: int, seed: int, class_aware: bool = True
           ) -> tuple[list[Any], dict[str, Any]]:
    """The release of ``rounds`` query rounds of private evolution (phantom proposals) and the votes' figures; with
    ``class_aware=False`` a private image votes among every candidate, whatever its plane."""
    fed = cfg.federation
    planes = list(cfg.data.plane_scope())
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {s: SiteStateStore(Path(tmp) / s).load_ledger(before_round=1, privacy=cfg.privacy) for s in private}
        release: list[Any] = []
        snr: list[float] = []
        sigma: float | None = None
        eps: dict[str, float] = {}
        n_votes = sum(len(z) for z, _ in private.values())
        for rnd in range(1, rounds + 1):
            rng = np.random.default_rng(derive_seed(seed, "pe-offline", rnd))
            pop = Population(size=cfg.data.image_size, source="phantom", rng=rng)

            def vote(candidates: list[Any], it: int) -> tuple[np.ndarray, float]:
                nonlocal sigma
                emb = embed(np.stack([c.image for c in candidates]))
                cand_plane = np.array([c.plane for c in candidates])
                total = np.zeros(len(candidates))
                std2 = 0.0
                for s, (z, y) in private.items():
                    led = None if noise is not None else ledgers[s]
                    res = private_vote(led, private=z, candidates=emb, private_plane=y if class_aware else None,
                                       candidate_plane=cand_plane if class_aware else None,
                                       planned_votes=rounds * votes_per_round, noise_multiplier=noise,
                                       noise_seed=derive_seed(seed, "pe-offline-noise", s, rnd, it))
                    total += res.histogram
                    std2 += res.noise_std ** 2
                    sigma = res.noise_multiplier
                    if led is not None:
                        eps[s] = res.epsilon
                snr.append((n_votes / len(candidates)) / std2 ** 0.5 if std2 > 0 else float("inf"))
                return total, std2 ** 0.5

            voted, histogram, std = run_votes(pop, pop.initial(population, planes=planes), vote,
                                              iterations=votes_per_round, keep=fed.pe_keep,
                                              threshold=fed.pe_threshold, strength_start=fed.pe_strength_start,
                                              strength_end=fed.pe_strength_end)
            release += [c for c, _, _ in select_release(voted, histogram, k=fed.al_select,
                                                        threshold=fed.pe_threshold * std)]
    return release, {"sigma": sigma, "votes_epsilon_max": max(eps.values()) if eps else None,
                     "snr_mean": float(np.mean(snr)) if np.isfinite(np.mean(snr)) else None}


def study(data_root: str, folds: int, seeds: int, configs: Sequence[str]) -> dict[str, Any]:
    # the preset and arm the Flower comparison runs (al_loop --preset demo --data african, private-evolution)
    cfg = build_config("demo", [f"{k}={v}" for k, v in ARMS["private-evolution"].items()], data="african",
                       data_root=data_root)
    images, labels, sites, groups = _load({"data": str(Path(data_root).parent)})
    embed = vote_embedder(cfg)
    z_all = embed(images)
    fold_idx = grouped_stratified_folds(labels, groups, folds, seed=0)
    planes = list(cfg.data.plane_scope())
    rows: list[dict[str, Any]] = []
    for f, test in enumerate(fold_idx):
        train = np.setdiff1d(np.arange(len(labels)), test)
        private = {str(s): (z_all[train][sites[train] == s], labels[train][sites[train] == s])
                   for s in sorted(set(sites[train].tolist()))}
        z_te, y_te = z_all[test], labels[test]
        for seed in range(seeds):
            for name in configs:
                population, per_round, noise, class_aware = CONFIGS[name]
                t0 = time.perf_counter()
                rel, info = evolve(cfg, private, embed, population=population, votes_per_round=per_round,
                                   noise=noise, rounds=cfg.federation.num_rounds, seed=derive_seed(seed, f),
                                   class_aware=class_aware)
                z = embed(np.stack([c.image for c in rel])) if rel else np.zeros((0, z_all.shape[1]), np.float32)
                y = np.array([c.plane for c in rel], dtype=np.int64)
                row = {"fold": f, "seed": seed, "config": name, "release": len(rel), **info,
                       "fd_matched": subset_mean(z, y, lambda zs, _: frechet_distance(z_te, zs), n=MATCHED),
                       "synthetic_only_matched": subset_mean(
                           z, y, lambda zs, ys: _probe(zs, ys, z_te, y_te, planes), n=MATCHED),
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"rows": rows, "summary": summarise(rows, configs)}


def summarise(rows: list[dict[str, Any]], configs: Sequence[str]) -> dict[str, Any]:
    """Per configuration: mean and std over (fold, seed), and the paired difference to ``product``."""
    out: dict[str, Any] = {}
    key = lambda r: (r["fold"], r["seed"])  # noqa: E731
    base = {key(r): r for r in rows if r["config"] == "product"}
    for name in configs:
        mine = [r for r in rows if r["config"] == name]
        entry: dict[str, Any] = {"n": len(mine)}
        for m in ("release", "snr_mean", "fd_matched", "synthetic_only_matched"):
            vals = [r[m] for r in mine if r[m] is not None]
            entry[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))} if vals else None
            if m in ("fd_matched", "synthetic_only_matched") and base:
                d = [r[m] - base[key(r)][m] for r in mine if r[m] is not None and base[key(r)][m] is not None]
                entry[f"{m}_vs_product"] = {"mean": float(np.mean(d)), "std": float(np.std(d)),
                                            "better": int(sum((x < 0) if m == "fd_matched" else (x > 0) for x in d)),
                                            "n": len(d)} if d else None
        entry["sigma"] = next((r["sigma"] for r in mine), None)
        entry["votes_epsilon_max"] = max((r["votes_epsilon_max"] or 0.0 for r in mine), default=None)
        out[name] = entry
    return out


def markdown(summary: dict[str, Any]) -> str:
    def f(s: dict[str, Any] | None, d: int = 3) -> str:
        return "-" if s is None else f"{s['mean']:.{d}f} ± {s['std']:.{d}f}"

    def p(s: dict[str, Any] | None) -> str:
        return "-" if s is None else f"{s['mean']:+.3f} ± {s['std']:.3f} ({s['better']}/{s['n']} better)"

    lines = [f"| configuration | sigma | votes SNR | release | FD at {MATCHED} | vs product | synthetic-only at "
             f"{MATCHED} | vs product |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        sigma = "-" if s["sigma"] is None else f"{s['sigma']:.3g}"
        lines.append(f"| {name} | {sigma} | {f(s['snr_mean'], 2)} | {f(s['release'], 1)} | {f(s['fd_matched'])} | "
                     f"{p(s['fd_matched_vs_product'])} | {f(s['synthetic_only_matched'])} | "
                     f"{p(s['synthetic_only_matched_vs_product'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "african_fetal_planes"))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--machine-note", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = [c for c in a.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {sorted(CONFIGS)}")
    t0 = time.perf_counter()
    result = study(a.data_root, a.folds, a.seeds, configs)
    report = {"study": "pe_offline: private evolution's vote signal at the African preset's scale (training split, "
                       "case-grouped folds)",
              "configs": {k: {"population": v[0], "votes_per_query_round": v[1], "noise_multiplier": v[2],
                              "class_aware": v[3]}
                          for k, v in CONFIGS.items() if k in configs},
              "matched_n": MATCHED,
              "command": "python -m simulations.experiments.pe_offline " + " ".join(argv or sys.argv[1:]),
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "note": a.machine_note},
              "wall_seconds": round(time.perf_counter() - t0, 1), **result}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=2))
    print(markdown(result["summary"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
