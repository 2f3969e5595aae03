"""The server's round loop: train, evaluate, query (active learning), checkpoint; resumable.

A round drives the strategy through its four public steps (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) with the true round number, so that Flower's ``server-round`` and the
logs agree with the checkpoints, and checkpoints, resume and the coordinator's queries sit between rounds.
Between rounds the server holds the weights in one form, the :class:`~common.models.bundle.ModelBundle`; they
become an ``ArrayRecord`` only at the Flower boundary (:mod:`common.federated.flwr_records`).

A round in which no site trained (every reply failed, was rejected or never came) ends the run: ``status.json``
says ``failed`` and why, the round leaves no checkpoint, and :class:`RunFailedError` fails the ServerApp. The model
did not change, so the next rounds would repeat the same failure; fix the cause and ``--resume`` from the last
checkpoint. A round in which every site had spent its privacy budget is no failure: training ended as planned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common.core.atomic_io import write_json_atomic
from common.core.config import RunConfig
from common.core.provenance import code_version
from common.federated.flwr_records import ROUND_KEY, bundle_to_record, load_bundle_record
from common.federated.secure_update import FEDSGD_STATE
from common.models.bundle import ModelBundle, build_bundle, expected_shapes, federated_arrays, load_federated_arrays
from server.checkpoint import RunFolder
from server.reporting import plot_rounds, save_sample_grid
from server.strategy import GuardedStrategy, SiteReport, make_strategy, update_bounds


class RunFailedError(RuntimeError):
    """A round ended with no site trained; ``status.json`` holds the sites' reasons."""


@dataclass(frozen=True)
class FederationResult:
    """Where the run ended."""

    last_round: int
    run_dir: Path
    arrays: dict[str, np.ndarray]


def run_federation(grid: Grid, cfg: RunConfig, *, resume: bool = False, coordinator: Any = None,
                   on_checkpoint: Callable[[int], None] | None = None) -> FederationResult:
    """Run (or resume) ``cfg.federation.num_rounds`` rounds against the sites reachable through ``grid``.

    ``on_checkpoint(server_round)`` is called after each round's checkpoint is written (an observer: the
    fault-injection tests kill the server there).
    """
    if not cfg.run_dir:
        raise ValueError("run-dir is empty: the server needs a run folder for checkpoints and metrics")
    run = RunFolder(Path(cfg.run_dir))
    latest = run.start(cfg, resume=resume)
    # A stale "failed" (or "finished") of an earlier attempt must not describe this one.
    started = {"state": "running", "last_round": latest.server_round if latest else 0}
    write_json_atomic(run.layout.status, started)
    bundle = build_bundle(cfg)
    strategy = GuardedStrategy(make_strategy(cfg), expected_shapes=expected_shapes(bundle),
                               update_bounds=update_bounds(cfg))
    ledger: dict[str, Any] = {}
    first = 1
    if latest is not None:
        load_federated_arrays(bundle, latest.arrays())
        strategy.load_state_arrays({k: v for k, v in latest.strategy_state().items() if not k.startswith(FEDSGD_STATE)})
        ledger = dict(latest.info().get("ledger", {}))
        first = latest.server_round + 1
        log(INFO, "Resuming %s from round %s", run.path, latest.server_round)
    rounds = cfg.federation.num_rounds
    secure = None
    if cfg.federation.secure_aggregation:  # Flower's SecAgg+: the server sees only the sum of the updates
        secure = restore_secure_aggregation(cfg, strategy, latest)
    strategy.summary()
    for server_round in range(first, rounds + 1):
        t0 = time.perf_counter()
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, rounds)
        strategy.begin_round()
        release_sync = None
        if coordinator is not None:
            strategy.extra_train_records = coordinator.train_records
            if secure is not None:  # SecAgg+'s fit instructions cannot carry the release: a plain message first
                release_sync = coordinator.sync_sites(grid, server_round)
        train_metrics, evaluate_metrics = fl_round(strategy, grid, bundle, server_round,
                                                   timeout=cfg.federation.reply_timeout_s, secure=secure)
        if coordinator is not None and secure is None:  # what each site that was sent the release now holds of it
            coordinator.acknowledge({node: r.release_held for node, r in strategy.reports.items() if r.bytes_down})
        sites = [r.as_dict() for r in strategy.reports.values()]
        failure = round_failure(strategy.reports.values())
        if failure is not None and not (secure is not None and secure.last.get("status") == "halted"):
            _fail(run, server_round, f"no site trained in round {server_round}: {failure}", sites)
        for report in strategy.reports.values():
            if report.privacy:
                ledger[report.name] = report.privacy
        record: dict[str, Any] = {
            "round": server_round,
            "wall_s": round(time.perf_counter() - t0, 3),
            "train": _metrics(train_metrics),
            "evaluate": _metrics(evaluate_metrics),
            "sites": sites,
            "ledger": ledger,
        }
        if secure is not None:  # a halted SecAgg+ round changed nothing; the run goes on (its reason is here)
            record["secure_aggregation"] = secure.last
        if release_sync is not None:
            record["release_sync"] = release_sync
        # wall_s: the federated round (training and evaluation at the sites); phases_s adds what follows it, so
        # a user sees where a round's time goes and round_s is the whole round
        phases = {"sites": record["wall_s"]}
        if coordinator is not None and coordinator.due(server_round):
            t1 = time.perf_counter()
            names = dict(strategy.node_names)  # bound to node ids by the training replies, not self-declared
            # the coordinator may refine the generator and the downstream models in the bundle
            record["active_learning"] = coordinator.query_round(grid, bundle, server_round, site_names=names)
            phases["query"] = round(time.perf_counter() - t1, 3)
        if cfg.federation.draws_sample_grid(server_round):  # the last round's, and every k-th (federation config)
            t1 = time.perf_counter()
            save_sample_grid(bundle, cfg, run.figures / f"samples-round-{server_round:03d}.png",
                             server_round=server_round)
            phases["sample_grid"] = round(time.perf_counter() - t1, 3)
        record.update(phases_s=phases, round_s=round(time.perf_counter() - t0, 3))
        run.save_checkpoint(
            server_round,
            bundle,
            strategy_state={**strategy.state_arrays(), **(secure.state_arrays() if secure is not None else {})},
            record=record,
            sidecar=_sidecar(cfg, bundle, server_round, ledger, secure.last if secure is not None else None),
        )
        _log_round(record, rounds)
        if on_checkpoint is not None:
            on_checkpoint(server_round)
    plot_rounds(run.read_metrics(), run.figures)
    last = run.latest()
    run.mark_finished(last.server_round if last else 0)
    return FederationResult(last_round=last.server_round if last else 0, run_dir=run.path,
                            arrays=federated_arrays(bundle))


def restore_secure_aggregation(cfg: RunConfig, strategy: GuardedStrategy, latest: Any = None) -> Any:
    """The run's :class:`server.secure_aggregation.SecureAggregation`, continued from the ``latest`` checkpoint
    when resuming: the shares each earlier sum held (distributed DP, the distributed classifier's steps) and the
    classifier's server-optimizer moments."""
    from server.secure_aggregation import SecureAggregation

    previous = latest.info().get("secure_aggregation", {}) if latest is not None else {}

    def restored(key: str) -> list[int]:  # a run without that mechanism records False (or nothing) there
        entry = previous.get(key)
        return list(entry.get("contributors", [])) if isinstance(entry, dict) else []

    secure = SecureAggregation(cfg, strategy, contributors=restored("distributed_dp"),
                               classifier_contributors=restored("classifier"))
    if latest is not None:
        secure.load_state_arrays(latest.strategy_state())
    return secure


def fl_round(strategy: GuardedStrategy, grid: Grid, bundle: ModelBundle, server_round: int, *,
             timeout: float, secure: Any = None) -> tuple[MetricRecord | None, MetricRecord | None]:
    """One federated round: train at the sites, aggregate into ``bundle`` (in place), evaluate at the sites.

    Returns the aggregated train and evaluate metrics (``None`` where no valid reply came). With ``secure`` (a
    :class:`server.secure_aggregation.SecureAggregation`) training goes through Flower's SecAgg+ workflow.
    """
    config = ConfigRecord({ROUND_KEY: server_round})
    sent = bundle_to_record(bundle)
    if secure is not None:
        aggregated, train_metrics = secure.train(grid, bundle, server_round)
    else:
        replies = grid.send_and_receive(strategy.configure_train(server_round, sent, config, grid), timeout=timeout)
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
    if aggregated is not None:
        load_bundle_record(bundle, aggregated)
    if secure is not None and secure.cfg.privacy.distributed_classifier:  # the classifier's DP-FedSGD sub-rounds
        secure.last["classifier"] = secure.train_classifier(grid, bundle, server_round)
        aggregated = bundle_to_record(bundle)
    current = aggregated if aggregated is not None else sent
    replies = grid.send_and_receive(strategy.configure_evaluate(server_round, current, ConfigRecord(dict(config)), grid),
                                    timeout=timeout)
    return train_metrics, strategy.aggregate_evaluate(server_round, replies)


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
    write_json_atomic(run.layout.status,
                      {"state": "failed", "round": server_round, "last_round": last_round, "reason": reason,
                       "sites": sites})
    log(ERROR, "Run failed: %s", reason)
    resume = f"fix it and resume from round {last_round}'s checkpoint" if last_round else "no checkpoint was written"
    raise RunFailedError(f"{reason} (run folder {run.path}; {resume})")


def _metrics(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def _sidecar(cfg: RunConfig, bundle: ModelBundle, server_round: int, ledger: dict[str, Any],
             secure: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {
        "kind": "federated-checkpoint",
        "round": server_round,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "prior_id": bundle.prior_id,
        # the public data behind the downstream models' frozen backbone (no privacy cost, listed for the auditor)
        "downstream": {"backbone": cfg.train.downstream_backbone,
                       **getattr(bundle.classifier.backbone, "provenance", {})},
        "privacy": {"delta": cfg.privacy.target_delta, "accountant": cfg.privacy.accountant, "sites": ledger},
        "sites": sorted(ledger),
        "code_version": code_version(),
    }
    if secure is not None:  # the trust model, and under distributed DP its central and local figures
        out["privacy"]["secure_aggregation"] = True
        if secure.get("distributed_dp"):
            out["privacy"]["distributed_dp"] = secure["distributed_dp"]
        if secure.get("classifier"):  # example-level distributed DP of the classifier: central and local figures
            out["privacy"]["distributed_classifier"] = secure["classifier"]
    return out


def _log_round(record: dict[str, Any], rounds: int) -> None:
    parts = []
    for site in record["sites"]:
        # the site's spend over all its models (basic composition), as the closing summary and the audit report it
        eps = sum(float(v.get("epsilon", 0.0)) for v in record["ledger"].get(site["name"], {}).values())
        parts.append(f"{site['name']}={site['status']}(eps {eps:.2f})")
    ev = record["evaluate"]
    phases = ", ".join(f"{name.replace('_', ' ')} {seconds:.0f}s" for name, seconds in record["phases_s"].items())
    log(
        INFO,
        "Round %s/%s done in %.1fs (%s) | sites: %s | plane-acc %.3f | denoise-loss %.4f",
        record["round"], rounds, record["round_s"], phases, ", ".join(parts),
        ev.get("plane-accuracy", float("nan")), ev.get("denoise-loss", float("nan")),
    )
