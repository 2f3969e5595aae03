"""Federation benchmarks: framework overhead per round, and scaling with the number of sites.

    python -m simulations.benchmarks.federation --out runs/benchmarks [--sites 2,4,8,16] [--rounds 2]
        [--overhead-presets smoke,demo]

Overhead: one site at a time (``cpus_per_site`` = all cores), so a round's wall time is the sites' own compute
(the handler time each site reports: data, model build, training, evaluation) plus Flower's messaging,
serialisation and scheduling; overhead share = 1 - sum(site compute) / round wall time (goal <= 5 %), reported
for the cold first round (Ray workers start, imports) and for the warm rounds after it, per preset: the share
depends on how much work a site does per round (smoke: ~1 s; demo: ~15 s).
Scaling: the smoke preset with fixed per-site work, N sites, 1 CPU per site (so ``os.cpu_count()`` sites run at
once); per N the warm round's wall time, the wall time per site (linear scaling = constant), and the peak resident
memory of the whole process tree (SuperLink, simulation runtime, Ray workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from common.core.config import RunConfig
from common.core.run_layout import RunLayout
from simulations.launcher import run_simulation


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants in a thread."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run(preset: str, sites: int, rounds: int, cpus_per_site: float, workdir: Path, sets: dict[str, Any]) -> dict[str, Any]:
    run_dir = workdir / f"{preset}-n{sites}-c{cpus_per_site:g}"
    cfg = RunConfig.from_flat({"preset": preset, "run-dir": str(run_dir), "data.num-sites": sites,
                               "federation.num-rounds": rounds, **sets})
    with PeakRSS() as mem:
        result = run_simulation(cfg, num_sites=sites, echo=False, cpus_per_site=cpus_per_site, timeout_s=3000)
    if result.returncode != 0:
        raise RuntimeError(f"run failed; see {result.log_file}")
    records = [json.loads(line) for line in RunLayout(run_dir).metrics.read_text().splitlines()]
    per_round = []
    for r in records:
        compute = sum(s["compute_s"].get("train", 0.0) + s["compute_s"].get("evaluate", 0.0) for s in r["sites"])
        row = {"round": r["round"], "wall_s": r["wall_s"], "site_compute_s": round(compute, 3)}
        if cpus_per_site >= (os.cpu_count() or 1):  # sites one at a time: the rest of the wall time is overhead
            row["overhead_share"] = round(1 - compute / r["wall_s"], 4) if r["wall_s"] else None
        else:  # sites run concurrently: how many cores' worth of site work the round kept busy
            row["concurrency"] = round(compute / r["wall_s"], 3) if r["wall_s"] else None
        per_round.append(row)
    out = {"preset": preset, "sites": sites, "rounds": rounds, "cpus_per_site": cpus_per_site,
           "total_wall_s": round(result.wall_s, 2), "peak_rss_mb": round(mem.peak / 2**20, 1), "per_round": per_round}
    warm = per_round[1:] or per_round
    out["warm_round_wall_s"] = round(sum(r["wall_s"] for r in warm) / len(warm), 3)
    out["warm_wall_per_site_s"] = round(out["warm_round_wall_s"] / sites, 3)
    return out


def overhead_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Cold (first round) and warm (later rounds, pooled) overhead shares of a sequential run."""
    rounds = run["per_round"]
    warm = rounds[1:]
    wall, compute = sum(r["wall_s"] for r in warm), sum(r["site_compute_s"] for r in warm)
    share = round(1 - compute / wall, 4) if wall else None
    return {"preset": run["preset"], "cold_round_overhead_share": rounds[0]["overhead_share"],
            "warm_overhead_share": share, "warm_overhead_s_per_round": round((wall - compute) / len(warm), 3) if warm else None,
            "goal_met": share is not None and share <= 0.05, "run": run}


def main() -> None:
    """Run both benchmarks and write ``federation.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/benchmarks")
    p.add_argument("--sites", default="2,4,8,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--overhead-presets", default="smoke,demo")
    args = p.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2: the first round is the cold start, the overhead goal is for warm rounds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="difusal-bench-") as tmp:
        work = Path(tmp)
        overhead = [overhead_summary(_run(name, 2, args.rounds, float(cpus), work, {}))
                    for name in args.overhead_presets.split(",")]
        scaling = [_run("smoke", n, args.rounds, 1.0, work, {}) for n in (int(x) for x in args.sites.split(","))]
    per_site = [s["warm_wall_per_site_s"] for s in scaling]
    report = {
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "overhead": {"goal": "warm-round overhead share <= 0.05", "presets": overhead},
        "scaling": {
            "goal": "linear wall time in N (constant wall per site) and peak memory not growing with N beyond the "
                    f"{cpus} concurrent sites",
            "runs": scaling,
            "wall_per_site_max_over_min": round(max(per_site) / min(per_site), 3),
            "peak_rss_max_over_min": round(max(s["peak_rss_mb"] for s in scaling) / min(s["peak_rss_mb"] for s in scaling), 3),
        },
        "command": "python -m simulations.benchmarks.federation " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    path = out / "federation.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({"overhead": [{k: v for k, v in o.items() if k != "run"} for o in overhead],
                      "scaling": [{k: s[k] for k in ("sites", "warm_round_wall_s", "warm_wall_per_site_s", "peak_rss_mb")}
                                  for s in scaling]}, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
