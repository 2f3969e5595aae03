"""Example-level distributed DP of the plane classifier (``privacy.distributed-classifier``): DP-FedSGD through SecAgg+.

In process: Flower's real ``SecAggPlusWorkflow`` against the sites' real ``ClientApp`` train handler (real site data,
real ledgers) over :class:`simulations.benchmarks.secagg_round.MemoryGrid`. End to end: the product's apps in Flower's
simulation runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.app import train as site_train
from client.site import resolve_site
from common.analysis.audit import check_ledger_model
from common.core.config import RunConfig
from common.core.errors import ConfigError
from common.data.sites import load_site
from common.data.tensors import records_to_dataset
from common.federated.fedsgd import ServerAdam, clipped_gradient_sum
from common.models.downstream import classifier_loss
from common.privacy.distributed_dp import DistributedPlan, classifier_noise_multiplier, classifier_plan
from common.privacy.ledger import PrivacyLedger, history_epsilon
from common.privacy.site_state import SiteStateStore
from server.secure_aggregation import SecureAggregation
from simulations.benchmarks.secagg_round import MemoryGrid, secure_aggregation_for

ROOT = Path(__file__).resolve().parents[1]


def _cfg(run_dir: Path | str = "", **overrides: object) -> RunConfig:
    return RunConfig.from_flat({"preset": "smoke", "run-dir": str(run_dir), "federation.secure-aggregation": True,
                                "privacy.distributed-classifier": True, **overrides})


# -- config --------------------------------------------------------------------------------------------------------
def test_the_distributed_classifier_needs_secure_aggregation_a_budget_and_planes_to_learn() -> None:
    with pytest.raises(ConfigError, match="needs federation.secure_aggregation=true"):
        _cfg(**{"federation.secure-aggregation": False})
    with pytest.raises(ConfigError, match="choose one unit"):
        _cfg(**{"privacy.distributed-dp": True})
    with pytest.raises(ConfigError, match="needs privacy.target_epsilon"):
        _cfg(**{"privacy.target-epsilon": None})
    with pytest.raises(ConfigError, match="one-plane label scope"):
        _cfg(**{"data.planes": "fetal_brain"})
    assert not RunConfig.from_flat({"preset": "smoke"}).privacy.distributed_classifier  # per-site DP-SGD default


# -- the site's gradient sum, the server's optimizer ---------------------------------------------------------------
class _Head(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.head = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_the_gradient_sum_clips_each_example_and_one_example_moves_it_by_at_most_the_clip() -> None:
    # Prepare: a linear softmax head (closed-form per-example gradient) on 12 random feature vectors
    torch.manual_seed(0)
    model = _Head(5, 3).double()
    x, y = 4 * torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    data = TensorDataset(x, y)

    def loss(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    # Execute
    total = clipped_gradient_sum(model, loss, data, clip=0.5)
    without_last = clipped_gradient_sum(model, loss, TensorDataset(x[:-1], y[:-1]), clip=0.5)
    # Assert: the closed form, clipped per example; removing one example moves the sum by <= the clip
    with torch.no_grad():
        err = torch.softmax(model(x), 1) - nn.functional.one_hot(y, 3).double()
        per = torch.cat([torch.einsum("bk,bd->bkd", err, x).reshape(12, -1), err], 1)  # [W (row-major) | b]
        raw_norms = per.norm(dim=1)
        per = per * (0.5 / raw_norms).clamp(max=1.0)[:, None]
    np.testing.assert_allclose(total, per.sum(0).numpy(), rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(total - without_last) <= 0.5 + 1e-12
    assert (raw_norms > 0.5).sum() >= 10 and (raw_norms < 0.5).any()  # both cases: clipped and left as is


def test_server_adam_matches_torch_adam_and_resumes_from_its_state() -> None:
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=7) for _ in range(6)]
    p = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1)
    ours, params = ServerAdam(0.1), np.zeros(7)
    resumed = ServerAdam(0.1)
    for i, g in enumerate(grads):
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        params = ours.step(params, g)
        if i == 2:  # a checkpoint after the third step, restored into a fresh optimizer
            resumed.load_state_arrays(ours.state_arrays())
            resumed_params = params.copy()
        elif i > 2:
            resumed_params = resumed.step(resumed_params, g)
    np.testing.assert_allclose(params, p.detach().numpy(), rtol=1e-12)
    np.testing.assert_array_equal(resumed_params, params)


# -- the example-level plan and the ledger -------------------------------------------------------------------------
def test_example_level_shares_sum_to_the_calibrated_noise_and_a_too_large_sum_is_refused() -> None:
    # Prepare: 4 sites, gradient sums of up to 30 clipped examples each
    plan = DistributedPlan(clip=1.0, noise_multiplier=2.0, num_sites=4, dim=3000, rounds=10, delta=1e-6,
                           unit="example", max_examples=64)
    rng = np.random.default_rng(1)
    sums = [rng.uniform(-30, 30, plan.dim) for _ in range(4)]
    # Execute: each site encodes with its share; the modular sum is decoded
    residues = [plan.encode(v, np.random.default_rng(10 + i))[0] for i, v in enumerate(sums)]
    mean = plan.decode(np.mod(sum(residues), 2**22), 4)
    # Assert: the mean of the sums plus noise of std z * Delta / (s * N) (the noise of the sum, once)
    noise = mean - np.mean(sums, axis=0)
    assert plan.sensitivity == pytest.approx(plan.scale * 1.0 + np.sqrt(plan.dim))  # one example, rounding
    assert noise.std() == pytest.approx(2.0 * plan.sensitivity / (plan.scale * 4), rel=0.05)
    assert abs(noise.mean()) < 4 * noise.std() / np.sqrt(plan.dim)
    with pytest.raises(ValueError, match="beyond max_examples x clip"):
        plan.encode(np.full(plan.dim, 64.5), rng)


def test_the_ledger_enforces_the_central_figure_and_reports_the_local_one_across_save_and_restore() -> None:
    # Prepare: a classifier budget of 4, the plan's noise for 6 steps without subsampling
    ledger = PrivacyLedger(target_epsilon=10.0, target_delta=1e-5,
                           budget_split={"generator": 0.6, "classifier": 0.4})
    plan = ledger.plan("classifier", sample_rate=1.0, planned_total_steps=6)
    ledger.mark_distributed("classifier", 5)
    # Execute: 6 steps, a save and restore in the middle
    for _ in range(3):
        ledger.accountant_for("classifier").step(noise_multiplier=plan.noise_multiplier, sample_rate=1.0)
    ledger = PrivacyLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    for _ in range(3):
        assert not ledger.would_exceed("classifier", noise_multiplier=plan.noise_multiplier, sample_rate=1.0)
        ledger.accountant_for("classifier").step(noise_multiplier=plan.noise_multiplier, sample_rate=1.0)
    # Assert: central within the budget and refused beyond it; local = the site's own share (sigma / sqrt(5))
    entry = ledger.summary()["classifier"]
    assert entry["epsilon"] <= 4.0 and entry["epsilon"] > 3.9
    assert ledger.would_exceed("classifier", noise_multiplier=plan.noise_multiplier, sample_rate=1.0)
    local = history_epsilon([(plan.noise_multiplier / np.sqrt(5), 1.0, 6)], 4e-6)
    assert entry["distributed"]["local_epsilon"] == pytest.approx(local) and local > 2 * entry["epsilon"]
    with pytest.raises(ConfigError, match="cannot mix"):
        ledger.mark_distributed("classifier", 3)
    # the audit recomputes both; an under-reported local figure is flagged
    assert check_ledger_model(entry)["consistent"]
    forged = {**entry, "distributed": {**entry["distributed"], "local_epsilon": entry["epsilon"]}}
    checked = check_ledger_model(forged)
    assert not checked["consistent"] and "local epsilon" in checked["note"]


# -- through Flower's SecAgg+ with the sites' real handler ----------------------------------------------------------
class _RecordingAdam(ServerAdam):
    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.grads: list[np.ndarray] = []

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        self.grads.append(np.asarray(grad).copy())
        return super().step(params, grad)


@pytest.mark.usefixtures("task_identity")
def test_a_distributed_classifier_step_sums_clipped_gradients_with_the_noise_once(tmp_path: Path) -> None:
    # Prepare: 3 phantom sites, one DP-FedSGD step per round, noise reproducible so the test can see it
    cfg = _cfg(tmp_path, **{"data.num-sites": 3, "privacy.distributed-steps": 1,
                            "privacy.insecure-reproducible-noise": True})
    secure, bundle = secure_aggregation_for(cfg)
    secure.adam = _RecordingAdam(cfg.privacy.distributed_lr)
    before = {k: v.clone() for k, v in bundle.classifier.head.state_dict().items()}
    grid = MemoryGrid({1000 + i: site_train for i in range(3)}, cfg.to_run_config())
    sums = []
    for i in range(3):  # what each site sums: its training images' clipped gradients at the sent weights
        site = load_site(cfg.data, seed=cfg.seed, site_index=i)
        data = records_to_dataset(site.train, image_size=cfg.data.image_size)
        sums.append(clipped_gradient_sum(bundle.classifier, classifier_loss, data, clip=cfg.privacy.max_grad_norm))
    # Execute
    summary = secure.train_classifier(grid, bundle, 1)
    # Assert: the server decoded the mean of the sites' sums plus the calibrated noise of all three shares, once
    z = classifier_noise_multiplier(cfg)
    plan = classifier_plan(cfg, len(sums[0]), z)
    noise = secure.adam.grads[0] - np.mean(sums, axis=0)
    assert noise.std() == pytest.approx(z * plan.sensitivity / (plan.scale * 3), rel=0.1)
    assert summary["steps"] == 1 and summary["contributors"] == [3] and not summary["halted"]
    assert any(not torch.equal(v, bundle.classifier.head.state_dict()[k]) for k, v in before.items())
    # no site's vector reached the server: the mod emptied every reply's arrays
    assert all(len(a) == 0 for r in grid.replies for a in r.content.array_records.values())
    # each site accounted the step in its one ledger: central = the summary's, local beside it
    for i in range(3):
        name, state_dir = resolve_site({"partition-id": i}, cfg).resolved(
            load_site(cfg.data, seed=cfg.seed, site_index=i).name, tmp_path)
        entry = SiteStateStore(state_dir).load_ledger(before_round=2, privacy=cfg.privacy).summary()["classifier"]
        assert entry["history"] == [[z, 1.0, 1]]
        assert entry["epsilon"] == pytest.approx(summary["central_epsilon"])
        assert summary["local_epsilon"][name] == pytest.approx(entry["distributed"]["local_epsilon"])
        assert entry["distributed"]["local_epsilon"] > entry["epsilon"]
    # Execute again: the run planned one step in all; the sites decline, the server takes no noise-only step
    params = {k: v.clone() for k, v in bundle.classifier.head.state_dict().items()}
    again = secure.train_classifier(grid, bundle, 1)
    assert again["steps"] == 0 and again["halted"][0]["error"] == "no site contributed a gradient"
    assert all(torch.equal(v, bundle.classifier.head.state_dict()[k]) for k, v in params.items())
    assert any("budget-exhausted" in w for r in secure.guard.reports.values() for w in r.warnings)


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_distributed_classifier_run_through_flower_certifies_central_and_local_epsilon(tmp_path: Path) -> None:
    # Prepare / Execute: the product's apps in Flower's simulation runtime, 2 sites, 2 rounds of 2 steps each, a
    # query round after each (the classifier scores the release's candidates)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "smoke", "--run-dir", str(run_dir),
           "--set", "federation.secure-aggregation=true", "--set", "privacy.distributed-classifier=true",
           "--set", "privacy.distributed-steps=2", "--set", "federation.num-rounds=2", "--set", "federation.al-every=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "central (local" in done.stdout  # the closing summary names both figures
    # Assert: 4 steps summed from both sites; each site's ledger holds the central history, the local figure beside
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]["secure_aggregation"]["classifier"]
    assert summary["contributors"] == [2, 2, 2, 2] and summary["steps"] == 2
    assert summary["central_epsilon"] == pytest.approx(summary["planned_central_epsilon"])
    assert summary["central_epsilon"] <= 10.0 * 0.2 * (1 + 1e-9)  # the smoke classifier's share of the budget
    for name, entry in records[-1]["ledger"].items():
        classifier = entry["classifier"]
        assert classifier["history"] == [[summary["noise_multiplier"], 1.0, 4]]
        assert classifier["distributed"]["local_epsilon"] == pytest.approx(summary["local_epsilon"][name])
    sidecar = json.loads((run_dir / "checkpoints" / "round-002" / "sidecar.json").read_text())
    assert sidecar["privacy"]["distributed_classifier"]["central_epsilon"] == pytest.approx(summary["central_epsilon"])
    assert "classifier: local (vs server + other sites)" in (run_dir / "report.html").read_text()
    # each released image's certificate names the classifier that scored it, at its round's central and local figures
    release = [json.loads(line) for line in (run_dir / "release" / "metadata.jsonl").read_text().splitlines()]
    assert {r["round"] for r in release} == {1, 2}
    for rec in release:
        scoring = rec["privacy"]["scoring"]
        ledger = records[rec["round"] - 1]["ledger"][rec["source_site"]]["classifier"]
        assert scoring["central_epsilon"] == pytest.approx(ledger["epsilon"])
        assert scoring["local_epsilon"] == pytest.approx(ledger["distributed"]["local_epsilon"])
        assert scoring["local_epsilon"] > scoring["central_epsilon"]
    assert "privacy.scoring" in json.loads((run_dir / "release" / "release.json").read_text())["privacy_statement"]
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert audit["headline"]["certificate_problems"] == 0
    checked = audit["certificate"]["sites"][next(iter(records[-1]["ledger"]))]["models"]["classifier"]
    local = classifier["distributed"]["local_epsilon"]  # the audit's accountant may be tighter, never looser
    assert checked["consistent"] and local * 0.99 <= checked["recomputed_local_epsilon"] <= local * (1 + 1e-9)


@pytest.mark.usefixtures("task_identity")
def test_a_dropout_in_a_classifier_step_halts_it_by_default_and_is_survived_above_the_share_floor(
        tmp_path: Path) -> None:
    # Prepare: 4 sites; site 3 vanishes after sharing its keys in the DP-FedSGD sub-round
    def run(min_shares: float, drop: dict[int, str]) -> tuple[dict, bool, SecureAggregation]:
        cfg = _cfg(tmp_path / f"{min_shares}-{bool(drop)}", **{"data.num-sites": 4, "privacy.distributed-steps": 1,
                                                                "privacy.distributed-min-shares": min_shares})
        secure, bundle = secure_aggregation_for(cfg)
        before = {k: v.clone() for k, v in bundle.classifier.head.state_dict().items()}
        grid = MemoryGrid({1000 + i: site_train for i in range(4)}, cfg.to_run_config(), drop=drop)
        summary = secure.train_classifier(grid, bundle, 1)
        moved = any(not torch.equal(v, bundle.classifier.head.state_dict()[k]) for k, v in before.items())
        return summary, moved, secure

    # Execute / Assert: the default (every site's share in every sum) halts the step: nothing unmasked, no update
    strict, moved, _ = run(1.0, {1003: "collect_masked_vectors"})
    assert strict["steps"] == 0 and strict["contributors"] == [] and not moved and strict["min_shares"] == 4
    # a floor of 3 of 4: the survivors' sum is used; it holds exactly the shares every ledger accounted
    floor, moved, secure = run(0.75, {1003: "collect_masked_vectors"})
    assert floor["steps"] == 1 and floor["contributors"] == [3] and floor["min_shares"] == 3 and moved
    assert floor["central_epsilon"] == pytest.approx(floor["enforced_central_epsilon"])
    dropped = [r for r in secure.guard.reports.values() if r.name == "node-1003"]
    assert dropped and any("dropped out of a DP-FedSGD sub-round" in w for w in dropped[0].warnings)
    assert dropped[0].status != "unavailable"  # a sub-round leaves the round's status to the site's training
    # the same floor without a dropout: 4 shares, more noise than accounted, so the realised central figure is lower
    full, _, _ = run(0.75, {})
    assert full["contributors"] == [4] and full["central_epsilon"] < 0.9 * full["enforced_central_epsilon"]
    z = full["noise_multiplier"]
    delta = _cfg().privacy.target_delta * _cfg().privacy.budget_classifier
    assert full["central_epsilon"] == pytest.approx(history_epsilon([(z * np.sqrt(4 / 3), 1.0, 1)], delta))
    assert full["noise_multiplier_all_sites"] == pytest.approx(z * np.sqrt(4 / 3))


@pytest.mark.usefixtures("task_identity")
def test_a_site_whose_ledger_planned_per_site_dp_sgd_for_the_classifier_refuses_a_distributed_step(
        tmp_path: Path) -> None:
    # Prepare: 3 sites; site 0's ledger already fixed a DP-SGD plan for the classifier (a run switched modes)
    cfg = _cfg(tmp_path, **{"data.num-sites": 3, "privacy.distributed-steps": 1, "privacy.distributed-min-shares": 0.6})
    name, state_dir = resolve_site({"partition-id": 0}, cfg).resolved(load_site(cfg.data, seed=cfg.seed,
                                                                               site_index=0).name, tmp_path)
    store = SiteStateStore(state_dir)
    ledger = store.load_ledger(before_round=1, privacy=cfg.privacy)
    ledger.plan("classifier", sample_rate=0.3, planned_total_steps=10)
    store.save_ledger(1, ledger, info={"site": name})
    secure, bundle = secure_aggregation_for(cfg)
    grid = MemoryGrid({1000 + i: site_train for i in range(3)}, cfg.to_run_config())
    # Execute
    with pytest.warns(UserWarning, match="differs from the planned"):
        summary = secure.train_classifier(grid, bundle, 1)
    # Assert: site 0 sent nothing and says why; the two others' step went on (threshold 2 of 3)
    assert summary["contributors"] == [2]
    warnings = [w for r in secure.guard.reports.values() for w in r.warnings]
    assert any("cannot switch the classifier's mechanism" in w for w in warnings), warnings


class _Checkpoint:
    def __init__(self, info: dict, state: dict) -> None:
        self._info, self._state = info, state

    def info(self) -> dict:
        return self._info

    def strategy_state(self) -> dict:
        return self._state


def test_resuming_a_secure_run_restores_the_shares_summed_and_the_servers_adam() -> None:
    # Prepare: a checkpoint of a run with the distributed classifier and no site-level distributed DP (its summary
    # records False there: resuming such a run used to crash on it)
    from server.federation import restore_secure_aggregation

    cfg = _cfg()
    secure, _ = secure_aggregation_for(cfg)
    params = secure.adam.step(np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0]))
    info = {"secure_aggregation": {"distributed_dp": False, "classifier": {"contributors": [2, 2, 2]}}}
    state = {"current_arrays/x": np.zeros(1), **secure.state_arrays()}
    # Execute
    resumed = restore_secure_aggregation(cfg, secure.guard, _Checkpoint(info, state))
    # Assert: the history and the optimizer continue where they were
    assert resumed.classifier_contributors == [2, 2, 2] and resumed.contributors == []
    grad = np.array([0.3, 0.3, -1.0, 2.0])
    np.testing.assert_array_equal(resumed.adam.step(params, grad), secure.adam.step(params, grad))
    fresh = restore_secure_aggregation(cfg, secure.guard, None)
    assert fresh.classifier_contributors == [] and fresh.adam.state_arrays() == {}


@pytest.mark.slow
@pytest.mark.e2e
def test_a_killed_distributed_classifier_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    # Prepare: the same 2-round run with the distributed classifier, uninterrupted and killed after round 1
    from common.models.bundle import load_federated_file
    from common.privacy.site_state import copy_site_secrets
    from simulations.launcher import run_simulation
    from tests.conftest import FAULT_APP

    def cfg(name: str) -> RunConfig:
        return _cfg(tmp_path / name, **{"federation.num-rounds": 2, "privacy.distributed-steps": 2})

    # Execute
    full = run_simulation(cfg("full"), num_sites=2, echo=False, timeout_s=600)
    assert len(copy_site_secrets(tmp_path / "full", tmp_path / "killed")) == 2  # the same sites, the same noise
    crash = run_simulation(cfg("killed"), num_sites=2, echo=False, timeout_s=600,
                           extra_env={"DIFUSAL_FAULT_AFTER_ROUND": "1"}, overlay=FAULT_APP)
    resumed = run_simulation(cfg("killed"), num_sites=2, resume=True, echo=False, timeout_s=600)
    # Assert: the classifier (server Adam restored, the sites' steps replayed with the same noise) and the ledgers
    assert full.returncode == 0 and crash.returncode != 0 and resumed.returncode == 0
    a = load_federated_file(tmp_path / "full" / "checkpoints" / "round-002")
    b = load_federated_file(tmp_path / "killed" / "checkpoints" / "round-002")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    records = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("full", "killed")]
    assert records[0][-1]["ledger"] == records[1][-1]["ledger"]
    assert records[1][-1]["secure_aggregation"]["classifier"]["contributors"] == [2, 2, 2, 2]
