"""Privacy audit: distances and memorisation, DCR, MIA metrics, the Steinke et al. bound, canaries, the DP
certificate, the generator attack and the audit command end to end (tiny, seeded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import stats

from common.analysis.audit import (
    canary_inclusion,
    check_ledger_model,
    closer_to_members_share,
    dp_certificate,
    make_canaries,
    memorization_scan,
    recompute_epsilon,
    tiled_l2,
)
from common.analysis.audit_mia import (
    bootstrap_ci,
    canary_audit,
    denoising_errors,
    mia_summary,
    roc_auc,
    roc_curve,
    steinke_epsilon_lower_bound,
    steinke_p_value,
    tpr_at_fpr,
)
from common.core.records import PLANES, UltrasoundRecord
from common.phantoms.simulator import make_phantoms
from common.privacy.ledger import PrivacyLedger


def _phantoms(n: int, seed: int) -> np.ndarray:
    """``n`` seeded 32x32 phantom images."""
    return np.stack([r.image for r in make_phantoms(n, size=32, seed=seed)])


def plant_canaries(records: Sequence[Any], canaries: np.ndarray, included: np.ndarray, *, site: str, seed: int,
                   planes: Sequence[int] | None = None,
                   ga_weeks: Sequence[float | None] | None = None) -> list[Any]:
    """The site's records plus the included canaries as records (given or random planes; GA given or unknown)."""
    plane = np.random.default_rng(seed).integers(0, len(PLANES), len(canaries)) if planes is None else planes
    ga = [None] * len(canaries) if ga_weeks is None else ga_weeks
    extra = [UltrasoundRecord(image=np.asarray(c, np.uint8), plane=int(plane[i]), ga_weeks=ga[i], pixel_spacing_mm=None,
                              site=site, patient_id=f"canary-{i}", image_id=f"canary-{i}", source="canary",
                              extra={"canary": i}) for i, c in enumerate(canaries) if included[i]]
    return list(records) + extra


def _ledger_summary(sigma: float, q: float, steps: int) -> dict:
    """A ledger ``summary()`` (the round.json form) after ``steps`` generator steps at (sigma, q)."""
    ledger = PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"generator": 0.6, "classifier": 0.4})
    ledger.plan("generator", sample_rate=q, planned_total_steps=steps, noise_multiplier=sigma)
    ledger.accountant_for("generator").history = [(sigma, q, steps)]
    return ledger.summary()


# -- distances and memorisation ---------------------------------------------------------------------------
def test_tiled_l2_matches_hand_computed_values() -> None:
    # Prepare: one image differs from black in exactly one quadrant (a 2x2 tiling puts it in one tile)
    a = np.zeros((1, 8, 8), np.uint8)
    b = a.copy()
    b[0, :4, :4] = 255
    # Execute
    tiled, plain = tiled_l2(a, b, grid=2), tiled_l2(a, b, grid=1)
    # Assert: that tile's RMS is 1; the whole image's RMS is sqrt(16/64) = 0.5
    assert tiled[0, 0] == pytest.approx(1.0)
    assert plain[0, 0] == pytest.approx(0.5)
    assert tiled_l2(b, b)[0, 0] == pytest.approx(0.0, abs=1e-7)


def test_planted_exact_copy_is_always_found() -> None:
    # Prepare: 24 private phantoms; a release of 6 other phantoms plus an exact copy of private image 7
    private = _phantoms(24, seed=1)
    released = np.concatenate([_phantoms(6, seed=2), private[7:8]])
    # Execute
    scan = memorization_scan(released, private)
    # Assert
    assert scan["nearest"][6] == 7 and scan["distance"][6] == pytest.approx(0.0, abs=1e-7)
    assert scan["near_copy"][6] and scan["exact_copy"][6] and scan["correlation"][6] == pytest.approx(1.0)
    assert scan["near_copy"].sum() == 1 and scan["exact_copy"].sum() == 1
    assert (scan["ratio"][:6] > 0.5).all()


@settings(max_examples=25, deadline=None)
@given(n_private=st.integers(1, 40), n_released=st.integers(1, 10), seed=st.integers(0, 2**16), data=st.data())
def test_a_planted_copy_is_found_wherever_it_is_planted(n_private: int, n_released: int, seed: int,
                                                       data: st.DataObject) -> None:
    # Prepare: random images; one released image replaced by a copy of a random private image
    rng = np.random.default_rng(seed)
    private = rng.integers(0, 256, (n_private, 16, 16), dtype=np.uint8)
    released = rng.integers(0, 256, (n_released, 16, 16), dtype=np.uint8)
    src, dst = data.draw(st.integers(0, n_private - 1)), data.draw(st.integers(0, n_released - 1))
    released[dst] = private[src]
    # Execute
    scan = memorization_scan(released, private, n_neighbors=50)
    # Assert: found and flagged (with one private image the ratio is undefined, the exact-copy test still holds)
    assert np.array_equal(private[scan["nearest"][dst]], private[src]) and scan["exact_copy"][dst]
    assert scan["near_copy"][dst] and (n_private == 1 or scan["ratio"][dst] < 1e-6)


def test_noisy_copy_is_a_near_copy_but_not_exact() -> None:
    # Prepare: a copy with +-4 grey levels of noise
    private = _phantoms(16, seed=3)
    noisy = np.clip(private[2].astype(int) + np.random.default_rng(0).integers(-4, 5, (32, 32)), 0, 255)
    # Execute
    scan = memorization_scan(noisy[None].astype(np.uint8), private)
    # Assert
    assert scan["nearest"][0] == 2 and scan["near_copy"][0] and not scan["exact_copy"][0]


def test_closer_to_members_share_detects_copies_and_not_fresh_draws() -> None:
    # Prepare
    members, nonmembers = _phantoms(20, seed=4), _phantoms(20, seed=5)
    # Execute
    copies = closer_to_members_share(members[:10], members, nonmembers)
    fresh = closer_to_members_share(_phantoms(40, seed=6), members, nonmembers)
    hub = closer_to_members_share(np.repeat(members[:1], 30, axis=0), members, nonmembers)
    # Assert: 10 distinct copied members are significant; one member copied 30 times is a single draw (hub)
    assert copies["share"] == 1.0 and copies["p_value"] < 0.01 and copies["distinct_nearest"] == 10
    assert fresh["expected"] == 0.5 and fresh["p_value"] > 0.01
    assert hub["share"] == 1.0 and hub["p_value"] > 0.3


# -- MIA metrics -------------------------------------------------------------------------------------------
def test_auc_roc_and_tpr_at_fpr_match_hand_computed_values() -> None:
    # Prepare: pairs (3>1), (3>2), (2>1), (2=2 tie, 1/2) -> AUC 3.5/4
    assert roc_auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    member, nonmember = np.array([0.9, 0.8, 0.3]), np.array([0.85, 0.2, 0.1, 0.05])
    # Execute
    fpr, tpr, thr = roc_curve(member, nonmember)
    # Assert: at FPR 0 only 0.9 is above every non-member; at FPR 1/4 (threshold 0.3) all members are caught
    assert tpr_at_fpr(member, nonmember, 0.1) == pytest.approx(1 / 3)
    assert tpr_at_fpr(member, nonmember, 0.25) == pytest.approx(1.0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    assert roc_auc(member, nonmember) == pytest.approx(np.trapezoid(tpr, fpr))


def test_auc_on_identical_distributions_is_near_half_with_covering_interval() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=1500), rng.normal(size=1500)
    # Execute
    summary = mia_summary(a, b, n_boot=200, seed=1)
    # Assert
    assert abs(summary["auc"] - 0.5) < 0.03
    assert summary["auc_ci95"][0] < 0.5 < summary["auc_ci95"][1]
    assert summary["tpr_at_0.01_fpr"] < 0.05


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_data() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    small = (rng.normal(1, 1, 30), rng.normal(0, 1, 30))
    large = (rng.normal(1, 1, 600), rng.normal(0, 1, 600))
    # Execute
    lo_s, hi_s = bootstrap_ci(*small, roc_auc, n_boot=300)
    lo_l, hi_l = bootstrap_ci(*large, roc_auc, n_boot=300)
    # Assert
    assert lo_s <= roc_auc(*small) <= hi_s and lo_l <= roc_auc(*large) <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    assert roc_auc(*large) == pytest.approx(stats.norm.cdf(1 / math.sqrt(2)), abs=0.03)  # binormal AUC


# -- Steinke, Nasr & Jagielski 2023 ------------------------------------------------------------------------
def test_steinke_p_value_at_eps0_is_a_fair_coin_tail_and_grows_with_eps_and_delta() -> None:
    assert steinke_p_value(100, 40, 28, 0.0, 0.0) == pytest.approx(stats.binom.sf(27, 40, 0.5))
    ps = [steinke_p_value(100, 40, 28, e, 0.0) for e in (0.0, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(ps, ps[1:]))
    assert steinke_p_value(100, 40, 28, 0.5, 1e-3) > ps[1]


def test_steinke_bound_is_zero_at_chance_and_positive_for_perfect_guesses() -> None:
    # r = 100 perfect guesses: q^100 < 0.05 -> q < 0.9705 -> eps > log(q / (1 - q)) = 3.49
    assert steinke_epsilon_lower_bound(1000, 100, 50, delta=0.0) == 0.0
    assert steinke_epsilon_lower_bound(1000, 100, 100, delta=0.0) == pytest.approx(3.49, abs=0.01)
    assert steinke_epsilon_lower_bound(1000, 100, 100, delta=1e-5) <= steinke_epsilon_lower_bound(1000, 100, 100,
                                                                                                 delta=0.0)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 300), data=st.data())
def test_steinke_bound_is_monotone_in_correct_guesses(m: int, data: st.DataObject) -> None:
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, r - 1))
    assert steinke_epsilon_lower_bound(m, r, v, delta=1e-5) <= steinke_epsilon_lower_bound(m, r, v + 1, delta=1e-5)


def test_steinke_bound_is_sound_for_randomised_response() -> None:
    # Prepare: guesses of an exactly 1-DP mechanism (randomised response) are correct w.p. e/(1+e)
    rng = np.random.default_rng(0)
    q = 1 / (1 + math.exp(-1.0))
    # Execute: 300 audits of 200 guesses each
    bounds = [steinke_epsilon_lower_bound(200, 200, int(rng.binomial(200, q)), delta=0.0) for _ in range(300)]
    # Assert: a 95% lower bound exceeds the true epsilon at most ~5% of the time
    assert np.mean(np.array(bounds) > 1.0) <= 0.09
    assert np.median(bounds) > 0.3  # and it has power


def test_canary_audit_separated_scores_beat_random_scores() -> None:
    # Prepare
    included = canary_inclusion(200, seed=0)
    perfect = included.astype(float) + np.random.default_rng(1).normal(0, 0.01, 200)
    random = np.random.default_rng(2).normal(size=200)
    # Execute
    good, chance = canary_audit(perfect, included, delta=1e-5), canary_audit(random, included, delta=1e-5)
    # Assert
    assert good["epsilon_lower_bound"] > 1.5 and good["auc"] > 0.99
    assert chance["epsilon_lower_bound"] < 0.5
    assert [row["k"] for row in good["per_k"]] == [25, 50, 100]


def test_canaries_are_distinct_binary_patterns_and_inclusion_is_seeded() -> None:
    # Execute
    canaries = make_canaries(16, size=32, seed=0)
    inc = canary_inclusion(1000, seed=3)
    records = plant_canaries([], canaries, inc[:16], site="s", seed=0)
    # Assert
    assert canaries.shape == (16, 32, 32) and canaries.dtype == np.uint8
    assert set(np.unique(canaries)) == {0, 255}
    assert tiled_l2(canaries, canaries, grid=1)[~np.eye(16, dtype=bool)].min() > 0.3
    assert np.array_equal(inc, canary_inclusion(1000, seed=3)) and 450 < inc.sum() < 550
    assert len(records) == inc[:16].sum() and all(r.source == "canary" and r.site == "s" for r in records)


def test_stamped_canaries_change_only_one_patch_of_their_base() -> None:
    # Prepare
    base = _phantoms(6, seed=7)
    # Execute
    stamped = make_canaries(6, size=32, seed=1, base=base, patch=8)
    records = plant_canaries(["r"], stamped, np.ones(6, bool), site="s", seed=0, planes=[1] * 6, ga_weeks=[20.0] * 6)
    # Assert: at most an 8x8 patch differs, and it is black/white
    for b, c in zip(base, stamped):
        rows, cols = np.nonzero(b != c)
        assert np.ptp(rows) < 8 and np.ptp(cols) < 8 and set(np.unique(c[b != c])) <= {0, 255}
    assert np.array_equal(base, _phantoms(6, seed=7))  # the base is not modified
    assert records[0] == "r" and records[1].plane == 1 and records[1].ga_weeks == 20.0
    with pytest.raises(ValueError, match="base must be"):
        make_canaries(5, size=32, seed=1, base=base)


# -- DP certificate ------------------------------------------------------------------------------------------
def test_certificate_recomputes_epsilon_and_flags_tampering_and_uncovered_images() -> None:
    # Prepare: two rounds of one site; the release has one filtered image and one under-claimed image
    r1 = {"round": 1, "ledger": {"site0": _ledger_summary(1.1, 0.25, 40)}}
    r2 = {"round": 2, "ledger": {"site0": _ledger_summary(1.1, 0.25, 80)}}
    eps2 = r2["ledger"]["site0"]["generator"]["epsilon"]
    records = [{"id": "a", "source_site": "site0", "round": 2, "privacy": {"epsilon": eps2, "model": "generator"},
                "memorization_checked": True},
               {"id": "b", "source_site": "site0", "round": 2, "privacy": {"epsilon": eps2 / 2, "model": "generator"},
                "memorization_checked": False}]
    # Execute
    cert = dp_certificate([r2, r1], release_records=records)
    tampered = json.loads(json.dumps(r2))
    tampered["ledger"]["site0"]["generator"]["epsilon"] = eps2 / 3
    bad = dp_certificate([r1, tampered])
    # Assert
    gen = cert["sites"]["site0"]["models"]["generator"]
    assert gen["consistent"] and 0 <= gen["slack"] < 0.1 * eps2  # the ledger may be (slightly) conservative
    assert gen["recomputed_epsilon"] == pytest.approx(recompute_epsilon(noise_multiplier=1.1, sample_rate=0.25,
                                                                        steps=80, delta=6e-6))
    assert cert["sites"]["site0"]["epsilon_basic"] == pytest.approx(eps2)
    assert cert["release"]["memorization_checked"] == 1 and cert["release"]["under_claimed"] == ["b"]
    assert any("memorisation filter" in s for s in cert["not_covered"])
    assert not bad["sites"]["site0"]["models"]["generator"]["consistent"]
    assert any("decreases" in p for p in bad["problems"]) and any("under-reports" in p for p in bad["problems"])
    assert check_ledger_model({"epsilon": 0.0, "steps": 0, "delta": 1e-5})["consistent"]


def test_certificate_flags_an_image_that_under_claims_its_distributed_scoring_classifier() -> None:
    # Prepare: the site's ledger holds a distributed classifier (central 3.9, local 9.97 at round 1)
    summary = _ledger_summary(1.1, 0.25, 40)
    summary["classifier"] = {"epsilon": 3.9, "delta": 4e-6, "steps": 0, "history": [],
                             "distributed": {"central_epsilon": 3.9, "local_epsilon": 9.97}}
    rounds = [{"round": 1, "ledger": {"site0": summary}}]
    eps = summary["generator"]["epsilon"]

    def image(image_id: str, central: float, local: float) -> dict:
        return {"id": image_id, "source_site": "site0", "round": 1, "memorization_checked": False,
                "privacy": {"epsilon": eps, "model": "generator",
                            "scoring": {"model": "classifier", "central_epsilon": central, "local_epsilon": local,
                                        "delta": 4e-6}}}

    # Execute
    cert = dp_certificate(rounds, release_records=[image("ok", 3.9, 9.97), image("low-central", 2.0, 9.97),
                                                   image("low-local", 3.9, 3.9)])
    # Assert
    assert cert["release"]["under_claimed_scoring"] == ["low-central", "low-local"]
    assert any("distributed classifier that scored them" in p for p in cert["problems"])


def test_certificate_without_ledger_says_no_dp() -> None:
    cert = dp_certificate([{"round": 1, "ledger": {}}])
    assert not cert["dp"] and "without DP" in cert["not_covered"][0]


# -- generator attack ------------------------------------------------------------------------------------------
def _tiny_generator() -> torch.nn.Module:
    """A seeded (4, 8) conditional UNet at 32 px."""
    from common.core.config import GeneratorConfig
    from common.models.generator import build_generator

    return build_generator(GeneratorConfig(block_out_channels=(4, 8), num_train_timesteps=50), image_size=32, seed=0)


def test_denoising_errors_are_deterministic_and_checked() -> None:
    # Prepare
    gen = _tiny_generator()
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    plane, ga = torch.tensor([0, 1, 2, -1, 3]), torch.tensor([20.0, float("nan"), 30.0, 25.0, 35.0])
    # Execute
    e1 = denoising_errors(gen, x, plane, ga, timesteps=[2, 10], seed=4, n_noise=2, batch_size=2)
    e2 = denoising_errors(gen, x, plane, ga, timesteps=[2, 10], seed=4, n_noise=2, batch_size=5)
    # Assert
    assert e1.shape == (5, 2) and (e1 > 0).all() and np.allclose(e1, e2, rtol=1e-5)
    assert not np.allclose(e1, denoising_errors(gen, x, plane, ga, timesteps=[2, 10], seed=5))
    with pytest.raises(ValueError, match="timesteps"):
        denoising_errors(gen, x, plane, ga, timesteps=[50])


class EmpiricalDenoiser(torch.nn.Module):
    """The ideal memoriser: the optimal denoiser of a finite training set (its posterior mean over the set).

    Sampling from it reproduces training images (Kadkhodaie et al. 2024; Gu et al. 2023), so it is the
    deliberately memorising model of the fast power test, with no training cost.
    """

    def __init__(self, train: torch.Tensor, *, timesteps: int = 50, prediction_type: str = "v_prediction") -> None:
        super().__init__()
        from common.core.config import GeneratorConfig
        from common.diffusion.schedulers import make_scheduler

        self.train_images = train
        self.generator_config = GeneratorConfig(block_out_channels=(4, 8), num_train_timesteps=timesteps,
                                                prediction_type=prediction_type)
        self.image_size = train.shape[-1]
        sched = make_scheduler("ddpm", num_train_timesteps=timesteps, prediction_type=prediction_type)
        self.abar = sched.alphas_cumprod.float()

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, plane: torch.Tensor, ga: torch.Tensor,
                site: torch.Tensor | None = None) -> torch.Tensor:
        """Epsilon or v of the posterior-mean x0 given x_t (the conditions are ignored)."""
        a = self.abar[torch.as_tensor(t).long().expand(x.shape[0])].view(-1, 1, 1, 1)
        d2 = ((x[:, None] - a[:, None].sqrt() * self.train_images[None]) ** 2).flatten(2).sum(-1)
        w = torch.softmax(-d2 / (2 * (1 - a.view(-1, 1))), dim=1)
        x0 = torch.einsum("bn,nchw->bchw", w, self.train_images)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.generator_config.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_audit_has_power_on_the_ideal_memoriser(prediction_type: str) -> None:
    # Prepare: the fast variant of the power experiment: 8 members memorised exactly, 8 non-members
    from common.data.tensors import records_to_dataset
    from common.diffusion.sampling import sample, to_uint8

    recs = make_phantoms(16, size=32, seed=11)
    members, others = records_to_dataset(recs[:8], image_size=32), records_to_dataset(recs[8:], image_size=32)
    model = EmpiricalDenoiser(members.tensors[0], prediction_type=prediction_type)
    # Execute: the generator attack, and the memorisation scan of its samples
    em = denoising_errors(model, *members.tensors[:3], timesteps=[2, 5, 10, 20], seed=1).mean(1)
    en = denoising_errors(model, *others.tensors[:3], timesteps=[2, 5, 10, 20], seed=1).mean(1)
    released = to_uint8(sample(model, plane=torch.zeros(6), ga=torch.full((6,), 20.0), scheduler_name="ddim",
                               num_inference_steps=25, guidance_scale=1.0, seed=0))
    scan = memorization_scan(released, np.stack([r.image for r in recs[:8]]))
    # Assert: members are denoised almost perfectly; every sample is a near-copy of a member
    assert roc_auc(-em, -en) == 1.0 and em.max() < 0.1 * en.min()
    assert scan["near_copy"].all()


# -- the audit command end to end ------------------------------------------------------------------------------
def _write_dir(folder: Path, images: np.ndarray, planes: list[int], gas: list[float]) -> Path:
    """A folder SPEC: PNGs plus metadata.jsonl with their labels."""
    folder.mkdir(parents=True)
    lines = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"x{i}.png")
        lines.append(json.dumps({"file_name": f"x{i}.png", "plane": planes[i], "ga_weeks": gas[i]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_audit_command_end_to_end(tmp_path: Path) -> None:
    # Prepare: a smoke checkpoint with a ledger, 12 members / 12 non-members, a release with a planted copy
    from common.active_learning.release import ReleaseItem, ReleaseStore
    from common.core.config import get_preset
    from common.models.bundle import build_bundle, save_bundle
    from simulations.audit import main

    cfg = get_preset("smoke")
    ckpt = tmp_path / "run" / "checkpoints" / "round-001"
    summary = _ledger_summary(1.3, 0.5, 12)
    eps = summary["generator"]["epsilon"]
    save_bundle(build_bundle(cfg), ckpt, sidecar={"config": cfg.to_dict()},
                extra_files={"round.json": json.dumps({"round": 1, "ledger": {"site0": summary}}).encode()})
    recs = make_phantoms(24, size=32, seed=21)
    imgs = np.stack([r.image for r in recs])
    planes, gas = [r.plane for r in recs], [float(r.ga_weeks) for r in recs]
    members = _write_dir(tmp_path / "members", imgs[:12], planes[:12], gas[:12])
    heldout = _write_dir(tmp_path / "heldout", imgs[12:], planes[12:], gas[12:])
    store = ReleaseStore(tmp_path / "release")
    released = np.concatenate([_phantoms(5, seed=22), imgs[4:5]])
    store.add(ReleaseItem(image=im, plane=1, ga_weeks=25.0, source_site="site0", round=1, scores={}, acquisition={},
                          privacy={"epsilon": eps, "delta": 6e-6, "accountant": "rdp", "model": "generator"},
                          memorization_checked=(i == 0)) for i, im in enumerate(released))
    before = (tmp_path / "release" / "metadata.jsonl").read_text()
    out = tmp_path / "audit"
    # Execute
    rc = main(["--release", str(tmp_path / "release"), "--checkpoint", str(tmp_path / "run"), "--private",
               str(members), "--heldout", str(heldout), "--out", str(out), "--n-boot", "50", "--n-noise", "1",
               "--canaries", "8", "--canary-steps", "2", "--canary-site", "site0", "--reference", str(ckpt)])
    report = json.loads((out / "audit.json").read_text())
    html = (out / "audit.html").read_text()
    # Assert
    assert rc == 0 and (tmp_path / "release" / "metadata.jsonl").read_text() == before  # read-only
    assert report["memorization"]["exact_copies"] == 1 and report["memorization"]["near_copies"] >= 1
    assert report["memorization"]["images"][0]["nearest_private"] == "x4.png"
    assert report["certificate"]["sites"]["site0"]["models"]["generator"]["consistent"]
    assert report["certificate"]["release"]["memorization_checked"] == 1
    assert 0.0 <= report["mia"]["generator"]["auc"] <= 1.0 and report["mia"]["release"]["n_members"] == 12
    assert report["mia"]["generator_calibrated"]["auc"] == 0.5  # the model is its own reference: all ties
    assert report["canary"]["dp"] and report["canary"]["m"] == 8 and report["canary"]["steps"] == 2
    assert report["canary"]["epsilon_lower_bound"] <= report["canary"]["accounted_epsilon"]
    assert html.count("data:image/png;base64,") >= 4 and "Not covered" in html


def test_specs_resolve_site_splits_and_folders_with_clear_errors(tmp_path: Path) -> None:
    # Prepare
    from common.core.config import get_preset
    from common.data.sites import load_site
    from simulations.audit import find_round, load_spec

    cfg = get_preset("smoke")
    site = load_site(cfg.data, seed=cfg.seed, site_index=1)
    # Execute
    train, test = load_spec("site:1", cfg), load_spec("site:1:test", cfg)
    # Assert
    assert len(train.ids) == len(site.train) and len(test.ids) == len(site.test)
    assert np.array_equal(train.images[0], site.train[0].image) and train.ids[0].startswith(site.name + "/")
    assert train.resized(64).images.shape[1:] == (64, 64) and "resized to 64px" in train.resized(64).notes
    with pytest.raises(ValueError, match="run config"):
        load_spec("site:0", None)
    with pytest.raises(ValueError, match="site:N:test"):
        load_spec("site:0:valid", cfg)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_spec(str(tmp_path / "nope"), cfg)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_round(tmp_path)


@pytest.mark.slow
def test_audit_power_memorising_model_is_caught_and_dp_model_is_not(tmp_path: Path) -> None:
    # Prepare / Execute: the quick settings of simulations/audit_power.py (minutes on 2 cores)
    from simulations.audit_power import run

    result = run(tmp_path / "power", quick=True, seed=0)
    mem, dp = result["memorising"], result["dp"]
    # Assert: power on the memorising model
    assert mem["headline"]["near_copies"] >= 1
    assert mem["headline"]["mia_generator_auc"] > 0.8 and mem["headline"]["mia_generator_auc_ci95"][0] > 0.5
    # Assert: the DP model looks like chance and its canary bound stays below its accounted epsilon
    assert dp["headline"]["dp"] and dp["training"]["epsilon"] <= 10
    assert abs(dp["headline"]["mia_generator_auc"] - 0.5) < 0.25
    assert dp["canary"]["epsilon_lower_bound"] <= dp["canary"]["accounted_epsilon"]


def test_audit_agrees_with_a_ledger_whose_sample_rate_changed() -> None:
    # Prepare: round 1 trains on 12 real images (q = 1/3), round 2 on 16 once released images join (q = 1/4)
    ledger = PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"classifier": 1.0})
    ledger.plan("classifier", sample_rate=1 / 3, planned_total_steps=20, noise_multiplier=1.1)
    acc = ledger.accountant_for("classifier")
    for q in [1 / 3] * 10 + [1 / 4] * 10:
        acc.step(noise_multiplier=1.1, sample_rate=q)
    # Execute
    entry = ledger.summary()["classifier"]
    checked = check_ledger_model(entry)
    cert = dp_certificate([{"round": 2, "ledger": {"site-a": ledger.summary()}}])
    # Assert: recomputed from the stored history, exactly the ledger's figure, and no problem raised
    assert [seg[1] for seg in entry["history"]] == [pytest.approx(1 / 3), pytest.approx(1 / 4)]
    assert checked["consistent"] and checked["recomputed_from"] == "history"
    assert checked["recomputed_epsilon"] == pytest.approx(entry["epsilon"], rel=1e-6)
    assert cert["problems"] == []
    # the one-segment recomputation from the summary alone would have over-charged it (what flagged it before)
    assert recompute_epsilon(noise_multiplier=1.1, sample_rate=1 / 3, steps=20, delta=1e-5) > entry["epsilon"] * 1.01


def test_audit_flags_a_history_that_does_not_add_up_and_public_noise() -> None:
    entry = _ledger_summary(1.0, 0.2, 10)["generator"]
    assert check_ledger_model({**entry, "history": [[1.0, 0.2, 3]]})["consistent"] is False
    public = check_ledger_model({**entry, "private_noise": False})
    assert public["consistent"] is False and "public run seed" in public["note"]
