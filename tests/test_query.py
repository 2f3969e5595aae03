"""Query replies: a site's answer validates; malformed answers are rejected with the site named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.active_learning.query import (
    answer_query,
    release_from_arrays,
    release_to_arrays,
    validate_candidates,
    validate_query_site,
)
from common.active_learning.scoring import SCORE_NAMES, nearest_private_ratio
from common.core.config import get_preset
from common.core.errors import ReplyValidationError
from common.models.bundle import build_bundle


@pytest.fixture(scope="module")
def answer():
    cfg = get_preset("smoke")
    bundle = build_bundle(cfg)
    plane = np.array([0, 2, 5], dtype=np.int64)
    ga = np.array([20.0, 30.0, 38.0], dtype=np.float32)
    ans = answer_query(bundle, cfg, plane=plane, ga=ga, bank=None, local_generator=None, private=None, seed=3)
    return cfg, plane, ga, ans


def _arrays(ans) -> dict[str, np.ndarray]:
    c = ans.candidates
    return {"images": c.images, "plane": c.plane, "ga": c.ga, **{f"score.{k}": v for k, v in c.scores.items()}}


def test_site_answer_has_every_score_and_validates(answer) -> None:
    cfg, plane, ga, ans = answer
    cand = validate_candidates(_arrays(ans), who="site-a", plane=plane, ga=ga, image_size=32, max_bytes=1 << 20)
    assert cand.images.shape == (3, 32, 32) and cand.images.dtype == np.uint8
    assert set(SCORE_NAMES) <= set(cand.scores)
    assert ((cand.scores["quality"] >= 0) & (cand.scores["quality"] <= 1)).all()
    assert np.isinf(cand.scores["novelty"]).all()  # the release is empty: everything is novel
    assert not ans.memorization_checked and not ans.used_local_model


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda a: a.pop("images"), "lacks"),
        (lambda a: a.update(images=a["images"].astype(np.float32)), "uint8"),
        (lambda a: a.update(images=a["images"][:2]), "uint8"),
        (lambda a: a.update(plane=np.array([1, 2, 5])), "conditions differ"),
        (lambda a: a.update(ga=a["ga"] + 3), "conditions differ"),
        (lambda a: a.pop("score.uncertainty"), "'uncertainty' is missing"),
        (lambda a: a.update(**{"score.quality": np.array([0.5, np.nan, 0.1], np.float32)}), "non-finite"),
        (lambda a: a.update(**{"score.quality": np.array([0.5, 1.5, 0.1], np.float32)}), r"\[0, 1\]"),
        (lambda a: a.update(**{"score.entropy": np.zeros(4, np.float32)}), "shape"),
        # hole 5: every field is checked, the optional memorization ratio included
        (lambda a: a.update(**{"score.memorization_ratio": np.array([0.5, np.nan, 0.1], np.float32)}), "non-finite"),
        (lambda a: a.update(**{"score.memorization_ratio": np.array([0.5], np.float32)}), "shape"),
        (lambda a: a.update(**{"score.memorization_ratio": np.array([0.5, 1.5, 0.1], np.float32)}), r"\[0, 1\]"),
        (lambda a: a.update(**{"score.memorization_ratio": np.array([0.5, -0.1, 0.1], np.float32)}), r"\[0, 1\]"),
        (lambda a: a.update(**{"score.memorization_ratio": np.array([0.5, 0.2, 0.1], np.float64)}), "float32"),
        (lambda a: a.update(**{"score.quality": a["score.quality"].astype(np.float64)}), "float32"),
        (lambda a: a.update(**{"score.entropy": np.array([0.5, 1.5, 0.1], np.float32)}), r"\[0, 1\]"),
        (lambda a: a.update(**{"score.ga_std": np.array([0.5, -1.0, 0.1], np.float32)}), "negative"),
        (lambda a: a.update(**{"score.ga_error": np.array([0.5, -1.0, 0.1], np.float32)}), "negative"),
        (lambda a: a.update(**{"score.novelty": np.array([0.5, -1.0, 0.1], np.float32)}), "negative"),
        (lambda a: a.update(**{"score.uncertainty": a["score.uncertainty"] + 0.5}), "entropy \\+ ga_std"),
        (lambda a: a.update(**{"score.bribe": np.ones(3, np.float32)}), "unexpected"),
        (lambda a: a.update(plane=a["plane"].astype(np.int32)), "int64"),
        (lambda a: a.update(ga=a["ga"].astype(np.float64)), "float32"),
        (lambda a: a.update(ga=a["ga"][:1]), "shape"),
    ],
)
def test_malformed_replies_are_rejected_naming_the_site(answer, mutate, needle) -> None:
    _, plane, ga, ans = answer
    arrays = _arrays(ans)
    mutate(arrays)
    with pytest.raises(ReplyValidationError, match=needle) as err:
        validate_candidates(arrays, who="hospital-x", plane=plane, ga=ga, image_size=32, max_bytes=1 << 20)
    assert "hospital-x" in str(err.value)


def test_oversized_reply_is_rejected(answer) -> None:
    _, plane, ga, ans = answer
    with pytest.raises(ReplyValidationError, match="exceeds the bound"):
        validate_candidates(_arrays(ans), who="h", plane=plane, ga=ga, image_size=32, max_bytes=1000)


def test_memorization_ratio_flags_a_planted_copy() -> None:
    rng = np.random.default_rng(0)
    private = rng.integers(0, 256, size=(20, 16, 16), dtype=np.uint8)
    candidates = np.stack([private[7], rng.integers(0, 256, size=(16, 16), dtype=np.uint8)])
    ratio = nearest_private_ratio(candidates, private)
    assert ratio[0] < 0.05 and ratio[1] > 0.8


def test_release_arrays_round_trip() -> None:
    records = [{"plane": 1, "ga_weeks": 22.5}, {"plane": 4, "ga_weeks": 30.0}]
    images = [np.full((8, 8), 3, np.uint8), np.full((8, 8), 9, np.uint8)]
    back = release_from_arrays(release_to_arrays(records, images))
    assert [(r.plane, r.ga_weeks, int(r.image[0, 0])) for r in back] == [(1, 22.5, 3), (4, 30.0, 9)]
    with pytest.raises(ReplyValidationError, match="unknown plane"):
        release_from_arrays({"images": np.zeros((1, 8, 8), np.uint8), "plane": np.array([9]), "ga": np.array([20.0])})


def test_an_honest_answer_with_the_memorization_check_validates(answer) -> None:
    # Prepare: the site's private images (here: the unchecked answer's own images) feed the ratio
    cfg, plane, ga, ans = answer
    private = release_from_arrays(release_to_arrays([{"plane": 0, "ga_weeks": 20.0}] * 3, list(ans.candidates.images)))
    checked = answer_query(build_bundle(cfg), cfg, plane=plane, ga=ga, bank=None, local_generator=None,
                           private=private, seed=3)
    # Execute
    cand = validate_candidates(_arrays(checked), who="h", plane=plane, ga=ga, image_size=32, max_bytes=1 << 20)
    site = validate_query_site(_site({"epsilon": 1.0}, **{"memorization-checked": checked.memorization_checked}),
                               who="h", candidates=cand)
    # Assert: the same seed gives the same images, each its own nearest private copy
    assert site.memorization_checked and np.allclose(cand.scores["memorization_ratio"], 0.0, atol=1e-3)


def _site(privacy: object, **extra: object) -> dict[str, object]:
    return {"name": "hospital-x", "privacy": json.dumps(privacy), "scanner": "voluson", **extra}


def test_a_site_record_validates_and_its_memorization_flag_matches_the_scores(answer) -> None:
    # Prepare
    _, plane, ga, ans = answer
    cand = validate_candidates(_arrays(ans), who="hospital-x", plane=plane, ga=ga, image_size=32, max_bytes=1 << 20)
    privacy = {"epsilon": 2.5, "delta": 1e-5, "accountant": "prv", "model": "generator", "local": True}
    # Execute
    site = validate_query_site(_site(privacy, **{"memorization-checked": False}), who="hospital-x", candidates=cand)
    # Assert
    assert site.privacy == privacy and site.scanner == "voluson" and site.memorization_checked is False
    scored = {**privacy, "scoring": {"model": "classifier", "central_epsilon": 3.9, "local_epsilon": 9.97,
                                     "delta": 4e-6}}  # the distributed classifier that scored the candidates
    assert validate_query_site(_site(scored), who="hospital-x", candidates=cand).privacy == scored
    no_dp = validate_query_site(_site({"epsilon": float("inf")}), who="hospital-x", candidates=cand)
    assert no_dp.privacy["epsilon"] == float("inf")  # a run without DP says so; it is not a lie


@pytest.mark.parametrize(
    ("site", "memo", "needle"),
    [
        ({"name": "h", "privacy": "not json"}, False, "JSON"),
        (_site([1.0]), False, "object"),
        (_site({"epsilon": float("nan")}), False, "epsilon"),
        (_site({"epsilon": -1.0}), False, "epsilon"),
        (_site({"epsilon": "1.0"}), False, "epsilon"),
        (_site({"epsilon": 1.0, "delta": 2.0}), False, "delta"),
        (_site({"epsilon": 1.0}, **{"memorization-checked": True}), False, "memorization"),
        (_site({"epsilon": 1.0}, **{"memorization-checked": False}), True, "memorization"),
        (_site({"epsilon": 1.0}, **{"memorization-checked": "yes"}), False, "memorization-checked"),
        (_site({"epsilon": 1.0, "scoring": [2.0]}), False, "scoring"),
        (_site({"epsilon": 1.0, "scoring": {"central_epsilon": 3.0, "local_epsilon": 2.0, "delta": 1e-6}}), False,
         "central_epsilon <= local_epsilon"),
        (_site({"epsilon": 1.0, "scoring": {"central_epsilon": "3", "local_epsilon": 5.0, "delta": 1e-6}}), False,
         "scoring"),
        (_site({"epsilon": 1.0, "scoring": {"central_epsilon": 3.0, "local_epsilon": 5.0}}), False, "scoring"),
    ],
)
def test_a_malformed_site_record_is_rejected_naming_the_site(answer, site, memo, needle) -> None:
    # Prepare
    _, plane, ga, ans = answer
    arrays = _arrays(ans)
    if memo:
        arrays["score.memorization_ratio"] = np.full(3, 0.5, np.float32)
    cand = validate_candidates(arrays, who="hospital-x", plane=plane, ga=ga, image_size=32, max_bytes=1 << 20)
    # Execute / Assert
    with pytest.raises(ReplyValidationError, match=needle) as err:
        validate_query_site(site, who="hospital-x", candidates=cand)
    assert "hospital-x" in str(err.value)
