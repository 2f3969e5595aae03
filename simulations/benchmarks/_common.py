"""What the torch benchmarks share: the machine facts behind a timing, the ``--threads`` option, the JSON report."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch


def machine_info() -> dict[str, Any]:
    """Facts that explain a timing: CPU, threads, load, library versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": [round(x, 2) for x in load]}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Add ``--threads`` (torch intra-op threads, default 1) to ``parser``, parse ``argv`` and set the threads."""
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args


def write_report(out_dir: Path, name: str, body: dict[str, Any]) -> Path:
    """Write ``out_dir/<name>.json``: the benchmark's name, the time (UTC), :func:`machine_info`, then ``body``."""
    report = {"benchmark": name, "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), **body}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=2))
    return path
