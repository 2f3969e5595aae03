"""Secure aggregation (Flower's SecAgg+) and distributed DP.

Two levels. In process: Flower's real ``SecAggPlusWorkflow`` (through
:class:`server.secure_aggregation.SecureAggregation`) against Flower's real ``secaggplus_mod`` (through
:func:`client.secure.secure_aggregation_mod`) and the site's real reply (:func:`client.secure.secure_reply`), over
an in-memory grid (:class:`simulations.benchmarks.secagg_round.MemoryGrid`) that can make a site vanish at any stage;
the sites' updates are chosen, so the sums are known. End to end: the product's apps in Flower's simulation runtime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.secure import secure_aggregation_mod
from common.core.config import RunConfig
from common.core.errors import ConfigError
from common.federated.flwr_records import record_to_arrays
from common.federated.secure_update import bounds_for, part_of
from common.models.bundle import build_bundle, federated_arrays
from common.privacy.distributed_dp import (
    CLIP_RANGE,
    MODULUS,
    DistributedPlan,
    discrete_gaussian,
    plan_for,
    zcdp_to_epsilon,
)
from server.secure_aggregation import SecureAggregation
from simulations.benchmarks.secagg_round import MemoryGrid, random_sites, secure_aggregation_for


def _cfg(run_dir: Path | str = "", **overrides: object) -> RunConfig:
    return RunConfig.from_flat({"preset": "smoke", "run-dir": str(run_dir), **overrides})


# -- the config guard -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedmedian", "trimmedmean", "krum"])
def test_a_robust_aggregator_with_secure_aggregation_is_refused_and_says_why(strategy: str) -> None:
    with pytest.raises(ConfigError, match="need each site's update.*sees only their sum"):
        _cfg(**{"federation.secure-aggregation": True, "federation.strategy": strategy})


def test_secure_aggregation_guards() -> None:
    with pytest.raises(ConfigError, match="needs federation.secure_aggregation=true"):
        _cfg(**{"privacy.distributed-dp": True})
    with pytest.raises(ConfigError, match="num_sites >= 2"):
        _cfg(**{"federation.secure-aggregation": True, "data.num-sites": 1})
    # a sampled fraction of the sites and FedAdam's server step need only the sum; a fraction with distributed DP
    # would leave the sum fewer noise shares than calibrated, so it is refused and says so
    assert _cfg(**{"federation.secure-aggregation": True, "federation.fraction-train": 0.5}).federation.fraction_train \
        == 0.5
    assert _cfg(**{"federation.secure-aggregation": True, "federation.strategy": "fedadam"}).federation.strategy \
        == "fedadam"
    for key in ("privacy.distributed-dp", "privacy.distributed-classifier"):
        with pytest.raises(ConfigError, match="fewer shares.*fraction-train=1"):
            _cfg(**{"federation.secure-aggregation": True, "federation.fraction-train": 0.5, key: True})
    # active learning works with SecAgg+ (the release reaches the sites in a plain message before each round), with
    # the distributed classifier too (each image's certificate carries its central and local figures)
    assert _cfg(**{"federation.secure-aggregation": True, "federation.al-every": 1}).federation.al_every == 1
    assert _cfg(**{"federation.secure-aggregation": True, "federation.al-every": 1,
                   "privacy.distributed-classifier": True}).privacy.distributed_classifier
    assert _cfg(**{"federation.secure-aggregation": True, "federation.strategy": "fedprox",
                   "federation.proximal-mu": 0.01}).federation.secure_aggregation
    assert not _cfg().federation.secure_aggregation and not _cfg().privacy.distributed_dp  # per-site DP default


# -- the distributed discrete Gaussian ----------------------------------------------------------------------------
def test_discrete_gaussian_has_the_stated_variance() -> None:
    rng = np.random.default_rng(0)
    for sigma in (0.8, 3.0, 40.0):
        x = discrete_gaussian(sigma, 200_000, rng)
        assert x.dtype == np.int64
        assert abs(x.mean()) < 4 * sigma / math.sqrt(len(x))
        # N_Z(0, s^2) has variance s^2 up to a term below 1e-3 for s >= 0.8 (Canonne et al. 2020, Prop. 19)
        assert x.var() == pytest.approx(sigma**2, rel=0.02)
    pmf = np.bincount(discrete_gaussian(1.0, 400_000, rng) + 10) / 400_000
    weights = np.exp(-np.arange(-10, 11) ** 2 / 2.0)
    np.testing.assert_allclose(pmf[8:13], (weights / weights.sum())[8:13], atol=3e-3)


def test_the_noise_of_the_sum_is_calibrated_and_each_share_has_the_stated_variance() -> None:
    # Prepare: 4 sites, calibrated for epsilon 8 over 3 rounds
    plan = DistributedPlan.for_run(epsilon=8.0, delta=1e-5, clip=5.0, num_sites=4, dim=20_000, rounds=3)
    zero = np.zeros(plan.dim)
    # Execute: every site encodes a zero update; the residues are what SecAgg+ sums (mod M)
    shares = [plan.encode(zero, np.random.default_rng(i))[0] for i in range(4)]
    centered = [np.where(s >= MODULUS // 2, s - MODULUS, s) for s in shares]
    summed = np.mod(np.sum(shares, axis=0), MODULUS)
    mean = plan.decode(summed, 4)
    # Assert: each share has sigma_share^2 = z^2 Delta^2 / N; the sum z^2 Delta^2 (the calibrated noise, once)
    for c in centered:
        assert c.var() == pytest.approx(plan.sigma_share**2, rel=0.03)
    assert (mean * plan.scale * 4).var() == pytest.approx((plan.noise_multiplier * plan.sensitivity) ** 2, rel=0.03)
    assert plan.sigma_share == pytest.approx(plan.noise_multiplier * plan.sensitivity / 2)
    # the calibration reaches the central epsilon; a site's own share gives the stated local one (N / (2 z^2) a round)
    assert plan.central_epsilon([4, 4, 4]) == pytest.approx(8.0, rel=1e-9)
    assert plan.local_epsilon(3) == pytest.approx(zcdp_to_epsilon(3 * 4 / (2 * plan.noise_multiplier**2), 1e-5))
    assert plan.local_epsilon(3) > plan.central_epsilon([4, 4, 4])
    # a sum that lost a site's share protects less, and says so
    assert plan.central_epsilon([4, 4, 3]) > plan.central_epsilon([4, 4, 4])


def test_distributed_encoding_round_trips_a_clipped_update() -> None:
    plan = DistributedPlan.for_run(epsilon=1e3, delta=1e-5, clip=1.0, num_sites=3, dim=1000, rounds=1)
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-0.02, 0.02, plan.dim) for _ in range(3)]
    big = np.full(plan.dim, 0.5)  # norm 15.8: clipped to 1
    res = [plan.encode(u, np.random.default_rng(i)) for i, u in enumerate([*updates[:2], big])]
    assert res[2][1] == pytest.approx(1.0 / np.linalg.norm(big))
    mean = plan.decode(np.sum([r for r, _ in res], axis=0), 3)
    expected = (updates[0] + updates[1] + big * res[2][1]) / 3
    noise_sd = plan.noise_multiplier * plan.sensitivity / (plan.scale * 3)
    assert np.abs(mean - expected).max() < 6 * noise_sd + 1.0 / plan.scale


# -- Flower's real SecAgg+ protocol in process ------------------------------------------------------------------
def _sites(cfg: RunConfig, tmp: Path, examples: list[int], *, scale: float = 0.9):
    return random_sites(cfg, tmp, examples, scale=scale)


def _secure(cfg: RunConfig) -> tuple[SecureAggregation, Any]:
    return secure_aggregation_for(cfg)


@pytest.mark.usefixtures("task_identity")
def test_secagg_aggregate_equals_fedavg_within_quantization_and_the_server_holds_no_update(tmp_path: Path) -> None:
    # Prepare: 3 sites with different weights and known updates
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True, "data.num-sites": 3})
    examples = [10, 24, 40]
    handlers, trained = _sites(cfg, tmp_path, examples)
    secure, bundle = _secure(cfg)
    sent = federated_arrays(bundle)
    grid = MemoryGrid(handlers, cfg.to_run_config())
    # Execute
    aggregated, metrics = secure.train(grid, bundle, 1)
    # Assert: plain FedAvg of the same updates, within SecAgg+'s quantization error
    assert aggregated is not None and secure.last["status"] == "ok" and secure.last["summed"] == 3
    got = record_to_arrays(aggregated)
    total = sum(examples)
    bounds = bounds_for(cfg)
    step = 2 * CLIP_RANGE / MODULUS
    for key, value in sent.items():
        fedavg = sum(n * trained[1000 + i][key].astype(np.float64) for i, n in enumerate(examples)) / total
        b = bounds[part_of(key)].max_displacement
        # each site's weighted vector is rounded to the grid (<= 1 step each), divided by the total weight ratio,
        # and its weight ratio itself is rounded to 1/M; then float32
        tol = b * (3 * step / (total / cfg.federation.secagg_max_weight) + 3 * 1.1 * 1000 / (total * MODULUS)) \
            + 2 * np.finfo(np.float32).eps * (np.abs(fedavg) + b)
        assert np.all(np.abs(got[key] - fedavg) <= tol), key
    assert float(np.abs(got["classifier." + next(k.split(".", 1)[1] for k in sent if k.startswith("classifier."))]
                        - sent[next(k for k in sent if k.startswith("classifier."))]).max()) > 1e-3  # it moved
    assert metrics is not None and metrics["sites-summed"] == 3 and metrics["num-examples"] == total
    # what the server received holds no individual update: no array leaves a site; the masked vectors are not it
    assert all(len(a) == 0 for r in grid.replies for a in r.content.array_records.values())  # the mod emptied them
    assert all(not r.has_error() for r in grid.replies)
    masked = [r for r in grid.replies if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    for r in masked:
        vectors = [bytes_to_ndarray(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        nid = r.metadata.src_node_id
        i = nid - 1000
        weight = examples[i] / cfg.federation.secagg_max_weight
        first = next(iter(sent))
        plain = ((trained[nid][first] - sent[first]) / bounds[part_of(first)].max_displacement * weight + CLIP_RANGE) \
            / step
        assert not np.allclose(vectors[1].astype(np.float64), plain, atol=2)  # masked: far from its quantized update
    reports = [r.as_dict() for r in secure.guard.reports.values()]
    assert sorted(r["name"] for r in reports) == ["site-0", "site-1", "site-2"]
    assert all(r["update_norms"] == {} and r["update_max"] == {} and r["bytes_up"] > 0 for r in reports)


@pytest.mark.usefixtures("task_identity")
def test_a_site_dropping_mid_round_below_the_threshold_is_survived(tmp_path: Path) -> None:
    # Prepare: 4 sites, 4 shares, threshold round(0.67 * 4) = 3; site 3 vanishes after sharing its keys
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True, "data.num-sites": 4})
    examples = [10, 20, 30, 40]
    handlers, trained = _sites(cfg, tmp_path, examples)
    secure, bundle = _secure(cfg)
    sent = federated_arrays(bundle)
    grid = MemoryGrid(handlers, cfg.to_run_config(), drop={1003: "collect_masked_vectors"})
    # Execute
    aggregated, _ = secure.train(grid, bundle, 1)
    # Assert: the survivors' FedAvg (the dropped site's masks were removed with its neighbours' shares)
    assert secure.last["status"] == "ok" and secure.last["summed"] == 3 and secure.last["threshold"] == 3
    got = record_to_arrays(aggregated)
    key = next(k for k in sent if k.startswith("classifier."))
    fedavg = sum(n * trained[1000 + i][key].astype(np.float64) for i, n in enumerate(examples[:3])) / 60
    np.testing.assert_allclose(got[key], fedavg, atol=1e-3 * bounds_for(cfg)["classifier"].max_displacement)
    statuses = {r.name: r.status for r in secure.guard.reports.values()}
    assert statuses == {"site-0": "ok", "site-1": "ok", "site-2": "ok", "node-1003": "unavailable"}


@pytest.mark.usefixtures("task_identity")
def test_a_sampled_fraction_of_the_sites_is_summed_and_a_resumed_round_samples_the_same_sites(tmp_path: Path) -> None:
    # Prepare: 5 sites, fraction 0.5 -> int(2.5) = 2 sampled a round
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True, "data.num-sites": 5,
                            "federation.fraction-train": 0.5})
    examples = [10, 20, 30, 40, 50]
    handlers, trained = _sites(cfg, tmp_path, examples)
    samples = []
    for server_round in (1, 1, 2, 3, 4):
        secure, bundle = _secure(cfg)
        sent = federated_arrays(bundle)
        grid = MemoryGrid(handlers, cfg.to_run_config())
        trained.clear()
        # Execute
        aggregated, metrics = secure.train(grid, bundle, server_round)
        # Assert: only the sampled sites heard of the round, and the sum is their FedAvg
        assert secure.last["status"] == "ok" and secure.last["sampled"] == secure.last["summed"] == 2
        assert {r.metadata.src_node_id for r in grid.replies} == set(trained) and len(trained) == 2
        assert metrics is not None and metrics["sites-summed"] == 2
        key = next(k for k in sent if k.startswith("classifier."))
        weights = {nid: examples[nid - 1000] for nid in trained}
        fedavg = sum(n * trained[nid][key].astype(np.float64) for nid, n in weights.items()) / sum(weights.values())
        np.testing.assert_allclose(record_to_arrays(aggregated)[key], fedavg,
                                   atol=1e-3 * bounds_for(cfg)["classifier"].max_displacement)
        assert sorted(r.name for r in secure.guard.reports.values()) == sorted(f"site-{n - 1000}" for n in trained)
        samples.append(tuple(sorted(trained)))
    assert samples[0] == samples[1]  # the same run and round: the same sites (a resumed round replays its sample)
    assert len(set(samples)) > 1  # other rounds draw other samples


@pytest.mark.usefixtures("task_identity")
def test_fedadam_under_secure_aggregation_steps_towards_the_secure_mean_as_adam_does(tmp_path: Path) -> None:
    # Prepare: 3 sites, FedAdam (eta 0.05, tau 1e-3, Flower's beta1 0.9 and beta2 0.99)
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True, "data.num-sites": 3,
                            "federation.strategy": "fedadam", "federation.fedadam-eta": 0.05})
    examples = [10, 24, 40]
    handlers, trained = _sites(cfg, tmp_path, examples)
    secure, bundle = _secure(cfg)
    sent = federated_arrays(bundle)
    # Execute: round 1 through Flower's SecAgg+
    aggregated, _ = secure.train(MemoryGrid(handlers, cfg.to_run_config()), bundle, 1)
    # Assert: Adam's first step from the weights sent, its pseudo-gradient the FedAvg mean minus them (written out
    # here: m = (1 - b1) d, v = (1 - b2) d^2, rate eta sqrt(1 - b2^2) / (1 - b1^2) as Flower's round-1 correction)
    assert aggregated is not None
    got = record_to_arrays(aggregated)
    eta, tau, b1, b2 = 0.05, cfg.federation.fedadam_tau, 0.9, 0.99
    rate = eta * math.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)
    moved = 0.0
    for key, x in sent.items():
        fedavg = sum(n * trained[1000 + i][key].astype(np.float64) for i, n in enumerate(examples)) / sum(examples)
        d = fedavg - x
        m, v = (1 - b1) * d, (1 - b2) * d ** 2
        want = x + rate * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(got[key], want, atol=2e-3 * rate + 1e-6, err_msg=key)
        moved = max(moved, float(np.abs(got[key] - fedavg).max()))
    assert moved > 1e-3  # not the plain mean
    state = secure.guard.state_arrays()  # the moments the checkpoint keeps for round 2
    assert any(k.startswith("m_t/") for k in state) and any(k.startswith("v_t/") for k in state)


@pytest.mark.usefixtures("task_identity")
def test_dropouts_beyond_the_threshold_fail_the_round_cleanly(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True, "data.num-sites": 4})
    handlers, _ = _sites(cfg, tmp_path, [10, 20, 30, 40])
    secure, bundle = _secure(cfg)
    grid = MemoryGrid(handlers, cfg.to_run_config(), drop={1002: "collect_masked_vectors", 1003: "unmask"})
    aggregated, metrics = secure.train(grid, bundle, 1)
    assert aggregated is None and metrics is None
    assert secure.last["status"] == "halted" and "the run goes on" in secure.last["reason"]
    assert {r.status for r in secure.guard.reports.values()} == {"secagg-halted", "unavailable"}


@pytest.mark.usefixtures("task_identity")
def test_a_site_refuses_a_plain_train_message_in_a_secure_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True})
    msg = Message(content=RecordDict(), dst_node_id=1, message_type="train", group_id="1")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config=cfg.to_run_config())
    reply = secure_aggregation_mod(msg, ctx, lambda m, c: pytest.fail("the handler must not run"))
    assert reply.has_error() and "refused a plain train message" in reply.error.reason


@pytest.mark.usefixtures("task_identity")
def test_a_site_whose_own_update_fails_its_check_sends_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True, "data.num-sites": 3})
    handlers, _ = _sites(cfg, tmp_path, [10, 20, 30])
    bad, _ = _sites(cfg, tmp_path, [10], scale=3.0)  # 3x the update bound
    handlers[1002] = bad[1000]
    secure, bundle = _secure(cfg)
    grid = MemoryGrid(handlers, cfg.to_run_config())
    aggregated, _ = secure.train(grid, bundle, 1)
    assert aggregated is not None and secure.last["summed"] == 2
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    assert len(errors) == 1 and "more than the 1.05 the server would accept; not sent" in errors[0]


@pytest.mark.usefixtures("task_identity")
def test_distributed_dp_through_secagg_adds_the_calibrated_noise_once(tmp_path: Path) -> None:
    # Prepare: 3 sites, zero-ish updates, a large clip so the noise in bound units is visible
    cfg = _cfg(tmp_path, **{"federation.secure-aggregation": True, "data.num-sites": 3, "privacy.distributed-dp": True,
                            "privacy.distributed-epsilon": 5.0, "privacy.distributed-clip": 200.0})
    handlers, trained = _sites(cfg, tmp_path, [10, 20, 30], scale=0.5)
    secure, bundle = _secure(cfg)
    sent = federated_arrays(bundle)
    grid = MemoryGrid(handlers, cfg.to_run_config())
    # Execute
    aggregated, _ = secure.train(grid, bundle, 1)
    # Assert: the unweighted mean (DP-FedAvg) plus noise of std z * Delta / (s * n) in bound units
    assert aggregated is not None and secure.last["status"] == "ok"
    got = record_to_arrays(aggregated)
    bounds = bounds_for(cfg)
    plan = plan_for(cfg, sum(v.size for v in sent.values()))
    noise = np.concatenate([((got[k].astype(np.float64) - sent[k]) / bounds[part_of(k)].max_displacement
                             - sum((trained[1000 + i][k].astype(np.float64) - sent[k]) for i in range(3))
                             / (3 * bounds[part_of(k)].max_displacement)).ravel() for k in sent
                            if part_of(k) == "generator"])  # float32 resolution is finest relative to its bound
    expected_sd = plan.noise_multiplier * plan.sensitivity / (plan.scale * 3)
    assert noise.std() == pytest.approx(expected_sd, rel=0.05)
    summary = secure.last["distributed_dp"]
    assert summary["contributors"] == [3]
    assert summary["central_epsilon"] == pytest.approx(plan.central_epsilon([3]))
    assert summary["planned_central_epsilon"] == pytest.approx(5.0, rel=1e-9)
    local = summary["local_epsilon"]
    assert sorted(local) == ["site-0", "site-1", "site-2"]
    assert all(v == pytest.approx(plan.local_epsilon(1)) for v in local.values())
    assert json.loads((tmp_path / "site-0" / "distributed-dp.json").read_text())["rounds"] == [1]


# -- end to end: the product's apps in Flower's simulation runtime ----------------------------------------------------
def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_secagg_run_through_flower_equals_the_plain_fedavg_run_and_syncs_the_release(tmp_path: Path) -> None:
    from common.models.bundle import load_federated_file
    from simulations.launcher import run_simulation

    # Prepare: the same sites and seeds (reproducible DP noise, test only), with and without SecAgg+. The SecAgg+ run
    # goes on for a second round with a query round after each: its round 1 is still the plain run's (the release is
    # empty before it), and round 2 trains on round 1's images, which reach the sites in the plain release message.
    # Both plan 2 rounds: sigma is derived for the run's planned steps
    common = {"privacy.insecure-reproducible-noise": True, "federation.num-rounds": 2}
    plain = _cfg(tmp_path / "plain", **common)
    secure = _cfg(tmp_path / "secure", **common, **{"federation.secure-aggregation": True, "federation.al-every": 1})
    # Execute
    a = run_simulation(plain, num_sites=2, echo=False, timeout_s=300)
    b = run_simulation(secure, num_sites=2, echo=False, timeout_s=300)
    # Assert: the same global model within the quantization error of SecAgg+ (bound per part, see the in-process test)
    assert a.returncode == 0 and b.returncode == 0, b.log_file.read_text()[-3000:]
    ref = load_federated_file(tmp_path / "plain" / "checkpoints" / "round-001")
    got = load_federated_file(tmp_path / "secure" / "checkpoints" / "round-001")
    prior = federated_arrays(build_bundle(plain))
    bounds = bounds_for(plain)
    step = 2 * CLIP_RANGE / MODULUS
    moved = 0.0
    for key in ref:
        b_part = bounds[part_of(key)].max_displacement
        tol = b_part * (2 * step / (48 / 1000) + 1e-5) + 4 * np.finfo(np.float32).eps * (np.abs(ref[key]) + b_part)
        assert np.all(np.abs(got[key] - ref[key]) <= tol), key
        moved = max(moved, float(np.abs(ref[key] - prior[key]).max()))
    assert moved > 1e-3  # the round changed the model
    # the server's records: each site's name, status, privacy and bytes; no update, no norm, no per-site loss
    record, second = _records(tmp_path / "secure")
    assert record["secure_aggregation"]["status"] == "ok" and record["secure_aggregation"]["summed"] == 2
    for site in record["sites"]:
        assert site["status"] == "ok" and site["update_norms"] == {} and site["update_max"] == {}
        assert "generator-loss" not in site["metrics"] and site["bytes_up"] > 0
    assert record["ledger"].keys() == _records(tmp_path / "plain")[0]["ledger"].keys()
    assert "release_sync" not in _records(tmp_path / "plain")[0]  # no coordinator there
    sidecar = json.loads((tmp_path / "secure" / "checkpoints" / "round-001" / "sidecar.json").read_text())
    assert sidecar["privacy"]["secure_aggregation"] is True
    # active learning: before round 1 the release was empty; before round 2 each site got round 1's images and
    # says it holds them, and the SecAgg+ round trained on them (each site's plaintext record counts them)
    released = record["active_learning"]["release_size"]
    assert released > 0 and second["active_learning"]["release_size"] >= released
    assert [(s["status"], s["held"]) for s in record["release_sync"]["sites"]] == [("ok", 0), ("ok", 0)]
    assert second["release_sync"]["release_size"] == released
    assert [(s["status"], s["held"]) for s in second["release_sync"]["sites"]] == [("ok", released)] * 2
    assert second["secure_aggregation"]["status"] == "ok"
    assert [s["metrics"]["synthetic-examples"] for s in record["sites"]] == [0, 0]
    assert [s["metrics"]["synthetic-examples"] for s in second["sites"]] == [released] * 2
    metadata = (tmp_path / "secure" / "release" / "metadata.jsonl").read_text().splitlines()
    assert len(metadata) == second["active_learning"]["release_size"]


@pytest.mark.e2e
def test_distributed_dp_run_survives_a_dropout_and_records_central_and_local_epsilon(tmp_path: Path) -> None:
    from simulations.launcher import run_simulation
    from tests.conftest import FAULT_APP

    # Prepare: 3 sites (3 shares, threshold 2), distributed DP on top of per-site DP; site-2 fails in training
    cfg = _cfg(tmp_path / "run", **{"federation.secure-aggregation": True, "data.num-sites": 3,
                                    "privacy.distributed-dp": True, "privacy.distributed-epsilon": 4.0})
    # Execute
    result = run_simulation(cfg, num_sites=3, echo=False, timeout_s=400, extra_env={"DIFUSAL_FAULT_SITE": "site-2"},
                            overlay=FAULT_APP)
    # Assert: the round is summed over the 2 survivors; the central figure counts 2 shares, the local one each site's
    assert result.returncode == 0, result.log_file.read_text()[-3000:]
    (record,) = _records(tmp_path / "run")
    secure = record["secure_aggregation"]
    assert secure["status"] == "ok" and secure["sampled"] == 3 and secure["summed"] == 2
    statuses = sorted(s["status"] for s in record["sites"])
    assert statuses == ["ok", "ok", "unavailable"]
    ddp = secure["distributed_dp"]
    plan = plan_for(cfg, ddp["dim"])
    assert ddp["contributors"] == [2]
    assert ddp["planned_central_epsilon"] == pytest.approx(4.0, rel=1e-9)
    assert ddp["central_epsilon"] == pytest.approx(plan.central_epsilon([2])) and ddp["central_epsilon"] > 4.0
    assert len(ddp["local_epsilon"]) == 2
    assert all(v == pytest.approx(plan.local_epsilon(1)) for v in ddp["local_epsilon"].values())
    for name in ddp["local_epsilon"]:  # the site's own ledger of shares, and its figures in the round's ledger
        assert json.loads((tmp_path / "run" / "sites" / name / "distributed-dp.json").read_text())["rounds"] == [1]
        assert record["ledger"][name]["distributed"]["local_epsilon"] == pytest.approx(plan.local_epsilon(1))
        assert record["ledger"][name]["generator"]["epsilon"] > 0  # per-site DP-SGD still holds as well
    sidecar = json.loads((tmp_path / "run" / "checkpoints" / "round-001" / "sidecar.json").read_text())
    assert sidecar["privacy"]["distributed_dp"]["central_epsilon"] == pytest.approx(ddp["central_epsilon"])


@pytest.mark.e2e
def test_dropouts_beyond_the_threshold_fail_the_round_and_the_run_goes_on(tmp_path: Path) -> None:
    from common.models.bundle import load_federated_file
    from simulations.launcher import run_simulation
    from tests.conftest import FAULT_APP

    cfg = _cfg(tmp_path / "run", **{"federation.secure-aggregation": True, "data.num-sites": 3,
                                    "federation.num-rounds": 2})
    result = run_simulation(cfg, num_sites=3, echo=False, timeout_s=400,
                            extra_env={"DIFUSAL_FAULT_SITE": "site-1,site-2"}, overlay=FAULT_APP)
    assert result.returncode == 0, result.log_file.read_text()[-3000:]
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["secure_aggregation"]["status"] == "halted"
        assert "the run goes on" in record["secure_aggregation"]["reason"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "finished"
    r2 = load_federated_file(tmp_path / "run" / "checkpoints" / "round-002")
    prior = federated_arrays(build_bundle(cfg))
    assert all(np.array_equal(r2[k], prior[k]) for k in prior)  # nothing was summed: the model is unchanged


@pytest.mark.e2e
def test_secure_aggregation_over_tls_with_authenticated_sites(tmp_path: Path) -> None:
    from simulations.deploy import Deployment, default_sites

    # Prepare: the real deployment (TLS SuperLink, registered SuperNodes) with SecAgg+
    cfg = _cfg(tmp_path / "run", **{"federation.secure-aggregation": True})
    # Execute
    with Deployment(tmp_path / "dep") as dep:
        nodes = dep.start(default_sites(2))
        result = dep.run(cfg, echo=False, timeout_s=600)
    # Assert: both registered sites' masked updates were summed over TLS
    assert result.returncode == 0, result.log_file.read_text()[-3000:]
    (record,) = _records(tmp_path / "run")
    assert record["secure_aggregation"]["status"] == "ok" and record["secure_aggregation"]["summed"] == 2
    assert sorted((s["name"], s["status"]) for s in record["sites"]) == [("site-0", "ok"), ("site-1", "ok")]
    assert {s["node_id"] for s in record["sites"]} == set(nodes.values())
    assert "Uvicorn running on https://127.0.0.1:" in dep.layout.path("logs", "superlink.log").read_text()


def test_the_certificate_and_the_report_show_central_and_local_epsilon() -> None:
    from common.analysis.audit import dp_certificate
    from common.privacy.distributed_dp import site_record
    from simulations.report import ledger_section

    # Prepare: one site's ledger after 2 rounds of distributed DP, as the server records it
    plan = DistributedPlan.for_run(epsilon=6.0, delta=1e-5, clip=10.0, num_sites=3, dim=5000, rounds=2)
    entry = {**site_record(plan, 2), "central_epsilon": plan.central_epsilon([3, 2])}
    rounds = [{"round": 2, "ledger": {"site-0": {"distributed": entry}}}]
    # Execute
    cert = dp_certificate(rounds)
    html, png = ledger_section([{"round": 2, "ledger": rounds[0]["ledger"]}])
    # Assert: the auditor recomputes the local figure from the stated plan and bounds the central one from below
    checked = cert["sites"]["site-0"]["distributed"]
    assert checked["consistent"] and not cert["problems"]
    assert checked["recomputed_local_epsilon"] == pytest.approx(entry["local_epsilon"])
    assert checked["central_epsilon_floor"] == pytest.approx(6.0) and entry["central_epsilon"] > 6.0
    assert "distributed: central (vs the server)" in html and "distributed: local (vs server + other sites)" in html
    assert f"{entry['local_epsilon']:.4g}"[:4] in html and png is None
    # an under-reported local figure is a problem
    bad = dp_certificate([{"round": 2, "ledger": {"site-0": {"distributed": {**entry, "local_epsilon": 1.0}}}}])
    assert bad["problems"] and "below the recomputed" in bad["problems"][0]
