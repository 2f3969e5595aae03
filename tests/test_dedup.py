"""Duplicate detection: exact copies, verified near copies, boundaries crossed, the African defect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from common.core.records import UltrasoundRecord
from common.data.dedup import dhash64, find_duplicates, pixel_hash
from common.data.loaders import load_african

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random uint8 image (blurred noise), structured enough for a gradient hash."""
    noise = np.random.default_rng(seed).normal(size=(size, size))
    field = ndimage.gaussian_filter(noise, sigma=4.0)
    field = (field - field.min()) / (field.max() - field.min())
    return (field * 255).astype(np.uint8)


def record(image: np.ndarray, k: int, *, patient: str | None = None, site: str = "a",
           split: str | None = None) -> UltrasoundRecord:
    """A record around ``image`` with distinct ids."""
    return UltrasoundRecord(image=image, plane=0, ga_weeks=None, pixel_spacing_mm=None, site=site,
                            patient_id=patient or f"p{k}", image_id=f"img{k}", source="test",
                            extra={"official_split": split})


def test_exact_and_near_copies_found_distinct_images_not() -> None:
    # Prepare: 0..5 distinct; 6 = exact copy of 0 at another site; 7 = 1 plus faint noise, other split
    images = [smooth_image(s) for s in range(6)]
    noisy = np.clip(images[1].astype(int) + np.random.default_rng(9).integers(-3, 4, images[1].shape), 0, 255)
    recs = [record(im, k, split="train") for k, im in enumerate(images)]
    recs.append(record(images[0].copy(), 6, site="b", split="train"))
    recs.append(record(noisy.astype(np.uint8), 7, split="test"))
    # Execute
    report = find_duplicates(recs)
    # Assert
    exact, near = report.of_kind("exact"), report.of_kind("near")
    assert [g.indices for g in exact] == [(0, 6)] and exact[0].cross_site and not exact[0].cross_split
    assert [g.indices for g in near] == [(1, 7)] and near[0].cross_split and not near[0].cross_site
    assert all(g.cross_patient for g in report.groups)
    assert report.exact_pairs == 1 and report.near_pairs == 1
    assert report.near_links[0].correlation > 0.99
    assert sorted(report.links()) == [(0, 6), (1, 7)]
    assert "1 exact duplicate pairs" in report.summary() and "1 near-duplicate links" in report.summary()


def test_near_search_can_be_disabled_and_correlation_gate_applies() -> None:
    # Prepare: a noisy copy of 0, and an inverted copy (negative correlation)
    base = smooth_image(3)
    noise = np.random.default_rng(1).integers(-12, 13, base.shape)
    recs = [record(base, 0), record(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8), 1),
            record(255 - base, 2)]
    # Execute: threshold 64 makes every pair a candidate, so only the correlation gate decides
    off = find_duplicates(recs, near_threshold=-1)
    everything = find_duplicates(recs, near_threshold=64)
    measured = everything.near_links[0].correlation
    stricter = find_duplicates(recs, near_threshold=64, min_correlation=measured + 0.001)
    # Assert
    assert off.groups == ()
    assert [g.indices for g in everything.of_kind("near")] == [(0, 1)]  # the inverted image is not merged
    assert 0.95 <= measured < 0.999
    assert stricter.near_pairs == 0


def test_three_exact_copies_count_three_pairs_and_one_group() -> None:
    # Prepare
    base = smooth_image(4)
    recs = [record(base.copy(), k) for k in range(3)] + [record(smooth_image(5), 3)]
    # Execute
    report = find_duplicates(recs)
    # Assert
    assert [g.indices for g in report.of_kind("exact")] == [(0, 1, 2)]
    assert report.exact_pairs == 3 and report.near_pairs == 0


def test_hashes_are_stable_and_sensitive() -> None:
    # Prepare
    a, b = smooth_image(6), smooth_image(7)
    # Execute
    ha, ha2, hb = dhash64(a), dhash64(a.copy()), dhash64(b)
    # Assert
    assert ha.shape == (8,) and np.array_equal(ha, ha2)
    assert np.unpackbits(ha ^ hb).sum() > 16  # independent images differ in many of the 64 bits
    assert pixel_hash(record(a, 0)) == pixel_hash(record(a.copy(), 1)) != pixel_hash(record(b, 2))


def test_bad_thresholds_raise() -> None:
    # Prepare
    recs = [record(smooth_image(0), 0)]
    # Execute / Assert
    with pytest.raises(ValueError, match="near_threshold"):
        find_duplicates(recs, near_threshold=65)
    with pytest.raises(ValueError, match="min_correlation"):
        find_duplicates(recs, min_correlation=1.5)


def test_african_shared_train_has_16_cross_patient_copies() -> None:
    # Prepare
    root = SHARED / "african_fetal_planes"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    recs = load_african(root, image_size=32, split="train").records
    ids = [r.image_id for r in recs]
    # Execute
    report = find_duplicates(recs)
    # Assert: the published defect (16 byte-identical images under another patient id) is found
    assert report.exact_pairs >= 16
    exact = report.of_kind("exact")
    assert all(g.cross_patient and not g.cross_site for g in exact)
    pair = {ids.index("train/patient008_MWI_plane1"), ids.index("train/patient019_MWI_plane1")}
    assert any(pair <= set(g.indices) for g in exact)
