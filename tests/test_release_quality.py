"""release_quality: the train-on-real reference beside the release's figures (phantom sites, no release yet)."""

from __future__ import annotations

import json
from pathlib import Path

from common.core.config import RunConfig
from common.data.sites import load_site
from simulations.config_args import count_sites
from simulations.experiments.release_quality import release_quality


def test_a_run_without_a_release_reports_train_on_real_and_no_release_figures(tmp_path: Path) -> None:
    # Prepare: a finished 2-round phantom run whose coordinator released nothing
    cfg = RunConfig.from_flat({"preset": "smoke", "data.images-per-site": 24})
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    failed = {"sites": [{"name": "site-1", "status": "failed", "reason": "OutOfMemoryError"}]}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2, **failed}) + "\n")
    sites = [load_site(cfg.data, seed=cfg.seed, site_index=i) for i in range(count_sites(cfg))]
    # Execute
    rows = release_quality(tmp_path)
    # Assert
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["failed_site_replies"] for r in rows] == [0, 1]  # a failed site is counted, not hidden
    for row in rows:
        assert row["release_size"] == 0 and "synthetic_only" not in row and "fd" not in row
        assert row["real_pooled_n"] == sum(len(s.train) for s in sites)
        assert row["smallest_n"] == min(len(s.train) for s in sites)
        # phantom planes are easy in the frozen feature space: pooled real beats chance over the scope by far
        assert row["real_pooled"] > 1.0 / len(cfg.data.plane_scope()) + 0.2
