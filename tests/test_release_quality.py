"""release_quality: the train-on-real reference beside the release's figures (phantom sites, no release yet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.config import RunConfig
from common.data.sites import load_site
from simulations.config_args import count_sites
from simulations.experiments.release_quality import L2_GRID, SYNTHETIC_WEIGHTS, release_quality


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
        # each site's cross-validated weight for the release is on the grid; weight 0 is the site alone
        for fig in row["by_site"].values():
            assert fig["weight_cv"] in SYNTHETIC_WEIGHTS and 0.0 <= fig["real_plus_synthetic_cv"] <= 1.0
            if fig["weight_cv"] == 0.0:
                assert fig["real_plus_synthetic_cv"] == fig["real"]
        assert row["sites_not_worse_cv"] == sum(v["real_plus_synthetic_cv"] >= v["real"]
                                                for v in row["by_site"].values())
        assert row["l2_real"] in L2_GRID and 0.0 <= row["real_pooled_cv"] <= 1.0
        smallest = row["by_site"][row["smallest_site"]]
        assert (smallest["real"], smallest["real_plus_synthetic"]) == (row["real_only_smallest"],
                                                                        row["real_plus_synthetic_smallest"])
    assert rows[0]["fd_matched"] is None  # 6 and 12 images: below the matched size


def _blobs(rng, n: int, planes: list[int], *, shift: float = 3.0, dim: int = 8):
    """Gaussian features, one mean per plane (``shift`` apart along its own axis), labels from ``planes``."""
    import numpy as np

    y = np.array([planes[i % len(planes)] for i in range(n)])
    z = rng.normal(size=(n, dim)).astype(np.float32)
    for k, p in enumerate(planes):
        z[y == p, k] += shift
    return z, y


def test_a_site_weighs_a_mislabelled_release_out_and_a_faithful_one_in() -> None:
    # Prepare: a site's 30 real images (its own groups: one image each) and two releases of 60 images from the same
    # plane means: one labelled right, one with every label moved to the next plane
    import numpy as np

    from simulations.experiments.release_quality import choose_synthetic_weight

    rng = np.random.default_rng(0)
    planes = [0, 1, 2]
    z, y = _blobs(rng, 30, planes, shift=1.5)
    groups = [[i] for i in range(len(y))]
    syn_z, syn_y = _blobs(rng, 60, planes, shift=1.5)
    wrong_y = np.array([planes[(planes.index(int(p)) + 1) % 3] for p in syn_y])
    # Execute
    faithful = choose_synthetic_weight(z, y, groups, syn_z, syn_y, planes)
    mislabelled = choose_synthetic_weight(z, y, groups, syn_z, wrong_y, planes)
    # Assert: the held-out real images decide; a release that teaches the wrong planes gets no weight
    assert mislabelled == 0.0
    assert faithful > 0.0


def test_the_probe_weights_rows_as_their_copies_would() -> None:
    # Prepare: a small labelled set, and the same set with its first 10 rows written twice
    import numpy as np
    import torch

    from common.models.features import fit_softmax

    rng = np.random.default_rng(1)
    z, y = _blobs(rng, 40, [0, 1, 2], shift=1.0)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    twice = fit_softmax(torch.cat([zt, zt[:10]]), torch.cat([yt, yt[:10]]), num_classes=3, l2=1e-3)
    # Execute
    weighted = fit_softmax(zt, yt, num_classes=3, l2=1e-3, weight=torch.tensor([2.0] * 10 + [1.0] * 30))
    ones = fit_softmax(zt, yt, num_classes=3, l2=1e-3, weight=torch.ones(40))
    dropped = fit_softmax(zt, yt, num_classes=3, l2=1e-3, weight=torch.tensor([0.0] * 10 + [1.0] * 30))
    # Assert: weight 2 = a row written twice; weights of 1 = the plain fit; weight 0 = the row left out
    plain = fit_softmax(zt, yt, num_classes=3, l2=1e-3)
    without = fit_softmax(zt[10:], yt[10:], num_classes=3, l2=1e-3)
    for a, b in ((weighted, twice), (ones, plain), (dropped, without)):
        assert torch.allclose(a.weight, b.weight, atol=1e-3) and torch.allclose(a.bias, b.bias, atol=1e-3)
    assert not torch.allclose(plain.weight, twice.weight, atol=1e-2)
    for bad in (torch.ones(39), torch.full((40,), -1.0), torch.zeros(40), torch.full((40,), float("nan"))):
        with pytest.raises(ValueError, match="one finite non-negative number per row"):
            fit_softmax(zt, yt, num_classes=3, l2=1e-3, weight=bad)
