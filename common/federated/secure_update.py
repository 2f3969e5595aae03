"""The vector a site hands to secure aggregation, and the checks that move from the server to the sites and the sum.

Under SecAgg+ the server never sees a site's update, so it cannot check it (:class:`server.strategy.GuardedStrategy`
does for plain rounds). Each site checks its own update before masking it (:func:`check_site_update`: finite, and no
parameter moved further than the update bound the server would enforce, which bounds its norm too), and the server
checks the sum (:func:`check_sum`: finite, the expected arrays and shapes, within the range a mean of checked
updates can take).

The summed vector is the round's update in **bound units**: each array's change divided by its model part's update
bound (:func:`common.federated.update_bound.update_bounds`, Adam's worst-case displacement), so that every coordinate
of an honest update lies in [-1.05, 1.05] whatever the part's learning rate, and one quantization grid fits all
parts. The arrays travel in the order of :func:`common.models.bundle.federated_arrays` (SecAgg+'s legacy
``Parameters`` carry no names).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from common.core.config import RunConfig
from common.core.errors import ReplyValidationError
from common.federated.update_bound import UpdateBound, update_bounds

# The SecAgg+ fit instructions' keys of a DP-FedSGD sub-round (privacy.distributed-classifier): its task and step.
TASK_KEY = "secagg-task"
STEP_KEY = "secagg-step"
CLASSIFIER_TASK = "classifier-gradient"
# Prefix of the server's DP-FedSGD optimizer state in a checkpoint's strategy state.
FEDSGD_STATE = "fedsgd-classifier/"
# The server's slack on the update bound (GuardedStrategy's default), applied by the sites to themselves.
SLACK = 1.05
F32_EPS = float(np.finfo(np.float32).eps)


def part_of(name: str) -> str:
    """The model part of an array name (``generator.unet.x`` -> ``generator``)."""
    return name.split(".", 1)[0]


def bounds_for(cfg: RunConfig) -> dict[str, UpdateBound]:
    """Per model part, the update bound of the run (what the bound units are units of)."""
    return update_bounds(cfg)


def to_bound_units(sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
                   bounds: Mapping[str, UpdateBound]) -> dict[str, np.ndarray]:
    """Each array's change ``trained - sent`` over its part's bound (float64), in ``sent``'s order."""
    if list(sent) != list(trained):
        raise ValueError(f"trained arrays {list(trained)[:3]}... do not match the sent ones {list(sent)[:3]}...")
    return {k: (np.asarray(trained[k], np.float64) - np.asarray(v, np.float64)) / bounds[part_of(k)].max_displacement
            for k, v in sent.items()}


def allowed_units(sent: np.ndarray, bound: UpdateBound) -> np.ndarray:
    """Largest honest change per coordinate in bound units: the slack plus the site's float32 rounding (as the
    server allows it, :meth:`server.strategy.GuardedStrategy._measure_update`)."""
    b = bound.max_displacement
    return SLACK + bound.steps * F32_EPS * (np.abs(np.asarray(sent, np.float64)) + SLACK * b) / b


def check_site_update(units: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
                      bounds: Mapping[str, UpdateBound], *, who: str) -> float:
    """A site's check of its own update before masking; returns its L2 norm in bound units.

    Raises :class:`ReplyValidationError` (the site then sends nothing: it drops out of the round) for a non-finite
    coordinate or one beyond :func:`allowed_units`; the coordinate bound caps the norm at
    ``1.05 sqrt(d)`` (plus rounding).
    """
    squares = 0.0
    for key, value in units.items():
        if not np.all(np.isfinite(value)):
            raise ReplyValidationError(f"{who}: own update of {key!r} is not finite; not sent to secure aggregation")
        limit = allowed_units(sent[key], bounds[part_of(key)])
        if (np.abs(value) > limit).any():
            raise ReplyValidationError(f"{who}: own update moves {key!r} by {float(np.abs(value).max()):.4g} bound "
                                       f"units, more than the {SLACK} the server would accept; not sent")
        squares += float(np.square(value).sum())
    return float(np.sqrt(squares))


def check_sum(mean: Sequence[np.ndarray], shapes: Mapping[str, tuple[int, ...]], *, limit: float | None) -> None:
    """The server's check of the securely summed (mean) update: the expected arrays, shapes, finite values, and
    (``limit``, in bound units; ``None`` under distributed DP, whose noise has no bound) no coordinate beyond what
    a mean of checked updates can reach."""
    if len(mean) != len(shapes):
        raise ReplyValidationError(f"secure sum has {len(mean)} arrays, expected {len(shapes)}")
    for (key, shape), value in zip(shapes.items(), mean):
        if tuple(np.shape(value)) != tuple(shape):
            raise ReplyValidationError(f"secure sum: array {key!r} has shape {np.shape(value)}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise ReplyValidationError(f"secure sum: array {key!r} is not finite")
        if limit is not None and np.abs(value).max(initial=0.0) > limit:
            raise ReplyValidationError(f"secure sum: array {key!r} moves by {float(np.abs(value).max()):.4g} bound "
                                       f"units, beyond the {limit:.4g} a mean of checked updates can reach")


def from_bound_units(sent: Mapping[str, np.ndarray], mean: Sequence[np.ndarray],
                     bounds: Mapping[str, UpdateBound]) -> dict[str, np.ndarray]:
    """The new global arrays: ``sent + mean * bound`` per array, as float32."""
    return {k: (np.asarray(v, np.float64) + np.asarray(m, np.float64).reshape(np.shape(v))
                * bounds[part_of(k)].max_displacement).astype(np.float32)
            for (k, v), m in zip(sent.items(), mean)}


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Arrays -> one float64 vector (the distributed-DP mechanism clips and noises the whole update)."""
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)


def unflatten(vector: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Inverse of :func:`flatten`."""
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        out.append(np.asarray(vector[at:at + n]).reshape(shape))
        at += n
    if at != len(vector):
        raise ValueError(f"vector has {len(vector)} values, the shapes hold {at}")
    return out
