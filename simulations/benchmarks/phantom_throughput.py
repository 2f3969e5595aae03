"""Phantom generator throughput: images per second at 64x64 and 128x128, with 1 and 2 worker processes.

Goal (issue): 10,000 phantoms of 64x64 in under 60 s on 2 cores, i.e. >= 166.7 images/s with 2 workers.
The report gives the wall-clock verdict (``goal.met``) and, because a shared machine's wall clock measures
its other tenants too, the verdict for idle cores from the single-worker CPU time (``goal.met_on_idle_cores``).

    python -m simulations.benchmarks.phantom_throughput --out runs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy

from common.phantoms.simulator import make_phantoms

GOAL_IMAGES, GOAL_SECONDS, GOAL_SIZE, GOAL_WORKERS = 10_000, 60.0, 64, 2


def machine_info() -> dict[str, Any]:
    """Facts that explain a throughput number: CPU, cores, load, library versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
        "cpu_count": os.cpu_count(), "usable_cores": affinity, "load_average_1_5_15": list(load),
    }


def measure(n: int, size: int, workers: int, seed: int = 0) -> dict[str, Any]:
    """Time ``make_phantoms(n, size=size, workers=workers)`` (process start-up included).

    On a shared machine the wall clock measures the contention as much as the code. With one worker the
    report also gives CPU milliseconds per image (all work is in this process), hence the throughput
    ``cores / cpu_ms_per_image`` that idle cores would reach.
    """
    cpu0, start = time.process_time(), time.perf_counter()
    recs = make_phantoms(n, size=size, seed=seed, workers=workers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    if len(recs) != n:
        raise RuntimeError(f"make_phantoms returned {len(recs)} records, expected {n}")
    out: dict[str, Any] = {"n": n, "size": size, "workers": workers, "seconds": round(seconds, 3),
                           "images_per_s": round(n / seconds, 2)}
    if workers == 1:
        out["cpu_ms_per_image"] = round(1000 * cpu / n, 3)
    return out


def run(out_dir: Path, *, n64: int, n128: int, workers: Sequence[int] = (1, 2)) -> Path:
    """Run every (size, workers) case and write ``phantom_throughput.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir:
        Output folder (created).
    n64, n128:
        Images per case at 64x64 and 128x128.
    workers:
        Worker-process counts to time.

    Returns
    -------
    Path
        The JSON report.
    """
    make_phantoms(4, size=64, seed=0)  # warm imports and caches outside the timed region
    results = [measure(n, size, w) for size, n in ((64, n64), (128, n128)) for w in workers]
    goal_case = next((r for r in results if r["size"] == GOAL_SIZE and r["workers"] == GOAL_WORKERS), None)
    projected = GOAL_IMAGES / goal_case["images_per_s"] if goal_case else None
    single = next((r for r in results if r["size"] == GOAL_SIZE and r["workers"] == 1), None)
    idle = GOAL_IMAGES * single["cpu_ms_per_image"] / 1000 / GOAL_WORKERS if single else None
    report = {
        "benchmark": "phantom_throughput",
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "goal": {"images": GOAL_IMAGES, "size": GOAL_SIZE, "workers": GOAL_WORKERS, "seconds": GOAL_SECONDS,
                 "projected_seconds": None if projected is None else round(projected, 2),
                 "met": None if projected is None else bool(projected < GOAL_SECONDS),
                 "projected_seconds_idle_cores": None if idle is None else round(idle, 2),
                 "met_on_idle_cores": None if idle is None else bool(idle < GOAL_SECONDS)},
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "phantom_throughput.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="output folder")
    parser.add_argument("--n64", type=int, default=GOAL_IMAGES, help="images per 64x64 case")
    parser.add_argument("--n128", type=int, default=2000, help="images per 128x128 case")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    args = parser.parse_args(argv)
    path = run(args.out, n64=args.n64, n128=args.n128, workers=args.workers)
    print(path.read_text())


if __name__ == "__main__":
    main()
