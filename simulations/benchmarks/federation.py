"""Federation benchmarks: framework overhead per round, and scaling with the number of sites.

    python -m simulations.benchmarks.federation --out runs/benchmarks [--sites 2,4,8,16] [--rounds 2]

Overhead: one site at a time (``cpus_per_site`` = all cores), so a round's wall time is the sites' own compute
(the handler time each site reports: data, model build, training, evaluation) plus Flower's messaging,
serialisation and scheduling; overhead share = 1 - sum(site compute) / round wall time (goal <= 5 %).
Scaling: the smoke preset with fixed per-site work, N sites, 1 CPU per site; wall time and the peak resident
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

from common.config import RunConfig
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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = []
    for r in records:
        compute = sum(s["compute_s"].get("train", 0.0) + s["compute_s"].get("evaluate", 0.0) for s in r["sites"])
        per_round.append({"round": r["round"], "wall_s": r["wall_s"], "site_compute_s": round(compute, 3),
                          "overhead_share": round(1 - compute / r["wall_s"], 4) if r["wall_s"] else None})
    return {"sites": sites, "rounds": rounds, "cpus_per_site": cpus_per_site, "total_wall_s": round(result.wall_s, 2),
            "peak_rss_mb": round(mem.peak / 2**20, 1), "per_round": per_round}


def main() -> None:
    """Run both benchmarks and write ``federation.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/benchmarks")
    p.add_argument("--sites", default="2,4,8,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--overhead-preset", default="smoke")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="difusal-bench-") as tmp:
        work = Path(tmp)
        overhead = _run(args.overhead_preset, 2, args.rounds, float(cpus), work, {})
        scaling = [_run("smoke", n, args.rounds, 1.0, work, {}) for n in (int(x) for x in args.sites.split(","))]
    last = overhead["per_round"][-1]
    report = {
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version()},
        "overhead": {**overhead, "goal": "overhead_share <= 0.05 (warm round)", "goal_met": last["overhead_share"] <= 0.05},
        "scaling": scaling,
        "command": "python -m simulations.benchmarks.federation " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    path = out / "federation.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
