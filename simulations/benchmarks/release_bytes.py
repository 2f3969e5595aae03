"""Bytes each site receives per round, and how they grow with the release (read from finished runs).

    python -m simulations.benchmarks.release_bytes RUN_DIR [RUN_DIR ...] [--label after ...]
        [--out simulations/benchmarks/results]

For each run folder (a finished ``simulate`` run with active learning), per round: the release size the round's
train messages had to bring to the sites, and per site the bytes of its train message and of its query message
(the payload of every record, as :func:`common.federated.flwr_records.record_nbytes` counts it; from
``metrics.jsonl``, where the server records them as it sends). Runs of code that recorded no query bytes report
``null`` there. ``release_bytes_per_site`` is a train message's size less round 1's (which carries no release):
what the release costs on top of the weights. Writes ``release_bytes.json``: one entry per run, with its label,
and for each the ratio of the last round's train bytes to the first round's (1.0 = flat).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from common.core.run_layout import RunLayout
from simulations.benchmarks._common import write_report


def run_bytes(run_dir: Path) -> dict[str, Any]:
    """Per round of ``run_dir``: release size, and per site the train and query bytes it was sent."""
    layout = RunLayout(run_dir)
    path = layout.metrics
    if not path.is_file():
        raise SystemExit(f"{run_dir} has no metrics.jsonl: give the folder of a finished run")
    rounds, release = [], 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        train = {s["name"]: int(s.get("bytes_down", 0)) for s in record["sites"] if s.get("bytes_down")}
        query_sites = (record.get("active_learning") or {}).get("sites", [])
        query = {s["name"]: s["bytes_down"] for s in query_sites if s.get("status") == "ok" and "bytes_down" in s}
        rounds.append({"round": record["round"], "release_size_at_train": release, "train_bytes_per_site": train,
                       "query_bytes_per_site": query or None})
        release = int((record.get("active_learning") or {}).get("release_size", release))
    first, last = rounds[0]["train_bytes_per_site"], rounds[-1]["train_bytes_per_site"]
    growth = max(last.values()) / max(first.values()) if first and last else None
    if rounds[0]["release_size_at_train"] == 0 and first:  # round 1 carries no release: its size is the weights'
        for r in rounds:
            r["release_bytes_per_site"] = {k: v - first.get(k, 0) for k, v in r["train_bytes_per_site"].items()}
    config = json.loads(layout.config.read_text()).get("config", {}) if layout.config.is_file() else {}
    return {"run_dir": str(run_dir), "preset": config.get("preset"), "image_size": config.get("data", {}).get("image_size"),
            "rounds": rounds, "train_bytes_last_over_first": growth}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--label", action="append", default=[], help="one label per run (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=Path("simulations/benchmarks/results"))
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        parser.error(f"{len(args.label)} labels for {len(args.runs)} runs")
    labels = args.label or [str(r) for r in args.runs]
    body = {"runs": [{"label": label, **run_bytes(run)} for label, run in zip(labels, args.runs)]}
    print(write_report(args.out, "release_bytes", body))


if __name__ == "__main__":
    main()
