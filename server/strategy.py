"""Strategy choice and the wrapper that guards aggregation (validation, budgets, bookkeeping).

Concerns are added by wrapping any ``flwr.serverapp.strategy`` strategy, as Flower's own
``DifferentialPrivacyServerSideFixedClipping`` does. The server drives the wrapper through the strategy's public
steps, one round at a time with the true round number (:func:`server.federation.fl_round`).

A site is not trusted to be honest: its reply must be float32, may move each parameter no further than the
optimizer it was told to use can move it (:func:`adam_max_displacement`), may not claim more examples than its
first reply did, keeps the name its Flower node id first used, and reports an epsilon that never decreases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, get_args

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.supercore import log

from common.active_learning.release_sync import Held
from common.core.config import RunConfig, StrategyName
from common.core.errors import ConfigError, ReplyValidationError
from common.federated import update_bound as _bound
from common.federated.flwr_records import held_from_config, record_nbytes, record_to_arrays, validate_arrays

# The update bound lives in common (each site checks its own update against it under SecAgg+); re-exported.
UpdateBound, update_bounds = _bound.UpdateBound, _bound.update_bounds
adam_max_displacement = _bound.adam_max_displacement

# Per node, the extra records a train message carries (the release delta for that site).
ExtraRecords = Callable[[int], Mapping[str, ArrayRecord | ConfigRecord]]

# Sites reply with :func:`common.models.bundle.federated_arrays`, which casts every array to float32.
REPLY_DTYPE = np.dtype(np.float32)
# A site's real training examples (``num-examples``) above this are absurd (a hospital holds thousands).
MAX_EXAMPLES = 1_000_000
# Aggregators that already damp one large update (the outlier warning is for the averaging ones).
ROBUST = (FedMedian, FedTrimmedAvg, MultiKrum, Bulyan)


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
        # FedProx only puts "proximal-mu" into the train config; the sites take mu from their run config instead
        # (one source of truth) and apply it in common.federated.local_update.local_train. Server-side it is FedAvg.
        return FedProx(**common, proximal_mu=fed.proximal_mu)
    if fed.strategy == "fedadam":
        return FedAdam(**common, eta=fed.fedadam_eta, eta_l=cfg.train.lr, tau=fed.fedadam_tau)
    if fed.strategy == "fedmedian":
        return FedMedian(**common)
    if fed.strategy == "trimmedmean":
        return FedTrimmedAvg(**common, beta=fed.trimmed_beta)
    if fed.strategy == "krum":
        return Krum(**common, num_malicious_nodes=max(0, (cfg.data.num_sites - 3) // 2))
    raise ConfigError(f"federation.strategy={fed.strategy!r} is unknown; choose one of {list(get_args(StrategyName))}")


@dataclass
class SiteReport:
    """What the server learned about one site in one round."""

    node_id: int
    name: str = "?"
    status: str = "ok"  # ok | budget-exhausted | failed | rejected | unavailable | not-sampled
    reason: str = ""
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)  # the site's handler time per message type
    num_examples: int = 0
    update_norms: dict[str, float] = field(default_factory=dict)  # L2 norm of (reply - sent) per model part
    update_max: dict[str, float] = field(default_factory=dict)  # largest change of one parameter per model part
    warnings: list[str] = field(default_factory=list)  # accepted but suspicious (an outlying update under FedAvg)
    release_held: Held | None = None  # what the site says it holds of the release after this round

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe view."""
        out = dict(self.__dict__)
        out["release_held"] = self.release_held.count if self.release_held is not None else None
        return out


def _no_extra_records(node: int) -> Mapping[str, ArrayRecord | ConfigRecord]:
    return {}


def _split_link_errors(replies: Iterable[Message]) -> tuple[list[Message], list[str]]:
    """Separate the SuperLink's own error replies (e.g. "Node Unavailable" for a dead SuperNode) from site replies."""
    sites, errors = [], []
    for msg in replies:
        if msg.metadata.src_node_id == SUPERLINK_NODE_ID and msg.has_error():
            errors.append(str(msg.error.reason))
        else:
            sites.append(msg)
    return sites, errors


def _contested_names(replies: Iterable[Message]) -> dict[str, list[int]]:
    """Site names claimed by more than one node in one batch of replies (neither may take it by arriving first)."""
    claims: dict[str, list[int]] = {}
    for msg in replies:
        if not msg.has_error() and isinstance(site := msg.content.get("site"), ConfigRecord):
            claims.setdefault(str(site.get("name", "")), []).append(msg.metadata.src_node_id)
    return {name: sorted(nodes) for name, nodes in claims.items() if len(set(nodes)) > 1}


def _check_privacy(who: str, privacy: object, before: Mapping[str, float]) -> dict[str, float]:
    """Each model's cumulative epsilon: a number >= 0, within the site's own budget, never below the last one."""
    if not isinstance(privacy, dict):
        raise ReplyValidationError(f"{who}: 'privacy' must be a JSON object per model, got {type(privacy).__name__}")
    out = {}
    for model, entry in privacy.items():
        eps = entry.get("epsilon") if isinstance(entry, dict) else None
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ReplyValidationError(f"{who}: epsilon of {model!r} must be a number >= 0, got {eps!r}")
        budget = entry.get("budget_epsilon")
        if isinstance(budget, (int, float)) and eps > budget * (1 + 1e-9) + 1e-12:
            raise ReplyValidationError(f"{who}: epsilon of {model!r} = {eps:.4g} exceeds its own budget {budget:.4g}")
        if eps < before.get(model, 0.0) * (1 - 1e-9):
            raise ReplyValidationError(f"{who}: cumulative epsilon of {model!r} decreased from "
                                       f"{before[model]:.4g} to {eps:.4g}")
        out[str(model)] = float(eps)
    return out


class GuardedStrategy(Strategy):
    """Wrap a strategy: validate replies before aggregation, skip exhausted sites, keep per-site reports.

    A reply with an error, missing keys, wrong shapes or dtype, non-finite values, an update larger than the
    sites' optimizer can make, an inflated example count, another site's name or a shrinking epsilon is rejected
    and logged with the site's name; it never reaches the wrapped strategy's aggregation.

    Parameters
    ----------
    update_bounds:
        Per model part (the array names' first component), what the sites were told to do (:func:`update_bounds`);
        each array of a reply may then differ from the weights sent this round by at most ``slack`` times the
        optimizer's worst case, plus float32 rounding. ``None``: updates are measured but not bounded.
    slack:
        Factor on that worst case. The bound is already the worst case over all gradients, so 1.05 only covers
        the site's float32 arithmetic; raise it for sites that legitimately train longer than configured.
    outlier_factor:
        Under an averaging aggregator (not median, trimmed mean or Krum), warn when a site's update norm for a
        part exceeds this multiple of the median of the other sites' norms, or its example count that of theirs.
    max_examples:
        No site holds more real training examples than this.
    """

    def __init__(self, base: Strategy, *, expected_shapes: dict[str, tuple[int, ...]],
                 update_bounds: Mapping[str, UpdateBound] | None = None, slack: float = 1.05,
                 outlier_factor: float = 5.0, max_examples: int = MAX_EXAMPLES) -> None:
        if not slack >= 1 or not outlier_factor > 1 or max_examples < 1:
            raise ValueError(f"need slack >= 1, outlier_factor > 1, max_examples >= 1; got {slack}, {outlier_factor}, "
                             f"{max_examples}")
        self.base = base
        self.expected_shapes = expected_shapes
        self.limits = {part: (b, slack * b.max_displacement) for part, b in (update_bounds or {}).items()}
        self.bounded = update_bounds is not None
        self.slack, self.outlier_factor, self.max_examples = slack, outlier_factor, max_examples
        self.node_names: dict[int, str] = {}  # node id -> the name it registered or first reported (binding)
        self.examples: dict[int, int] = {}  # node id -> num-examples of its first accepted reply
        self.epsilons: dict[int, dict[str, float]] = {}  # node id -> model -> last accepted cumulative epsilon
        self.exhausted: set[int] = set()
        self.reports: dict[int, SiteReport] = {}
        self.asked: set[int] = set()  # the nodes this round's training was sent to (a sample at fraction-train < 1)
        self.sent: dict[str, np.ndarray] | None = None  # global weights of this round's train messages
        # Records added to each site's train message (its delta of the shared synthetic release).
        self.extra_train_records: ExtraRecords = _no_extra_records
        if not self.bounded:
            log(WARNING, "GuardedStrategy without update_bounds: a site's update size is not bounded")

    # -- bookkeeping -------------------------------------------------------------------------
    def begin_round(self) -> None:
        """Forget the previous round's reports, sample and weights."""
        self.reports = {}
        self.asked = set()
        self.sent = None

    def _report(self, node_id: int) -> SiteReport:
        if node_id not in self.reports:
            self.reports[node_id] = SiteReport(node_id=node_id, name=self.node_names.get(node_id, f"node-{node_id}"))
        return self.reports[node_id]

    # -- training ------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then drop sites that spent their budget; count bytes sent; keep the weights sent."""
        for node in grid.get_nodes():  # deployment: names registered with `flwr supernode register --name`
            if getattr(node, "name", ""):
                self.node_names.setdefault(node.node_id, node.name)
        self.sent = {k: v.astype(np.float64) for k, v in record_to_arrays(arrays).items()}
        messages = []
        for msg in self.base.configure_train(server_round, arrays, config, grid):
            node = msg.metadata.dst_node_id
            if node in self.exhausted:
                report = self._report(node)
                report.status, report.reason = "budget-exhausted", "skipped: privacy budget spent in an earlier round"
                continue
            extra = self.extra_train_records(node)
            if extra:  # the base strategy's messages share one RecordDict: give this node its own
                content = RecordDict({**dict(msg.content.items()), **extra})
                msg = Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node)
            self._report(node).bytes_down = sum(record_nbytes(r) for r in msg.content.values()
                                                if isinstance(r, (ArrayRecord, ConfigRecord)))
            self.asked.add(node)
            messages.append(msg)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply; aggregate only the valid ones through the wrapped strategy."""
        valid: list[Message] = []
        replies, link_errors = _split_link_errors(replies)
        contested = _contested_names(replies)
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
                self._validate_train_reply(msg, report, contested)
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
        if not isinstance(self.base, ROBUST):
            self._warn_outliers(server_round, [self._report(m.metadata.src_node_id) for m in valid])
        return self.base.aggregate_train(server_round, valid)

    def _mark_unanswered(self, server_round: int, answered: set[int], link_errors: list[str]) -> None:
        """Sites that were sent a task but never replied (the SuperLink reports them unavailable)."""
        for node, report in self.reports.items():
            if report.bytes_down > 0 and node not in answered and report.status == "ok":
                report.status = "unavailable"
                report.reason = link_errors[0] if link_errors else "no reply"
                log(WARNING, "Round %s: %s did not reply (%s)", server_round, report.name, report.reason)

    def _validate_train_reply(self, msg: Message, report: SiteReport, contested: Mapping[str, list[int]]) -> None:
        """Check every field; bind the name, example count and epsilon only once the whole reply is accepted."""
        content = msg.content
        if "site" not in content or "arrays" not in content or "metrics" not in content:
            raise ReplyValidationError(f"{report.name}: reply lacks one of 'site', 'arrays', 'metrics'")
        site, arrays, metrics = content["site"], content["arrays"], content["metrics"]
        if not (isinstance(site, ConfigRecord) and isinstance(arrays, ArrayRecord)
                and isinstance(metrics, MetricRecord)):
            raise ReplyValidationError(f"{report.name}: 'site', 'arrays' and 'metrics' must be a config, an array "
                                       "and a metric record")
        name = self._check_name(report.node_id, str(site.get("name", report.name)), contested)
        report.name = name
        report.status = str(site.get("status", "ok"))
        if report.status not in ("ok", "budget-exhausted"):
            raise ReplyValidationError(f"{name}: status {report.status!r} is neither 'ok' nor 'budget-exhausted'")
        try:
            report.metrics = json.loads(str(site.get("metrics", "{}")))
            report.privacy = json.loads(str(site.get("privacy", "{}")))
            report.reason = "; ".join(str(m) for m in json.loads(str(site.get("messages", "[]"))))
            report.compute_s["train"] = float(site.get("compute-s", 0.0))  # type: ignore[arg-type]
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ReplyValidationError(f"{name}: site record is malformed: {exc}") from exc
        report.bytes_up = record_nbytes(arrays)
        report.release_held = held_from_config(site)
        received = record_to_arrays(arrays)
        validate_arrays(received, self.expected_shapes, who=name)
        for key, value in received.items():
            if value.dtype != REPLY_DTYPE:
                raise ReplyValidationError(f"{name}: array {key!r} is {value.dtype}, expected {REPLY_DTYPE} "
                                           "(what the server sends and the sites' models hold)")
        self._measure_update(received, report)
        for key, value in metrics.items():
            if not np.all(np.isfinite(np.asarray(value, dtype=float))):
                raise ReplyValidationError(f"{name}: metric {key!r} is not finite ({value})")
        report.num_examples = self._check_examples(report, metrics.get("num-examples"))
        epsilons = _check_privacy(name, report.privacy, self.epsilons.get(report.node_id, {}))
        # accepted: bind what later replies are held to
        self.node_names[report.node_id] = name
        if report.status == "ok":
            self.examples.setdefault(report.node_id, report.num_examples)
        self.epsilons[report.node_id] = {**self.epsilons.get(report.node_id, {}), **epsilons}

    def _check_name(self, node: int, claimed: str, contested: Mapping[str, list[int]]) -> str:
        """The node's name: the one it registered or first reported; another site's name is never accepted."""
        bound = self.node_names.get(node)
        owner = next((n for n, other in self.node_names.items() if other == claimed and n != node), None)
        holder = f", the name of node {owner}" if owner is not None else ""
        if bound is not None and claimed != bound:
            raise ReplyValidationError(f"{bound}: node {node} is {bound!r} but its reply claims {claimed!r}{holder}")
        if owner is not None:
            raise ReplyValidationError(f"node-{node}: node {node} claims {claimed!r}{holder}")
        if bound is None and len(contested.get(claimed, [])) > 1:
            raise ReplyValidationError(f"node-{node}: nodes {contested[claimed]} all claim {claimed!r} in the same "
                                       "round; none is given the name")
        return claimed

    def _measure_update(self, received: Mapping[str, np.ndarray], report: SiteReport) -> None:
        """Norms of (reply - weights sent) per part; reject a change no honest optimizer step could make."""
        if self.sent is None:
            if self.bounded:
                raise ReplyValidationError(f"{report.name}: no global weights were sent this round to measure the "
                                           "update against")
            return
        squares: dict[str, float] = {}
        for key, value in received.items():
            part, sent = key.split(".", 1)[0], self.sent.get(key)
            if sent is None:
                raise ReplyValidationError(f"{report.name}: array {key!r} was not sent this round")
            delta = np.abs(value.astype(np.float64) - sent)
            moved = float(delta.max(initial=0.0))
            squares[part] = squares.get(part, 0.0) + float(np.square(delta).sum())
            report.update_max[part] = max(report.update_max.get(part, 0.0), moved)
            if not self.bounded:
                continue
            if part not in self.limits:
                raise ReplyValidationError(f"{report.name}: no update bound for model part {part!r}")
            bound, limit = self.limits[part]
            # float32 rounding of the site's parameter after each step (half an ulp, counted as a whole one)
            rounding = bound.steps * np.finfo(np.float32).eps * (np.abs(sent) + limit)
            if (delta > limit + rounding).any():
                raise ReplyValidationError(
                    f"{report.name}: update moves {key!r} by up to {moved:.3g}; {bound.steps} Adam steps of lr "
                    f"{bound.lr:g} move a parameter by at most {limit:.3g} (slack {self.slack:g})")
        # The per-parameter bound b implies ||delta||_2 <= sqrt(n) * b; the norm is kept for the outlier warning.
        report.update_norms = {part: math.sqrt(sq) for part, sq in squares.items()}

    def _check_examples(self, report: SiteReport, value: object) -> int:
        """``num-examples`` (real training examples, :func:`common.federated.local_update.local_train`): a sane integer, at
        most what the node first reported (the synthetic release it is sent is not counted in it)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not float(value).is_integer():
            raise ReplyValidationError(f"{report.name}: metric 'num-examples' must be an integer, got {value!r}")
        n = int(value)
        least = 1 if report.status == "ok" else 0  # a site that trained had data; an exhausted one reports 0
        if not least <= n <= self.max_examples:
            raise ReplyValidationError(f"{report.name}: metric 'num-examples' = {n} is outside [{least}, "
                                       f"{self.max_examples}]")
        first = self.examples.get(report.node_id)
        if first is not None and n > first:
            raise ReplyValidationError(f"{report.name}: claims {n} examples, but first reported {first}")
        return n

    def _warn_outliers(self, server_round: int, reports: list[SiteReport]) -> None:
        """Warn (log and report) about a site whose update or example count dwarfs the others' under averaging."""
        if len(reports) < 2:
            return
        parts = sorted({p for r in reports for p in r.update_norms})
        for report in reports:
            others = [o for o in reports if o is not report]
            checks = [(f"update norm of {p!r}", report.update_norms.get(p, 0.0),
                       float(np.median([o.update_norms.get(p, 0.0) for o in others]))) for p in parts]
            median_examples = float(np.median([o.num_examples for o in others]))
            checks.append(("num-examples", float(report.num_examples), median_examples))
            for what, value, median in checks:
                if median > 0 and value > self.outlier_factor * median:
                    text = (f"{report.name}: {what} is {value:.3g}, {value / median:.1f}x the other sites' median "
                            f"({median:.3g}): an outlier that {type(self.base).__name__} averages in unchanged")
                    report.warnings.append(text)
                    log(WARNING, "Round %s: %s", server_round, text)

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
            node = msg.metadata.src_node_id
            unasked = node not in self.reports and node not in self.asked  # evaluated, never asked to train
            report = self._report(node)
            if unasked:
                report.status = "not-sampled"
                report.reason = ("not asked to train this round: outside its sample (federation.fraction-train < 1) "
                                 "or connected after the training was sent")
            if msg.has_error():
                log(WARNING, "Round %s: evaluation failed at %s: %s", server_round, report.name, msg.error.reason)
                continue
            try:  # a malformed evaluation is dropped (logged), never a crash of the round
                if "site" in msg.content:
                    site = msg.content["site"]
                    report.evaluation = json.loads(str(site.get("metrics", "{}")))
                    report.compute_s["evaluate"] = float(site.get("compute-s", 0.0))  # type: ignore[arg-type]
                metrics = msg.content["metrics"]
                if not all(np.all(np.isfinite(np.asarray(v, dtype=float))) for v in metrics.values()):
                    raise ValueError("a metric is not finite")
                if not 0 <= float(metrics.get("num-examples", -1)) <= self.max_examples:  # type: ignore[arg-type]
                    raise ValueError(f"num-examples {metrics.get('num-examples')!r} is not in [0, {self.max_examples}]")
            except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
                log(WARNING, "Round %s: rejected evaluation of %s: %s", server_round, report.name, exc)
                continue
            valid.append(msg)
        return self.base.aggregate_evaluate(server_round, valid) if valid else None

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        log(INFO, "\t├──> GuardedStrategy around %s (reply validation, %s, budget tracking)",
            type(self.base).__name__, f"update bound x{self.slack:g}" if self.bounded else "updates unbounded")
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
