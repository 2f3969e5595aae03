"""Records to a ``TensorDataset`` in the fixed order the whole project relies on: image, plane, GA, spacing."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.core.errors import DataError
from common.core.records import PLANES, UltrasoundRecord
from common.data.loaders import IMAGE_SIZES, fit_square


def records_to_dataset(records: Sequence[UltrasoundRecord], *, image_size: int) -> TensorDataset:
    """Stack records into tensors ``(images, plane, ga, spacing)``, in this order.

    Parameters
    ----------
    records:
        Non-empty sequence of records (any source).
    image_size:
        Side of the output images; a record of another size is fitted (aspect kept, zero-padded) and its
        pixel spacing rescaled.

    Returns
    -------
    ``TensorDataset`` of: images ``float32 [N, 1, H, W]`` in ``[-1, 1]``; plane ``int64 [N]``;
    GA weeks ``float32 [N]`` (NaN if unknown); pixel spacing mm ``float32 [N]`` (NaN if unknown).
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size={image_size!r} is not supported; choose one of {list(IMAGE_SIZES)}")
    if len(records) == 0:
        raise DataError("records_to_dataset got no records; check the site's data (loader report) first")
    images = np.empty((len(records), 1, image_size, image_size), dtype=np.uint8)
    planes = np.empty(len(records), dtype=np.int64)
    ga = np.full(len(records), np.nan, dtype=np.float32)
    spacing = np.full(len(records), np.nan, dtype=np.float32)
    for k, record in enumerate(records):
        image = np.asarray(record.image)
        if image.ndim != 2 or image.dtype != np.uint8:
            raise DataError(f"record {record.source}:{record.image_id} has an image of shape {image.shape} and "
                            f"dtype {image.dtype}; expected a uint8 (H, W) grayscale array")
        if not 0 <= record.plane < len(PLANES):
            raise DataError(f"record {record.source}:{record.image_id} has plane {record.plane}; expected an "
                            f"index into PLANES (0..{len(PLANES) - 1})")
        scale = 1.0
        if image.shape != (image_size, image_size):
            image, scale = fit_square(image, image_size)
        images[k, 0] = image
        planes[k] = record.plane
        if record.ga_weeks is not None and math.isfinite(record.ga_weeks):
            ga[k] = record.ga_weeks
        if record.pixel_spacing_mm is not None and math.isfinite(record.pixel_spacing_mm):
            spacing[k] = record.pixel_spacing_mm / scale
    pixels = torch.from_numpy(images).to(torch.float32) / 127.5 - 1.0
    return TensorDataset(pixels, torch.from_numpy(planes), torch.from_numpy(ga), torch.from_numpy(spacing))


def has_ga(data: TensorDataset) -> bool:
    """Whether any example of a :func:`records_to_dataset` dataset has a known GA (its third tensor, NaN = unknown)."""
    return bool(torch.isfinite(data.tensors[2]).any())
