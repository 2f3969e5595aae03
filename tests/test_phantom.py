"""Phantom generator: determinism, Hadlock sizing, pixel spacing, scanner profiles, shadowing, validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.core.records import PLANE_INDEX, PLANES
from common.phantoms.profiles import SCANNER_PROFILES, ScannerProfile, build_geometry, get_profile
from common.phantoms.simulator import (
    BONE,
    MASK_LABELS,
    SOFT,
    Capsule,
    ellipse_perimeter,
    image_scene,
    make_phantoms,
    render_phantom,
    write_phantom_grids,
)

BONE_LABEL = MASK_LABELS.index("bone")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _head_circumference_mm(mask: np.ndarray, spacing: float) -> float:
    """Perimeter of the ellipse with the second moments of the head (skull + brain + fluid inside it)."""
    head = np.isin(mask, [MASK_LABELS.index(k) for k in ("bone", "brain", "fluid")])
    labels, n = ndimage.label(head)
    sizes = ndimage.sum(head, labels, range(1, n + 1))
    rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    cov = np.cov(np.stack([rows, cols]).astype(float))
    lam = np.linalg.eigvalsh(cov)
    # A filled ellipse of semi-axes a >= b has variances a^2 / 4 and b^2 / 4 along its axes.
    return ellipse_perimeter(2 * math.sqrt(lam[1]), 2 * math.sqrt(lam[0])) * spacing


def _femur_length_mm(mask: np.ndarray, spacing: float) -> float:
    """Extent, along its principal axis, of the largest connected bone component (the femur)."""
    labels, n = ndimage.label(mask == BONE_LABEL)
    sizes = ndimage.sum(mask == BONE_LABEL, labels, range(1, n + 1))
    pts = np.argwhere(labels == 1 + int(np.argmax(sizes))).astype(float)
    pts -= pts.mean(0)
    axis = np.linalg.eigh(np.cov(pts.T))[1][:, -1]
    proj = pts @ axis
    return (proj.max() - proj.min() + 1.0) * spacing


def test_same_seed_same_images_and_different_seed_differs() -> None:
    # Prepare
    kwargs = dict(size=32, profile="aloka")
    # Execute
    a = make_phantoms(4, seed=3, **kwargs)
    b = make_phantoms(4, seed=3, **kwargs)
    c = make_phantoms(4, seed=4, **kwargs)
    # Assert
    for ra, rb in zip(a, b):
        assert np.array_equal(ra.image, rb.image)
        assert (ra.plane, ra.ga_weeks) == (rb.plane, rb.ga_weeks)
    assert not any(np.array_equal(ra.image, rc.image) for ra, rc in zip(a, c))


def test_image_i_does_not_depend_on_n_or_workers() -> None:
    # Prepare / Execute
    five = make_phantoms(5, size=32, seed=11)
    ten = make_phantoms(10, size=32, seed=11)
    ten_parallel = make_phantoms(10, size=32, seed=11, workers=2)
    # Assert
    for r5, r10 in zip(five, ten[:5]):
        assert np.array_equal(r5.image, r10.image) and r5.image_id == r10.image_id
    for r1, r2 in zip(ten, ten_parallel):
        assert np.array_equal(r1.image, r2.image) and r1.plane == r2.plane and r1.ga_weeks == r2.ga_weeks


@pytest.mark.parametrize("ga", [20.0, 30.0])
def test_skull_circumference_in_mask_follows_hadlock(ga: float) -> None:
    # Prepare
    profile = SCANNER_PROFILES["voluson_e6"]
    # Execute
    ph = render_phantom(PLANE_INDEX["fetal_brain"], ga, size=128, profile=profile, rng=_rng(5))
    # Assert
    hc = _head_circumference_mm(ph.mask, ph.pixel_spacing_mm)
    assert hc == pytest.approx(ph.biometry["hc_mm"], rel=0.10)
    assert ph.measured["hc_px"] * ph.pixel_spacing_mm == pytest.approx(ph.biometry["hc_mm"], rel=0.01)
    assert ph.measured["bpd_px"] * ph.pixel_spacing_mm == pytest.approx(ph.biometry["bpd_mm"], rel=1e-6)


def test_head_and_femur_grow_with_ga_as_hadlock_says() -> None:
    # Prepare
    profile = SCANNER_PROFILES["voluson_e6"]
    brain, femur = PLANE_INDEX["fetal_brain"], PLANE_INDEX["fetal_femur"]
    # Execute
    heads = [render_phantom(brain, ga, size=128, profile=profile, rng=_rng(1)) for ga in (20.0, 30.0)]
    femurs = [render_phantom(femur, ga, size=128, profile=profile, rng=_rng(2)) for ga in (20.0, 30.0)]
    # Assert
    hc = [_head_circumference_mm(p.mask, p.pixel_spacing_mm) for p in heads]
    fl = [_femur_length_mm(p.mask, p.pixel_spacing_mm) for p in femurs]
    assert hc[1] / hc[0] == pytest.approx(heads[1].biometry["hc_mm"] / heads[0].biometry["hc_mm"], rel=0.10)
    assert fl[1] / fl[0] == pytest.approx(femurs[1].biometry["fl_mm"] / femurs[0].biometry["fl_mm"], rel=0.10)
    for p, length in zip(femurs, fl):
        assert length == pytest.approx(p.biometry["fl_mm"], rel=0.10)
        assert p.measured["fl_px"] * p.pixel_spacing_mm == pytest.approx(p.biometry["fl_mm"])


@pytest.mark.parametrize("name", sorted(SCANNER_PROFILES))
def test_pixel_spacing_is_depth_over_rows_for_every_profile(name: str) -> None:
    # Prepare
    profile = SCANNER_PROFILES[name]
    # Execute
    recs = make_phantoms(2, size=48, seed=0, profile=name)
    ph = render_phantom(0, 25.0, size=48, profile=profile, rng=_rng(0))
    # Assert
    assert ph.pixel_spacing_mm == pytest.approx(profile.depth_mm / 48)
    assert all(r.pixel_spacing_mm == pytest.approx(profile.depth_mm / 48) for r in recs)
    assert ph.image.shape == ph.mask.shape == (48, 48) and ph.image.dtype == ph.mask.dtype == np.uint8
    assert ph.mask.max() < len(MASK_LABELS)


def test_at_least_four_profiles_and_they_differ_in_settings() -> None:
    # Prepare / Execute
    profiles = SCANNER_PROFILES.values()
    settings = {(p.probe, p.frequency_mhz, p.depth_mm, p.dynamic_range_db, p.gain_db) for p in profiles}
    # Assert
    assert len(SCANNER_PROFILES) >= 4 and len(settings) == len(SCANNER_PROFILES)
    assert {p.probe for p in profiles} == {"convex", "linear"}


def test_profiles_differ_in_brightness_and_speckle_size() -> None:
    # Prepare: the same phantoms through two scanners, and uniform tissue for the speckle grain
    bright, dark = SCANNER_PROFILES["voluson_s10"], SCANNER_PROFILES["aloka"]

    def mean_level(profile: object) -> float:
        return float(np.mean([render_phantom(pl, 28.0, size=64, profile=profile, rng=_rng(pl)).image.mean()
                              for pl in range(len(PLANES))]))

    def speckle_lag1(name: str) -> np.ndarray:
        """Lag-1 autocorrelation (lateral, axial) of the speckle of uniform tissue, texture high-passed away."""
        geom = build_geometry(SCANNER_PROFILES[name], 128)
        out = []
        for seed in (0, 1):
            disp, _ = image_scene((), SOFT, geom, _rng(seed))
            patch = disp[24:88, 32:96] - ndimage.gaussian_filter(disp[24:88, 32:96], 2.0)
            patch = patch[4:-4, 4:-4]
            var = np.mean(patch * patch)
            out.append([np.mean(patch[:, :-1] * patch[:, 1:]) / var, np.mean(patch[:-1] * patch[1:]) / var])
        return np.mean(out, axis=0)

    # Execute
    levels = mean_level(bright), mean_level(dark)
    s10, aloka = speckle_lag1("voluson_s10"), speckle_lag1("aloka")
    portable, e6 = speckle_lag1("portable"), speckle_lag1("voluson_e6")
    # Assert: s10 has more gain, a lighter gray map and speckle reduction (smoother, more correlated grain);
    # the 3 MHz probe's wider beam gives laterally coarser speckle than the 5 MHz one.
    assert levels[0] > levels[1] + 5
    assert s10.mean() > aloka.mean() + 0.08
    assert portable[0] > e6[0] + 0.05


def test_bone_casts_an_acoustic_shadow() -> None:
    # Prepare: a horizontal femur in uniform soft tissue
    geom = build_geometry(SCANNER_PROFILES["voluson_e6"], 128)
    femur = Capsule(-15.0, 60.0, 15.0, 60.0, 2.0, BONE)
    sp = geom.pixel_spacing_mm
    rows = slice(int(70 / sp), int(95 / sp))
    below = slice(int(64 - 8 / sp), int(64 + 8 / sp))
    beside = np.r_[int(64 - 45 / sp):int(64 - 30 / sp), int(64 + 30 / sp):int(64 + 45 / sp)]
    # Execute
    disp, mask = image_scene((femur,), SOFT, geom, _rng(4))
    # Assert
    assert disp[rows, below].mean() < 0.5 * disp[rows][:, beside].mean()
    assert (mask == BONE_LABEL).any() and disp[int(60 / sp), 64] > disp[rows][:, beside].mean()


def test_records_carry_the_requested_labels() -> None:
    # Prepare
    probs = [0.0] * len(PLANES)
    probs[PLANE_INDEX["fetal_thorax"]] = 1.0
    # Execute
    recs = make_phantoms(6, size=32, seed=2, profile="mindray", plane_probs=probs, ga_range=(22.0, 23.0),
                         site="site-a", id_prefix="px")
    # Assert
    assert all(r.plane == PLANE_INDEX["fetal_thorax"] and 22.0 <= r.ga_weeks <= 23.0 for r in recs)
    assert all(r.site == "site-a" and r.source == "phantom" and r.extra["profile"] == "mindray" for r in recs)
    assert [r.image_id for r in recs] == [f"px-2-{i}" for i in range(6)]
    assert len({r.patient_id for r in recs}) == 6
    assert set(recs[0].extra["biometry"]) == {"hc_mm", "bpd_mm", "ac_mm", "fl_mm"}
    assert make_phantoms(1, size=32, seed=2, profile="mindray")[0].site == "mindray"


def test_uniform_plane_probabilities_cover_every_plane() -> None:
    # Prepare / Execute
    recs = make_phantoms(60, size=16, seed=7)
    # Assert
    assert {r.plane for r in recs} == set(range(len(PLANES)))
    assert all(14.0 <= r.ga_weeks <= 40.0 for r in recs)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: render_phantom(7, 20.0, size=32, profile=get_profile("aloka"), rng=_rng(0)), r"plane=7.*0\.\.5"),
        (lambda: render_phantom(0, 50.0, size=32, profile=get_profile("aloka"), rng=_rng(0)),
         r"ga_weeks=50.*14.*40"),
        (lambda: render_phantom(0, 20.0, size=0, profile=get_profile("aloka"), rng=_rng(0)), r"size=0.*16\.\.1024"),
        (lambda: make_phantoms(2, size=32, seed=0, profile="siemens"), r"profile='siemens'.*voluson_e6"),
        (lambda: make_phantoms(2, size=32, seed=0, ga_range=(10.0, 20.0)), r"ga_range"),
        (lambda: make_phantoms(2, size=32, seed=0, plane_probs=[1.0, 0.0]), r"plane_probs"),
        (lambda: make_phantoms(-1, size=32, seed=0), r"n=-1"),
    ],
)
def test_bad_input_raises_value_error_naming_argument_and_range(call: object, pattern: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=pattern):
        call()  # type: ignore[operator]


def test_write_phantom_grids_writes_both_figures(tmp_path: Path) -> None:
    # Prepare / Execute
    paths = write_phantom_grids(tmp_path / "figs", size=16, seed=0)
    # Assert
    assert [p.name for p in paths] == ["phantoms_by_plane_ga.png", "phantoms_by_scanner.png"]
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        assert a.size[0] > 7 * 16 and a.size[1] > 6 * 16  # 6 planes x 7 ages
        assert b.size[1] > len(SCANNER_PROFILES) * 16


def test_invalid_scanner_profile_is_rejected() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=r"depth_mm=-5.*\[10, 400\]"):
        ScannerProfile("broken", depth_mm=-5.0)
