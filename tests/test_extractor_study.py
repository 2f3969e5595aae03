"""The extractor study's own machinery (simulations.experiments.extractors): folds and the closed-form DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.privacy.dpsgd import train_private
from common.privacy.ledger import PrivacyLedger
from simulations.experiments import extractors as ex

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


def test_grouped_folds_keep_every_case_whole_and_balance_the_folds() -> None:
    # 40 cases of 4 images (one per plane, like the African patients) and 8 single images
    labels, groups = [], []
    for c in range(40):
        groups.append(list(range(len(labels), len(labels) + 4)))
        labels += [0, 1, 2, 3]
    for c in range(8):
        groups.append([len(labels)])
        labels.append(c % 4)
    folds = ex.grouped_stratified_folds(np.array(labels), groups, 5, seed=3)
    where = {i: f for f, idx in enumerate(folds) for i in idx.tolist()}
    assert sorted(where) == list(range(len(labels)))  # every image in exactly one fold
    assert all(len({where[i] for i in g}) == 1 for g in groups)  # no case split
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 4, sizes  # the earlier greedy cost filled one fold and left two empty
    for f in folds:
        assert np.bincount(np.array(labels)[f], minlength=4).min() >= 7


def test_closed_form_dp_sgd_is_the_opacus_step_and_charges_the_same_accountant() -> None:
    # Prepare: one softmax head, two copies; features with norm > clip so clipping binds
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 12, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * 1.7
    y = torch.randint(0, 4, (20,), generator=g)
    opacus_head, closed = nn.Linear(12, 4), nn.Linear(12, 4)
    closed.load_state_dict(opacus_head.state_dict())
    start = opacus_head.weight.detach().clone()
    ledgers = [PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"classifier": 1.0})
               for _ in range(2)]
    # Execute: q = 1 (batch >= N) and a vanishing noise multiplier make both deterministic
    train_private(opacus_head, ex._per_example_ce, TensorDataset(x, y), steps=5, batch_size=20, lr=0.7,
                  ledger=ledgers[0], model_key="classifier", planned_total_steps=5, max_grad_norm=0.5,
                  optimizer="sgd", noise_multiplier=1e-9, noise_seed=1, grad_sample_mode="functorch")
    ledgers[1].plan("classifier", sample_rate=1.0, planned_total_steps=5, noise_multiplier=1e-9)
    ex.linear_dp_sgd(closed, x, y, steps=5, batch_size=20, lr=0.7, ledger=ledgers[1], planned_total_steps=5, optimizer="sgd",
                     clip=0.5, generator=torch.Generator().manual_seed(1))
    # Assert: the same weights (to float rounding), far from the start, and the same accountant history
    assert (opacus_head.weight - start).abs().max() > 0.1
    assert torch.allclose(opacus_head.weight, closed.weight, atol=1e-6)
    assert torch.allclose(opacus_head.bias, closed.bias, atol=1e-6)
    assert ledgers[0].accountant_for("classifier").history == ledgers[1].accountant_for("classifier").history


def test_closed_form_federated_dp_spends_exactly_the_budget_per_site() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 4, 60)
    sites = np.array(["a", "b", "c"])[rng.integers(0, 3, 60)]
    _, info = ex.federated_dp(x, y, sites, epsilon=4.0, lr=1.0, rounds=3, local_steps=5, clip=1.0, seed=0)
    assert sorted(info) == ["a", "b", "c"]
    for site in info.values():
        assert site["steps"] == 15 and 3.5 < site["epsilon"] <= 4.0


def test_federated_dp_with_a_batch_size_samples_at_the_products_rate_and_reports_every_round() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 4, 60)
    sites = np.array(["a"] * 40 + ["b"] * 20)
    seen: list[tuple[int, torch.Tensor]] = []
    head, info = ex.federated_dp(x, y, sites, epsilon=4.0, lr=0.5, rounds=3, local_steps=5, clip=1.0, seed=0,
                                 batch_size=16, on_round=lambda r, h: seen.append((r, h.weight.detach().clone())))
    # q = 1 / ceil(n / 16): 1/3 at the 40-image site, 1/2 at the 20-image one (the product's expected batch 16)
    assert info["a"]["q"] == round(1 / 3, 4) and info["b"]["q"] == 0.5
    assert [r for r, _ in seen] == [0, 1, 2]
    assert torch.equal(seen[-1][1], head.weight) and not torch.equal(seen[0][1], seen[-1][1])


def test_release_check_pairs_arms_and_counts_better_in_the_metrics_direction() -> None:
    from simulations.experiments.release_in_heads import paired

    out = {"real": [0.7, 0.8, 0.9], "real+release": [0.75, 0.8, 0.85]}
    acc = paired(out, lower_is_better=False)["paired_difference"]
    assert acc["better"] == 1 and acc["worse"] == 1 and acc["pairs"] == 3 and abs(acc["mean"]) < 1e-12
    mae = paired({"real": [7.0, 7.0], "real+release": [7.5, 7.2]}, lower_is_better=True)["paired_difference"]
    assert mae["worse"] == 2 and mae["better"] == 0 and mae["mean"] == pytest.approx(0.35)


def test_release_check_trains_the_real_arm_once_per_fold_and_seed_and_pairs_every_release_with_it() -> None:
    from simulations.experiments.release_in_heads import SEEDS, compare

    calls: list[tuple[int, int, object]] = []

    def train_and_score(f: int, test: np.ndarray, seed: int, release: object) -> float:
        calls.append((f, seed, release))
        return 10.0 * f + seed + (0.0 if release is None else float(release))  # type: ignore[arg-type]

    folds = [np.array([0]), np.array([1])]
    out = compare(folds, {"a": 0.5, "b": -1.0}, train_and_score, lower_is_better=False)
    assert [c for c in calls if c[2] is None] == [(f, s, None) for f in range(2) for s in range(SEEDS)]
    assert len(calls) == 3 * 2 * SEEDS
    a = out["a"]["paired_difference"]
    assert a["mean"] == pytest.approx(0.5) and a["better"] == 2 * SEEDS
    assert out["b"]["paired_difference"]["worse"] == 2 * SEEDS and out["b"]["real"] == out["a"]["real"]


def test_closed_form_adam_is_the_opacus_adam_step() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    ledgers = [PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"classifier": 1.0})
               for _ in range(2)]
    train_private(a, ex._per_example_ce, TensorDataset(x, y), steps=4, batch_size=16, lr=0.05, ledger=ledgers[0],
                  model_key="classifier", planned_total_steps=4, max_grad_norm=1.0, optimizer="adam",
                  noise_multiplier=1e-9, noise_seed=1, grad_sample_mode="functorch")
    ledgers[1].plan("classifier", sample_rate=1.0, planned_total_steps=4, noise_multiplier=1e-9)
    ex.linear_dp_sgd(b, x, y, steps=4, batch_size=16, lr=0.05, ledger=ledgers[1], planned_total_steps=4, clip=1.0,
                     generator=torch.Generator().manual_seed(1), optimizer="adam")
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)
