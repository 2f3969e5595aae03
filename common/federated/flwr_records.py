"""Weights <-> Flower records: the only module of ``common/`` that touches Flower types.

The federated weights have one typed form on each side, the :class:`~common.models.bundle.ModelBundle`; they cross
the Flower boundary as one ``ArrayRecord`` of named float32 arrays, built by :func:`bundle_to_record` and loaded by
:func:`load_bundle_record`, here and nowhere else.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.active_learning.release_sync import Held, ReleaseDelta, ReleaseSyncError
from common.core.errors import ReplyValidationError

if TYPE_CHECKING:  # the models (torch, diffusers) load only where a bundle is used: a SecAgg+ stage message that
    # carries no weights starts a site's ClientApp process without them (seconds per message in a deployment)
    from common.models.bundle import ModelBundle

# The round number in every message's config: Flower's own key (its strategies inject it in configure_train and
# configure_evaluate), which the server sets to the true round of the run.
ROUND_KEY = "server-round"


def bundle_to_record(bundle: ModelBundle) -> ArrayRecord:
    """The federated part of ``bundle`` (:func:`~common.models.bundle.federated_arrays`) as the ``ArrayRecord`` sent."""
    from common.models.bundle import federated_arrays

    return arrays_to_record(federated_arrays(bundle))


def load_bundle_record(bundle: ModelBundle, record: ArrayRecord) -> None:
    """Load a received (or aggregated) ``ArrayRecord`` into ``bundle``, strictly (names and shapes must match)."""
    from common.models.bundle import load_federated_arrays

    load_federated_arrays(bundle, record_to_arrays(record))


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ``ArrayRecord`` (keys kept, order kept)."""
    return ArrayRecord(torch_state_dict={k: _as_tensor(v) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` -> named numpy arrays."""
    return {key: array.numpy() for key, array in record.items()}


def record_nbytes(record: ArrayRecord | ConfigRecord) -> int:
    """Payload size of a record in bytes (what goes over the wire, before framing): array bytes, or the JSON size
    of a config record's values."""
    if isinstance(record, ArrayRecord):
        return int(sum(len(array.data) for array in record.values()))
    return len(json.dumps(dict(record.items()), default=str).encode())


# Message keys of the release delta (:mod:`common.active_learning.release_sync`) in train and query messages, and
# of what the site says it holds in its replies' ``site`` record.
RELEASE_KEY, RELEASE_META_KEY = "release", "release-meta"
HELD_COUNT_KEY, HELD_DIGEST_KEY = "release-held", "release-digest"


def delta_to_records(delta: ReleaseDelta) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records a message carries for ``delta`` (merge them into its content)."""
    return {RELEASE_KEY: arrays_to_record(delta.arrays()), RELEASE_META_KEY: ConfigRecord(delta.meta())}


def delta_from_content(content: RecordDict) -> ReleaseDelta | None:
    """The release delta a message carries, or ``None`` when it carries none."""
    if RELEASE_META_KEY not in content:
        return None
    if RELEASE_KEY not in content:
        raise ReleaseSyncError(f"message has {RELEASE_META_KEY!r} but no {RELEASE_KEY!r} array record")
    return ReleaseDelta.from_parts(record_to_arrays(content[RELEASE_KEY]), dict(content[RELEASE_META_KEY].items()))


def held_to_config(held: Held) -> dict[str, int | str]:
    """What a site holds, as entries of its reply's ``site`` config record."""
    return {HELD_COUNT_KEY: held.count, HELD_DIGEST_KEY: held.digest}


def held_from_config(site: ConfigRecord) -> Held | None:
    """What a reply says the site holds (``None`` when it says nothing or says it malformed)."""
    count, digest = site.get(HELD_COUNT_KEY), site.get(HELD_DIGEST_KEY)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(digest, str):
        return None
    return Held(count=count, digest=digest)


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
