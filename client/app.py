"""Flower ``ClientApp`` of a hospital site: thin adapters from messages to :mod:`common` functions."""

from __future__ import annotations

import functools
import json
import math
import os
import time
import traceback
import warnings
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import SiteSpec, resolve_site
from common.active_learning.query import answer_query, release_from_arrays
from common.core.config import RunConfig
from common.core.seeding import derive_seed
from common.data.sites import SiteData, load_site
from common.federated.flwr_records import arrays_to_record, record_to_arrays
from common.federated.local_update import local_evaluate, local_train
from common.models.bundle import build_bundle, federated_arrays, load_federated_arrays
from common.privacy.site_state import SiteStateStore

# Known-noisy third-party warnings (numpy 2 copy keyword in diffusers' solvers; Opacus' CPU autocast note).
warnings.filterwarnings("ignore", category=DeprecationWarning)
# Opacus' functorch mode asks for CPU autocast in float32, which torch declines (a two-line message)
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

app = ClientApp()

# Error code for a site-side failure (Flower's codes are < 100).
SITE_FAILURE = 700
# Test hook: a site whose name (or "site-<index>") equals this variable raises in every handler.
FAULT_ENV = "DIFUSAL_FAULT_SITE"


def _site(context: Context) -> tuple[SiteSpec, SiteData, str, Path]:
    """This site's spec, its data, its name and its state folder."""
    spec = resolve_site(context.node_config, RunConfig.from_run_config(context.run_config))
    site = load_site(spec.cfg.data, seed=spec.cfg.seed, site_index=spec.index)
    if FAULT_ENV in os.environ and os.environ[FAULT_ENV] in (site.name, f"site-{spec.index}"):
        raise RuntimeError(f"fault injected by {FAULT_ENV}")
    name, state_dir = spec.resolved(site.name, Path(spec.cfg.run_dir or "runs/latest"))
    return spec, site, name, state_dir


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
    spec, site, name, state_dir = _site(context)
    cfg = spec.cfg
    server_round = int(msg.content["config"]["fl-round"])  # type: ignore[arg-type]
    bundle = build_bundle(cfg)
    load_federated_arrays(bundle, record_to_arrays(msg.content["arrays"]))
    store = SiteStateStore(state_dir)
    ledger = store.load_ledger(before_round=server_round, privacy=cfg.privacy) if cfg.privacy.target_epsilon else None
    synthetic = release_from_arrays(record_to_arrays(msg.content["release"])) if "release" in msg.content else []
    if cfg.privacy.insecure_reproducible_noise and ledger is not None:
        print(f"site {name}: WARNING privacy.insecure-reproducible-noise is on: DP noise is seeded from the public "
              "run seed, anyone who knows it can remove the noise; nothing this run produces is private", flush=True)
    result = local_train(bundle, site, ledger, cfg, server_round=server_round, synthetic=synthetic,
                         secret=store.secret() if ledger is not None else None)
    arrays = federated_arrays(bundle)
    if ledger is not None:
        store.save_ledger(server_round, ledger, info={"site": name, "messages": result.messages})
    store.save_local_model(server_round, {k: v for k, v in arrays.items() if k.startswith("generator.")})
    status = "ok" if result.trained_any else "budget-exhausted"
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
        }
    )
    content = RecordDict({"arrays": arrays_to_record(arrays), "metrics": metrics, "site": site_record})
    return Message(content=content, reply_to=msg)


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Report the global models' metrics on the site's held-out data."""
    spec, site, name, _ = _site(context)
    bundle = build_bundle(spec.cfg)
    load_federated_arrays(bundle, record_to_arrays(msg.content["arrays"]))
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
    spec, site, name, state_dir = _site(context)
    cfg = spec.cfg
    config = msg.content["config"]
    server_round = int(config["fl-round"])  # type: ignore[arg-type]
    bundle = build_bundle(cfg)
    load_federated_arrays(bundle, record_to_arrays(msg.content["arrays"]))
    store = SiteStateStore(state_dir)
    request = record_to_arrays(msg.content["request"])
    answer = answer_query(
        bundle,
        cfg,
        plane=request["plane"],
        ga=request["ga"],
        bank=request.get("bank"),
        local_generator=store.load_local_model(up_to_round=server_round),
        private=site.train if bool(config.get("memorization-check", False)) else None,
        seed=derive_seed(int(config.get("seed", 0)), name),  # type: ignore[arg-type]
    )
    ledger = store.load_ledger(before_round=server_round + 1, privacy=cfg.privacy) if cfg.privacy.target_epsilon else None
    privacy = ledger.summary().get("generator", {}) if ledger is not None else {"epsilon": float("inf")}
    site_record = ConfigRecord(
        {
            "name": name,
            "privacy": json.dumps({**privacy, "model": "generator", "local": answer.used_local_model}),
            "scanner": str(site.train[0].extra.get("profile", site.name)) if site.train else site.name,
            "memorization-checked": answer.memorization_checked,
        }
    )
    payload = {"images": answer.candidates.images, "plane": answer.candidates.plane, "ga": answer.candidates.ga}
    payload.update({f"score.{k}": v for k, v in answer.candidates.scores.items()})
    content = RecordDict({"candidates": arrays_to_record(payload), "site": site_record})
    return Message(content=content, reply_to=msg)
