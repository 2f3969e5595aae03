"""The release reaches the sites incrementally: a delta of what is new, and a content-addressed cache at the site.

The release is append-only between checkpoints, so a site that holds its first ``k`` items only needs the rest.
Every item is addressed by the SHA-256 of its pixels (the release store's ``sha256``); the release as a whole by
the chain digest of its item keys in order (:func:`chain_digest`). The server keeps, per site, what the site last
said it holds (count and digest) and sends a :class:`ReleaseDelta`: the items from that count on, with the digest of
the prefix the site must already hold and the digest of the whole. The site's :class:`ReleaseCache` checks both, and
the content address of every new item, before it uses any of it.

When the site's word and the release disagree (the release was rolled back on resume, the site's cache was lost, the
server restarted and forgot the acknowledgements) the delta starts from 0: the site receives the whole release once.
A site whose cache does not hold the prefix the delta assumes refuses the round with :class:`ReleaseSyncError`; the
server forgets its acknowledgement, and the next message carries everything.

Pure numpy and files: no Flower types (the records are built in :mod:`common.federated.flwr_records`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.atomic_io import write_bytes_atomic, write_json_atomic
from common.core.errors import ReplyValidationError
from common.core.records import PLANES, UltrasoundRecord

EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
MANIFEST = "manifest.json"


class ReleaseSyncError(ReplyValidationError):
    """A release delta does not fit what the site holds, or an item is not what its key says."""


def image_key(image: np.ndarray) -> str:
    """The content address of a release image: SHA-256 of its uint8 pixels (the store's ``sha256``)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def chain_digest(keys: Sequence[str]) -> str:
    """Digest of an ordered list of item keys (the empty release has :data:`EMPTY_DIGEST`)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest() if keys else EMPTY_DIGEST


@dataclass(frozen=True)
class Held:
    """What a site says it holds: the first ``count`` items of the release, whose chain digest is ``digest``."""

    count: int = 0
    digest: str = EMPTY_DIGEST


@dataclass(frozen=True)
class ReleaseDelta:
    """The release items from ``offset`` on (``total`` in all) and the digests the site checks them against."""

    total: int
    offset: int
    prefix_digest: str
    digest: str
    keys: tuple[str, ...]
    images: np.ndarray  # uint8 (n, H, W)
    plane: np.ndarray  # int64 (n,)
    ga: np.ndarray  # float32 (n,)

    def arrays(self) -> dict[str, np.ndarray]:
        """The new items as named arrays (what the array record carries)."""
        return {"images": self.images, "plane": self.plane, "ga": self.ga}

    def meta(self) -> dict[str, Any]:
        """Counts, digests and keys (what the config record carries)."""
        return {"total": self.total, "offset": self.offset, "prefix-digest": self.prefix_digest,
                "digest": self.digest, "keys": list(self.keys)}

    @classmethod
    def from_parts(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> "ReleaseDelta":
        """Inverse of :meth:`arrays` and :meth:`meta`, checked for shape and type (a clear error otherwise)."""
        try:
            images, plane, ga = np.asarray(arrays["images"]), np.asarray(arrays["plane"]), np.asarray(arrays["ga"])
            keys = tuple(str(k) for k in meta["keys"])
            delta = cls(total=int(meta["total"]), offset=int(meta["offset"]), prefix_digest=str(meta["prefix-digest"]),
                        digest=str(meta["digest"]), keys=keys, images=images, plane=plane, ga=ga)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseSyncError(f"release delta is malformed: {type(exc).__name__}: {exc}") from None
        n = len(keys)
        if images.dtype != np.uint8 or images.ndim != 3 or len(images) != n or plane.shape != (n,) or ga.shape != (n,):
            raise ReleaseSyncError(f"release delta is inconsistent: {n} keys, images {images.dtype} {images.shape}, "
                                   f"plane {plane.shape}, ga {ga.shape}")
        if not 0 <= delta.offset <= delta.total or delta.offset + n != delta.total:
            raise ReleaseSyncError(f"release delta covers items {delta.offset}..{delta.offset + n} of {delta.total}")
        if n and ((plane < 0) | (plane >= len(PLANES))).any():
            raise ReleaseSyncError("release delta carries an unknown plane index")
        return delta


def make_delta(records: Sequence[Mapping[str, Any]], load_image: Callable[[Mapping[str, Any]], np.ndarray],
               held: Held | None) -> ReleaseDelta:
    """The delta for a site that holds ``held`` of the release ``records`` (store order); ``None``: unknown.

    Starts from 0 when the site's count or digest does not match the release's own prefix.
    """
    keys = [str(r["sha256"]) for r in records]
    offset = 0
    if held is not None and 0 < held.count <= len(keys) and chain_digest(keys[:held.count]) == held.digest:
        offset = held.count
    new = records[offset:]
    images = [np.asarray(load_image(r), dtype=np.uint8) for r in new]
    return ReleaseDelta(
        total=len(keys), offset=offset, prefix_digest=chain_digest(keys[:offset]), digest=chain_digest(keys),
        keys=tuple(keys[offset:]),
        images=np.stack(images) if images else np.zeros((0, 0, 0), np.uint8),
        plane=np.array([int(r["plane"]) for r in new], dtype=np.int64),
        ga=np.array([float(r["ga_weeks"]) for r in new], dtype=np.float32),
    )


class ReleaseCache:
    """A site's copy of the release, content-addressed: ``<folder>/<sha256>.npy`` plus an ordered manifest.

    The released images are public (post-processing of DP generators): the cache holds nothing private.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _manifest(self) -> list[dict[str, Any]]:
        path = self.folder / MANIFEST
        if not path.is_file():
            return []
        return list(json.loads(path.read_text())["items"])

    def held(self) -> Held:
        """What this cache holds (what the site tells the server)."""
        keys = [item["key"] for item in self._manifest()]
        return Held(count=len(keys), digest=chain_digest(keys))

    def apply(self, delta: ReleaseDelta) -> Held:
        """Store the delta's new items after the prefix it assumes; returns what the cache now holds.

        Raises :class:`ReleaseSyncError` when the cache does not hold that prefix, a new item's pixels do not match
        its key, or the result does not have the release's digest. Nothing is changed then.
        """
        items = self._manifest()
        prefix = items[:delta.offset]
        if len(prefix) != delta.offset or chain_digest([i["key"] for i in prefix]) != delta.prefix_digest:
            raise ReleaseSyncError(
                f"the release cache in {self.folder} holds {len(items)} items, not the {delta.offset} the server "
                "assumed (cache lost or rolled back); the server resends the whole release next round")
        for i, key in enumerate(delta.keys):
            if image_key(delta.images[i]) != key:
                raise ReleaseSyncError(f"release item {delta.offset + i} does not match its key {key[:16]}")
        new = [{"key": key, "plane": int(delta.plane[i]), "ga": float(delta.ga[i])} for i, key in enumerate(delta.keys)]
        merged = prefix + new
        if chain_digest([i["key"] for i in merged]) != delta.digest:
            raise ReleaseSyncError("the release after this delta does not have the digest the server announced")
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(delta.keys):
            path = self.folder / f"{key}.npy"
            if not path.is_file():
                write_bytes_atomic(path, _npy_bytes(delta.images[i]))
        write_json_atomic(self.folder / MANIFEST, {"items": merged})
        return Held(count=len(merged), digest=delta.digest)

    def images(self) -> np.ndarray:
        """The cached release's images in release order, uint8 (n, H, W)."""
        items = self._manifest()
        loaded = [np.load(self.folder / f"{i['key']}.npy", allow_pickle=False) for i in items]
        return np.stack(loaded) if loaded else np.zeros((0, 0, 0), np.uint8)

    def records(self) -> list[UltrasoundRecord]:
        """The cached release as records for downstream training (synthetic: no pixel spacing)."""
        items = self._manifest()
        images = self.images()
        return [
            UltrasoundRecord(image=images[n], plane=int(i["plane"]), ga_weeks=float(i["ga"]), pixel_spacing_mm=None,
                             site="release", patient_id=f"synthetic-{i['key'][:12]}",
                             image_id=f"synthetic-{i['key'][:12]}", source="synthetic")
            for n, i in enumerate(items)
        ]


def _npy_bytes(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()
