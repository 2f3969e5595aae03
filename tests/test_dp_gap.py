"""The DP-gap study's mechanisms: the prototype release is accounted and calibrated; a public warm start is used."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.privacy.ledger import PrivacyLedger
from simulations.experiments import dp_gap
from simulations.experiments import extractors as ex


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_class_sums_charge_one_release_and_noise_matches_sigma():
    rng = np.random.default_rng(0)
    x, y = _unit(rng, 40, 8), rng.integers(0, 4, 40)
    ledger = PrivacyLedger(target_epsilon=4.0, target_delta=1e-5, budget_split={"classifier": 1.0})
    noisy = dp_gap.dp_class_sums(x, y, num_classes=4, ledger=ledger, rng=np.random.default_rng(1))
    exact = dp_gap.dp_class_sums(x, y, num_classes=4, ledger=None, rng=np.random.default_rng(1))
    sigma = ledger.plan("classifier", sample_rate=1.0, planned_total_steps=1).noise_multiplier
    assert ledger.steps("classifier") == 1
    assert 3.0 < ledger.epsilon("classifier") <= 4.0 + 1e-6  # sigma calibrated to the budget, not looser
    resid = noisy - exact
    assert abs(resid.std() - sigma) < 0.35 * sigma
    # counts: the constant coordinate times sqrt 2 is the class count
    assert np.allclose(exact[:, -1] * math.sqrt(2), np.bincount(y, minlength=4))
    with pytest.raises(RuntimeError, match="budget is spent"):
        dp_gap.dp_class_sums(x, y, num_classes=4, ledger=ledger, rng=rng)  # a second release would exceed it


def test_class_sums_refuse_unnormalised_features():
    with pytest.raises(ValueError, match="unit-norm"):
        dp_gap.dp_class_sums(np.ones((3, 4)), np.zeros(3, int), num_classes=4, ledger=None,
                             rng=np.random.default_rng(0))


def test_prototypes_classify_separable_classes():
    rng = np.random.default_rng(2)
    centers = np.eye(4, 16) * 3
    y = rng.integers(0, 4, 200)
    x = centers[y] + 0.3 * rng.standard_normal((200, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sums = dp_gap.federated_prototypes(x, y, np.array(["a", "b"] * 100), epsilon=10.0, seed=0)
    assert (dp_gap.prototype_predict(sums, x) == y).mean() > 0.95


def test_federated_dp_starts_from_the_public_head():
    rng = np.random.default_rng(3)
    x = _unit(rng, 30, 6).astype(np.float32)
    y = rng.integers(0, 4, 30)
    init = nn.Linear(6, 4)
    with torch.no_grad():
        init.weight.fill_(0.5)
        init.bias.fill_(-0.25)
    # lr 0: nothing moves, so the result is exactly the starting head (zero without init)
    head, _ = ex.federated_dp(x, y, np.array(["s"] * 30), epsilon=10.0, lr=0.0, rounds=1, local_steps=2,
                              clip=1.0, seed=0, init=init)
    assert torch.equal(head.weight, init.weight) and torch.equal(head.bias, init.bias)
    head0, _ = ex.federated_dp(x, y, np.array(["s"] * 30), epsilon=10.0, lr=0.0, rounds=1, local_steps=2,
                               clip=1.0, seed=0)
    assert not head0.weight.any()
