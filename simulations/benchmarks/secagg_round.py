"""SecAgg+ benchmark: round time and bytes per site with and without secure aggregation, 2-8 sites (JSON out).

    python -m simulations.benchmarks.secagg_round --out simulations/benchmarks/results [--sites 2,4,8]
        [--rounds 2] [--protocol-preset demo] [--skip-e2e]

Two parts.

- ``e2e``: the product through Flower's simulation runtime (smoke preset, 1 CPU per site, DP-SGD on), per number of
  sites: plain FedAvg, SecAgg+ (``federation.secure-aggregation``) and SecAgg+ with distributed DP. Per round the
  wall time (training + evaluation, the whole round) and per site the bytes down and up. Plain rounds count the
  train and evaluate payloads (arrays and config records); SecAgg+ rounds count every message of the four stages
  (keys, encrypted shares, masked vectors, unmask shares) plus evaluation.
- ``protocol``: Flower's SecAgg+ workflow and mod alone, in this process (no Ray, no training: each site's update is
  random), on the federated vector of ``--protocol-preset`` (demo: 140 k parameters): the server's workflow time and
  each site's bytes, against the plain payload of the same vector.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
from flwr.app import Context, Message, RecordDict

from client.secure import received, secure_aggregation_mod, secure_reply
from common.core.config import RunConfig
from common.core.run_layout import RunLayout
from common.federated.secure_update import bounds_for, part_of
from common.models.bundle import build_bundle, expected_shapes, federated_arrays, load_federated_arrays
from server.secure_aggregation import SecureAggregation
from server.strategy import GuardedStrategy, make_strategy, update_bounds
from simulations.benchmarks._common import write_report
from simulations.launcher import run_simulation

MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "secagg": {"federation.secure-aggregation": True},
    "secagg+distributed-dp": {"federation.secure-aggregation": True, "privacy.distributed-dp": True},
    # example-level distributed DP of the classifier: the round adds privacy.distributed-steps SecAgg+ sub-rounds
    "secagg+distributed-classifier": {"federation.secure-aggregation": True, "privacy.distributed-classifier": True},
}


class MemoryGrid:
    """A Grid whose nodes are :func:`client.secure.secure_aggregation_mod` + a handler in this process.

    ``drop`` maps a node to the SecAgg+ stage at which it vanishes (no reply from then on); every reply is kept
    (``replies``: what the server received). Messages and replies are deep-copied, as serialisation would.
    """

    def __init__(self, handlers: dict[int, Callable[[Message, Context], Message]], run_config: dict[str, Any],
                 drop: dict[int, str] | None = None) -> None:
        self.handlers = handlers
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(),
                                      run_config=dict(run_config)) for i, nid in enumerate(handlers)}
        self.drop = drop or {}
        self.gone: set[int] = set()
        self.replies: list[Message] = []
        self.run = SimpleNamespace(run_id=1)
        self.site_s: dict[int, float] = {}

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=n, name="") for n in self.handlers]

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            stage = msg.content.config_records["secaggplus_configs"].get("stage")
            if self.drop.get(nid) == stage:
                self.gone.add(nid)
            if nid in self.gone:
                continue
            t0 = time.perf_counter()
            reply = secure_aggregation_mod(copy.deepcopy(msg), self.contexts[nid], self.handlers[nid])
            self.site_s[nid] = self.site_s.get(nid, 0.0) + time.perf_counter() - t0
            out.append(copy.deepcopy(reply))
        self.replies += out
        return out


def random_sites(cfg: RunConfig, state_root: Path, examples: list[int], *, scale: float = 0.9,
                 seed: int = 0) -> tuple[dict[int, Callable[[Message, Context], Message]], dict[int, dict]]:
    """Handlers (node ids 1000, 1001, ...) that apply a uniform random update of at most ``scale`` bound units and
    reply as the site does (:func:`client.secure.secure_reply`); ``trained`` receives each site's arrays."""
    bounds = bounds_for(cfg)
    trained: dict[int, dict[str, np.ndarray]] = {}
    handlers = {}
    for i, n in enumerate(examples):
        nid = 1000 + i

        def handle(msg: Message, ctx: Context, i: int = i, n: int = n, nid: int = nid) -> Message:
            bundle, server_round, sampled = received(msg, cfg)
            sent = federated_arrays(bundle)
            rng = np.random.default_rng(seed + i)
            load_federated_arrays(bundle, {k: v + scale * bounds[part_of(k)].max_displacement
                                           * rng.uniform(-1, 1, v.shape) for k, v in sent.items()})
            trained[nid] = federated_arrays(bundle)
            site = {"site-name": f"site-{i}", "site-status": "ok", "site-metrics": json.dumps({"real-examples": n}),
                    "site-privacy": "{}", "site-messages": "[]"}
            return secure_reply(msg, cfg, sent=sent, bundle=bundle, server_round=server_round, sampled=sampled,
                                name=f"site-{i}", state_dir=state_root / f"site-{i}", secret=bytes(32),
                                num_examples=n, status="ok", site=site)

        handlers[nid] = handle
    return handlers, trained


def secure_aggregation_for(cfg: RunConfig) -> tuple[SecureAggregation, Any]:
    """The server's :class:`SecureAggregation` (with its guard) and a fresh bundle of ``cfg``."""
    bundle = build_bundle(cfg)
    guard = GuardedStrategy(make_strategy(cfg), expected_shapes=expected_shapes(bundle),
                            update_bounds=update_bounds(cfg))
    return SecureAggregation(cfg, guard), bundle


def _e2e(sites: int, mode: str, rounds: int, work: Path) -> dict[str, Any]:
    run_dir = work / f"{mode}-n{sites}"
    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(run_dir), "data.num-sites": sites,
                               "federation.num-rounds": rounds, **MODES[mode]})
    result = run_simulation(cfg, num_sites=sites, echo=False, cpus_per_site=1.0, timeout_s=3000)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} with {sites} sites failed; see {result.log_file}")
    records = [json.loads(line) for line in RunLayout(run_dir).metrics.read_text().splitlines()]
    per_round = []
    for r in records:
        ok = [s for s in r["sites"] if s["bytes_down"]]
        per_round.append({
            "round": r["round"], "wall_s": r["wall_s"],
            "secure_aggregation": (r.get("secure_aggregation") or {}).get("status"),
            "bytes_down_per_site": round(float(np.mean([s["bytes_down"] for s in ok])), 1) if ok else 0,
            "bytes_up_per_site": round(float(np.mean([s["bytes_up"] for s in ok])), 1) if ok else 0,
        })
    warm = per_round[1:] or per_round
    return {"mode": mode, "sites": sites, "rounds": rounds, "per_round": per_round,
            "warm_round_wall_s": round(float(np.mean([r["wall_s"] for r in warm])), 3),
            "warm_bytes_up_per_site": warm[-1]["bytes_up_per_site"],
            "warm_bytes_down_per_site": warm[-1]["bytes_down_per_site"]}


def _protocol(preset: str, sites: int, mode: str, work: Path) -> dict[str, Any]:
    cfg = RunConfig.from_flat({"preset": preset, "run-dir": str(work), "data.num-sites": sites, "federation.al-every": 0,
                               **MODES[mode]})
    handlers, _ = random_sites(cfg, work / f"{mode}-{sites}", [50] * sites)
    secure, bundle = secure_aggregation_for(cfg)
    grid = MemoryGrid(handlers, cfg.to_run_config())
    t0 = time.perf_counter()
    aggregated, _ = secure.train(grid, bundle, 1)
    wall = time.perf_counter() - t0
    if aggregated is None:
        raise RuntimeError(f"protocol run halted: {secure.last}")
    sent = federated_arrays(bundle)
    plain = sum(v.nbytes for v in sent.values())  # float32 weights, one way
    reports = list(secure.guard.reports.values())
    site_s = [grid.site_s[n] for n in grid.handlers]
    return {"mode": mode, "sites": sites, "parameters": int(sum(v.size for v in sent.values())),
            "round_wall_s": round(wall, 3), "site_handler_s_mean": round(float(np.mean(site_s)), 3),
            "server_s": round(wall - sum(site_s), 3),
            "bytes_down_per_site": round(float(np.mean([r.bytes_down for r in reports])), 1),
            "bytes_up_per_site": round(float(np.mean([r.bytes_up for r in reports])), 1),
            "plain_payload_bytes_each_way": plain}


def _classifier_step(preset: str, sites: int, work: Path) -> dict[str, Any]:
    """One DP-FedSGD sub-round of ``privacy.distributed-classifier`` in process: the sites' real train handler on
    their phantom data (gradient sums, ledger, noise share), Flower's SecAgg+ workflow and mod, the server's step."""
    from client.app import train as site_train

    cfg = RunConfig.from_flat({"preset": preset, "run-dir": str(work / f"classifier-{sites}"),
                               "data.num-sites": sites, "federation.al-every": 0, "privacy.distributed-steps": 1,
                               **MODES["secagg+distributed-classifier"]})
    secure, bundle = secure_aggregation_for(cfg)
    grid = MemoryGrid({1000 + i: site_train for i in range(sites)}, cfg.to_run_config())
    t0 = time.perf_counter()
    summary = secure.train_classifier(grid, bundle, 1)
    wall = time.perf_counter() - t0
    if summary["steps"] != 1:
        raise RuntimeError(f"classifier step halted: {summary['halted']}")
    reports = list(secure.guard.reports.values())
    site_s = [grid.site_s[n] for n in grid.handlers]
    return {"mode": "secagg+distributed-classifier (one sub-round)", "sites": sites, "parameters": summary["dim"],
            "round_wall_s": round(wall, 3), "site_handler_s_mean": round(float(np.mean(site_s)), 3),
            "server_s": round(wall - sum(site_s), 3),
            "bytes_down_per_site": round(float(np.mean([r.bytes_down for r in reports])), 1),
            "bytes_up_per_site": round(float(np.mean([r.bytes_up for r in reports])), 1)}


def main(argv: list[str] | None = None) -> None:
    """Run both parts and write ``secagg_round.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="simulations/benchmarks/results")
    p.add_argument("--sites", default="2,4,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--protocol-preset", default="demo")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--modes", default=",".join(MODES), help=f"the Flower runs' modes, of {list(MODES)}")
    args = p.parse_args(argv)
    from flwr.supercore.task_identity import TaskIdentity  # messages outside a Flower runtime need one

    for name in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, name, 1)
    counts = [int(x) for x in args.sites.split(",")]
    given = sys.argv[1:] if argv is None else argv
    body: dict[str, Any] = {"command": "python -m simulations.benchmarks.secagg_round " + " ".join(given),
                            "note": "load average in 'machine': the 2 cores were shared with other jobs; plain "
                                    "bytes are the train + evaluate payloads, SecAgg+ bytes every message of the "
                                    "four stages + evaluate (client.secure, server.secure_aggregation)"}
    with tempfile.TemporaryDirectory(prefix="difusal-secagg-") as tmp:
        work = Path(tmp)
        body["protocol"] = [_protocol(args.protocol_preset, n, mode, work) for n in counts
                            for mode in ("secagg", "secagg+distributed-dp")]
        body["protocol"] += [_classifier_step(args.protocol_preset, n, work) for n in counts]
        print(json.dumps(body["protocol"], indent=1), flush=True)
        if not args.skip_e2e:
            modes = [m for m in args.modes.split(",") if m]
            unknown = sorted(set(modes) - set(MODES))
            if unknown:
                p.error(f"--modes {unknown} unknown; choose from {list(MODES)}")
            body["e2e"] = [_e2e(n, mode, args.rounds, work) for n in counts for mode in modes]
            print(json.dumps([{k: v for k, v in r.items() if k != "per_round"} for r in body["e2e"]], indent=1))
    print(f"written to {write_report(Path(args.out), 'secagg_round', body)}")


if __name__ == "__main__":
    main()
