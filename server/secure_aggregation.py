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
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
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
from common.core.seeding import derive_seed
from common.federated.fedsgd import ServerAdam, trainable_names
from common.federated.flwr_records import ROUND_KEY, arrays_to_record
from common.federated.secure_update import (
    CLASSIFIER_TASK,
    FEDSGD_STATE,
    SLACK,
    STEP_KEY,
    TASK_KEY,
    bounds_for,
    check_sum,
    flatten,
    from_bound_units,
    unflatten,
)
from common.models.bundle import ModelBundle, federated_arrays
from common.models.downstream import federated_state, load_federated_state
from common.privacy.distributed_dp import (
    CLIP_RANGE,
    MODULUS,
    classifier_noise_multiplier,
    classifier_plan,
    from_secagg_mean,
    min_shares,
    plan_for,
)
from common.privacy.ledger import history_epsilon
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


def secure_sample_size(live: int, fraction: float) -> int:
    """How many of ``live`` sites a SecAgg+ round samples at ``federation.fraction-train``: the plain path's count
    (``int(live * fraction)``, Flower's FedAvg) raised to the 2 sites a secure sum needs, and at most ``live``."""
    return min(live, max(2, int(live * fraction)))


class SecAggFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg as the SecAgg+ workflow drives it: samples the sites, keeps what it is given.

    Every registered node takes part, or with ``fraction`` < 1 a sample of :func:`secure_sample_size` of them drawn
    from ``rng`` (seeded by the run and round, so a resumed round samples the same sites). ``aggregate_fit``
    receives each site's ``FitRes`` whose parameters the workflow replaced by the unmasked aggregate; it keeps the
    aggregate and the sites' plaintext records (never an individual update).
    """

    def __init__(self, extra_config: dict[str, Any] | None = None, *, fraction: float = 1.0,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                         accept_failures=True)
        self.results: list[tuple[int, FitRes]] = []
        self.failures: list[BaseException | tuple[ClientProxy, FitRes]] = []
        self.aggregate: list[np.ndarray] | None = None
        self.sampled: list[int] = []
        self.extra_config = dict(extra_config or {})  # e.g. a DP-FedSGD sub-round's task and step
        if fraction < 1 and rng is None:
            raise ValueError("sampling a fraction of the sites needs the round's rng")
        self.fraction, self.rng = fraction, rng

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The sampled nodes, with the true round and the number of sites sampled in the config."""
        clients = sorted(client_manager.all().values(), key=lambda c: c.node_id)
        if self.fraction < 1 and self.rng is not None:
            keep = self.rng.choice(len(clients), size=secure_sample_size(len(clients), self.fraction), replace=False)
            clients = [clients[i] for i in sorted(keep)]
        self.sampled = [int(c.node_id) for c in clients]
        config = {ROUND_KEY: server_round, SAMPLED_KEY: len(clients), **self.extra_config}
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
    # privacy.distributed-classifier: the shares in each DP-FedSGD step's sum over the run, and the server's Adam
    classifier_contributors: list[int] = field(default_factory=list)
    adam: ServerAdam | None = None

    def __post_init__(self) -> None:
        if self.adam is None:
            self.adam = ServerAdam(self.cfg.privacy.distributed_lr)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The DP-FedSGD server optimizer's moments, named for the checkpoint's strategy state."""
        assert self.adam is not None
        return {FEDSGD_STATE + k: v for k, v in self.adam.state_arrays().items()}

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_arrays` (other keys are ignored)."""
        assert self.adam is not None
        self.adam.load_state_arrays({k[len(FEDSGD_STATE):]: v for k, v in state.items() if k.startswith(FEDSGD_STATE)})

    def train_classifier(self, grid: Grid, bundle: ModelBundle, server_round: int) -> dict[str, Any]:
        """``privacy.distributed-classifier``: this round's DP-FedSGD steps of the classifier, one SecAgg+ sub-round
        each; the classifier in ``bundle`` is updated in place. Returns the summary for the round record.

        Each sub-round the server decodes the noisy sum of the sites' clipped gradient sums (the noise of ``N``
        shares once), divides it by the number of sites summed (public) and takes an Adam step. A halted sub-round
        changes nothing and the next one goes on; the realised central epsilon counts the shares each sum held.
        """
        assert self.adam is not None
        p = self.cfg.privacy
        names = trainable_names(bundle.classifier)
        state = federated_state(bundle.classifier)
        shapes = [tuple(state[n].shape) for n in names]
        params = flatten([state[n].detach().cpu().double().numpy() for n in names])
        sigma = classifier_noise_multiplier(self.cfg)  # what each site's ledger accounts: a sum of `least` shares
        plan = classifier_plan(self.cfg, len(params), sigma)
        least = min_shares(self.cfg)
        done, halted = 0, []
        live = len([n for n in grid.get_nodes() if n.node_id not in self.guard.exhausted])
        steps = p.distributed_steps
        if live < least:  # every site would decline: the sum could hold fewer shares than its ledger accounts
            halted.append({"step": 0, "halted_at": "setup", "error": f"{live} sites reachable, the classifier's sums "
                           f"need {least} (privacy.distributed-min-shares); its steps are skipped this round"})
            log(WARNING, "Round %s: %s", server_round, halted[-1]["error"])
            steps = 0
        for step in range(steps):
            arrays = [a.astype(np.float32) for a in unflatten(params, shapes)]
            # Flower unmasks a sum only while >= `least` sites are live: no sum holds fewer shares than accounted
            legacy, summary = self._protocol(grid, arrays, server_round, {TASK_KEY: CLASSIFIER_TASK, STEP_KEY: step},
                                             sub_round=True, threshold=least)
            n = len(legacy.results)
            if summary["status"] != "ok" or legacy.aggregate is None:
                halted.append({"step": step, "halted_at": summary["halted_at"], "error": summary["error"]})
                log(WARNING, "Round %s: DP-FedSGD step %s halted (%s); the classifier keeps its weights",
                    server_round, step, summary["error"] or summary["halted_at"])
                continue
            if not any(str(res.metrics.get("site-status", "")) == "ok" for _, res in legacy.results):
                # every summed site declined (budget spent, over the example cap): the sum is noise only
                halted.append({"step": step, "halted_at": "sites", "error": "no site contributed a gradient"})
                log(WARNING, "Round %s: DP-FedSGD step %s: no site contributed a gradient; the classifier's steps "
                    "end for this round", server_round, step)
                break
            grad = plan.decode(from_secagg_mean(flatten(legacy.aggregate), n), n)
            if grad.shape != params.shape or not np.all(np.isfinite(grad)):
                halted.append({"step": step, "halted_at": "check", "error": "the secure sum is malformed"})
                continue
            params = self.adam.step(params, grad)
            self.classifier_contributors.append(n)
            done += 1
        load_federated_state(bundle.classifier, {n: torch.from_numpy(a.astype(np.float32))
                                                 for n, a in zip(names, unflatten(params, shapes))})
        delta = p.target_delta * p.budget_classifier
        realised = [(sigma * math.sqrt(n / least), 1.0, 1) for n in self.classifier_contributors]
        local = {r.name: r.privacy.get("classifier", {}).get("distributed", {}).get("local_epsilon")
                 for r in self.guard.reports.values() if r.privacy.get("classifier", {}).get("distributed")}
        return {"steps": done, "halted": halted, "noise_multiplier": sigma, "min_shares": least,
                "lr": p.distributed_lr, "contributors": list(self.classifier_contributors),
                "central_epsilon": history_epsilon(realised, delta, p.accountant),
                "enforced_central_epsilon": history_epsilon([(sigma, 1.0, len(realised))], delta, p.accountant),
                "planned_central_epsilon": history_epsilon([(sigma, 1.0, plan.rounds)], delta, p.accountant),
                "local_epsilon": local, "delta": delta, "noise_multiplier_all_sites": plan.noise_multiplier,
                **{k: v for k, v in plan.as_dict().items() if k not in ("noise_multiplier", "delta")},
                "statement": "example-level (epsilon, delta) of the classifier: central holds against the server "
                             "and anyone who sees only the secure sums (realised: with the shares each sum held; "
                             "enforced by each site's ledger: with min_shares shares, the fewest Flower unmasks); "
                             "local is what each site keeps if the server and every other site collude (its own "
                             "noise share)"}

    def workflow(self, threshold: int | None = None) -> RecordingSecAggPlusWorkflow:
        """Flower's workflow with the run's shares, threshold (or ``threshold`` sites) and weights, on the grid the
        encoding assumes."""
        fed = self.cfg.federation
        return RecordingSecAggPlusWorkflow(
            num_shares=float(fed.secagg_shares),
            reconstruction_threshold=float(fed.secagg_threshold) if threshold is None else int(threshold),
            max_weight=float(fed.secagg_max_weight), clipping_range=CLIP_RANGE, quantization_range=MODULUS,
            modulus_range=MASK_MODULUS, timeout=fed.reply_timeout_s)

    def _protocol(self, grid: Grid, arrays: list[np.ndarray], server_round: int,
                  extra_config: dict[str, Any] | None = None, *, sub_round: bool = False,
                  threshold: int | None = None) -> tuple[SecAggFedAvg, dict[str, Any]]:
        """One run of the SecAgg+ workflow over ``arrays`` (what the sites receive): the legacy strategy holding
        the unmasked sum (or ``None``) and the sites' plaintext records, and the protocol's summary; per-site byte
        counts, dropouts and records go to the guard's reports (a ``sub_round`` leaves the sites' round status as
        their training set it and only adds warnings)."""
        guard = self.guard
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
        fraction = 1.0 if sub_round else self.cfg.federation.fraction_train  # DP-FedSGD steps sum every site
        legacy = SecAggFedAvg(extra_config, fraction=fraction,
                              rng=np.random.default_rng(derive_seed(self.cfg.seed, "secagg-sample", server_round)))
        context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}), strategy=legacy, client_manager=manager)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(list(arrays)), keep_input=True)
        workflow = self.workflow(threshold)
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
        if not sub_round:
            guard.asked.update(legacy.sampled)
        summary: dict[str, Any] = {
            "status": "ok" if legacy.aggregate is not None and not error else "halted",
            "halted_at": workflow.halted_at, "error": error,
            "sampled": len(legacy.sampled), "summed": len(summed),
            "num_shares": state.num_shares if state else 0, "threshold": state.threshold if state else 0,
            "distributed_dp": self.cfg.privacy.distributed_dp,
        }
        reasons = "; ".join(_failure_reason(f) for f in legacy.failures)
        summary["dropped"] = sorted(guard._report(n).name for n in legacy.sampled if n not in summed)
        for node in legacy.sampled:  # every stage's bytes (a round's DP-FedSGD sub-rounds add to its training's)
            report = guard._report(node)
            report.bytes_down += counting.down.get(node, 0)
            report.bytes_up += counting.up.get(node, 0)
            if node not in summed and sub_round:
                report.warnings.append(f"dropped out of a DP-FedSGD sub-round ({reasons or 'no reply'})")
            elif node not in summed:
                report.status = "unavailable"
                report.reason = "dropped out of the SecAgg+ round before its masked vector was collected" + (
                    f" ({reasons})" if reasons else "")
        for node, res in legacy.results:
            self._read_site(server_round, node, res, sub_round=sub_round)
        return legacy, summary

    def train(self, grid: Grid, bundle: ModelBundle, server_round: int) -> tuple[ArrayRecord | None,
                                                                                  MetricRecord | None]:
        """One SecAgg+ training round: the new global arrays (``None`` when nothing was summed) and the metrics."""
        guard = self.guard
        sent = federated_arrays(bundle)
        legacy, summary = self._protocol(grid, list(sent.values()), server_round)
        summed = {node for node, _ in legacy.results}
        aggregated = None
        if summary["status"] == "ok":
            try:
                aggregated = self._unpack(sent, legacy.aggregate or [], len(summed), legacy.results)
            except ReplyValidationError as exc:
                summary.update(status="halted", error=f"the secure sum failed its check: {exc}")
                log(WARNING, "Round %s: %s", server_round, summary["error"])
        if aggregated is not None and self.cfg.federation.strategy == "fedadam":
            aggregated = self._server_optimizer(server_round, sent, aggregated)
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

    def _server_optimizer(self, server_round: int, sent: dict[str, np.ndarray], mean: ArrayRecord) -> ArrayRecord:
        """FedAdam on the secure mean: Flower's own ``FedAdam`` (the guard's base strategy, whose moments the
        checkpoints keep) steps from the weights sent towards the mean, which it receives as its one reply, so the
        secure path takes exactly the plain path's server step."""
        base = self.guard.base
        base.current_arrays = {k: np.array(v) for k, v in sent.items()}  # what FedOpt.configure_train records
        reply = Message(content=RecordDict({base.arrayrecord_key: mean,
                                            "metrics": MetricRecord({base.weighted_by_key: 1})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        stepped, _ = base.aggregate_train(server_round, [reply])
        if stepped is None:
            raise RuntimeError(f"round {server_round}: FedAdam returned no arrays for the secure mean")
        return stepped

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

    def _read_site(self, server_round: int, node: int, res: FitRes, *, sub_round: bool = False) -> None:
        """A site's plaintext record: name, status, privacy figures and step counts (never its update).

        A DP-FedSGD ``sub_round``'s record updates the site's privacy figures only; its status and messages become
        warnings when they are not "ok" (the round's status is its training's)."""
        guard = self.guard
        report = guard._report(node)
        metrics = res.metrics
        try:
            claimed = str(metrics.get("site-name", report.name))
            report.name = guard._check_name(node, claimed, {})
            guard.node_names[node] = report.name
        except ReplyValidationError as exc:  # its vector is in the sum already: the server can only say so
            report.warnings.append(f"{exc} (its masked update is in the sum: SecAgg+ cannot drop it)")
        status = str(metrics.get("site-status", "ok"))
        try:
            site_metrics = json.loads(str(metrics.get("site-metrics", "{}")))
            privacy = json.loads(str(metrics.get("site-privacy", "{}")))
            reason = "; ".join(str(m) for m in json.loads(str(metrics.get("site-messages", "[]"))))
            epsilons = _check_privacy(report.name, privacy, guard.epsilons.get(node, {}))
            guard.epsilons[node] = {**guard.epsilons.get(node, {}), **epsilons}
            report.privacy = privacy
            if sub_round:
                if status != "ok":
                    report.warnings.append(f"DP-FedSGD sub-round: {status}: {reason}")
                return
            report.status, report.metrics, report.reason = status, site_metrics, reason
            if "site-distributed" in metrics:
                report.privacy = {**privacy, "distributed": json.loads(str(metrics["site-distributed"]))}
        except (ReplyValidationError, json.JSONDecodeError, TypeError, ValueError) as exc:
            report.warnings.append(f"site record rejected: {exc} (its masked update is in the sum)")
            log(WARNING, "Round %s: %s: %s", server_round, report.name, exc)
            if sub_round:
                return
            report.status = status
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
