"""The site's side of secure aggregation: Flower's ``secaggplus_mod`` around the train handler, and the reply it masks.

Under ``federation.secure-aggregation`` the server runs Flower's ``SecAggPlusWorkflow`` (``server.secure_aggregation``):
four train messages per round (setup, share keys, collect masked vectors, unmask). Flower's ``secaggplus_mod`` answers
three of them itself and calls the train handler for the third, whose reply it quantizes, masks and strips of its
arrays before it leaves the site. The handler replies in the legacy ``FitRes`` layout the mod reads: the update in
bound units (:mod:`common.federated.secure_update`) as the parameters, the weight as ``num_examples``, and the
site's record (name, status, privacy) as plaintext string metrics.

Before masking the site checks its own update (finite, within the update bound: the checks the server can no longer
make). Under ``privacy.distributed-dp`` it clips the update, adds its discrete-Gaussian share of the noise and
encodes it on SecAgg+'s integer grid (:mod:`common.privacy.distributed_dp`); its shares are counted in
``distributed-dp.json`` in its state folder (its local epsilon is a function of that count).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from common.core.atomic_io import write_json_atomic
from common.core.config import RunConfig
from common.core.errors import ReplyValidationError
from common.core.seeding import derive_seed, secret_seed
from common.federated.flwr_records import ROUND_KEY
from common.federated.secure_update import (
    STEP_KEY,
    TASK_KEY,
    bounds_for,
    check_site_update,
    flatten,
    to_bound_units,
    unflatten,
)
from common.privacy.distributed_dp import classifier_plan, min_shares, plan_for, site_record, to_secagg_floats

if TYPE_CHECKING:
    from common.models.bundle import ModelBundle
    from common.privacy.ledger import PrivacyLedger

# Three of SecAgg+'s four stages (setup, share keys, unmask) never reach the train handler: in a deployment each
# message starts a fresh ClientApp process, so the models, Opacus and the ledger are imported where they are used,
# not here (a stage message then starts in about a second instead of eight on 2 cores).

# Error code of a site that refuses or fails a secure-aggregation step (Flower's codes are < 100; client.app: 700).
SECAGG_FAILURE = 701
DISTRIBUTED_FILE = "distributed-dp.json"
# The fit instructions' key for the number of sites SecAgg+ sampled this round (set by the server).
SAMPLED_KEY = "secagg-sampled"


class SecureAggregationRefused(RuntimeError):
    """The site will not answer this message the way it asks (e.g. a plain train message in a SecAgg+ run)."""


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ train messages; a plain train message is refused when the run is
    configured for secure aggregation (the site does not send a readable update to a server it agreed would see
    only sums). Other message types pass through."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    name = str(context.node_config.get("site-name", f"site-{context.node_config.get('partition-id', '?')}"))
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if _secure(context):
            return Message(Error(code=SECAGG_FAILURE, reason=f"site {name}: refused a plain train message: the run is "
                                 "configured with federation.secure-aggregation=true (the site sends masked updates "
                                 "only)"), reply_to=msg)
        return call_next(msg, context)

    def raising_next(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():  # the train handler's guard turned a failure into an error reply: abort the mod
            raise SecureAggregationRefused(str(reply.error.reason))
        return reply

    try:
        return secaggplus_mod(msg, context, raising_next)
    except Exception as exc:  # noqa: BLE001 - reported to the server (SecAgg+ counts the site as dropped)
        reason = str(exc) if isinstance(exc, SecureAggregationRefused) else f"site {name}: {type(exc).__name__}: {exc}"
        return Message(Error(code=SECAGG_FAILURE, reason=reason), reply_to=msg)


def _secure(context: Context) -> bool:
    """Whether the run is configured for secure aggregation (an unreadable config: the handler reports it)."""
    value = context.run_config.get("federation.secure-aggregation", "")
    if value != "":
        return str(value).lower() in ("true", "1")
    try:
        return RunConfig.from_run_config(context.run_config).federation.secure_aggregation
    except Exception:  # noqa: BLE001 - the train handler's guard reports a bad config with the site's name
        return False


def is_secure_train(msg: Message) -> bool:
    """Whether ``msg`` is SecAgg+'s collect-masked-vectors message (legacy fit instructions)."""
    return "fitins.parameters" in msg.content.array_records


def received(msg: Message, cfg: RunConfig) -> tuple[ModelBundle, int, int]:
    """The bundle loaded with the global weights of the fit instructions, the round, and the sites sampled."""
    from common.models.bundle import build_bundle, federated_arrays, load_federated_arrays

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    bundle = build_bundle(cfg)
    names = list(federated_arrays(bundle))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ReplyValidationError(f"fit instructions carry {len(arrays)} arrays, the model has {len(names)}")
    load_federated_arrays(bundle, dict(zip(names, arrays)))
    return bundle, int(fitins.config[ROUND_KEY]), int(fitins.config.get(SAMPLED_KEY, cfg.data.num_sites))


def _count_share(state_dir: Path, server_round: int) -> int:
    """Record that this site put a noise share into ``server_round``'s sum; the number of rounds it did so.

    A replayed round (resume) redraws the same share (keyed by the site secret), so it is counted once.
    """
    path = state_dir / DISTRIBUTED_FILE
    rounds = set(json.loads(path.read_text())["rounds"]) if path.is_file() else set()
    rounds.add(int(server_round))
    write_json_atomic(path, {"format": "difusal-distributed-dp/1", "rounds": sorted(rounds)})
    return len(rounds)


def secure_reply(msg: Message, cfg: RunConfig, *, sent: dict[str, np.ndarray], bundle: ModelBundle,
                 server_round: int, sampled: int, name: str, state_dir: Path, secret: bytes | None,
                 num_examples: int, status: str, site: dict[str, Any]) -> Message:
    """The legacy ``FitRes`` reply ``secaggplus_mod`` masks: the checked update in bound units and the site record.

    ``site`` (name, status, privacy figures, messages: what the server may read) travels in plaintext; nothing of
    the update does (not its norm, not the site's training losses).
    """
    from common.models.bundle import federated_arrays

    fed = cfg.federation
    bounds = bounds_for(cfg)
    trained = federated_arrays(bundle)
    units = to_bound_units(sent, trained, bounds)
    if status != "ok":  # a site that took no step sends a zero update (and, under distributed DP, its noise share)
        units = {k: np.zeros_like(v) for k, v in units.items()}
    check_site_update(units, sent, bounds, who=f"site {name}")
    if num_examples > fed.secagg_max_weight:
        raise ReplyValidationError(f"site {name}: {num_examples} examples exceed federation.secagg-max-weight="
                                   f"{fed.secagg_max_weight:g}; the masked sum could overflow (raise it)")
    record = dict(site)
    if cfg.privacy.distributed_dp:
        if sampled > cfg.data.num_sites:
            raise ReplyValidationError(f"site {name}: the server sampled {sampled} sites, more than the run's "
                                       f"{cfg.data.num_sites}: the noise shares would not add up to the calibration")
        shapes = [v.shape for v in units.values()]
        vector = flatten(list(units.values()))
        plan = plan_for(cfg, len(vector))
        if cfg.privacy.insecure_reproducible_noise or secret is None:
            seed = derive_seed(cfg.seed, name, server_round, "distributed-dp")
        else:
            seed = secret_seed(secret, name, server_round, "distributed-dp")
        residues, factor = plan.encode(vector, np.random.default_rng(seed))
        arrays = unflatten(to_secagg_floats(residues), shapes)
        weight = int(fed.secagg_max_weight)  # uniform weights (DP-FedAvg): each site's ratio is exactly 1
        record["site-distributed"] = json.dumps({**site_record(plan, _count_share(state_dir, server_round)),
                                                 "clip_factor": factor,
                                                 "noise_private": not cfg.privacy.insecure_reproducible_noise})
    else:
        arrays = list(units.values())
        weight = num_examples if status == "ok" else 0
    fitres = FitRes(status=Status(code=Code.OK, message="ok"), parameters=ndarrays_to_parameters(arrays),
                    num_examples=weight, metrics=record)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_task(msg: Message) -> str:
    """The task of SecAgg+'s fit instructions: ``""`` for a training round, :data:`CLASSIFIER_TASK` for a
    DP-FedSGD sub-round of the classifier (read from the config record, without copying the parameters)."""
    return str(msg.content.config_records["fitins.config"].get(TASK_KEY, ""))


def site_noise_multiplier(cfg: RunConfig, ledger: PrivacyLedger) -> float:
    """``z`` of the classifier's DP-FedSGD: the classifier's budget share over every planned step, no subsampling
    (the site's ledger derives it at first use with :func:`common.privacy.ledger.noise_multiplier_for`, from the
    same budget and steps :func:`common.privacy.distributed_dp.classifier_noise_multiplier` gives the server)."""
    planned = cfg.privacy.distributed_steps * cfg.federation.num_rounds
    plan = ledger.plan("classifier", sample_rate=1.0, planned_total_steps=planned)
    p = cfg.privacy
    budget = (p.target_epsilon * p.budget_classifier, p.target_delta * p.budget_classifier)  # the server's inputs
    if (plan.sample_rate, plan.planned_steps, plan.derived) != (1.0, planned, True) or not all(
            math.isclose(a, b, rel_tol=1e-9) for a, b in zip(ledger.budget("classifier"), budget)):
        raise ReplyValidationError(f"the site ledger's classifier plan (sigma {plan.noise_multiplier:.4g}, q "
                                   f"{plan.sample_rate:g}, {plan.planned_steps} steps) is not the distributed "
                                   f"classifier's ({planned} full-batch steps): a run cannot switch the classifier's "
                                   "mechanism or its plan midway; start a new run")
    return plan.noise_multiplier


def classifier_gradient_reply(msg: Message, cfg: RunConfig, *, records: list, ledger: PrivacyLedger, name: str,
                              secret: bytes | None) -> tuple[Message, str]:
    """One DP-FedSGD sub-round at a site: the reply ``secaggplus_mod`` masks, and the site's status.

    The site loads the classifier the server sent, sums its images' clipped per-example gradients, checks and
    accounts the step in its ledger (the central figure, with the ``N`` shares the plan assumes; ``local_epsilon``
    beside it), adds its discrete-Gaussian share and encodes the vector on SecAgg+'s grid. A site whose budget would
    be exceeded, or whose data exceeds the public example cap, sends only its noise share (a zero sum) and says why.
    """
    import torch

    from common.data.tensors import records_to_dataset
    from common.federated.fedsgd import clipped_gradient_sum, trainable_names
    from common.models.downstream import DownstreamSpec, classifier_loss, load_federated_state

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round, step = int(fitins.config[ROUND_KEY]), int(fitins.config[STEP_KEY])
    sampled = int(fitins.config.get(SAMPLED_KEY, cfg.data.num_sites))
    least = min_shares(cfg)
    if not least <= sampled <= cfg.data.num_sites:
        raise ReplyValidationError(f"site {name}: the server sampled {sampled} sites for a classifier step; the noise "
                                   f"is calibrated for sums of {least} to {cfg.data.num_sites} sites' shares "
                                   "(privacy.distributed-min-shares, data.num-sites): not sent")
    classifier = DownstreamSpec.from_config(cfg).classifier()
    names = trainable_names(classifier)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ReplyValidationError(f"site {name}: classifier step carries {len(arrays)} arrays, the classifier has "
                                   f"{len(names)}")
    load_federated_state(classifier, {n: torch.from_numpy(np.asarray(a, np.float32).copy())
                                      for n, a in zip(names, arrays)})
    z = site_noise_multiplier(cfg, ledger)
    ledger.mark_distributed("classifier", least)  # its own share: 1/t of the noise its ledger accounts
    dim = sum(int(np.prod(np.shape(a))) for a in arrays)
    plan = classifier_plan(cfg, dim, z)
    status, messages = "ok", []
    if len(records) > cfg.privacy.distributed_max_examples:
        status = "refused"
        messages.append(f"site {name} holds {len(records)} training images, more than "
                        f"privacy.distributed-max-examples={cfg.privacy.distributed_max_examples} (the public cap the "
                        "secure sum's grid is sized for): raise it at every site and the server")
    elif ledger.would_exceed("classifier", noise_multiplier=z, sample_rate=1.0):
        status = "budget-exhausted"
        messages.append(f"classifier: one more distributed step would exceed its budget "
                        f"{ledger.budget('classifier')[0]:.4g}; sends its noise share only")
    vector = np.zeros(dim)
    if status == "ok":
        data = records_to_dataset(records, image_size=cfg.data.image_size)
        vector = clipped_gradient_sum(classifier, classifier_loss, data, clip=plan.clip)
        ledger.accountant_for("classifier").step(noise_multiplier=z, sample_rate=1.0)
    if cfg.privacy.insecure_reproducible_noise:
        ledger.mark_noise_not_private()
        seed = derive_seed(cfg.seed, name, server_round, step, "classifier-fedsgd")
    else:
        seed = secret_seed(secret, name, server_round, step, "classifier-fedsgd") if secret is not None else None
    residues, _ = plan.encode(vector, np.random.default_rng(seed))
    shapes = [np.shape(a) for a in arrays]
    privacy = ledger.summary()
    site = {"site-name": name, "site-status": status,
            "site-metrics": json.dumps({"real-examples": len(records), "classifier-steps": float(status == "ok"),
                                        "classifier-epsilon": privacy["classifier"]["epsilon"]}),
            "site-privacy": json.dumps(privacy), "site-messages": json.dumps(messages)}
    fitres = FitRes(status=Status(code=Code.OK, message="ok"),
                    parameters=ndarrays_to_parameters(unflatten(to_secagg_floats(residues), shapes)),
                    num_examples=int(cfg.federation.secagg_max_weight), metrics=site)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg), status
