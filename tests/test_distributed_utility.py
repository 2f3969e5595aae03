"""The example-level distributed-DP arm of the utility study: calibration, noise of the secure sum, no wrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.privacy.distributed_dp import DistributedPlan, epsilon_to_zcdp, zcdp_to_epsilon
from simulations.experiments import distributed_utility as du


def _toy(n_per_site: int = 20, sites: int = 4, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_per_site * sites, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 4, len(x))
    return x, y, np.repeat(np.arange(sites), n_per_site)


def test_noise_multiplier_composes_to_the_target_epsilon() -> None:
    for eps, rounds in ((1.0, 10), (4.0, 40), (10.0, 5)):
        z = du.noise_multiplier(eps, rounds)
        assert zcdp_to_epsilon(rounds / (2 * z * z), du.DELTA) == pytest.approx(eps, rel=1e-9)
    assert du.noise_multiplier(1.0, 10) > du.noise_multiplier(2.0, 10)  # less epsilon, more noise


def test_secure_sum_is_exact_plus_noise_of_the_calibrated_variance() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.uniform(-3, 3, 20_000) for _ in range(5)]
    # the product's example-level plan (sums of up to 3 clipped examples per site)
    plan = DistributedPlan(clip=1.0, noise_multiplier=0.5, num_sites=5, dim=20_000, rounds=1, delta=du.DELTA,
                           unit="example", max_examples=3)
    sigma_share = plan.sigma_share
    noisy = du.secure_noisy_sum(vectors, plan, np.random.default_rng(1))
    noise = (noisy - sum(vectors)) * plan.scale  # integer units; rounding adds <= 5 * 1/2
    assert abs(noise.mean()) < 5 * sigma_share * math.sqrt(5) / math.sqrt(len(noise))
    assert noise.var() == pytest.approx(5 * sigma_share**2, rel=0.03)  # the shares add: noise once, N shares


def test_fedsgd_reports_central_epsilon_at_the_target_and_a_larger_local_one() -> None:
    x, y, sites = _toy()
    init = nn.Linear(x.shape[1], 4)
    nn.init.zeros_(init.weight), nn.init.zeros_(init.bias)
    head, info = du.fedsgd(x, y, sites, epsilon=2.0, rounds=6, lr=0.05, seed=0, init=init, mode="distributed")
    assert info["central_epsilon"] == pytest.approx(2.0, rel=0.03)  # rounding grid inflates Delta by sqrt(d)/s
    rho_local = 4 * epsilon_to_zcdp(2.0, du.DELTA)  # N shares: each one carries 1/N of the variance
    assert info["local_epsilon"] == pytest.approx(zcdp_to_epsilon(rho_local, du.DELTA), rel=0.05)
    assert info["coordinates_near_wrap"] == 0
    assert torch.isfinite(head.weight).all()
    _, per_site = du.fedsgd(x, y, sites, epsilon=2.0, rounds=6, lr=0.05, seed=0, init=init, mode="per_site")
    assert per_site["site_epsilon"] == pytest.approx(2.0, rel=1e-9)


def test_fedsgd_refuses_a_site_over_the_public_example_cap() -> None:
    x, y, sites = _toy(n_per_site=du.MAX_EXAMPLES + 1, sites=2)
    with pytest.raises(ValueError, match="public cap"):
        du.fedsgd(x, y, sites, epsilon=2.0, rounds=1, lr=0.05, seed=0, init=nn.Linear(x.shape[1], 4),
                  mode="distributed")
