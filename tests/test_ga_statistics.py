"""The noisy-sufficient-statistics study (simulations.experiments.ga_statistics): calibrated, bounded, accounted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.core.errors import ConfigError
from common.models.downstream import GARegressor
from common.privacy.ledger import PrivacyLedger
from simulations.experiments.ga_statistics import (
    SENSITIVITY,
    STATISTICS_SAMPLE_RATE,
    StatisticsBudgetExhausted,
    StatisticsDesign,
    check_regressor,
    clean_statistics,
    fold_into_head,
    release_statistics,
    solve_ridge,
    unpack,
    vector_length,
)


def _data(n: int = 40, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 0.3
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True) / 0.9, 1.0)  # inside the clipping norm
    return x, x @ np.array([0.5, -0.2, 0.1])[:d] + 0.05 * rng.normal(size=n)


def test_one_example_moves_the_released_vector_by_at_most_the_sensitivity() -> None:
    x, y = _data()
    x[0] *= 100.0  # far outside norm 1: clipped
    y[0] = -7.0
    full = clean_statistics(x, y)
    worst = 0.0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        worst = max(worst, float(np.linalg.norm(full - clean_statistics(x[keep], y[keep]))))
    assert worst <= SENSITIVITY + 1e-12
    # the bound is reached by a row of norm 1 with |y| = 1
    edge = np.zeros((1, 3))
    edge[0, 0] = 1.0
    assert np.linalg.norm(clean_statistics(edge, np.array([1.0]))) == pytest.approx(SENSITIVITY)


def test_noise_has_the_calibrated_std() -> None:
    x, y = _data()
    clean = clean_statistics(x, y)
    sigma = 0.8
    draws = np.stack([release_statistics(None, "regressor", x, y, noise_seed=s, noise_multiplier=sigma).vector
                      for s in range(800)])
    std = (draws - clean).std()
    assert std == pytest.approx(sigma * SENSITIVITY, rel=0.03)
    assert abs((draws - clean).mean()) < 0.05


def test_release_is_one_gaussian_step_in_the_ledger_and_a_second_is_refused() -> None:
    x, y = _data()
    ledger = PrivacyLedger(target_epsilon=4.0, target_delta=1e-5, budget_split={"regressor": 1.0})
    out = release_statistics(ledger, "regressor", x, y, noise_seed=1)
    assert ledger.accountant_for("regressor").history == [(out.noise_multiplier, STATISTICS_SAMPLE_RATE, 1)]
    assert 3.5 < out.epsilon <= 4.0  # the whole share, spent by the one planned release
    assert out.noise_std == pytest.approx(out.noise_multiplier * SENSITIVITY)
    with pytest.raises(StatisticsBudgetExhausted, match="past its budget"):
        release_statistics(ledger, "regressor", x, y, noise_seed=2)
    assert ledger.steps("regressor") == 1


def test_solve_ridge_without_noise_is_ridge_least_squares() -> None:
    x, y = _data(200)
    w, var = solve_ridge(clean_statistics(x, y), 3, ridge=0.5)
    want = np.linalg.solve(x.T @ x + 0.5 * np.eye(3), x.T @ y)
    np.testing.assert_allclose(w, want, rtol=1e-9)
    assert var == pytest.approx(np.mean((x @ w - y) ** 2), rel=1e-6)
    a, _, _, m = unpack(clean_statistics(x, y), 3)
    np.testing.assert_allclose(a, a.T)
    assert m == pytest.approx(200.0)
    with pytest.raises(ValueError, match="entries"):
        unpack(np.zeros(vector_length(3) + 1), 3)


def test_folded_head_adds_the_fitted_correction() -> None:
    reg = GARegressor(32, backbone="scattering", film=False)
    check_regressor(reg)
    d = reg.backbone.out_dim
    rng = np.random.default_rng(3)
    design = StatisticsDesign(mean=rng.normal(size=d), basis=rng.normal(size=(2, d)) / d, spacing_center=0.8,
                              spacing_scale=0.5, row_scale=2.0, target_scale=0.2)
    feats = torch.randn(6, d)
    spacing = torch.tensor([0.5, 0.8, 1.0, 1.5, 2.0, 3.0])
    w = np.array([0.3, -0.1, 0.2, 0.05])

    def first_output() -> np.ndarray:
        with torch.no_grad():
            x = torch.cat([feats, reg.scale_input(spacing)], 1)
            return (x @ reg.head.weight[0] + reg.head.bias[0]).double().numpy()

    before = first_output()
    fold_into_head(reg, design, w, residual_variance=0.25)
    np.testing.assert_allclose(first_output() - before, design.target_scale * design.rows(feats, spacing) @ w,
                               atol=1e-5)
    with torch.no_grad():  # the log-size std is the residual std in the head's units
        _, logvar = reg.forward_features(feats, spacing, log_hc=True)
    np.testing.assert_allclose(torch.exp(0.5 * logvar).numpy(), math.sqrt(0.25) * 0.2, rtol=1e-4)
    assert StatisticsDesign.from_arrays(design.to_arrays()).rows(feats, spacing) == pytest.approx(
        design.rows(feats, spacing))


def test_a_trained_film_is_refused() -> None:
    with pytest.raises(ConfigError, match="FiLM"):
        check_regressor(GARegressor(32, backbone="scattering", film=True))
