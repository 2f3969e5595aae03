"""One training round through Flower's SecAgg+ (``federation.secure-aggregation``): the server sees only the sum.

Flower's ``SecAggPlusWorkflow`` runs inside this ServerApp's own round loop (:func:`server.federation.fl_round`):
each round gets a ``LegacyContext`` holding the global weights, a legacy ``FedAvg`` (:class:`SecAggFedAvg`) and a
client manager of the live nodes. The workflow's four stages (setup, share keys, collect masked vectors, unmask) go
to the sites' ``secaggplus_mod`` (:mod:`client.secure`); the workflow unmasks only the weighted sum and hands every
site's legacy ``FitRes`` to the strategy with that sum as its parameters, so nothing here ever holds a site's update.

What the server still reads per site is the plaintext record each site attaches (name, status, privacy figures,
step counts) and the byte counts of its messages. The checks of individual updates move to the sites
(:func:`common.federated.secure_update.check_site_update`, before masking) and to the sum
(:func:`common.federated.secure_update.check_sum`). A site that drops out after sharing its keys is survived while
every site keeps ``reconstruction_threshold`` live neighbours (its masks are reconstructed from their shares); below
that the workflow halts, the round changes nothing, and the run goes on with the next round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore import log

from common.core.config import RunConfig
from common.core.errors import ReplyValidationError
from common.federated.flwr_records import ROUND_KEY, arrays_to_record
from common.federated.secure_update import SLACK, bounds_for, check_sum, flatten, from_bound_units, unflatten
from common.models.bundle import ModelBundle, federated_arrays
from common.privacy.distributed_dp import CLIP_RANGE, MODULUS, from_secagg_mean, plan_for
from server.strategy import GuardedStrategy, _check_privacy

# SecAgg+'s mask modulus (Flower's default and maximum).
MASK_MODULUS = 2**32
# The fit instructions' key for the number of sites sampled (client.secure.SAMPLED_KEY).
SAMPLED_KEY = "secagg-sampled"


def message_nbytes(msg: Message) -> int:
    """Payload bytes of a message: arrays' bytes, config values' bytes (``bytes`` as is, others as text), 8 per
    metric. The SecAgg+ key shares and masked vectors are ``bytes`` in config records."""
    if msg.has_error():
        return len(str(msg.error.reason).encode())
    total = 0
    for record in msg.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, ConfigRecord):
            for key, value in record.items():
                items = value if isinstance(value, list) else [value]
                total += len(key) + sum(len(v) if isinstance(v, bytes) else len(str(v)) for v in items)
        elif isinstance(record, MetricRecord):
            total += 8 * len(record)
    return total


def _failure_reason(failure: object) -> str:
    """The site's reason inside the workflow's ``Exception(msg.error)``."""
    args = getattr(failure, "args", ())
    return str(getattr(args[0], "reason", args[0])) if args else str(failure)


class CountingGrid:
    """A ``Grid`` that counts each node's bytes down and up (all SecAgg+ stages) and delegates the rest."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Count, delegate, count."""
        messages = list(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + message_nbytes(msg)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            node = msg.metadata.src_node_id
            self.up[node] = self.up.get(node, 0) + message_nbytes(msg)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SecAggFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg as the SecAgg+ workflow drives it: samples every live node, keeps what it is given.

    ``aggregate_fit`` receives each site's ``FitRes`` whose parameters the workflow replaced by the unmasked
    aggregate; it keeps the aggregate and the sites' plaintext records (never an individual update).
    """

    def __init__(self) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                         accept_failures=True)
        self.results: list[tuple[int, FitRes]] = []
        self.failures: list[BaseException | tuple[ClientProxy, FitRes]] = []
        self.aggregate: list[np.ndarray] | None = None
        self.sampled: list[int] = []

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Every registered node, with the true round and the number of sites sampled in the config."""
        clients = sorted(client_manager.all().values(), key=lambda c: c.node_id)
        self.sampled = [int(c.node_id) for c in clients]
        config = {ROUND_KEY: server_round, SAMPLED_KEY: len(clients)}
        return [(client, FitIns(parameters, dict(config))) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        """Keep the unmasked aggregate (identical in every result) and each site's plaintext record."""
        self.results = [(int(proxy.node_id), res) for proxy, res in results]
        self.failures = list(failures)
        if results:
            self.aggregate = [np.asarray(a) for a in parameters_to_ndarrays(results[0][1].parameters)]
            for _, res in results:  # every FitRes carries the same sum; one site's update is nowhere
                res.parameters = Parameters(tensors=[], tensor_type="")
        return (ndarrays_to_parameters(self.aggregate) if self.aggregate is not None else None), {}


class RecordingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow``, unchanged, recording at which stage it halted and its protocol sizes."""

    halted_at: str | None = None
    state: WorkflowState | None = None

    def __call__(self, grid: Grid, context: Context) -> None:
        """Run the four stages as Flower's ``__call__`` does; remember the stage that stopped the protocol."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        self.state = state = WorkflowState()
        self.halted_at = None
        for step in (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage):
            if not step(grid, context, state):
                self.halted_at = step.__name__
                log(INFO, "Secure aggregation halted at %s.", step.__name__)
                return
        log(INFO, "Secure aggregation completed.")


@dataclass
class SecureAggregation:
    """The run's secure-aggregation rounds: the workflow's settings, and the distributed-DP history of sums."""

    cfg: RunConfig
    guard: GuardedStrategy
    contributors: list[int] = field(default_factory=list)  # shares in each completed round's sum (distributed DP)
    last: dict[str, Any] = field(default_factory=dict)  # the summary of the latest round (for metrics.jsonl)

    def workflow(self) -> RecordingSecAggPlusWorkflow:
        """Flower's workflow with the run's shares, threshold and weights, on the grid the encoding assumes."""
        fed = self.cfg.federation
        return RecordingSecAggPlusWorkflow(
            num_shares=float(fed.secagg_shares), reconstruction_threshold=float(fed.secagg_threshold),
            max_weight=float(fed.secagg_max_weight), clipping_range=CLIP_RANGE, quantization_range=MODULUS,
            modulus_range=MASK_MODULUS, timeout=fed.reply_timeout_s)

    def train(self, grid: Grid, bundle: ModelBundle, server_round: int) -> tuple[ArrayRecord | None,
                                                                                  MetricRecord | None]:
        """One SecAgg+ training round: the new global arrays (``None`` when nothing was summed) and the metrics."""
        guard = self.guard
        sent = federated_arrays(bundle)
        counting = CountingGrid(grid)
        manager = SimpleClientManager()
        for node in grid.get_nodes():
            if getattr(node, "name", ""):
                guard.node_names.setdefault(node.node_id, node.name)
            if node.node_id in guard.exhausted:
                report = guard._report(node.node_id)
                report.status, report.reason = "budget-exhausted", "skipped: privacy budget spent in an earlier round"
                continue
            manager.register(GridClientProxy(node_id=node.node_id, grid=counting, run_id=grid.run.run_id))
        legacy = SecAggFedAvg()
        context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}), strategy=legacy, client_manager=manager)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(list(sent.values())), keep_input=True)
        workflow = self.workflow()
        error = ""
        try:
            workflow(counting, context)
        except Exception as exc:  # noqa: BLE001 - a protocol failure fails the round, not the run
            error = f"{type(exc).__name__}: {exc}"
            workflow.halted_at = workflow.halted_at or "exception"
            log(WARNING, "Round %s: secure aggregation failed: %s", server_round, error)
        state = workflow.state
        if legacy.aggregate is None and state is not None:  # halted after collecting: the vectors it had collected
            legacy.results = [(int(proxy.node_id), res) for proxy, res in state.legacy_results]
        summed = {node for node, _ in legacy.results}
        summary: dict[str, Any] = {
            "status": "ok" if legacy.aggregate is not None and not error else "halted",
            "halted_at": workflow.halted_at, "error": error,
            "sampled": len(legacy.sampled), "summed": len(summed),
            "num_shares": state.num_shares if state else 0, "threshold": state.threshold if state else 0,
            "distributed_dp": self.cfg.privacy.distributed_dp,
        }
        reasons = "; ".join(_failure_reason(f) for f in legacy.failures)
        for node in legacy.sampled:
            report = guard._report(node)
            report.bytes_down, report.bytes_up = counting.down.get(node, 0), counting.up.get(node, 0)
            if node not in summed:
                report.status = "unavailable"
                report.reason = "dropped out of the SecAgg+ round before its masked vector was collected" + (
                    f" ({reasons})" if reasons else "")
        for node, res in legacy.results:
            self._read_site(server_round, node, res)
        aggregated = None
        if summary["status"] == "ok":
            try:
                aggregated = self._unpack(sent, legacy.aggregate or [], len(summed), legacy.results)
            except ReplyValidationError as exc:
                summary.update(status="halted", error=f"the secure sum failed its check: {exc}")
                log(WARNING, "Round %s: %s", server_round, summary["error"])
        if summary["status"] != "ok":
            why = (f"SecAgg+ {summary['halted_at'] or 'check'}: {summary['error'] or 'too few live sites'} "
                   f"({len(summed)} of {len(legacy.sampled)} sites' vectors collected, threshold "
                   f"{summary['threshold']}); the round changes nothing and the run goes on")
            summary["reason"] = why
            for node in legacy.sampled:
                report = guard._report(node)
                if report.status == "ok":
                    report.status, report.reason = "secagg-halted", why
            log(WARNING, "Round %s: %s", server_round, why)
        elif self.cfg.privacy.distributed_dp:
            self.contributors.append(len(summed))
        if self.cfg.privacy.distributed_dp:
            summary["distributed_dp"] = self.distributed_summary(len(flatten(list(sent.values()))))
            for report in guard.reports.values():  # each site's ledger entry carries both figures
                if report.privacy.get("distributed"):
                    report.privacy["distributed"]["central_epsilon"] = summary["distributed_dp"]["central_epsilon"]
        self.last = summary
        if aggregated is None:
            return None, None
        ok = [r for n, r in legacy.results if guard._report(n).status == "ok"]
        return aggregated, MetricRecord({"num-examples": int(sum(guard._report(n).num_examples for n, _ in
                                                                 legacy.results)),
                                         "sites-summed": len(summed), "sites-trained": len(ok)})

    def distributed_summary(self, dim: int) -> dict[str, Any]:
        """The central figure (realised: each round with the shares its sum held) and each site's local one."""
        plan = plan_for(self.cfg, dim)
        local = {r.name: r.privacy.get("distributed", {}).get("local_epsilon")
                 for r in self.guard.reports.values() if r.privacy.get("distributed")}
        return {**plan.as_dict(), "contributors": list(self.contributors),
                "central_epsilon": plan.central_epsilon(self.contributors),
                "planned_central_epsilon": plan.central_epsilon([plan.num_sites] * plan.rounds),
                "local_epsilon": local,
                "statement": "site-level (epsilon, delta): central holds against the server and anyone who sees "
                             "only the sums; local is what each site keeps if the server and every other site "
                             "collude (its own noise share)"}

    def _read_site(self, server_round: int, node: int, res: FitRes) -> None:
        """A site's plaintext record: name, status, privacy figures and step counts (never its update)."""
        guard = self.guard
        report = guard._report(node)
        metrics = res.metrics
        try:
            claimed = str(metrics.get("site-name", report.name))
            report.name = guard._check_name(node, claimed, {})
            guard.node_names[node] = report.name
        except ReplyValidationError as exc:  # its vector is in the sum already: the server can only say so
            report.warnings.append(f"{exc} (its masked update is in the sum: SecAgg+ cannot drop it)")
        report.status = str(metrics.get("site-status", "ok"))
        try:
            report.metrics = json.loads(str(metrics.get("site-metrics", "{}")))
            privacy = json.loads(str(metrics.get("site-privacy", "{}")))
            report.reason = "; ".join(str(m) for m in json.loads(str(metrics.get("site-messages", "[]"))))
            epsilons = _check_privacy(report.name, privacy, guard.epsilons.get(node, {}))
            guard.epsilons[node] = {**guard.epsilons.get(node, {}), **epsilons}
            report.privacy = privacy
            if "site-distributed" in metrics:
                report.privacy = {**privacy, "distributed": json.loads(str(metrics["site-distributed"]))}
        except (ReplyValidationError, json.JSONDecodeError, TypeError, ValueError) as exc:
            report.warnings.append(f"site record rejected: {exc} (its masked update is in the sum)")
            log(WARNING, "Round %s: %s: %s", server_round, report.name, exc)
        report.num_examples = int(report.metrics.get("real-examples", 0)) if report.status == "ok" else 0
        if report.status == "budget-exhausted":
            guard.exhausted.add(node)

    def _unpack(self, sent: dict[str, np.ndarray], mean: list[np.ndarray], summed: int,
                results: list[tuple[int, FitRes]]) -> ArrayRecord:
        """The unmasked mean (bound units, or the distributed-DP residues) -> checked new global arrays."""
        bounds = bounds_for(self.cfg)
        shapes = {k: v.shape for k, v in sent.items()}
        if self.cfg.privacy.distributed_dp:
            vector = flatten(mean)
            plan = plan_for(self.cfg, len(vector))
            units = unflatten(plan.decode(from_secagg_mean(vector, summed), summed), list(shapes.values()))
            check_sum(units, shapes, limit=None)
        else:
            units = [np.asarray(m, np.float64) for m in mean]
            total = sum(res.num_examples for _, res in results) / self.cfg.federation.secagg_max_weight
            check_sum(units, shapes, limit=SLACK * 1.01 + self.quantization_error(summed, total))
        return arrays_to_record(from_bound_units(sent, units, bounds))

    def quantization_error(self, summed: int, total_ratio: float) -> float:
        """Largest error SecAgg+'s stochastic quantization adds to one coordinate of the mean (bound units):
        each site's weighted vector is rounded to a ``2c / M`` grid, the mean divides by the total weight ratio."""
        if not total_ratio > 0:
            return math.inf
        return summed * (2 * CLIP_RANGE / MODULUS) / total_ratio
