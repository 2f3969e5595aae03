"""Seeded fetal ultrasound phantoms: anatomy of the six planes sized by Hadlock biometry, imaged in B-mode.

This module builds the *scene* (what is scanned): tissue primitives with echogenicity, attenuation and
specular reflectivity, sized from gestational age with :mod:`common.phantoms.biometry` (Hadlock et al. 1984), and
hands them to the simulated scanner of :mod:`common.phantoms.profiles` (beam grid, speckle, PSF, attenuation
and shadowing, TGC, log compression, scan conversion, overlays). ``pixel_spacing_mm = depth_mm / size``.
Mask labels are positions in :data:`MASK_LABELS`.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS, PLANES, UltrasoundRecord
from common.core.viz import save_grid
from common.phantoms import biometry
from common.phantoms.profiles import (
    SCANNER_PROFILES,
    Geometry,
    Grid,
    ScannerProfile,
    build_geometry,
    draw_overlays,
    get_profile,
    simulate_bmode,
)

MASK_LABELS: tuple[str, ...] = (
    "background", "bone", "brain", "fluid", "fetal_soft_tissue", "heart", "placenta", "maternal_tissue",
    "amniotic_fluid",
)
MIN_SIZE, MAX_SIZE = 16, 1024


@dataclass(frozen=True)
class Tissue:
    """Acoustic properties: backscatter amplitude (1 = soft tissue), round-trip attenuation, specularity."""

    echo: float
    alpha: float  # dB / (mm MHz), round trip (soft tissue ~0.1, i.e. 0.5 dB/(cm MHz) one way)
    specular: float
    label: int


# Echogenicities follow the usual sonographic ordering: bone > placenta, lung > liver, muscle > brain > fluid.
FLUID = Tissue(0.004, 0.002, 0.0, 3)
AMNIOTIC = Tissue(0.005, 0.002, 0.0, 8)
SKULL = Tissue(1.8, 0.25, 10.0, 1)
BONE = Tissue(2.0, 2.0, 12.0, 1)
BRAIN = Tissue(0.4, 0.08, 0.0, 2)
THALAMUS = Tissue(0.22, 0.08, 0.0, 2)
CHOROID = Tissue(1.9, 0.1, 0.0, 2)
FALX = Tissue(1.3, 0.1, 2.5, 2)
SOFT = Tissue(0.85, 0.1, 0.0, 4)
SKIN = Tissue(1.6, 0.1, 3.0, 4)
LIVER = Tissue(0.75, 0.1, 0.0, 4)
LUNG = Tissue(1.25, 0.1, 0.0, 4)
MYOCARDIUM = Tissue(0.95, 0.1, 0.0, 5)
PLACENTA = Tissue(1.3, 0.1, 0.0, 6)
MATERNAL = Tissue(0.9, 0.1, 0.0, 7)
FAT = Tissue(0.5, 0.12, 0.0, 7)
MUSCLE = Tissue(1.15, 0.12, 0.0, 7)
MUCOSA = Tissue(0.3, 0.1, 0.0, 7)
CANAL = Tissue(1.6, 0.1, 3.0, 7)
MATERNAL_SKIN = Tissue(2.2, 0.12, 1.0, 7)
FASCIA = Tissue(1.6, 0.12, 0.6, 7)


@dataclass(frozen=True)
class Ellipse:
    """Filled ellipse (``ring == 0``) or elliptic ring of thickness ``ring`` centred on the ellipse (mm)."""

    cx: float
    cz: float
    a: float
    b: float
    angle: float
    tissue: Tissue
    ring: float = 0.0

    def bbox(self) -> tuple[float, float, float, float]:
        """Cartesian bounding box (x0, x1, z0, z1)."""
        r = max(self.a, self.b) + self.ring
        return self.cx - r, self.cx + r, self.cz - r, self.cz + r

    def _local(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates along the (a, b) axes."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dz = x - self.cx, z - self.cz
        return dx * c + dz * s, dz * c - dx * s

    def inside(self, x: np.ndarray, z: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Points inside the ellipse (or the ring between the half-thickness offsets), as a quadratic form."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dz = x - self.cx, z - self.cz
        xx, zz, xz = dx * dx, dz * dz, dx * dz
        h = self.ring / 2

        def quad(a: float, b: float) -> np.ndarray:
            ia, ib = 1.0 / a**2, 1.0 / b**2
            return xx * (c * c * ia + s * s * ib) + zz * (s * s * ia + c * c * ib) + xz * (2 * c * s * (ia - ib))

        out = quad(self.a + h, self.b + h) <= 1.0
        if self.ring:
            out &= quad(self.a - h, self.b - h) > 1.0
        return out

    def cosine(self, x: np.ndarray, z: np.ndarray, bx: np.ndarray, bz: np.ndarray) -> np.ndarray:
        """|cos| of the angle between the surface normal (gradient of the implicit function) and the beam."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = self._local(x, z)
        gu, gv = u * (1.0 / self.a**2), v * (1.0 / self.b**2)
        return np.abs((gu * c - gv * s) * bx + (gu * s + gv * c) * bz) / (np.sqrt(gu * gu + gv * gv) + 1e-9)


@dataclass(frozen=True)
class Capsule:
    """Segment from (x0, z0) to (x1, z1) thickened by ``radius`` (bones, vessels, the falx)."""

    x0: float
    z0: float
    x1: float
    z1: float
    radius: float
    tissue: Tissue

    def bbox(self) -> tuple[float, float, float, float]:
        """Cartesian bounding box (x0, x1, z0, z1)."""
        r = self.radius
        xs, zs = sorted((self.x0, self.x1)), sorted((self.z0, self.z1))
        return xs[0] - r, xs[1] + r, zs[0] - r, zs[1] + r

    def _offset(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vector from the nearest point of the segment."""
        ex, ez = self.x1 - self.x0, self.z1 - self.z0
        t = np.clip(((x - self.x0) * ex + (z - self.z0) * ez) * (1.0 / (ex * ex + ez * ez + 1e-9)), 0.0, 1.0)
        return x - (self.x0 + t * ex), z - (self.z0 + t * ez)

    def inside(self, x: np.ndarray, z: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Points within ``radius`` of the segment."""
        dx, dz = self._offset(x, z)
        return dx * dx + dz * dz <= self.radius**2

    def cosine(self, x: np.ndarray, z: np.ndarray, bx: np.ndarray, bz: np.ndarray) -> np.ndarray:
        """|cos| between the radial surface normal and the beam."""
        dx, dz = self._offset(x, z)
        return np.abs(dx * bx + dz * bz) / (np.sqrt(dx * dx + dz * dz) + 1e-6)


@dataclass(frozen=True)
class Layer:
    """Band parallel to the probe face, ``d0(x) <= d <= d1(x)``, with wavy boundaries (maternal wall)."""

    d0: float
    d1: float
    wave: float
    phase: float
    tissue: Tissue

    def bbox(self) -> tuple[float, float, float, float]:
        """Cartesian bounding box (x0, x1, z0, z1); layers span the whole width."""
        return -1e4, 1e4, 0.0, self.d1 + abs(self.wave)  # the grid also skips rows shallower than d0

    def inside(self, x: np.ndarray, z: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Points whose depth along the beam lies between the wavy boundaries."""
        w = self.wave * np.sin(0.045 * x + self.phase)
        return (d >= self.d0 + 0.4 * w) & (d <= self.d1 + w)

    def cosine(self, x: np.ndarray, z: np.ndarray, bx: np.ndarray, bz: np.ndarray) -> np.ndarray:
        """Boundaries parallel to the probe face meet the beam head-on."""
        return np.ones_like(x)


Primitive = Ellipse | Capsule | Layer


@dataclass(frozen=True)
class Scene:
    """Primitives painted in order over a background tissue, with the sizes actually drawn."""

    primitives: tuple[Primitive, ...]
    background: Tissue
    measured_mm: dict[str, float]
    calipers: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class PhantomImage:
    """One rendered phantom.

    Parameters
    ----------
    image:
        ``uint8`` B-mode image, ``size x size``.
    mask:
        ``uint8`` label map (positions in :data:`MASK_LABELS`; 0 outside the field of view).
    pixel_spacing_mm:
        ``profile.depth_mm / size``.
    biometry:
        True Hadlock ``hc_mm, bpd_mm, ac_mm, fl_mm`` for the gestational age.
    measured:
        Sizes drawn, in pixels (``hc_px, bpd_px`` brain; ``ac_px`` abdomen; ``fl_px`` femur; ``tc_px`` thorax;
        ``cervix_length_px`` cervix; nothing for "other").
    """

    image: np.ndarray
    mask: np.ndarray
    pixel_spacing_mm: float
    biometry: dict[str, float]
    measured: dict[str, float]


def ellipse_perimeter(a: float, b: float) -> float:
    """Ramanujan's approximation of the perimeter of an ellipse with semi-axes a, b."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def semi_axis_for_perimeter(perimeter: float, b: float) -> float:
    """Semi-axis ``a >= b`` giving the ellipse ``perimeter`` (bisection); ``b`` if the perimeter is too small."""
    lo, hi = b, perimeter / 2
    if ellipse_perimeter(lo, b) >= perimeter:
        return b
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ellipse_perimeter(mid, b) < perimeter else (lo, mid)
    return 0.5 * (lo + hi)


def true_biometry(ga_weeks: float) -> dict[str, float]:
    """Hadlock 1984 head circumference, biparietal diameter, abdominal circumference, femur length (mm)."""
    return {"hc_mm": float(biometry.hc_mm(ga_weeks)), "bpd_mm": float(biometry.bpd_mm(ga_weeks)),
            "ac_mm": float(biometry.ac_mm(ga_weeks)), "fl_mm": float(biometry.fl_mm(ga_weeks))}


class _Frame:
    """Local frame of a structure: centre plus rotation, mapping (u, v) in mm to scene (x, z)."""

    def __init__(self, cx: float, cz: float, angle: float) -> None:
        """Store centre and angle (radians, from the lateral axis towards depth)."""
        self.cx, self.cz, self.angle = cx, cz, angle
        self.c, self.s = math.cos(angle), math.sin(angle)

    def at(self, u: float, v: float) -> tuple[float, float]:
        """Scene coordinates of local point (u, v)."""
        return self.cx + u * self.c - v * self.s, self.cz + u * self.s + v * self.c

    def ellipse(self, u: float, v: float, a: float, b: float, tissue: Tissue, turn: float = 0.0,
                ring: float = 0.0) -> Ellipse:
        """Ellipse centred at local (u, v), major axis rotated by ``turn`` relative to the frame."""
        x, z = self.at(u, v)
        return Ellipse(x, z, a, b, self.angle + turn, tissue, ring)

    def capsule(self, u0: float, v0: float, u1: float, v1: float, radius: float, tissue: Tissue) -> Capsule:
        """Capsule between local points."""
        return Capsule(*self.at(u0, v0), *self.at(u1, v1), radius, tissue)


def _environment(rng: np.random.Generator, depth: float, ga: float) -> tuple[list[Primitive], float]:
    """Maternal wall (skin, fat, muscle, myometrium), posterior uterine wall, placenta, other fetal parts.

    Returns the primitives and the depth of the anterior wall's deep boundary (mm).
    """
    k = depth / 150.0
    d = [0.0, 1.0]
    for lo, hi in ((5.0, 13.0), (4.0, 9.0), (1.0, 2.0), (4.0, 9.0)):
        d.append(d[-1] + rng.uniform(lo, hi) * k)
    tissues = (MATERNAL_SKIN, FAT, MUSCLE, FASCIA, MATERNAL)
    prims: list[Primitive] = [Layer(d[i], d[i + 1], rng.uniform(0.5, 2.5), rng.uniform(0, 6.3), t)
                              for i, t in enumerate(tissues)]
    back = rng.uniform(0.75, 0.95) * depth  # posterior uterine wall and the maternal tissue behind it
    prims.append(Layer(back, back + 12 * k, rng.uniform(2, 8), rng.uniform(0, 6.3), MATERNAL))
    prims.append(Layer(back + 12 * k, 2 * depth, rng.uniform(2, 6), rng.uniform(0, 6.3), Tissue(0.7, 0.12, 0.0, 7)))
    if rng.random() < 0.6:  # anterior (under the wall) or posterior placenta
        thick, width = rng.uniform(14, 28) * k, rng.uniform(0.7, 1.1) * depth
        cz = d[-1] + 0.3 * thick if rng.random() < 0.5 else back - 0.2 * thick
        cx, tilt = rng.uniform(-0.3, 0.3) * depth, rng.uniform(-0.15, 0.15)
        prims.append(Ellipse(cx, cz, width / 2, thick, tilt, PLACENTA))
    # Other fetal parts crowd the uterus more as the fetus grows and the fluid shrinks.
    for _ in range(int(rng.integers(1, 3 + int(ga > 26)))):
        r = rng.uniform(0.07, 0.16) * depth * (0.5 + ga / 40)
        x, z = rng.uniform(-0.55, 0.55) * depth, rng.uniform(d[-1] + 0.5 * r, back + 0.3 * r)
        rb, ang = rng.uniform(0.5, 0.9) * r, rng.uniform(0, math.pi)
        prims += [Ellipse(x, z, r, rb, ang, SKIN), Ellipse(x, z, r - 1.2, rb - 1.2, ang, SOFT)]
    return prims, d[-1]


def _spine_angle(rng: np.random.Generator, fr: _Frame) -> float:
    """Local angle of the spine: mostly away from the probe (sonographers avoid its shadow), sometimes towards."""
    world = rng.uniform(0.15, math.pi - 0.15) if rng.random() < 0.85 else -rng.uniform(0.3, math.pi - 0.3)
    return world - fr.angle


def _spine_and_ribs(fr: _Frame, a: float, b: float, spine_angle: float, n_ribs: int) -> list[Primitive]:
    """Ossification centres of a vertebra (body + two laminae) and rib arcs, inside a trunk of semi-axes a, b."""
    cu, sv = math.cos(spine_angle), math.sin(spine_angle)
    r = 0.07 * (a + b)
    prims: list[Primitive] = [fr.ellipse(0.68 * a * cu, 0.68 * b * sv, r, 0.8 * r, BONE, turn=spine_angle)]
    for side in (-1.0, 1.0):
        ang = spine_angle + side * 0.32
        prims.append(fr.ellipse(0.84 * a * math.cos(ang), 0.84 * b * math.sin(ang), 0.7 * r, 0.45 * r, BONE,
                                turn=ang + side * 1.2))
        for k in range(n_ribs):  # short bony arcs along the chest wall, each casting a shadow
            a0, a1 = spine_angle + side * (0.95 + 0.6 * k), spine_angle + side * (1.2 + 0.6 * k)
            prims.append(fr.capsule(0.9 * a * math.cos(a0), 0.9 * b * math.sin(a0),
                                    0.9 * a * math.cos(a1), 0.9 * b * math.sin(a1), 0.022 * (a + b), BONE))
    return prims


def _scene_brain(bio: dict[str, float], fr: _Frame, rng: np.random.Generator, ga: float) -> Scene:
    """Transthalamic head: skull ellipse (outer HC, BPD), falx, cavum septi pellucidi, thalami, ventricles."""
    b_o = bio["bpd_mm"] / 2
    a_o = semi_axis_for_perimeter(bio["hc_mm"], b_o)
    t = 1.0 + 0.075 * ga  # skull thickness (mm), thickening with ossification
    a_i, b_i = a_o - t, b_o - t
    ant = float(rng.choice([-1.0, 1.0]))  # which end is frontal
    p: list[Primitive] = [fr.ellipse(0, 0, a_o + 3, b_o + 3, SOFT), fr.ellipse(0, 0, a_i, b_i, BRAIN)]
    p += [fr.capsule(-0.92 * a_i, 0, 0.92 * a_i, 0, 0.8, FALX)]
    p += [fr.ellipse(ant * 0.38 * a_i, 0, 0.1 * a_i, 0.07 * b_i, FLUID)]  # cavum septi pellucidi
    for side in (-1.0, 1.0):
        p.append(fr.ellipse(-ant * 0.05 * a_i, side * 0.17 * b_i, 0.2 * a_i, 0.13 * b_i, THALAMUS,
                            turn=side * ant * 0.5))
        turn = side * ant * 0.35  # atrium of the lateral ventricle with its bright choroid plexus
        p.append(fr.ellipse(-ant * 0.62 * a_i, side * 0.4 * b_i, 0.2 * a_i, 0.09 * b_i, FLUID, turn=turn))
        p.append(fr.ellipse(-ant * 0.6 * a_i, side * 0.4 * b_i, 0.12 * a_i, 0.05 * b_i, CHOROID, turn=turn))
        p.append(fr.ellipse(ant * 0.1 * a_i, side * 0.72 * b_i, 0.16 * a_i, 0.06 * b_i, FALX, turn=side * 0.3 * ant))
    p.append(fr.ellipse(0, 0, a_o - t / 2, b_o - t / 2, SKULL, ring=t))
    cal = (fr.at(0, -b_o), fr.at(0, b_o - t))
    return Scene(tuple(p), AMNIOTIC, {"hc": ellipse_perimeter(a_o, b_o), "bpd": 2 * b_o, "ofd": 2 * a_o}, cal)


def _scene_abdomen(bio: dict[str, float], fr: _Frame, rng: np.random.Generator, ga: float) -> Scene:
    """Transverse abdomen at the AC level: round trunk, stomach bubble, umbilical vein, spine with shadow."""
    b = bio["ac_mm"] / (2 * math.pi) * rng.uniform(0.9, 0.97)
    a = semi_axis_for_perimeter(bio["ac_mm"], b)
    sp = _spine_angle(rng, fr)
    side = float(rng.choice([-1.0, 1.0]))
    st = sp + side * 2.1
    uv = sp + math.pi
    p: list[Primitive] = [fr.ellipse(0, 0, a, b, LIVER), fr.ellipse(0, 0, a - 0.6, b - 0.6, SKIN, ring=1.2)]
    p.append(fr.ellipse(0.42 * a * math.cos(st), 0.42 * b * math.sin(st), 0.22 * a, 0.14 * b, FLUID, turn=st + 1.4))
    p.append(fr.capsule(0.75 * a * math.cos(uv), 0.75 * b * math.sin(uv), 0.2 * a * math.cos(uv + 0.5 * side),
                        0.2 * b * math.sin(uv + 0.5 * side), 0.045 * a, FLUID))
    p.append(fr.ellipse(0.45 * a * math.cos(sp + 0.3), 0.45 * b * math.sin(sp + 0.3), 0.05 * a, 0.05 * a, FLUID))
    p += _spine_and_ribs(fr, a, b, sp, int(rng.random() < 0.5))
    return Scene(tuple(p), AMNIOTIC, {"ac": ellipse_perimeter(a, b)})


def _scene_femur(bio: dict[str, float], fr: _Frame, rng: np.random.Generator, ga: float) -> Scene:
    """Femur diaphysis of length FL (bright, shadowing) in the thigh, with the knee and part of the lower leg."""
    fl = bio["fl_mm"]
    r = 0.5 * (1.0 + 0.06 * fl)
    half = fl / 2 - r  # capsule end to end = FL
    kn = float(rng.choice([-1.0, 1.0]))  # which end is the knee
    bend = rng.uniform(1.0, 2.0)
    kc, ks = kn * math.cos(bend), math.sin(bend) * float(rng.choice([-1.0, 1.0]))
    ku = kn * 0.62 * fl
    p: list[Primitive] = [fr.ellipse(-kn * 0.75 * fl, 0.1 * fl, 0.45 * fl, 0.35 * fl, SOFT)]  # buttock / pelvis
    p.append(fr.capsule(ku, 0, ku + 0.8 * fl * kc, 0.8 * fl * ks, 0.15 * fl, SOFT))  # lower leg
    for off in (-0.05 * fl, 0.05 * fl):  # tibia and fibula
        p.append(fr.capsule(ku + 0.15 * fl * kc - off * ks, 0.15 * fl * ks + off * kc,
                            ku + 0.75 * fl * kc - off * ks, 0.75 * fl * ks + off * kc, 0.5 * r, BONE))
    p.append(fr.capsule(-0.6 * fl, 0, 0.6 * fl, 0, 0.2 * fl, SOFT))  # thigh
    p.append(fr.capsule(-0.6 * fl, 0, 0.6 * fl, 0, 0.2 * fl - 0.5, SKIN))
    p.append(fr.capsule(-0.6 * fl, 0, 0.6 * fl, 0, 0.2 * fl - 1.2, SOFT))
    for end in (-1.0, 1.0):  # cartilaginous epiphyses (hypoechoic) capping the diaphysis
        p.append(fr.ellipse(end * (fl / 2 + 0.05 * fl), 0, 0.06 * fl, 0.07 * fl, BRAIN))
    p.append(fr.capsule(-half, 0, half, 0, r, BONE))
    return Scene(tuple(p), AMNIOTIC, {"fl": fl}, (fr.at(-fl / 2, 0), fr.at(fl / 2, 0)))


def _scene_thorax(bio: dict[str, float], fr: _Frame, rng: np.random.Generator, ga: float) -> Scene:
    """Four-chamber view: round chest (TC ~ 0.9 AC), lungs, heart with four chambers, spine and ribs."""
    tc = 0.9 * bio["ac_mm"]
    b = tc / (2 * math.pi) * rng.uniform(0.92, 0.99)
    a = semi_axis_for_perimeter(tc, b)
    sp = _spine_angle(rng, fr)
    side = float(rng.choice([-1.0, 1.0]))
    p: list[Primitive] = [fr.ellipse(0, 0, a, b, LUNG), fr.ellipse(0, 0, a - 0.6, b - 0.6, SKIN, ring=1.2)]
    hc_ang = sp + math.pi - side * 0.45
    hu, hv = 0.22 * a * math.cos(hc_ang), 0.22 * b * math.sin(hc_ang)
    axis = sp + math.pi - side * 0.8  # heart axis ~45 degrees to the anteroposterior axis (levocardia)
    ha, hb = 0.5 * a, 0.4 * b
    p.append(fr.ellipse(hu, hv, ha, hb, MYOCARDIUM, turn=axis))
    hf = _Frame(*fr.at(hu, hv), fr.angle + axis)
    # Ventricles towards the apex, atria towards the base; the myocardium left between them is the bright
    # crux (septum + atrioventricular valves) of the four-chamber view.
    for du, dv, ea, eb in ((0.42, 0.4, 0.36, 0.3), (0.42, -0.4, 0.36, 0.28), (-0.47, 0.4, 0.3, 0.3),
                           (-0.47, -0.4, 0.3, 0.3)):
        p.append(hf.ellipse(du * ha, dv * hb, ea * ha, eb * hb, FLUID))
    p.append(fr.ellipse(0.45 * a * math.cos(sp + side * 0.35), 0.45 * b * math.sin(sp + side * 0.35),
                        0.05 * a, 0.05 * a, FLUID))  # descending aorta
    p += _spine_and_ribs(fr, a, b, sp, 1)
    return Scene(tuple(p), AMNIOTIC, {"tc": ellipse_perimeter(a, b)})


def _scene_cervix(bio: dict[str, float], fr: _Frame, rng: np.random.Generator, ga: float) -> Scene:
    """Maternal cervix: stroma, hypoechoic mucosa around a bright canal, bladder, fetal head beyond the os."""
    length = rng.uniform(28, 45)
    width = rng.uniform(0.55, 0.75) * length
    os_end = float(rng.choice([-1.0, 1.0]))  # internal os side
    bladder = fr.ellipse(-os_end * 0.1 * length, -0.95 * width, 0.8 * length, 0.3 * width, FLUID, turn=0.1)
    p: list[Primitive] = [bladder]
    p.append(fr.ellipse(os_end * 0.95 * length, 0.1 * width, 0.35 * length, 0.5 * width, AMNIOTIC))
    head = bio["bpd_mm"] / 2
    p.append(fr.ellipse(os_end * (0.95 * length + head), 0.2 * width, head, 0.85 * head, BRAIN))
    p.append(fr.ellipse(os_end * (0.95 * length + head), 0.2 * width, head, 0.85 * head, SKULL, ring=2.0))
    p.append(fr.ellipse(0, 0, 0.55 * length, 0.5 * width, Tissue(1.5, 0.1, 0.8, 7), ring=1.5))  # stroma boundary
    p.append(fr.ellipse(0, 0, 0.54 * length, 0.49 * width, Tissue(1.15, 0.1, 0.0, 7)))  # cervical stroma
    p.append(fr.ellipse(0, 0, 0.46 * length, rng.uniform(0.1, 0.16) * width, MUCOSA))  # endocervical mucosa
    p.append(fr.capsule(-0.45 * length, 0, 0.45 * length, 0, 0.6, CANAL))
    cal = (fr.at(-0.45 * length, 0), fr.at(0.45 * length, 0))
    return Scene(tuple(p), Tissue(0.6, 0.1, 0.0, 7), {"cervix_length": 0.9 * length}, cal)


def _scene_other(bio: dict[str, float], fr: _Frame, rng: np.random.Generator, ga: float) -> Scene:
    """Mixed views: limbs with bones, umbilical cord loops, a trunk with a longitudinal spine, kidneys."""
    fl, ac = bio["fl_mm"], bio["ac_mm"]
    p: list[Primitive] = []
    for _ in range(int(rng.integers(2, 5))):
        u, v, turn = rng.uniform(-0.5, 0.5) * 2 * fl, rng.uniform(-0.5, 0.5) * 2 * fl, rng.uniform(0, math.pi)
        part = _Frame(*fr.at(u, v), fr.angle + turn)
        kind = int(rng.integers(4))
        if kind == 0:  # limb segment with one or two long bones
            p.append(part.capsule(-0.6 * fl, 0, 0.6 * fl, 0, 0.18 * fl, SOFT))
            for off in ((0.0,) if rng.random() < 0.5 else (-0.06 * fl, 0.06 * fl)):
                p.append(part.capsule(-0.45 * fl, off, 0.45 * fl, off, 0.035 * fl + 0.4, BONE))
        elif kind == 1:  # umbilical cord: Wharton's jelly with two arteries and one vein
            for k in range(3):
                cu = (k - 1) * 0.25 * fl
                p.append(part.ellipse(cu, 0, 0.14 * fl, 0.12 * fl, SOFT))
                p.append(part.ellipse(cu, 0.03 * fl, 0.05 * fl, 0.05 * fl, FLUID))
                p.append(part.ellipse(cu - 0.05 * fl, -0.05 * fl, 0.03 * fl, 0.03 * fl, FLUID))
        elif kind == 2:  # trunk cut lengthwise: a row of vertebral ossification centres
            r = ac / (2 * math.pi)
            p.append(part.ellipse(0, 0, 1.6 * r, 0.8 * r, LIVER))
            for k in range(-5, 6):
                p.append(part.ellipse(k * 0.22 * r, 0.55 * r, 0.07 * r, 0.05 * r, BONE))
        else:  # kidney: hypoechoic cortex, bright sinus
            r = 0.25 * ac / (2 * math.pi)
            p.append(part.ellipse(0, 0, 2.6 * r, 2.6 * r, SOFT))
            p.append(part.ellipse(0, 0, 1.6 * r, 0.9 * r, THALAMUS))
            p.append(part.ellipse(0, 0, 0.9 * r, 0.25 * r, CHOROID))
    return Scene(tuple(p), AMNIOTIC, {})


SCENES: tuple[Callable[[dict[str, float], _Frame, np.random.Generator, float], Scene], ...] = (
    _scene_brain, _scene_abdomen, _scene_femur, _scene_thorax, _scene_cervix, _scene_other,
)


def _rasterise(prims: Sequence[Primitive], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Paint primitives in order (later on top): index map (0 = background, k = prims[k-1]) and specular map."""
    ids = np.zeros(grid.shape, np.uint8)
    spec = np.zeros(grid.shape, np.float32)
    for k, prim in enumerate(prims, start=1):
        rs, cs = grid.box(*prim.bbox(), d_min=prim.d0 - 0.4 * abs(prim.wave) if isinstance(prim, Layer) else 0.0)
        if rs.stop <= rs.start or cs.stop <= cs.start:
            continue
        x, z = grid.x[rs, cs], grid.z[rs, cs]
        inside = prim.inside(x, z, grid.d[rs, cs])
        np.putmask(ids[rs, cs], inside, k)  # putmask: ~3x faster than boolean-index assignment
        t = prim.tissue
        if t.specular:  # strongest where the beam meets the surface head-on (Szabo sec. 3.4)
            cos = prim.cosine(x[inside], z[inside], grid.bx[rs, cs][inside], grid.bz[rs, cs][inside])
            spec[rs, cs][inside] = t.specular * (0.15 + 0.85 * cos * cos)
        else:
            np.putmask(spec[rs, cs], inside, 0.0)
    return ids, spec


def _smooth_field(rng: np.random.Generator, grid: Grid, min_wavelength_mm: float, waves: int = 16) -> np.ndarray:
    """Zero-mean, unit-variance random field on the beam grid: plane waves of random direction, wavelengths
    between ``min_wavelength_mm`` and the field depth (lateral distances taken at mid-depth).

    cos(a + b) = cos a cos b - sin a sin b makes each wave rank 2, so the sum is one small matrix product.
    """
    rows, cols = grid.row_mm, grid.col_mm
    k_max, k_min = 2 * np.pi / min_wavelength_mm, 2 * np.pi / float(rows[-1])
    k = k_min + (k_max - k_min) * rng.uniform(0.0, 1.0, waves) ** 2  # favour low frequencies
    direction = rng.uniform(0, np.pi, waves)
    kr, kc = (k * np.cos(direction)).astype(np.float32), (k * np.sin(direction)).astype(np.float32)
    a = rows[:, None] * kr[None, :] + rng.uniform(0, 2 * np.pi, waves).astype(np.float32)
    b = cols[None, :] * kc[:, None]
    r = np.concatenate([np.cos(a), -np.sin(a)], axis=1)
    c = np.concatenate([np.cos(b), np.sin(b)], axis=0)
    # einsum, not matmul: a threaded BLAS call costs more than it saves at this size (and fights the workers).
    return np.einsum("ik,kj->ij", r, c) * np.float32(np.sqrt(2.0 / waves))


def _check(plane: int, ga_weeks: float, size: int) -> None:
    """Raise ValueError naming the argument and its allowed range."""
    if isinstance(plane, bool) or not isinstance(plane, (int, np.integer)) or not 0 <= plane < len(PLANES):
        raise ValueError(f"plane={plane!r} is out of range; allowed: integers 0..{len(PLANES) - 1} "
                         f"(index into PLANES={PLANES})")
    numeric = isinstance(ga_weeks, (int, float, np.floating, np.integer)) and not isinstance(ga_weeks, bool)
    if not (numeric and GA_MIN_WEEKS <= ga_weeks <= GA_MAX_WEEKS):
        raise ValueError(f"ga_weeks={ga_weeks!r} is out of range; allowed: [{GA_MIN_WEEKS}, {GA_MAX_WEEKS}] weeks")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size={size!r} is out of range; allowed: integers {MIN_SIZE}..{MAX_SIZE} pixels")


def image_scene(primitives: Sequence[Primitive], background: Tissue, geom: Geometry, rng: np.random.Generator,
                *, wall_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Image primitives (painted in order over ``background``) with the scanner of ``geom``.

    Parameters
    ----------
    primitives, background:
        The scene; later primitives cover earlier ones.
    geom:
        Scanner geometry from :func:`common.phantoms.profiles.build_geometry`.
    rng:
        Randomness (warp, texture, speckle, TGC).
    wall_mm:
        Depth of the abdominal wall, whose echoes reverberate one wall-depth deeper (0: none).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Display image in [0, 1] (no overlays) and ``uint8`` label mask (:data:`MASK_LABELS`), both ``size x size``.
    """
    tissues = (background, *(pr.tissue for pr in primitives))
    # Each structure gets its own echogenicity within +-15 %, so no two phantoms share gray levels.
    jitter = rng.uniform(0.85, 1.15, len(tissues)).astype(np.float32)
    echo_lut = np.array([t.echo for t in tissues], np.float32) * jitter
    alpha_lut = np.array([t.alpha for t in tissues], np.float32)
    # A smooth random deformation (~0.7 mm rms) makes every boundary organically irregular.
    beams, shape = geom.beams, geom.beams.shape
    warp = 0.7 * geom.profile.depth_mm / 150.0
    dx, dz = (warp * _smooth_field(rng, beams, 25.0, 8) for _ in range(2))
    grid = beams.warped(dx, dz, 5 * warp)
    ids, spec = _rasterise(primitives, grid)
    # Tissue heterogeneity (a few mm and up) and sparse strong point scatterers on top of the speckle.
    echo = echo_lut[ids] * np.exp(np.float32(0.5) * _smooth_field(rng, beams, 3.0, 24))
    points = rng.integers(0, echo.size, echo.size // 80)
    echo.flat[points] *= rng.uniform(2.0, 4.0, points.size).astype(np.float32)
    # Reverberation between the probe face and the abdominal wall repeats the wall's echoes one wall-depth deeper.
    nw = min(int(wall_mm / beams.spacing_mm), shape[0] // 2)
    echo[nw:2 * nw] = np.maximum(echo[nw:2 * nw], np.float32(0.12) * echo[:nw])
    disp = simulate_bmode(echo, spec, alpha_lut[ids], geom, rng)
    # The label map is scan-converted like the image (nearest beam sample of every pixel centre).
    mask = np.array([t.label for t in tissues], np.uint8)[ids[geom.nearest_rows, geom.nearest_cols]]
    mask[geom.fov < 0.5] = 0
    return disp, mask


def _render(plane: int, ga_weeks: float, geom: Geometry, rng: np.random.Generator) -> PhantomImage:
    """Build the scene of ``plane`` at ``ga_weeks`` and image it with the scanner of ``geom``."""
    depth = geom.profile.depth_mm
    env, wall = _environment(rng, depth, ga_weeks)
    bio = true_biometry(ga_weeks)
    angle = {0: rng.uniform(-0.45, 0.45), 2: rng.uniform(-0.3, 0.3), 4: rng.uniform(-0.35, 0.35)}.get(
        plane, rng.uniform(-math.pi, math.pi))
    frame = _Frame(rng.uniform(-0.07, 0.07) * depth, max(wall + 0.2 * depth, rng.uniform(0.5, 0.6) * depth), angle)
    scene = SCENES[plane](bio, frame, rng, ga_weeks)
    disp, mask = image_scene((*env, *scene.primitives), scene.background, geom, rng, wall_mm=wall)
    disp = draw_overlays(disp, geom, rng, scene.calipers)
    sp = geom.pixel_spacing_mm
    return PhantomImage(
        image=(np.clip(disp, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask=mask, pixel_spacing_mm=sp,
        biometry=bio, measured={f"{k}_px": v / sp for k, v in scene.measured_mm.items()},
    )


def render_phantom(plane: int, ga_weeks: float, *, size: int, profile: ScannerProfile | str,
                   rng: np.random.Generator) -> PhantomImage:
    """Render one phantom of ``plane`` at ``ga_weeks`` as imaged by ``profile``.

    Parameters
    ----------
    plane:
        Index into :data:`common.core.records.PLANES` (0..5).
    ga_weeks:
        Gestational age in [14, 40] weeks; sizes the anatomy through Hadlock 1984.
    size:
        Output side in pixels (16..1024); ``pixel_spacing_mm = profile.depth_mm / size``.
    profile:
        The scanner (a :class:`ScannerProfile`, or a name of :data:`SCANNER_PROFILES`).
    rng:
        Source of all randomness (same generator state => identical image).

    Returns
    -------
    PhantomImage
        Image, label mask, pixel spacing, true biometry and drawn sizes.
    """
    _check(plane, ga_weeks, size)
    return _render(int(plane), float(ga_weeks), build_geometry(get_profile(profile), int(size)), rng)


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of image ``index``: the ``index``-th child of ``SeedSequence(seed)``, independent of ``n``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _make_chunk(start: int, stop: int, size: int, seed: int, profile: ScannerProfile, probs: np.ndarray,
                ga_range: tuple[float, float], site: str, id_prefix: str) -> list[UltrasoundRecord]:
    """Render images ``start..stop-1`` of a :func:`make_phantoms` call (runs in a worker process or inline)."""
    geom = build_geometry(profile, size)
    out = []
    for i in range(start, stop):
        rng = _image_rng(seed, i)
        plane = int(rng.choice(len(PLANES), p=probs))
        ga = float(rng.uniform(*ga_range))
        ph = _render(plane, ga, geom, rng)
        out.append(UltrasoundRecord(
            image=ph.image, plane=plane, ga_weeks=ga, pixel_spacing_mm=ph.pixel_spacing_mm, site=site,
            patient_id=f"{id_prefix}-{seed}-{i}", image_id=f"{id_prefix}-{seed}-{i}", source="phantom",
            extra={"biometry": ph.biometry, "profile": profile.name, "measured": ph.measured},
        ))
    return out


def make_phantoms(n: int, *, size: int, seed: int, profile: str | ScannerProfile = "voluson_e6",
                  plane_probs: Sequence[float] | None = None, ga_range: tuple[float, float] = (14.0, 40.0),
                  site: str | None = None, id_prefix: str = "phantom", workers: int = 1) -> list[UltrasoundRecord]:
    """Generate ``n`` seeded phantom records; image ``i`` depends only on (seed, i, size, profile, probs, range).

    Parameters
    ----------
    n:
        Number of images (>= 0).
    size:
        Image side in pixels (16..1024).
    seed:
        Non-negative integer; image ``i`` uses child ``i`` of ``SeedSequence(seed)``.
    profile:
        Scanner profile or its name in :data:`SCANNER_PROFILES`.
    plane_probs:
        Probabilities of the six planes (normalised); uniform when ``None``.
    ga_range:
        Gestational ages are drawn uniformly in this range, within [14, 40] weeks.
    site:
        Site of the records; the profile name when ``None``.
    id_prefix:
        Prefix of ``patient_id`` and ``image_id`` (``f"{id_prefix}-{seed}-{i}"``).
    workers:
        Processes to render with; the output is identical for any value.

    Returns
    -------
    list[UltrasoundRecord]
        ``source="phantom"``, ``extra={"biometry", "profile", "measured"}``.
    """
    prof = get_profile(profile)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r} is invalid; allowed: integers >= 0")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid; allowed: integers >= 0")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid; allowed: integers >= 1")
    lo, hi = (float(v) for v in ga_range)
    if not GA_MIN_WEEKS <= lo <= hi <= GA_MAX_WEEKS:
        raise ValueError(f"ga_range={ga_range!r} is invalid; allowed: lo <= hi within "
                         f"[{GA_MIN_WEEKS}, {GA_MAX_WEEKS}] weeks")
    _check(0, lo, size)
    probs = np.full(len(PLANES), 1.0 / len(PLANES)) if plane_probs is None else np.asarray(plane_probs, float)
    if probs.shape != (len(PLANES),) or not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.sum() <= 0:
        raise ValueError(f"plane_probs={plane_probs!r} is invalid; give {len(PLANES)} non-negative numbers "
                         f"with a positive sum, in PLANES order {PLANES}")
    probs = probs / probs.sum()
    args = (int(size), int(seed), prof, probs, (lo, hi), site or prof.name, id_prefix)
    if workers == 1 or n < 2 * workers:
        return _make_chunk(0, int(n), *args)
    step = max(1, math.ceil(n / (workers * 4)))
    ctx = get_context("forkserver" if os.name == "posix" else "spawn")
    with ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx) as pool:
        futures = [pool.submit(_make_chunk, s, min(s + step, int(n)), *args) for s in range(0, int(n), step)]
        return [rec for fut in futures for rec in fut.result()]


def write_phantom_grids(out_dir: Path, *, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``phantoms_by_plane_ga.png`` (planes x GA 16..40) and ``phantoms_by_scanner.png`` (profiles x planes).

    Parameters
    ----------
    out_dir:
        Folder to write into (created if missing).
    size:
        Side of each phantom in pixels (cells are magnified to at least 128 pixels).
    seed:
        Seed of the grids (cell (r, c) uses child (r, c) of ``SeedSequence(seed)``).

    Returns
    -------
    list[Path]
        The two PNG paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gas = (16.0, 20.0, 24.0, 28.0, 32.0, 36.0, 40.0)
    prof = SCANNER_PROFILES["voluson_e6"]
    rows = [[render_phantom(pl, ga, size=size, profile=prof,
                            rng=np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(r, c)))).image
             for c, ga in enumerate(gas)] for r, pl in enumerate(range(len(PLANES)))]
    scale = max(1, 128 // size)
    p1 = save_grid(rows, out_dir / "phantoms_by_plane_ga.png", row_labels=PLANES, scale=scale,
                   col_labels=[f"GA {g:.0f} w" for g in gas], title=f"Phantoms by plane and GA ({prof.name}, {size}x{size} px, seed {seed})")
    names = list(SCANNER_PROFILES)
    rows = [[render_phantom(pl, 28.0, size=size, profile=SCANNER_PROFILES[name],
                            rng=np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(100 + r, pl)))).image
             for pl in range(len(PLANES))] for r, name in enumerate(names)]
    p2 = save_grid(rows, out_dir / "phantoms_by_scanner.png", row_labels=names, col_labels=PLANES, scale=scale,
                   title=f"Phantoms by scanner profile (GA 28 w, {size}x{size} px, seed {seed})")
    return [p1, p2]
