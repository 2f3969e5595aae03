"""The one record type every data source yields, and the unified plane label set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

# The six FETAL_PLANES_DB classes, in a fixed order: the label index is the position here.
PLANES: tuple[str, ...] = (
    "fetal_brain",
    "fetal_abdomen",
    "fetal_femur",
    "fetal_thorax",
    "maternal_cervix",
    "other",
)
PLANE_INDEX: dict[str, int] = {name: i for i, name in enumerate(PLANES)}

# Gestational-age range the phantoms and the conditioning cover (weeks).
GA_MIN_WEEKS = 14.0
GA_MAX_WEEKS = 40.0


@dataclass(frozen=True)
class UltrasoundRecord:
    """One 2D fetal ultrasound image with its labels, from any source.

    Parameters
    ----------
    image:
        Grayscale ``uint8`` array of shape ``(H, W)``.
    plane:
        Index into :data:`PLANES`.
    ga_weeks:
        Gestational age in weeks, or ``None`` when the source does not give it.
    pixel_spacing_mm:
        Physical size of one pixel of ``image`` (as stored, after any resize), or ``None`` if unknown.
    site:
        Site / scanner / centre the image comes from (the federation's natural partition key).
    patient_id:
        Patient identifier, unique within ``source``; partitions never split a patient.
    image_id:
        Identifier unique within ``source`` (e.g. the file stem).
    source:
        ``"phantom"``, ``"fetal_planes_db"``, ``"hc18"`` or ``"african"``.
    extra:
        Source-specific facts (true biometry of a phantom, the official split, head circumference ...).
    """

    image: np.ndarray
    plane: int
    ga_weeks: float | None
    pixel_spacing_mm: float | None
    site: str
    patient_id: str
    image_id: str
    source: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def plane_name(self) -> str:
        """Name of the plane label."""
        return PLANES[self.plane]
