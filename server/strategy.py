"""Strategy choice and the wrapper that guards aggregation (validation, budgets, bookkeeping).

Concerns are added by wrapping any ``flwr.serverapp.strategy`` strategy, as Flower's own
``DifferentialPrivacyServerSideFixedClipping`` does; ``Strategy.start`` is never copied.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy
from flwr.supercore import log

from common.config import RunConfig
from common.errors import ReplyValidationError
from common.flwr_records import record_nbytes, record_to_arrays, validate_arrays


def make_strategy(cfg: RunConfig) -> Strategy:
    """The configured base strategy (FedAvg, FedProx, FedAdam, FedMedian, trimmed mean or Krum)."""
    fed = cfg.federation
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": fed.min_sites,
    }
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "fedprox":
        return FedProx(**common, proximal_mu=fed.proximal_mu)
    if fed.strategy == "fedadam":
        return FedAdam(**common, eta=1e-2, eta_l=cfg.train.lr, tau=1e-3)
    if fed.strategy == "fedmedian":
        return FedMedian(**common)
    if fed.strategy == "trimmedmean":
        return FedTrimmedAvg(**common, beta=fed.trimmed_beta)
    return Krum(**common, num_malicious_nodes=max(0, (cfg.data.num_sites - 3) // 2))


@dataclass
class SiteReport:
    """What the server learned about one site in one round."""

    node_id: int
    name: str = "?"
    status: str = "ok"  # ok | budget-exhausted | failed | rejected
    reason: str = ""
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)  # the site's handler time per message type

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe view."""
        return dict(self.__dict__)


def _split_link_errors(replies: Iterable[Message]) -> tuple[list[Message], list[str]]:
    """Separate the SuperLink's own error replies (e.g. "Node Unavailable" for a dead SuperNode) from site replies."""
    sites, errors = [], []
    for msg in replies:
        if msg.metadata.src_node_id == SUPERLINK_NODE_ID and msg.has_error():
            errors.append(str(msg.error.reason))
        else:
            sites.append(msg)
    return sites, errors


class GuardedStrategy(Strategy):
    """Wrap a strategy: validate replies before aggregation, skip exhausted sites, keep per-site reports.

    A reply with an error, missing keys, wrong shapes or non-finite values is rejected and logged with the
    site's name; it never reaches the wrapped strategy's aggregation.
    """

    def __init__(self, base: Strategy, *, expected_shapes: dict[str, tuple[int, ...]]) -> None:
        self.base = base
        self.expected_shapes = expected_shapes
        self.node_names: dict[int, str] = {}
        self.exhausted: set[int] = set()
        self.reports: dict[int, SiteReport] = {}
        # Records added to every train message (the shared synthetic release flows back to the sites).
        self.extra_train_records: dict[str, ArrayRecord] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def begin_round(self) -> None:
        """Forget the previous round's reports."""
        self.reports = {}

    def _report(self, node_id: int) -> SiteReport:
        if node_id not in self.reports:
            self.reports[node_id] = SiteReport(node_id=node_id, name=self.node_names.get(node_id, f"node-{node_id}"))
        return self.reports[node_id]

    # -- training ------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then drop sites that spent their budget; count bytes sent."""
        for node in grid.get_nodes():  # deployment: names registered with `flwr supernode register --name`
            if getattr(node, "name", ""):
                self.node_names.setdefault(node.node_id, node.name)
        messages = []
        size = record_nbytes(arrays) + sum(record_nbytes(r) for r in self.extra_train_records.values())
        for msg in self.base.configure_train(server_round, arrays, config, grid):
            for key, record in self.extra_train_records.items():
                msg.content[key] = record
            node = msg.metadata.dst_node_id
            if node in self.exhausted:
                report = self._report(node)
                report.status, report.reason = "budget-exhausted", "skipped: privacy budget spent in an earlier round"
                continue
            self._report(node).bytes_down = size
            messages.append(msg)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply; aggregate only the valid ones through the wrapped strategy."""
        valid: list[Message] = []
        replies, link_errors = _split_link_errors(replies)
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            report = self._report(node)
            if msg.has_error():
                report.status, report.reason = "failed", msg.error.reason
                log(WARNING, "Round %s: %s failed: %s", server_round, report.name, msg.error.reason)
                continue
            try:
                self._validate_train_reply(msg, report)
            except ReplyValidationError as exc:
                report.status, report.reason = "rejected", str(exc)
                log(WARNING, "Round %s: rejected reply of %s: %s", server_round, report.name, exc)
                continue
            if report.status == "budget-exhausted":
                self.exhausted.add(node)
                log(INFO, "Round %s: %s has spent its privacy budget and stops contributing", server_round, report.name)
                continue
            valid.append(msg)
        self._mark_unanswered(server_round, answered, link_errors)
        if not valid:
            log(WARNING, "Round %s: no valid reply; the global model is unchanged", server_round)
            return None, None
        # Arrival order is a race; floating-point sums are not associative: aggregate in site-name order.
        valid.sort(key=lambda m: (self._report(m.metadata.src_node_id).name, m.metadata.src_node_id))
        return self.base.aggregate_train(server_round, valid)

    def _mark_unanswered(self, server_round: int, answered: set[int], link_errors: list[str]) -> None:
        """Sites that were sent a task but never replied (the SuperLink reports them unavailable)."""
        for node, report in self.reports.items():
            if report.bytes_down > 0 and node not in answered and report.status == "ok":
                report.status = "unavailable"
                report.reason = link_errors[0] if link_errors else "no reply"
                log(WARNING, "Round %s: %s did not reply (%s)", server_round, report.name, report.reason)

    def _validate_train_reply(self, msg: Message, report: SiteReport) -> None:
        content = msg.content
        if "site" not in content or "arrays" not in content or "metrics" not in content:
            raise ReplyValidationError(f"{report.name}: reply lacks one of 'site', 'arrays', 'metrics'")
        site = content["site"]
        report.name = str(site.get("name", report.name))
        self.node_names[report.node_id] = report.name
        report.status = str(site.get("status", "ok"))
        try:
            report.metrics = json.loads(str(site.get("metrics", "{}")))
            report.privacy = json.loads(str(site.get("privacy", "{}")))
            report.reason = "; ".join(json.loads(str(site.get("messages", "[]"))))
        except json.JSONDecodeError as exc:
            raise ReplyValidationError(f"{report.name}: site record is not valid JSON: {exc}") from exc
        report.compute_s["train"] = float(site.get("compute-s", 0.0))  # type: ignore[arg-type]
        arrays = content["arrays"]
        report.bytes_up = record_nbytes(arrays)
        validate_arrays(record_to_arrays(arrays), self.expected_shapes, who=report.name)
        metrics = content["metrics"]
        for key, value in metrics.items():
            if not np.all(np.isfinite(np.asarray(value, dtype=float))):
                raise ReplyValidationError(f"{report.name}: metric {key!r} is not finite ({value})")
        if float(metrics.get("num-examples", -1)) < 0:  # type: ignore[arg-type]
            raise ReplyValidationError(f"{report.name}: metric 'num-examples' is missing or negative")

    # -- evaluation ----------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.base.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each site's full metrics, then delegate the weighted average."""
        valid = []
        replies, _ = _split_link_errors(replies)
        for msg in replies:
            report = self._report(msg.metadata.src_node_id)
            if msg.has_error():
                log(WARNING, "Round %s: evaluation failed at %s: %s", server_round, report.name, msg.error.reason)
                continue
            if "site" in msg.content:
                report.evaluation = json.loads(str(msg.content["site"].get("metrics", "{}")))
                report.compute_s["evaluate"] = float(msg.content["site"].get("compute-s", 0.0))  # type: ignore[arg-type]
            valid.append(msg)
        return self.base.aggregate_evaluate(server_round, valid) if valid else None

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        log(INFO, "\t├──> GuardedStrategy around %s (reply validation, budget tracking)", type(self.base).__name__)
        self.base.summary()

    # -- state for checkpoints -----------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server-optimizer state of the wrapped strategy (FedAdam's moments), flat and named."""
        out: dict[str, np.ndarray] = {}
        for attr in ("current_arrays", "m_t", "v_t"):
            value = getattr(self.base, attr, None)
            if isinstance(value, dict):
                out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        return out

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_arrays`."""
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            attr, _, name = key.partition("/")
            grouped.setdefault(attr, {})[name] = value
        for attr, value in grouped.items():
            setattr(self.base, attr, value)
