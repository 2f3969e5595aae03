"""Acquisition math: k-center greedy, balancing, thresholds, gap-driven requests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.active_learning.acquisition import (
    balanced_quota,
    condition_bins,
    entropy,
    kcenter_greedy,
    novelty,
    num_bins,
    plan_conditions,
    select,
)


def test_kcenter_picks_the_farthest_point_at_each_step() -> None:
    # Prepare: random points; recompute the farthest-point rule independently
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    # Execute
    chosen = kcenter_greedy(x, 6)
    # Assert
    assert chosen[0] == 0 and len(set(chosen)) == 6
    for step in range(1, 6):
        centers = x[chosen[:step]]
        d = np.min(np.linalg.norm(x[:, None, :] - centers[None], axis=2), axis=1)
        d[chosen[:step]] = -1
        assert chosen[step] == int(np.argmax(d))


def test_kcenter_with_existing_set_starts_from_the_point_farthest_from_it() -> None:
    x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 5.0]])
    existing = np.array([[0.0, 0.0]])
    assert kcenter_greedy(x, 2, existing=existing) == [2, 3]


@given(n=st.integers(1, 30), k=st.integers(0, 40))
@settings(max_examples=30, deadline=None)
def test_kcenter_respects_the_budget(n: int, k: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, 2))
    chosen = kcenter_greedy(x, k)
    assert len(chosen) == min(n, k) and len(set(chosen)) == len(chosen)


def test_balanced_quota_hits_target_proportions_when_supply_allows() -> None:
    # Prepare: 3 bins with plenty of supply, target 1:2:1
    bins = np.repeat([0, 1, 2], 50)
    target = np.zeros(num_bins())
    target[[0, 1, 2]] = [1, 2, 1]
    # Execute
    quota = balanced_quota(bins, 40, target)
    # Assert
    assert quota == {0: 10, 1: 20, 2: 10}


def test_balanced_quota_redistributes_short_supply() -> None:
    bins = np.array([0] * 2 + [1] * 50 + [2] * 50)
    quota = balanced_quota(bins, 30, np.ones(num_bins()))
    assert quota[0] == 2 and quota[1] + quota[2] == 28 and abs(quota[1] - quota[2]) <= 1


def test_select_balances_planes_and_applies_the_quality_threshold() -> None:
    # Prepare: 6 planes x 20 candidates, GA in one bin; half of plane 0 is low quality
    rng = np.random.default_rng(1)
    plane = np.repeat(np.arange(6), 20)
    ga = np.full(120, 22.0)
    bins = condition_bins(plane, ga)
    quality = np.ones(120)
    quality[:10] = 0.1
    unc = rng.random(120)
    # Execute
    sel = select(k=30, bins=bins, quality=quality, uncertainty=unc, features=rng.normal(size=(120, 4)),
                 ordering="uncertainty", quality_threshold=0.5, rng=rng)
    # Assert
    counts = np.bincount(plane[sel.indices], minlength=6)
    assert counts.tolist() == [5] * 6
    assert all(quality[i] >= 0.5 for i in sel.indices)
    # inside each plane, the most uncertain candidates were taken
    for p in range(6):
        pool = [i for i in range(p * 20, p * 20 + 20) if quality[i] >= 0.5]
        top = sorted(pool, key=lambda i: -unc[i])[:5]
        assert sorted(i for i in sel.indices if plane[i] == p) == sorted(top)
    assert all("top uncertainty" in r for r in sel.reasons)


def test_random_baseline_ignores_scores_and_is_seeded() -> None:
    bins = np.zeros(50, dtype=int)
    args = dict(k=10, bins=bins, quality=np.zeros(50), uncertainty=np.arange(50.0), features=np.zeros((50, 2)),
                ordering="random", balance=False)
    a = select(**args, rng=np.random.default_rng(3))
    b = select(**args, rng=np.random.default_rng(3))
    assert a.indices == b.indices and len(set(a.indices)) == 10


def test_plan_conditions_asks_for_the_gaps() -> None:
    # Prepare: the release already holds many images of bin 0 and none elsewhere
    rng = np.random.default_rng(0)
    release_bins = np.zeros(200, dtype=int)
    # Execute
    plane, ga = plan_conditions(release_bins, 500, rng=rng)
    bins = condition_bins(plane, ga)
    # Assert
    assert (bins == 0).mean() < 0.01  # the covered bin is (nearly) never asked for
    assert set(np.unique(bins)) >= set(range(1, num_bins()))  # every gap is asked for
    assert ga.min() >= 14.0 and ga.max() <= 40.0


def test_plan_conditions_asks_only_for_planes_in_the_consortium_scope() -> None:
    # Prepare: an empty release; the consortium releases brain and femur only (indices 0 and 2)
    rng = np.random.default_rng(1)
    # Execute
    plane, ga = plan_conditions(np.zeros(0, dtype=int), 400, rng=rng, planes=[0, 2])
    # Assert: only in-scope planes, both asked for, GA bins of both covered
    assert set(plane.tolist()) == {0, 2}
    n_ga = num_bins() // 6
    assert set(np.unique(condition_bins(plane, ga))) == set(range(n_ga)) | set(range(2 * n_ga, 3 * n_ga))
    with pytest.raises(ValueError, match="out of range"):
        plan_conditions(np.zeros(0, dtype=int), 4, rng=rng, planes=[6])
    with pytest.raises(ValueError, match="at least one plane"):
        plan_conditions(np.zeros(0, dtype=int), 4, rng=rng, planes=[])


def test_entropy_and_novelty_values() -> None:
    assert entropy(np.array([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx([0.0, np.log(2)], abs=1e-9)
    assert novelty(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[0.0, 0.0]])).tolist() == [0.0, 5.0]
    assert np.isinf(novelty(np.zeros((2, 2)), None)).all()


def test_bin_uncertainty_means_per_bin_and_plans_more_where_the_models_are_unsure() -> None:
    from common.active_learning.acquisition import bin_uncertainty, condition_bins, num_bins, plan_conditions

    # Prepare: bins 0 and 1 scored (0.2 twice, 0.9 once); every other bin unseen; one NaN score ignored
    bins = np.array([0, 0, 1, 1])
    u = bin_uncertainty(bins, np.array([0.2, 0.2, 0.9, np.nan]))
    # Assert: per-bin means, unseen bins get the highest mean seen
    assert u is not None and u.shape == (num_bins(),)
    assert u[0] == pytest.approx(0.2) and u[1] == pytest.approx(0.9) and np.all(u[2:] == pytest.approx(0.9))
    assert bin_uncertainty(np.array([3]), np.array([np.nan])) is None
    # Execute: with equal release counts, the planner asks more often for the uncertain bin than the certain one
    release = np.repeat(np.arange(num_bins()), 2)
    plane, ga = plan_conditions(release, 4000, rng=np.random.default_rng(0), bin_uncertainty=u)
    asked = np.bincount(condition_bins(plane, ga), minlength=num_bins())
    assert asked[1] > 1.3 * asked[0]
