"""The coordinator's query, both ends: the site answers it, the coordinator validates the answer.

Schema of a reply's ``candidates`` arrays: ``images`` uint8 [N, H, W], ``plane`` int64 [N], ``ga`` float32 [N],
``score.<name>`` float32 [N] for every name in :data:`common.scoring.SCORE_NAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from common.bundle import ModelBundle, load_federated_arrays, federated_arrays
from common.config import RunConfig
from common.errors import ReplyValidationError
from common.records import PLANES, UltrasoundRecord
from common.scoring import SCORE_NAMES, Candidates, generate, nearest_private_ratio, score


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
        scores["memorization_ratio"] = ratio
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
    """Check a reply against the request: counts, shapes, dtypes, finite scores, the conditions asked for, size."""
    n = len(plane)
    images = arrays.get("images")
    if images is None or "plane" not in arrays or "ga" not in arrays:
        raise ReplyValidationError(f"{who}: reply lacks 'images', 'plane' or 'ga'")
    if images.dtype != np.uint8 or images.shape != (n, image_size, image_size):
        raise ReplyValidationError(
            f"{who}: images must be uint8 {(n, image_size, image_size)}, got {images.dtype} {images.shape}"
        )
    total = int(sum(np.asarray(v).nbytes for v in arrays.values()))
    if total > max_bytes:
        raise ReplyValidationError(f"{who}: reply of {total} bytes exceeds the bound of {max_bytes}")
    if not np.array_equal(np.asarray(arrays["plane"]), plane) or not np.allclose(arrays["ga"], ga, atol=1e-4):
        raise ReplyValidationError(f"{who}: reply conditions differ from the ones requested")
    scores = {}
    for name in SCORE_NAMES:
        key = f"score.{name}"
        if key not in arrays:
            raise ReplyValidationError(f"{who}: score {name!r} is missing")
        value = np.asarray(arrays[key], dtype=np.float32)
        if value.shape != (n,):
            raise ReplyValidationError(f"{who}: score {name!r} has shape {value.shape}, expected ({n},)")
        finite = np.isfinite(value) | (np.isposinf(value) if name == "novelty" else False)
        if not finite.all():
            raise ReplyValidationError(f"{who}: score {name!r} has non-finite values")
        scores[name] = value
    if not ((scores["quality"] >= 0) & (scores["quality"] <= 1)).all():
        raise ReplyValidationError(f"{who}: quality scores must lie in [0, 1]")
    if "score.memorization_ratio" in arrays:
        scores["memorization_ratio"] = np.asarray(arrays["score.memorization_ratio"], dtype=np.float32)
    return Candidates(images=images, plane=plane, ga=ga, scores=scores)


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
