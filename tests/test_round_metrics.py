"""Per-round pooled held-out metrics: weighted by test examples, only over the sites that report a metric."""

from __future__ import annotations

import pytest

from common.federated.round_metrics import pooled, round_summary


def test_pooling_weights_by_test_examples_and_skips_sites_without_the_metric() -> None:
    # Prepare: site a (30 test images, GA known), site b (10, no GA), site c (failed: no evaluation), site d (0 images)
    record = {"round": 2, "active_learning": {"release_size": 12}, "sites": [
        {"name": "a", "evaluation": {"num-examples": 30.0, "plane-accuracy": 0.9, "ga-mae-days": 10.0}},
        {"name": "b", "evaluation": {"num-examples": 10.0, "plane-accuracy": 0.5}},
        {"name": "c", "evaluation": {}},
        {"name": "d", "evaluation": {"num-examples": 0.0, "plane-accuracy": 0.0}},
    ]}
    # Execute
    summary = round_summary(record)
    # Assert
    assert summary["plane_accuracy"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert summary["ga_mae_days"] == pytest.approx(10.0)  # only site a knows GA
    assert summary["plane_macro_f1"] is None and summary["ga_coverage"] is None
    assert summary["round"] == 2 and summary["release_size"] == 12
    assert pooled([], "plane-accuracy") is None
    assert round_summary({"round": 1, "sites": []})["release_size"] == 0
