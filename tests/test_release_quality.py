"""release_quality: the train-on-real reference beside the release's figures (phantom sites, no release yet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
        assert row["release_size"] == 0 and "synthetic_only" not in row and "fd" not in row and "by_site" not in row
        assert row["real_pooled_n"] == sum(len(s.train) for s in sites)
        assert row["smallest_n"] == min(len(s.train) for s in sites)
        # phantom planes are easy in the frozen feature space: pooled real beats chance over the scope by far
        assert row["real_pooled"] > 1.0 / len(cfg.data.plane_scope()) + 0.2


def test_size_matched_fd_removes_the_release_size_bias_of_the_plain_estimate() -> None:
    # Prepare: real test features and two releases drawn from the SAME distribution, of 48 and of 144 images
    import numpy as np

    from common.analysis.metrics import frechet_distance
    from simulations.experiments.release_quality import subset_mean

    rng = np.random.default_rng(0)
    dim = 32
    real = rng.normal(size=(400, dim))
    fd = lambda z, _: frechet_distance(real, z)  # noqa: E731
    small = [rng.normal(size=(48, dim)) for _ in range(10)]
    large = [rng.normal(size=(144, dim)) for _ in range(10)]
    labels = lambda z: np.zeros(len(z), dtype=int)  # noqa: E731
    # Execute
    plain_small = np.mean([frechet_distance(real, z) for z in small])
    plain_large = np.mean([frechet_distance(real, z) for z in large])
    matched_large = np.mean([subset_mean(z, labels(z), fd, n=48) for z in large])
    # Assert: the plain estimate favours the larger release of the same images; the matched one does not
    assert plain_large < 0.6 * plain_small
    assert abs(matched_large - plain_small) < 0.1 * plain_small
    # a release of exactly n is scored once, a smaller one not at all, a bad pair of arrays is an error
    z = small[0]
    assert subset_mean(z, labels(z), fd, n=48) == frechet_distance(real, z)
    assert subset_mean(z[:47], labels(z[:47]), fd, n=48) is None
    with pytest.raises(ValueError, match="differ in length"):
        subset_mean(z, labels(z)[:3], fd, n=2)
    # draws where the score is undefined are left out; none defined gives None
    assert subset_mean(z, labels(z), lambda *_: None, n=10) is None


def test_every_site_gets_its_real_and_real_plus_release_figures(tmp_path: Path) -> None:
    # Prepare: a 2-round phantom run whose release got 6 public phantoms in each round
    from common.active_learning.release import ReleaseItem, ReleaseStore
    from common.phantoms.simulator import make_phantoms

    cfg = RunConfig.from_flat({"preset": "smoke", "data.images-per-site": 24})
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n")
    recs = make_phantoms(12, size=cfg.data.image_size, seed=7, site="public", id_prefix="rel")
    store = ReleaseStore(tmp_path / "release")
    for rnd, part in ((1, recs[:6]), (2, recs[6:])):
        store.add([ReleaseItem(image=r.image, plane=r.plane, ga_weeks=r.ga_weeks, source_site="site-0", round=rnd,
                               scores={}, acquisition={}, privacy={}) for r in part])
    sites = [load_site(cfg.data, seed=cfg.seed, site_index=i) for i in range(count_sites(cfg))]
    # Execute
    rows = release_quality(tmp_path)
    # Assert: both rounds score the release so far against each site's own real images
    assert [r["release_size"] for r in rows] == [6, 12]
    for row in rows:
        assert sorted(row["by_site"]) == sorted(s.name for s in sites) and row["sites"] == len(sites)
        for s in sites:
            fig = row["by_site"][s.name]
            assert fig["n"] == len(s.train) and 0.0 <= fig["real"] <= 1.0 and 0.0 <= fig["real_plus_synthetic"] <= 1.0
        assert row["sites_not_worse"] == sum(v["real_plus_synthetic"] >= v["real"] for v in row["by_site"].values())
        smallest = row["by_site"][row["smallest_site"]]
        assert (smallest["real"], smallest["real_plus_synthetic"]) == (row["real_only_smallest"],
                                                                        row["real_plus_synthetic_smallest"])
    assert rows[0]["fd_matched"] is None  # 6 and 12 images: below the matched size
