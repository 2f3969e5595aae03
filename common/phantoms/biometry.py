"""Fetal biometry growth curves (Hadlock et al. 1984) and their inverse for head circumference.

Hadlock FP, Deter RL, Harrist RB, Park SK. "Estimating fetal age: computer-assisted analysis of multiple
fetal growth parameters." Radiology 1984;152:497-501. Menstrual age (MA) in weeks, lengths in cm there;
the functions below take and return millimetres.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

Curve = Callable[[ArrayLike], np.ndarray]


def _signed(x: float) -> str:
    return f"{'-' if x < 0 else '+'} {np.format_float_positional(abs(x))}"


def _hadlock_curve(name: str, label: str, a: float, b: float, c: float, power: int) -> Curve:
    """Hadlock's regression of one length on menstrual age, ``L[cm] = a + b MA + c MA^power``, in millimetres."""

    def curve(ga_weeks: ArrayLike) -> np.ndarray:
        ma = np.asarray(ga_weeks, dtype=np.float64)
        return 10.0 * (a + b * ma + c * ma**power)

    curve.__name__ = curve.__qualname__ = f"{name}_mm"
    curve.__doc__ = (f"{label}: {name.upper()}[cm] = {np.format_float_positional(a)} {_signed(b)} MA "
                     f"{_signed(c)} MA^{power}.")
    return curve


# name, what it measures, and the coefficients a, b, c and power of MA of Hadlock et al. 1984
hc_mm = _hadlock_curve("hc", "Head circumference", -11.48, 1.56, -0.0002548, 3)
bpd_mm = _hadlock_curve("bpd", "Biparietal diameter", -3.08, 0.41, -0.000061, 3)
ac_mm = _hadlock_curve("ac", "Abdominal circumference", -13.3, 1.61, -0.00998, 2)
fl_mm = _hadlock_curve("fl", "Femur length", -3.91, 0.427, -0.0034, 2)


def ga_from_hc(hc_millimetres: ArrayLike) -> np.ndarray:
    """Gestational age in weeks from head circumference (Hadlock 1984): MA = 8.96 + 0.540 HC + 0.0003 HC^3, HC in cm."""
    hc = np.asarray(hc_millimetres, dtype=np.float64) / 10.0
    return 8.96 + 0.540 * hc + 0.0003 * hc**3


def hc_from_ga(ga_weeks: ArrayLike) -> np.ndarray:
    """Head circumference (mm) whose Hadlock GA (:func:`ga_from_hc`) is ``ga_weeks``: the one real root of the
    monotone cubic, ``HC = -2 sqrt(p/3) sinh(asinh(3q/(2p) sqrt(3/p)) / 3)`` with ``p = 0.54/0.0003`` and
    ``q = (8.96 - MA)/0.0003`` (HC in cm). Defined for every GA; below 8.96 weeks the root is negative (no head)."""
    ma = np.asarray(ga_weeks, dtype=np.float64)
    p, q = 0.540 / 0.0003, (8.96 - ma) / 0.0003
    return 10.0 * (-2.0 * np.sqrt(p / 3.0) * np.sinh(np.arcsinh(1.5 * q / p * np.sqrt(3.0 / p)) / 3.0))
