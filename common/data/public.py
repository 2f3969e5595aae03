"""Public real scans a user names (not any site's data), loaded in a supported layout with a record of the source."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.records import PLANES
from common.data.loaders import load_source


@dataclass(frozen=True)
class PublicImages:
    """Labelled public real scans for the encoder (not any site's data): images, planes, and where they came from."""

    images: np.ndarray  # uint8 [N, H, W]
    planes: np.ndarray  # int64 [N], indices into PLANES
    source: dict[str, Any]  # layout, folder name, image count, sha256 of the pixels


def load_public_images(layout: str, root: str | Path, *, size: int = 64) -> PublicImages:
    """Every plane-labelled image of a dataset folder in a supported layout (:func:`common.data.loaders.load_source`),
    to train the encoder with. The caller vouches that the folder is public (no site's private scans)."""
    result = load_source(layout, root, image_size=size)
    records = [r for r in result.records if r.plane is not None and 0 <= int(r.plane) < len(PLANES)]
    if not records:
        raise ValueError(f"{root}: no plane-labelled image in the {layout!r} layout; the encoder needs plane labels")
    images = np.stack([r.image for r in records]).astype(np.uint8)
    planes = np.asarray([int(r.plane) for r in records], dtype=np.int64)
    source = {"layout": layout, "folder": Path(root).name, "images": int(len(records)),
              "planes": {PLANES[k]: int(v) for k, v in zip(*np.unique(planes, return_counts=True))},
              "rows_skipped": int(result.report.skipped),
              "pixels_sha256": hashlib.sha256(images.tobytes()).hexdigest()}
    return PublicImages(images, planes, source)
