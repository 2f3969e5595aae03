"""Weights <-> Flower records: the only module of ``common/`` that touches Flower types."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord

from common.core.errors import ReplyValidationError


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ``ArrayRecord`` (keys kept, order kept)."""
    return ArrayRecord(torch_state_dict={k: _as_tensor(v) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` -> named numpy arrays."""
    return {key: array.numpy() for key, array in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Payload size of an ``ArrayRecord`` in bytes (what goes over the wire, before framing)."""
    return int(sum(len(array.data) for array in record.values()))


def validate_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, who: str
) -> None:
    """Check names, shapes and finiteness of received arrays against ``expected``.

    Raises
    ------
    ReplyValidationError
        Naming ``who`` and the first problem found (missing/extra keys, wrong shape, non-finite values).
    """
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ReplyValidationError(
            f"{who}: arrays do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for key, shape in expected.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(shape):
            raise ReplyValidationError(f"{who}: array {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ReplyValidationError(f"{who}: array {key!r} has non-finite values")


def _as_tensor(value: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(value))
