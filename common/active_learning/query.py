"""The coordinator's query, both ends: the site answers it, the coordinator validates the answer.

Schema of a reply's ``candidates`` arrays: ``images`` uint8 [N, H, W], ``plane`` int64 [N], ``ga`` float32 [N],
``score.<name>`` float32 [N] for every name in :data:`common.active_learning.scoring.SCORE_NAMES` and optionally
``score.memorization_ratio`` (when the site ran the memorization check); nothing else. Ranges (from
:mod:`common.active_learning.scoring`): ``quality``, ``entropy`` and ``memorization_ratio`` in [0, 1]; ``ga_std``, ``ga_error``
and ``novelty`` >= 0 (``novelty`` may be +inf: the release is empty); ``uncertainty`` = ``entropy`` + ``ga_std``.
Its ``site`` record: ``privacy`` (JSON object, ``epsilon`` >= 0, +inf without DP), ``scanner``, and
``memorization-checked``, true exactly when the ratio is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from common.active_learning.scoring import SCORE_NAMES, Candidates, generate, nearest_private_ratio, score
from common.core.config import RunConfig
from common.core.errors import ReplyValidationError
from common.core.records import PLANES, UltrasoundRecord
from common.models.bundle import ModelBundle, federated_arrays, load_federated_arrays
from common.privacy.distributed_dp import central_and_local_epsilon

if TYPE_CHECKING:
    from common.privacy.ledger import PrivacyLedger

MEMORIZATION = "memorization_ratio"
# Scores in [0, 1] (probabilities, a normalised entropy, a nearest/k-nearest distance ratio); the others are >= 0.
UNIT_SCORES = ("quality", "entropy", MEMORIZATION)
# float32 rounding of a score computed as a ratio or a sum (e.g. an entropy of 1 + 1e-7)
SCORE_ATOL = 1e-5


@dataclass(frozen=True)
class QueryAnswer:
    """A site's scored candidates and how they were made."""

    candidates: Candidates
    used_local_model: bool
    memorization_checked: bool


def answer_query(
    bundle: ModelBundle,
    cfg: RunConfig,
    *,
    plane: np.ndarray,
    ga: np.ndarray,
    bank: np.ndarray | None,
    local_generator: Mapping[str, np.ndarray] | None,
    private: Sequence[UltrasoundRecord] | None,
    seed: int,
) -> QueryAnswer:
    """Sample the requested conditions with the site's own DP generator and score them with the global models.

    Parameters
    ----------
    bundle:
        Holds the global models; its generator part is replaced by ``local_generator`` when given (the site's
        latest DP fine-tune), so the images are post-processing of this site's DP model.
    private:
        The site's private training records for the optional memorization filter (not covered by DP: the
        candidates are flagged); ``None`` skips it.
    """
    if local_generator:
        current = federated_arrays(bundle)
        current.update(local_generator)
        load_federated_arrays(bundle, current)
    images = generate(bundle, cfg, plane, ga, seed=seed)
    scores = score(bundle, images, plane, ga, bank=bank)
    checked = private is not None and len(private) > 0
    if checked:
        priv = np.stack([r.image for r in private])  # type: ignore[union-attr]
        ratio = nearest_private_ratio(images, priv)
        scores[MEMORIZATION] = ratio
    return QueryAnswer(
        candidates=Candidates(images=images, plane=plane.astype(np.int64), ga=ga.astype(np.float32), scores=scores),
        used_local_model=bool(local_generator),
        memorization_checked=checked,
    )


def validate_candidates(
    arrays: Mapping[str, np.ndarray],
    *,
    who: str,
    plane: np.ndarray,
    ga: np.ndarray,
    image_size: int,
    max_bytes: int,
) -> Candidates:
    """Check a reply against the request and the schema: keys, counts, shapes, dtypes, score ranges, conditions, size.

    Raises
    ------
    ReplyValidationError
        Naming ``who`` and the first problem found; nothing of a rejected reply is used.
    """
    n = len(plane)
    images = arrays.get("images")
    if images is None or "plane" not in arrays or "ga" not in arrays:
        raise ReplyValidationError(f"{who}: reply lacks 'images', 'plane' or 'ga'")
    allowed = {"images", "plane", "ga", f"score.{MEMORIZATION}", *(f"score.{name}" for name in SCORE_NAMES)}
    if extra := sorted(set(arrays) - allowed):
        raise ReplyValidationError(f"{who}: unexpected arrays {extra[:5]}")
    if images.dtype != np.uint8 or images.shape != (n, image_size, image_size):
        raise ReplyValidationError(
            f"{who}: images must be uint8 {(n, image_size, image_size)}, got {images.dtype} {images.shape}"
        )
    total = int(sum(np.asarray(v).nbytes for v in arrays.values()))
    if total > max_bytes:
        raise ReplyValidationError(f"{who}: reply of {total} bytes exceeds the bound of {max_bytes}")
    for key, dtype in (("plane", np.int64), ("ga", np.float32)):
        _check_vector(arrays[key], key, dtype, n, who)
    if not np.array_equal(arrays["plane"], plane) or not np.allclose(arrays["ga"], ga, atol=1e-4):
        raise ReplyValidationError(f"{who}: reply conditions differ from the ones requested")
    scores = {}
    for name in (*SCORE_NAMES, MEMORIZATION):
        key = f"score.{name}"
        if key not in arrays:
            if name == MEMORIZATION:
                continue
            raise ReplyValidationError(f"{who}: score {name!r} is missing")
        value = _check_vector(arrays[key], f"score {name!r}", np.float32, n, who)
        finite = np.isfinite(value) | (np.isposinf(value) if name == "novelty" else False)
        if not finite.all():
            raise ReplyValidationError(f"{who}: score {name!r} has non-finite values")
        if name in UNIT_SCORES:
            if not ((value >= -SCORE_ATOL) & (value <= 1 + SCORE_ATOL)).all():
                raise ReplyValidationError(f"{who}: {name} scores must lie in [0, 1]")
            value = np.clip(value, 0, 1)
        elif (value < 0).any():
            raise ReplyValidationError(f"{who}: score {name!r} has negative values")
        scores[name] = value
    if not np.allclose(scores["uncertainty"], scores["entropy"] + scores["ga_std"], rtol=SCORE_ATOL, atol=SCORE_ATOL):
        raise ReplyValidationError(f"{who}: score 'uncertainty' is not entropy + ga_std")
    return Candidates(images=images, plane=plane, ga=ga, scores=scores)


def _check_vector(value: np.ndarray, what: str, dtype: type, n: int, who: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != (n,):
        raise ReplyValidationError(f"{who}: {what} must be {np.dtype(dtype)} of shape ({n},), got "
                                   f"{getattr(value, 'dtype', type(value).__name__)} {np.shape(value)}")
    return value


@dataclass(frozen=True)
class QuerySite:
    """The validated ``site`` record of a query reply."""

    privacy: dict[str, Any]
    scanner: str
    memorization_checked: bool


def reply_json_object(site: Mapping[str, object], key: str, *, who: str) -> dict[str, Any]:
    """The JSON object a reply's ``site`` record holds under ``key`` (``{}`` when absent); a string that is not JSON,
    or JSON that is not an object, is a :class:`ReplyValidationError` naming ``who``."""
    try:
        value = json.loads(str(site.get(key, "{}")))
    except json.JSONDecodeError as exc:
        raise ReplyValidationError(f"{who}: {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ReplyValidationError(f"{who}: {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def scoring_privacy(ledger: "PrivacyLedger") -> dict[str, Any]:
    """The certificate of the classifier that scored a site's candidates when it trains by example-level distributed
    DP (``privacy.distributed-classifier``): its central epsilon (against the server and anyone who sees only the
    secure sums and what follows from them, the release included) and the local one this site keeps if the server and
    every other site collude, from the site's ledger."""
    entry = ledger.summary()["classifier"]
    central, local = central_and_local_epsilon(entry)
    return {"model": "classifier", "central_epsilon": central, "local_epsilon": local, "delta": float(entry["delta"])}


def _check_scoring(scoring: object, *, who: str) -> None:
    """A ``scoring`` certificate: a JSON object with central <= local epsilons >= 0 and a delta in [0, 1)."""
    if not isinstance(scoring, dict):
        raise ReplyValidationError(f"{who}: privacy 'scoring' must be a JSON object, got {type(scoring).__name__}")
    central, local, delta = scoring.get("central_epsilon"), scoring.get("local_epsilon"), scoring.get("delta")
    numbers = (central, local, delta)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers) or not (
            0 <= central <= local * (1 + 1e-9) and 0 <= delta < 1):  # type: ignore[operator]
        raise ReplyValidationError(f"{who}: privacy 'scoring' needs 0 <= central_epsilon <= local_epsilon and a delta "
                                   f"in [0, 1), got {scoring!r}")


def validate_query_site(site: Mapping[str, object], *, who: str, candidates: Candidates) -> QuerySite:
    """Check a query reply's ``site`` record: its privacy JSON, scanner and memorization flag (see the schema).

    Raises
    ------
    ReplyValidationError
        Naming ``who``: the privacy is not a JSON object with an epsilon >= 0 (and a delta in [0, 1)), or the
        memorization flag disagrees with whether ``candidates`` carry the ratio.
    """
    privacy = reply_json_object(site, "privacy", who=who)
    eps, delta = privacy.get("epsilon"), privacy.get("delta", 0.0)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ReplyValidationError(f"{who}: privacy epsilon must be a number >= 0 (inf without DP), got {eps!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
        raise ReplyValidationError(f"{who}: privacy delta must be a number in [0, 1), got {delta!r}")
    if "scoring" in privacy:
        _check_scoring(privacy["scoring"], who=who)
    checked, scanner = site.get("memorization-checked", False), site.get("scanner", "")
    if not isinstance(checked, bool) or not isinstance(scanner, str):
        raise ReplyValidationError(f"{who}: 'memorization-checked' must be a bool and 'scanner' a string")
    if checked != (MEMORIZATION in candidates.scores):
        raise ReplyValidationError(f"{who}: memorization-checked={checked} but the memorization ratio is "
                                   f"{'absent' if checked else 'present'}")
    return QuerySite(privacy=privacy, scanner=scanner, memorization_checked=checked)


def release_to_arrays(records: Sequence[Mapping[str, object]], images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The shared release as arrays for a train message (it flows back to the sites)."""
    return {
        "images": np.stack(list(images)).astype(np.uint8),
        "plane": np.array([int(r["plane"]) for r in records], dtype=np.int64),  # type: ignore[call-overload]
        "ga": np.array([float(r["ga_weeks"]) for r in records], dtype=np.float32),  # type: ignore[arg-type]
    }


def release_from_arrays(arrays: Mapping[str, np.ndarray]) -> list[UltrasoundRecord]:
    """Inverse of :func:`release_to_arrays`, as records for downstream augmentation (no pixel spacing)."""
    images, plane, ga = arrays["images"], arrays["plane"], arrays["ga"]
    if images.ndim != 3 or len(images) != len(plane) or len(plane) != len(ga):
        raise ReplyValidationError(f"release arrays are inconsistent: {images.shape}, {plane.shape}, {ga.shape}")
    if ((plane < 0) | (plane >= len(PLANES))).any():
        raise ReplyValidationError("release arrays carry an unknown plane index")
    return [
        UltrasoundRecord(image=images[i], plane=int(plane[i]), ga_weeks=float(ga[i]), pixel_spacing_mm=None,
                         site="release", patient_id=f"synthetic-{i}", image_id=f"synthetic-{i}", source="synthetic")
        for i in range(len(plane))
    ]
