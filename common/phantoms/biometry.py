"""Fetal biometry growth curves (Hadlock et al. 1984) and their inverse for head circumference.

Hadlock FP, Deter RL, Harrist RB, Park SK. "Estimating fetal age: computer-assisted analysis of multiple
fetal growth parameters." Radiology 1984;152:497-501. Menstrual age (MA) in weeks, lengths in cm there;
the functions below take and return millimetres.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def hc_mm(ga_weeks: ArrayLike) -> np.ndarray:
    """Head circumference: HC[cm] = -11.48 + 1.56 MA - 0.0002548 MA^3."""
    ma = np.asarray(ga_weeks, dtype=np.float64)
    return 10.0 * (-11.48 + 1.56 * ma - 0.0002548 * ma**3)


def bpd_mm(ga_weeks: ArrayLike) -> np.ndarray:
    """Biparietal diameter: BPD[cm] = -3.08 + 0.41 MA - 0.000061 MA^3."""
    ma = np.asarray(ga_weeks, dtype=np.float64)
    return 10.0 * (-3.08 + 0.41 * ma - 0.000061 * ma**3)


def ac_mm(ga_weeks: ArrayLike) -> np.ndarray:
    """Abdominal circumference: AC[cm] = -13.3 + 1.61 MA - 0.00998 MA^2."""
    ma = np.asarray(ga_weeks, dtype=np.float64)
    return 10.0 * (-13.3 + 1.61 * ma - 0.00998 * ma**2)


def fl_mm(ga_weeks: ArrayLike) -> np.ndarray:
    """Femur length: FL[cm] = -3.91 + 0.427 MA - 0.0034 MA^2."""
    ma = np.asarray(ga_weeks, dtype=np.float64)
    return 10.0 * (-3.91 + 0.427 * ma - 0.0034 * ma**2)


def ga_from_hc(hc_millimetres: ArrayLike) -> np.ndarray:
    """Gestational age in weeks from head circumference (Hadlock 1984): MA = 8.96 + 0.540 HC + 0.0003 HC^3, HC in cm."""
    hc = np.asarray(hc_millimetres, dtype=np.float64) / 10.0
    return 8.96 + 0.540 * hc + 0.0003 * hc**3
