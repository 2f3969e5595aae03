"""Flower ``ClientApp`` of a hospital site: thin adapters from messages to :mod:`common` functions."""

from __future__ import annotations

import functools
import json
import math
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure import is_secure_train, secure_aggregation_mod, secure_task
from client.site import SiteSpec, resolve_site
from common.active_learning.release_sync import ReleaseCache
from common.core.config import RunConfig
from common.core.seeding import derive_seed
from common.federated.flwr_records import (
    ROUND_KEY,
    arrays_to_record,
    delta_from_content,
    held_to_config,
    record_to_arrays,
)
from common.federated.secure_update import CLASSIFIER_TASK

if TYPE_CHECKING:
    from common.core.records import UltrasoundRecord
    from common.data.sites import SiteData
    from common.models.bundle import ModelBundle

# In a deployment every message starts a fresh ClientApp process (Flower's subprocess isolation), and three of
# SecAgg+'s four stages never reach a handler: so this module imports only what routing needs, and each handler
# imports the models, the data and the DP machinery it uses (torch, diffusers and Opacus take about 7 s on 2 cores).

# SecAgg+ train messages go through Flower's secaggplus_mod (client.secure); the others reach the handlers as they are.
app = ClientApp(mods=[secure_aggregation_mod])

# Error code for a site-side failure (Flower's codes are < 100).
SITE_FAILURE = 700
# The site's copy of the shared release, in its state folder (public images: post-processing of DP generators).
RELEASE_CACHE = "release-cache"


def _site(context: Context) -> tuple[SiteSpec, SiteData, str, Path]:
    """This site's spec, its data, its name and its state folder."""
    from common.data.sites import load_site

    spec = resolve_site(context.node_config, RunConfig.from_run_config(context.run_config))
    site = load_site(spec.cfg.data, seed=spec.cfg.seed, site_index=spec.index)
    name, state_dir = spec.resolved(site.name, Path(spec.cfg.run_dir or "runs/latest"))
    return spec, site, name, state_dir


def receive_release(msg: Message, state_dir: Path) -> tuple[list[UltrasoundRecord], dict[str, int | str]]:
    """Apply the message's release delta to the site's cache: the release as records, and what the site now holds.

    A message without a delta means the release is empty: no synthetic images this round.
    """
    delta = delta_from_content(msg.content)
    if delta is None:
        return [], {}
    cache = ReleaseCache(state_dir / RELEASE_CACHE)
    held = cache.apply(delta)
    return cache.records(), held_to_config(held)


def cached_release(state_dir: Path) -> list[UltrasoundRecord]:
    """The site's copy of the release as it stands (none before the first release message)."""
    return ReleaseCache(state_dir / RELEASE_CACHE).records()


def _received_bundle(msg: Message, cfg: RunConfig) -> ModelBundle:
    from common.federated.flwr_records import load_bundle_record
    from common.models.bundle import build_bundle

    bundle = build_bundle(cfg)
    load_bundle_record(bundle, msg.content["arrays"])
    return bundle


def _guarded(handler):  # type: ignore[no-untyped-def]
    """Reply with an error that names the site instead of crashing the ClientApp."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        name = str(context.node_config.get("site-name", f"site-{context.node_config.get('partition-id', '?')}"))
        try:
            t0 = time.perf_counter()
            reply = handler(msg, context)
            if "site" in reply.content:  # the site's own compute time, for the framework-overhead benchmark
                reply.content["site"]["compute-s"] = time.perf_counter() - t0
            return reply
        except Exception as exc:  # noqa: BLE001 - reported to the server with the site's name
            traceback.print_exc()
            return Message(Error(code=SITE_FAILURE, reason=f"site {name}: {type(exc).__name__}: {exc}"), reply_to=msg)

    return wrapper


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Fine-tune generator + downstream models with DP on the site's private data; reply with the trained part."""
    from client.secure import received as secure_received
    from client.secure import secure_reply
    from common.federated.flwr_records import bundle_to_record
    from common.federated.local_update import local_train
    from common.models.bundle import federated_arrays
    from common.privacy.site_state import SiteStateStore

    spec, site, name, state_dir = _site(context)
    cfg = spec.cfg
    secure = is_secure_train(msg)  # SecAgg+'s collect-masked-vectors stage: legacy fit instructions
    if secure and secure_task(msg) == CLASSIFIER_TASK:  # a DP-FedSGD sub-round (privacy.distributed-classifier)
        return _classifier_step(msg, cfg, site, name, state_dir)
    if secure:
        bundle, server_round, sampled = secure_received(msg, cfg)
        sent = federated_arrays(bundle)
    else:
        server_round = int(msg.content["config"][ROUND_KEY])  # type: ignore[arg-type]
        bundle = _received_bundle(msg, cfg)
    store = SiteStateStore(state_dir)
    ledger = store.load_ledger(before_round=server_round, privacy=cfg.privacy) if cfg.privacy.target_epsilon else None
    if secure:  # SecAgg+'s fit instructions carry no release delta: the release message before the round synced it
        synthetic, held = cached_release(state_dir), {}
    else:
        synthetic, held = receive_release(msg, state_dir)
    if cfg.privacy.insecure_reproducible_noise and ledger is not None:
        print(f"site {name}: WARNING privacy.insecure-reproducible-noise is on: DP noise is seeded from the public "
              "run seed, anyone who knows it can remove the noise; nothing this run produces is private", flush=True)
    result = local_train(bundle, site, ledger, cfg, server_round=server_round, synthetic=synthetic,
                         secret=store.secret() if ledger is not None else None)
    weights = bundle_to_record(bundle)
    if ledger is not None:
        store.save_ledger(server_round, ledger, info={"site": name, "messages": result.messages})
    store.save_local_model(server_round, {k: v for k, v in record_to_arrays(weights).items()
                                          if k.startswith("generator.")})
    status = "ok" if result.trained_any else "budget-exhausted"
    if secure:  # the update leaves masked; only the site's record is plaintext (no losses: they are the site's own)
        steps = {k: v for k, v in result.metrics.items() if k.endswith(("-steps", "-epsilon", "-examples"))}
        return secure_reply(msg, cfg, sent=sent, bundle=bundle, server_round=server_round, sampled=sampled, name=name,
                            state_dir=state_dir, secret=store.secret(),
                            num_examples=result.num_examples, status=status,
                            site={"site-name": name, "site-status": status, "site-metrics": json.dumps(steps),
                                  "site-privacy": json.dumps(result.privacy),
                                  "site-messages": json.dumps(result.messages)})
    # Aggregated metrics must be finite and have the same keys at every site: a model that took no step this
    # round reports 0.0 here; the site record below keeps the NaN and the step counts.
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples if status == "ok" else 0,
            **{k: _finite(result.metrics.get(k, 0.0)) for k in ("generator-loss", "classifier-loss")},
        }
    )
    site_record = ConfigRecord(
        {
            "name": name,
            "status": status,
            "metrics": json.dumps(result.metrics),
            "privacy": json.dumps(result.privacy),
            "messages": json.dumps(result.messages),
            **held,
        }
    )
    content = RecordDict({"arrays": weights, "metrics": metrics, "site": site_record})
    return Message(content=content, reply_to=msg)


def _classifier_step(msg: Message, cfg: RunConfig, site: SiteData, name: str, state_dir: Path) -> Message:
    """This site's share of one DP-FedSGD step of the classifier, accounted in its one ledger."""
    from client.secure import classifier_gradient_reply
    from common.privacy.site_state import SiteStateStore

    store = SiteStateStore(state_dir)
    server_round = int(msg.content["fitins.config"][ROUND_KEY])  # type: ignore[arg-type]
    # the ledger after this round's training and its earlier classifier steps: one ledger for the whole run
    ledger = store.load_ledger(before_round=server_round + 1, privacy=cfg.privacy)
    reply, status = classifier_gradient_reply(msg, cfg, records=list(site.train), ledger=ledger, name=name,
                                              secret=store.secret())
    if status == "ok":
        store.save_ledger(server_round, ledger, info={"site": name, "after": "a distributed classifier step"})
    return reply


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Report the global models' metrics on the site's held-out data."""
    from common.federated.local_update import local_evaluate

    spec, site, name, _ = _site(context)
    bundle = _received_bundle(msg, spec.cfg)
    metrics = local_evaluate(bundle, site, spec.cfg)
    fixed = {k: _finite(metrics.get(k, 0.0)) for k in ("num-examples", "plane-accuracy", "denoise-loss")}
    content = RecordDict(
        {"metrics": MetricRecord(fixed), "site": ConfigRecord({"name": name, "metrics": json.dumps(metrics)})}
    )
    return Message(content=content, reply_to=msg)


@app.query()
@_guarded
def query(msg: Message, context: Context) -> Message:
    """Generate candidates for the requested conditions with this site's DP generator and score them."""
    from common.active_learning.query import answer_query, scoring_privacy
    from common.active_learning.scoring import features
    from common.privacy.site_state import SiteStateStore

    spec, site, name, state_dir = _site(context)
    cfg = spec.cfg
    config = msg.content["config"]
    server_round = int(config[ROUND_KEY])  # type: ignore[arg-type]
    bundle = _received_bundle(msg, cfg)
    store = SiteStateStore(state_dir)
    request = record_to_arrays(msg.content["request"])
    released, held = receive_release(msg, state_dir)
    # the release's features in the global classifier's space, from the site's own copy (novelty of candidates)
    bank = features(bundle, np.stack([r.image for r in released])).astype(np.float32) if released else None
    answer = answer_query(
        bundle,
        cfg,
        plane=request["plane"],
        ga=request["ga"],
        bank=bank,
        local_generator=store.load_local_model(up_to_round=server_round),
        private=site.train if bool(config.get("memorization-check", False)) else None,
        seed=derive_seed(int(config.get("seed", 0)), name),  # type: ignore[arg-type]
    )
    ledger = store.load_ledger(before_round=server_round + 1, privacy=cfg.privacy) if cfg.privacy.target_epsilon else None
    privacy = ledger.summary().get("generator", {}) if ledger is not None else {"epsilon": float("inf")}
    if ledger is not None and cfg.privacy.distributed_classifier:  # the classifier that scored the candidates
        privacy = {**privacy, "scoring": scoring_privacy(ledger)}
    site_record = ConfigRecord(
        {
            "name": name,
            "privacy": json.dumps({**privacy, "model": "generator", "local": answer.used_local_model}),
            "scanner": str(site.train[0].extra.get("profile", site.name)) if site.train else site.name,
            "memorization-checked": answer.memorization_checked,
            **held,
        }
    )
    payload = {"images": answer.candidates.images, "plane": answer.candidates.plane, "ga": answer.candidates.ga}
    payload.update({f"score.{k}": v for k, v in answer.candidates.scores.items()})
    content = RecordDict({"candidates": arrays_to_record(payload), "site": site_record})
    return Message(content=content, reply_to=msg)


@app.query("release")
@_guarded
def release(msg: Message, context: Context) -> Message:
    """Bring this site's copy of the release up to date (before a SecAgg+ round); reply with what it now holds."""
    _, _, name, state_dir = _site(context)
    _, held = receive_release(msg, state_dir)
    return Message(content=RecordDict({"site": ConfigRecord({"name": name, **held})}), reply_to=msg)


@app.query("vote")
@_guarded
def vote(msg: Message, context: Context) -> Message:
    """Private evolution: this site's private images vote on the candidates; reply with the noisy histogram only."""
    from common.active_learning.vote_query import VoteRequest, answer_vote, vote_embedder
    from common.federated.local_update import dp_noise_seed
    from common.privacy.site_state import SiteStateStore

    spec, site, name, state_dir = _site(context)
    cfg = spec.cfg
    config = msg.content["config"]
    server_round, index = int(config[ROUND_KEY]), int(config["vote"])  # type: ignore[arg-type]
    request = record_to_arrays(msg.content["request"])
    store = SiteStateStore(state_dir)
    # the ledger after this round's training (and this round's earlier votes): one ledger for the whole run
    ledger = store.load_ledger(before_round=server_round + 1, privacy=cfg.privacy) if cfg.privacy.target_epsilon else None
    answer = answer_vote(
        VoteRequest(ids=request["ids"], plane=request["plane"], embeddings=request["embeddings"],
                    class_aware=bool(config.get("class-aware", True)),
                    votes_per_image=int(config.get("votes-per-image", 1))),  # type: ignore[arg-type]
        ledger=ledger, private=site.train, embed=vote_embedder(cfg), cfg=cfg,
        noise_seed=dp_noise_seed(cfg, store.secret() if ledger is not None else None, name, server_round,
                                 f"votes-{index}"),
    )
    if ledger is not None and answer.status == "ok":
        store.save_ledger(server_round, ledger, info={"site": name, "after": f"vote {index} of round {server_round}"})
    generator = ledger.summary().get("generator", {}) if ledger is not None else {"epsilon": float("inf")}
    site_record = ConfigRecord({"name": name, "status": answer.status, "reason": answer.reason,
                                "privacy": json.dumps(answer.privacy), "generator-privacy": json.dumps(generator)})
    content = RecordDict({"site": site_record})
    if answer.result is not None:
        content["votes"] = arrays_to_record({"ids": request["ids"].astype(np.int64),
                                             "histogram": answer.result.histogram.astype(np.float64)})
    return Message(content=content, reply_to=msg)
