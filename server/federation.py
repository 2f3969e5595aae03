"""The server's round loop: train, evaluate, query (active learning), checkpoint; resumable.

Each round calls the wrapped strategy's ``start`` for one round, so that checkpoints, resume and the
coordinator's queries sit between rounds without copying ``Strategy.start``.

A round in which no site trained (every reply failed, was rejected or never came) ends the run: ``status.json``
says ``failed`` and why, the round leaves no checkpoint, and :class:`RunFailedError` fails the ServerApp. The model
did not change, so the next rounds would repeat the same failure; fix the cause and ``--resume`` from the last
checkpoint. A round in which every site had spent its privacy budget is no failure: training ended as planned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common.core.atomic_io import write_json_atomic
from common.core.config import RunConfig
from common.core.provenance import code_version
from common.federated.flwr_records import arrays_to_record, record_to_arrays
from common.models.bundle import ModelBundle, build_bundle, expected_shapes, federated_arrays, load_federated_arrays
from server.checkpoint import RunFolder
from server.reporting import plot_rounds, save_sample_grid
from server.strategy import GuardedStrategy, SiteReport, make_strategy, update_bounds

# Test hook: make the server process die right after checkpointing this round (simulates a kill).
FAULT_ENV = "DIFUSAL_FAULT_AFTER_ROUND"


class RunFailedError(RuntimeError):
    """A round ended with no site trained; ``status.json`` holds the sites' reasons."""


@dataclass(frozen=True)
class FederationResult:
    """Where the run ended."""

    last_round: int
    run_dir: Path
    arrays: dict[str, np.ndarray]


def run_federation(grid: Grid, cfg: RunConfig, *, resume: bool = False, coordinator: Any = None) -> FederationResult:
    """Run (or resume) ``cfg.federation.num_rounds`` rounds against the sites reachable through ``grid``."""
    if not cfg.run_dir:
        raise ValueError("run-dir is empty: the server needs a run folder for checkpoints and metrics")
    run = RunFolder(Path(cfg.run_dir))
    latest = run.start(cfg, resume=resume)
    # A stale "failed" (or "finished") of an earlier attempt must not describe this one.
    started = {"state": "running", "last_round": latest.server_round if latest else 0}
    write_json_atomic(run.path / "status.json", started)
    bundle = build_bundle(cfg)
    strategy = GuardedStrategy(make_strategy(cfg), expected_shapes=expected_shapes(bundle),
                               update_bounds=update_bounds(cfg))
    arrays = federated_arrays(bundle)
    ledger: dict[str, Any] = {}
    first = 1
    if latest is not None:
        arrays = latest.arrays()
        strategy.load_state_arrays(latest.strategy_state())
        ledger = dict(latest.info().get("ledger", {}))
        first = latest.server_round + 1
        log(INFO, "Resuming %s from round %s", run.path, latest.server_round)
    load_federated_arrays(bundle, arrays)
    rounds = cfg.federation.num_rounds
    for server_round in range(first, rounds + 1):
        t0 = time.perf_counter()
        strategy.begin_round()
        config = {"fl-round": server_round}
        release = coordinator.release_record() if coordinator is not None else None
        strategy.extra_train_records = {"release": release} if release is not None else {}
        result = strategy.start(
            grid,
            arrays_to_record(arrays),
            num_rounds=1,
            timeout=cfg.federation.reply_timeout_s,
            train_config=ConfigRecord(dict(config)),
            evaluate_config=ConfigRecord(dict(config)),
        )
        if len(result.arrays) > 0:
            arrays = record_to_arrays(result.arrays)
            load_federated_arrays(bundle, arrays)
        sites = [r.as_dict() for r in strategy.reports.values()]
        failure = round_failure(strategy.reports.values())
        if failure is not None:
            _fail(run, server_round, f"no site trained in round {server_round}: {failure}", sites)
        for report in strategy.reports.values():
            if report.privacy:
                ledger[report.name] = report.privacy
        record: dict[str, Any] = {
            "round": server_round,
            "wall_s": round(time.perf_counter() - t0, 3),
            "train": _metrics(result.train_metrics_clientapp),
            "evaluate": _metrics(result.evaluate_metrics_clientapp),
            "sites": sites,
            "ledger": ledger,
        }
        if coordinator is not None and coordinator.due(server_round):
            names = dict(strategy.node_names)  # bound to node ids by the training replies, not self-declared
            record["active_learning"] = coordinator.query_round(grid, bundle, server_round, site_names=names)
            arrays = federated_arrays(bundle)  # the coordinator may have refined the generator and downstream models
        save_sample_grid(bundle, cfg, run.figures / f"samples-round-{server_round:03d}.png", server_round=server_round)
        run.save_checkpoint(
            server_round,
            bundle,
            strategy_state=strategy.state_arrays(),
            record=record,
            sidecar=_sidecar(cfg, bundle, server_round, ledger),
        )
        _log_round(record, rounds)
        if os.environ.get(FAULT_ENV) == str(server_round):
            log(INFO, "%s=%s: exiting after the checkpoint (fault injection)", FAULT_ENV, server_round)
            os._exit(137)
    plot_rounds(run.read_metrics(), run.figures)
    last = run.latest()
    run.mark_finished(last.server_round if last else 0)
    return FederationResult(last_round=last.server_round if last else 0, run_dir=run.path, arrays=arrays)


def round_failure(reports: Iterable[SiteReport]) -> str | None:
    """Why no site trained in a round (each site's status and reason), or ``None`` when one did.

    A round in which the sites only ran out of privacy budget is no failure.
    """
    reports = list(reports)
    if not reports:
        return "no site took part in the round"
    if any(r.status in ("ok", "budget-exhausted") for r in reports):
        return None
    return "; ".join(f"{r.name} {r.status}: {r.reason or 'no reason given'}" for r in reports)


def _fail(run: RunFolder, server_round: int, reason: str, sites: list[dict[str, Any]]) -> None:
    """Mark the run failed (``status.json`` names the round, the reason and each site's report) and raise."""
    last = run.latest()
    last_round = last.server_round if last else 0
    write_json_atomic(run.path / "status.json",
                      {"state": "failed", "round": server_round, "last_round": last_round, "reason": reason,
                       "sites": sites})
    log(ERROR, "Run failed: %s", reason)
    resume = f"fix it and resume from round {last_round}'s checkpoint" if last_round else "no checkpoint was written"
    raise RunFailedError(f"{reason} (run folder {run.path}; {resume})")


def _metrics(history: dict[int, Any]) -> dict[str, float]:
    if not history:
        return {}
    latest = history[max(history)]
    return {k: float(v) for k, v in latest.items() if isinstance(v, (int, float))}


def _sidecar(cfg: RunConfig, bundle: ModelBundle, server_round: int, ledger: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "federated-checkpoint",
        "round": server_round,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "prior_id": bundle.prior_id,
        "privacy": {"delta": cfg.privacy.target_delta, "accountant": cfg.privacy.accountant, "sites": ledger},
        "sites": sorted(ledger),
        "code_version": code_version(),
    }


def _log_round(record: dict[str, Any], rounds: int) -> None:
    parts = []
    for site in record["sites"]:
        eps = max((float(v.get("epsilon", 0.0)) for v in record["ledger"].get(site["name"], {}).values()), default=0.0)
        parts.append(f"{site['name']}={site['status']}(eps {eps:.2f})")
    ev = record["evaluate"]
    log(
        INFO,
        "Round %s/%s done in %.1fs | sites: %s | plane-acc %.3f | denoise-loss %.4f",
        record["round"], rounds, record["wall_s"], ", ".join(parts),
        ev.get("plane-accuracy", float("nan")), ev.get("denoise-loss", float("nan")),
    )
