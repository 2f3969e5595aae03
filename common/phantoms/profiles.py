"""The simulated scanner: per-site profiles, beam geometry and the B-mode imaging chain of the phantoms.

The anatomy (what is scanned) lives in :mod:`common.phantoms.simulator`; this module is the machine that images it.
The chain follows the textbook B-mode pipeline (Szabo, *Diagnostic Ultrasound Imaging*, 2nd ed., ch. 8-10;
Jensen, *Linear description of ultrasound imaging systems*, 1991; speckle statistics after Burckhardt 1978):

1. echoes are sampled along beam lines, i.e. on a polar (depth, angle) grid for a convex array or a
   (depth, x) grid for a linear array, so that attenuation and acoustic shadowing accumulate along the beam;
2. round-trip attenuation ``A(d) = sum alpha(d') f dd'`` [dB] (alpha in dB/(mm MHz), f the centre frequency);
3. diffuse scatterers are a circular complex Gaussian field scaled by the tissue echogenicity, plus coherent
   specular reflection from bone, plus receiver noise; the field is convolved with a Gaussian point-spread
   function whose axial width is half the pulse length and whose lateral width is ``lambda * F#``,
   widening away from the transmit focus like a Gaussian beam;
4. envelope detection ``|.|``, time-gain compensation, log compression to a dynamic range, speckle reduction
   and anti-aliasing in the display domain, scan conversion to the Cartesian image with
   :func:`scipy.ndimage.map_coordinates`, a gray map (gamma) and burned-in overlays (text, ruler, gray bar).

Pixel spacing: the image rows span the field depth, so ``pixel_spacing_mm = depth_mm / size`` (square
pixels, ``size x size`` image).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

SPEED_OF_SOUND_MM_PER_US = 1.54  # soft tissue, so wavelength [mm] = 1.54 / f [MHz]
NATIVE_FACTOR = 2  # beam samples per output pixel along each axis (display-domain averaging, see step 4)
TGC_ALPHA = 0.04  # dB/(mm MHz) the TGC expects along a typical obstetric path (tissue + fluid)
WHITE_DB = 27.0  # a tissue echo of amplitude 1 sits this many dB below white before the gain is applied

# 3x5 bitmap glyphs (rows top to bottom) for the burned-in text: digits and a few letters.
_GLYPH_STRINGS: tuple[str, ...] = (
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
    "111100111001111", "111100111101111", "111001001010010", "111101111101111", "111101111001111",
    "000000111000000", "101101111101101", "111100100100111", "000111101111100", "110101110101110",
    "010101111101101", "001001010100100", "000000000000010", "101111111101101", "011100010001110",
)
_GLYPH_BITS = np.array([[c == "1" for c in g] for g in _GLYPH_STRINGS], np.float32).reshape(-1, 5, 3)


@dataclass(frozen=True)
class OverlayStyle:
    """Where a scanner burns text, the depth ruler, the gray bar and the orientation mark into its images."""

    text_blocks: tuple[tuple[float, float, int, int], ...] = ()  # (x, y) as fractions of size, lines, chars
    ruler: Literal["left", "right", "none"] = "right"
    gray_bar: tuple[float, float, float] | None = None  # (x, y, height) as fractions of size
    mark: tuple[float, float] | None = (0.22, 0.04)  # probe orientation mark (x, y) fractions
    text_gray: int = 235


@dataclass(frozen=True)
class ScannerProfile:
    """One scanner / site: probe geometry, acoustic settings and display processing.

    Parameters
    ----------
    name:
        Key of :data:`SCANNER_PROFILES` and the default ``site`` of its phantoms.
    probe:
        ``"convex"`` (sector from a virtual apex ``probe_radius_mm`` above the skin) or ``"linear"``.
    frequency_mhz:
        Centre frequency: sets wavelength, hence speckle size, and the attenuation.
    depth_mm:
        Field depth; the image rows span it, so ``pixel_spacing_mm = depth_mm / size``.
    fan_angle_deg, probe_radius_mm:
        Convex arrays only: full sector angle and radius of curvature.
    linear_width_mm:
        Linear arrays only: width of the rectangular field.
    f_number, pulse_cycles, focus_fraction:
        Lateral resolution ``lambda * F#`` at the focus (depth ``focus_fraction * depth_mm``), axial resolution
        ``pulse_cycles * lambda / 2``.
    gain_db, dynamic_range_db, gamma:
        Display: overall gain, log-compression range, gray-map exponent.
    tgc_compensation:
        Fraction of the expected attenuation (``TGC_ALPHA`` dB/(mm MHz)) that the preset TGC curve undoes.
    auto_tgc:
        Weight (0..1) of automatic gain optimisation, which levels the mean tissue echo of every depth.
    noise_db:
        Receiver noise relative to a unit tissue echo at the skin (amplified by TGC at depth).
    smoothing:
        Speckle-reduction filter width (native beam samples) applied to the log image.
    caliper_prob:
        Probability that measurement calipers ("+" marks) are burned in.
    overlay:
        Layout of the burned-in marks.
    """

    name: str
    probe: Literal["convex", "linear"] = "convex"
    frequency_mhz: float = 5.0
    depth_mm: float = 150.0
    fan_angle_deg: float = 70.0
    probe_radius_mm: float = 50.0
    linear_width_mm: float = 90.0
    f_number: float = 2.5
    pulse_cycles: float = 3.0
    focus_fraction: float = 0.55
    gain_db: float = 0.0
    dynamic_range_db: float = 55.0
    gamma: float = 1.0
    tgc_compensation: float = 0.9
    auto_tgc: float = 0.6
    noise_db: float = -60.0
    smoothing: float = 0.0
    caliper_prob: float = 0.0
    overlay: OverlayStyle = OverlayStyle()

    def __post_init__(self) -> None:
        """Reject settings the imaging chain cannot honour, naming the field and its range."""
        checks = (("probe", self.probe in ("convex", "linear"), "'convex' or 'linear'"),
                  ("frequency_mhz", 0.5 <= self.frequency_mhz <= 20.0, "[0.5, 20]"),
                  ("depth_mm", 10.0 <= self.depth_mm <= 400.0, "[10, 400]"),
                  ("fan_angle_deg", 5.0 <= self.fan_angle_deg <= 150.0, "[5, 150]"),
                  ("probe_radius_mm", self.probe_radius_mm > 0, "> 0"),
                  ("linear_width_mm", self.linear_width_mm > 0, "> 0"),
                  ("f_number", self.f_number > 0 and self.pulse_cycles > 0, "> 0 (and pulse_cycles > 0)"),
                  ("focus_fraction", 0.0 < self.focus_fraction <= 1.0, "(0, 1]"),
                  ("dynamic_range_db", self.dynamic_range_db > 0 and self.gamma > 0, "> 0 (and gamma > 0)"),
                  ("auto_tgc", 0.0 <= self.auto_tgc <= 1.0 and 0.0 <= self.caliper_prob <= 1.0,
                   "[0, 1] (and caliper_prob in [0, 1])"),
                  ("smoothing", self.smoothing >= 0, ">= 0"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"ScannerProfile {self.name!r}: {name}={getattr(self, name)!r} is invalid; "
                                 f"allowed: {allowed}")


SCANNER_PROFILES: dict[str, ScannerProfile] = {
    p.name: p
    for p in (
        ScannerProfile(
            "voluson_e6", frequency_mhz=5.0, depth_mm=150.0, fan_angle_deg=70.0, probe_radius_mm=50.0,
            dynamic_range_db=60.0, gain_db=0.0, smoothing=0.6, noise_db=-62.0, auto_tgc=0.7, caliper_prob=0.25,
            overlay=OverlayStyle(text_blocks=((0.80, 0.04, 5, 5),), ruler="right",
                                 gray_bar=(0.03, 0.05, 0.22), mark=(0.24, 0.05)),
        ),
        ScannerProfile(
            "aloka", frequency_mhz=3.5, depth_mm=130.0, fan_angle_deg=60.0, probe_radius_mm=60.0,
            f_number=3.0, dynamic_range_db=50.0, gain_db=-3.0, gamma=1.25, tgc_compensation=0.8,
            noise_db=-55.0, auto_tgc=0.4, caliper_prob=0.4,
            overlay=OverlayStyle(text_blocks=((0.03, 0.04, 4, 6), (0.03, 0.85, 2, 7)), ruler="left",
                                 gray_bar=None, mark=(0.70, 0.05), text_gray=210),
        ),
        ScannerProfile(
            "voluson_s10", frequency_mhz=6.0, depth_mm=140.0, fan_angle_deg=78.0, probe_radius_mm=45.0,
            f_number=2.0, dynamic_range_db=66.0, gain_db=2.0, gamma=0.85, tgc_compensation=0.95,
            noise_db=-68.0, smoothing=1.1, auto_tgc=0.8, caliper_prob=0.15,
            overlay=OverlayStyle(text_blocks=((0.03, 0.20, 5, 4), (0.78, 0.04, 3, 5)), ruler="right",
                                 gray_bar=(0.04, 0.04, 0.12), mark=(0.26, 0.05)),
        ),
        ScannerProfile(
            "portable", probe="linear", frequency_mhz=3.0, depth_mm=120.0, linear_width_mm=84.0,
            f_number=3.5, pulse_cycles=4.0, dynamic_range_db=45.0, gain_db=3.0, gamma=1.1,
            tgc_compensation=0.7, noise_db=-46.0, auto_tgc=0.2, caliper_prob=0.0,
            overlay=OverlayStyle(text_blocks=((0.02, 0.90, 1, 5),), ruler="left", gray_bar=None,
                                 mark=None, text_gray=200),
        ),
        ScannerProfile(
            "mindray", frequency_mhz=4.0, depth_mm=160.0, fan_angle_deg=66.0, probe_radius_mm=55.0,
            f_number=2.8, dynamic_range_db=56.0, gain_db=-1.0, gamma=1.1, tgc_compensation=0.85,
            noise_db=-58.0, smoothing=0.3, auto_tgc=0.6, caliper_prob=0.3,
            overlay=OverlayStyle(text_blocks=((0.02, 0.04, 3, 5), (0.80, 0.04, 3, 4), (0.80, 0.80, 3, 4)),
                                 ruler="right", gray_bar=(0.93, 0.30, 0.30), mark=(0.74, 0.05)),
        ),
    )
}


def get_profile(profile: str | ScannerProfile) -> ScannerProfile:
    """Resolve a profile name (or pass a :class:`ScannerProfile` through), with a clear error if unknown."""
    if isinstance(profile, ScannerProfile):
        return profile
    if profile not in SCANNER_PROFILES:
        raise ValueError(f"profile={profile!r} is unknown; choose one of {sorted(SCANNER_PROFILES)} "
                         "or pass a ScannerProfile")
    return SCANNER_PROFILES[profile]


class Grid:
    """Beam samples (rows = depth along the beam, cols = beam lines) with their position (mm) and beam direction."""

    def __init__(self, x: np.ndarray, z: np.ndarray, d: np.ndarray, bx: np.ndarray, bz: np.ndarray,
                 spacing_mm: float, profile: ScannerProfile) -> None:
        """Store coordinates; ``d`` is depth along the beam from the probe face, ``spacing_mm`` between rows."""
        self.x, self.z, self.d, self.bx, self.bz = x, z, d, bx, bz
        self.spacing_mm = spacing_mm
        self.shape = x.shape
        self.margin_mm = 0.0
        self._p = profile
        width = profile.linear_width_mm
        if profile.probe == "convex":  # arc length of the fan at mid-depth
            width = (profile.probe_radius_mm + profile.depth_mm / 2) * math.radians(profile.fan_angle_deg)
        # Row and column positions in mm (lateral at mid-depth), for fields defined in physical units.
        self.row_mm = np.linspace(0, profile.depth_mm, self.shape[0], dtype=np.float32)
        self.col_mm = np.linspace(0, width, self.shape[1], dtype=np.float32)

    def warped(self, dx: np.ndarray, dz: np.ndarray, margin_mm: float) -> Grid:
        """Copy whose sample positions are displaced by (dx, dz), with |displacement| <= ``margin_mm``."""
        out = copy.copy(self)
        out.x, out.z, out.d, out.margin_mm = self.x + dx, self.z + dz, self.d + dz, margin_mm
        return out

    def box(self, x0: float, x1: float, z0: float, z1: float, d_min: float = 0.0) -> tuple[slice, slice]:
        """Index rectangle covering the Cartesian box ``[x0, x1] x [z0, z1]`` (mm) and depths >= ``d_min``."""
        p, (nr, nc), m = self._p, self.shape, self.margin_mm
        x0, x1, z0, z1, d_min = x0 - m, x1 + m, z0 - m, z1 + m, d_min - m
        if p.probe == "linear":  # rows = depth, cols = x over the field width
            dx = p.linear_width_mm / nc
            c0, c1 = (x0 + p.linear_width_mm / 2) / dx, (x1 + p.linear_width_mm / 2) / dx
            r0, r1 = z0 / self.spacing_mm, z1 / self.spacing_mm
        else:  # rows = depth d = rho - R, cols = angle; box corners clipped to the fan
            r_ap, half = p.probe_radius_mm, math.radians(p.fan_angle_deg) / 2
            tan_h = math.tan(half)
            ths, rhos = [], []
            for zz in (max(z0, 0.0) + r_ap, max(z1, 0.0) + r_ap):
                for xx in (x0, x1):
                    xx = min(max(xx, -zz * tan_h), zz * tan_h)
                    ths.append(math.atan2(xx, zz))
                    rhos.append(math.hypot(xx, zz))
            rho_min = math.hypot(min(max(0.0, x0), x1), max(z0, 0.0) + r_ap)
            dth = 2 * half / nc
            c0, c1 = (min(ths) + half) / dth, (max(ths) + half) / dth
            r0, r1 = (rho_min - r_ap) / self.spacing_mm, (max(rhos) - r_ap) / self.spacing_mm
        r0 = max(r0, d_min / self.spacing_mm)
        rs = slice(min(max(math.floor(r0) - 1, 0), nr), min(max(math.ceil(r1) + 2, 0), nr))
        cs = slice(min(max(math.floor(c0) - 1, 0), nc), min(max(math.ceil(c1) + 2, 0), nc))
        return rs, cs


@dataclass(frozen=True)
class Geometry:
    """Beam grid, image grid and scan-conversion tables of one (profile, size), reused across images."""

    profile: ScannerProfile
    size: int
    beams: Grid  # native beam-sample grid (rows = depth)
    nearest_rows: np.ndarray  # nearest beam sample of every output pixel (scan conversion of labels)
    nearest_cols: np.ndarray
    display_coords: np.ndarray  # (2, size, size) coordinates of every pixel in the block-averaged beam grid
    fov: np.ndarray  # soft field-of-view weight of every output pixel (anti-aliased fan edge)
    lat_sigmas: np.ndarray  # lateral PSF levels (beam samples) and per-row blend weights
    lat_weights: np.ndarray
    ax_sigma: float  # axial PSF width (samples)
    psf_gain: np.ndarray  # per-row 1/sqrt(PSF energy), keeps mean speckle power = echogenicity^2

    @property
    def pixel_spacing_mm(self) -> float:
        """Physical size of one output pixel: field depth over image rows."""
        return self.profile.depth_mm / self.size


def _kernel_energy(sigma: float) -> float:
    """Sum of squares of the normalised discrete Gaussian kernel scipy uses for ``sigma``."""
    if sigma < 1e-3:
        return 1.0
    n = np.arange(-int(4.0 * sigma + 0.5), int(4.0 * sigma + 0.5) + 1)
    k = np.exp(-0.5 * (n / sigma) ** 2)
    return float(((k / k.sum()) ** 2).sum())


def build_geometry(profile: ScannerProfile, size: int) -> Geometry:
    """Precompute grids, scan conversion and PSF tables for images of ``size x size`` pixels."""
    p = profile
    sp = p.depth_mm / size
    nd = nu = NATIVE_FACTOR * size
    dd = p.depth_mm / nd
    d = (np.arange(nd, dtype=np.float32) + 0.5) * dd
    # Output pixel centres (mm): x lateral from the image centre, z depth below the skin line.
    zc = ((np.arange(size, dtype=np.float32) + 0.5) * sp)[:, None] * np.ones((1, size), np.float32)
    xc = ((np.arange(size, dtype=np.float32) + 0.5 - size / 2) * sp)[None, :] * np.ones((size, 1), np.float32)
    if p.probe == "convex":
        r_ap, half = p.probe_radius_mm, np.deg2rad(p.fan_angle_deg) / 2
        dth = 2 * half / nu
        th = (-half + (np.arange(nu, dtype=np.float32) + 0.5) * dth)[None, :]
        rho = (r_ap + d)[:, None]
        bx, bz = np.sin(th) * np.ones_like(rho), np.cos(th) * np.ones_like(rho)
        beams = Grid(rho * bx, rho * bz - r_ap, rho - r_ap + 0 * bx, bx, bz, dd, p)
        prho, pth = np.hypot(xc, zc + r_ap), np.arctan2(xc, zc + r_ap)
        scan_rows, scan_cols = (prho - r_ap) / dd - 0.5, (pth + half) / dth - 0.5
        edge = np.minimum((half - np.abs(pth)) * prho, p.depth_mm - (prho - r_ap))
        lat_spacing = (r_ap + d) * dth  # mm between beam lines at each depth
    else:
        w = p.linear_width_mm
        xs = (-w / 2 + (np.arange(nu, dtype=np.float32) + 0.5) * w / nu)[None, :]
        ones = np.ones((nd, nu), np.float32)
        beams = Grid(xs * ones, d[:, None] * ones, d[:, None] * ones, 0 * ones, ones, dd, p)
        scan_rows, scan_cols = zc / dd - 0.5, (xc + w / 2) / (w / nu) - 0.5
        edge = np.minimum(w / 2 - np.abs(xc), p.depth_mm - zc)
        lat_spacing = np.full(nd, w / nu, np.float32)
    fov = np.clip(edge / sp + 0.5, 0.0, 1.0).astype(np.float32)
    # PSF (Szabo ch. 7-8): axial FWHM = pulse length / 2; lateral FWHM = lambda F# at the focus, growing
    # like a Gaussian beam w(d) = w0 sqrt(1 + ((d - focus) / zR)^2); zR = 3.5 lambda F#^2 is the Rayleigh
    # range of one transmit focus, stretched 4x for the dynamic receive focusing every modern scanner uses.
    lam = SPEED_OF_SOUND_MM_PER_US / p.frequency_mhz
    fwhm_to_sigma = 1.0 / 2.355
    ax_sigma = max(0.25, p.pulse_cycles * lam / 2 * fwhm_to_sigma / dd)
    z_r = 3.5 * lam * p.f_number**2 * 4.0
    w_lat = lam * p.f_number * np.sqrt(1 + ((d - p.focus_fraction * p.depth_mm) / z_r) ** 2)
    lat = np.maximum(0.25, w_lat * fwhm_to_sigma / lat_spacing)
    levels = np.unique(np.round(np.geomspace(lat.min(), lat.max(), 3), 3))
    weights = np.zeros((len(levels), nd), np.float32)
    if len(levels) == 1:
        weights[0] = 1.0
    else:
        pos = np.interp(np.log(lat), np.log(levels), np.arange(len(levels)))
        lo = np.minimum(np.floor(pos).astype(int), len(levels) - 2)
        frac = pos - lo
        weights[lo, np.arange(nd)] = 1 - frac
        weights[lo + 1, np.arange(nd)] = frac
    lat_energy = (weights * np.array([_kernel_energy(s) for s in levels])[:, None]).sum(0)
    gain = (1.0 / np.sqrt(_kernel_energy(ax_sigma) * lat_energy)).astype(np.float32)
    near_r = np.clip(np.rint(scan_rows), 0, nd - 1).astype(np.intp)
    near_c = np.clip(np.rint(scan_cols), 0, nu - 1).astype(np.intp)
    k = NATIVE_FACTOR
    display = np.stack([(scan_rows + 0.5) / k - 0.5, (scan_cols + 0.5) / k - 0.5]).astype(np.float32)
    return Geometry(p, size, beams, near_r, near_c, display, fov, levels, weights, float(ax_sigma), gain)


def simulate_bmode(echo: np.ndarray, specular: np.ndarray, alpha: np.ndarray, geom: Geometry,
                   rng: np.random.Generator) -> np.ndarray:
    """Image tissue maps sampled on the beam grid; returns the scan-converted display image in [0, 1].

    ``echo`` is the diffuse backscatter amplitude (1 = soft tissue), ``specular`` the coherent reflection
    amplitude, ``alpha`` the round-trip attenuation in dB/(mm MHz); all on ``geom.beams``.
    """
    p, nd = geom.profile, geom.beams.shape[0]
    dd, f = geom.beams.spacing_mm, p.frequency_mhz
    db_to_ln = np.float32(np.log(10.0) / 20.0)
    # Step 2: attenuation accumulated along each beam line (shadows behind bone, enhancement behind fluid);
    # the beam has a finite width, so a shadow's edge is as soft as the lateral PSF.
    att_db = (np.cumsum(alpha, axis=0) - 0.5 * alpha) * np.float32(f * dd)
    att_db[:, 1:-1] = 0.5 * att_db[:, 1:-1] + 0.25 * (att_db[:, :-2] + att_db[:, 2:])  # [1 2 1] / 4 across beams
    att = np.exp(-db_to_ln * att_db)
    # Step 3: circular complex Gaussian scatterers + receiver noise (added before TGC), coherent specular.
    d = (np.arange(nd, dtype=np.float32) + 0.5) * dd
    tgc_db = p.tgc_compensation * TGC_ALPHA * f * d + p.gain_db + _smooth_curve(rng, nd, amplitude_db=2.0)
    ea = echo * att
    if p.auto_tgc > 0:  # automatic optimisation: level the mean tissue echo (echo > 0.2) of every depth
        tissue = echo > 0.2
        count = ndimage.gaussian_filter1d(tissue.sum(axis=1).astype(np.float32), 6.0)
        level = np.where(tissue, np.log(ea + 1e-6), 0.0).sum(axis=1, dtype=np.float32)
        level = ndimage.gaussian_filter1d(level, 6.0) / (count + 1e-3)
        weight = p.auto_tgc * np.clip(count / (0.1 * ea.shape[1]), 0.0, 1.0)
        auto_db = np.clip(p.gain_db - level / db_to_ln - tgc_db, -12.0, 12.0)  # within the sliders' range
        tgc_db = tgc_db + weight * auto_db
    tgc_db = tgc_db.astype(np.float32)
    noise = np.float32(10.0 ** (p.noise_db / 20.0))
    diffuse = np.sqrt(ea * ea + noise * noise) * (geom.psf_gain[:, None] * np.float32(np.sqrt(0.5)))
    field = rng.standard_normal((2, *echo.shape), dtype=np.float32)
    field *= diffuse
    field[0] += specular * att * np.float32(rng.choice([-1.0, 1.0]))
    if geom.ax_sigma >= 0.3:  # narrower kernels are the identity on this grid
        field = ndimage.gaussian_filter1d(field, geom.ax_sigma, axis=1, mode="nearest")
    blurred = np.zeros_like(field)
    for sigma, w in zip(geom.lat_sigmas, geom.lat_weights):
        part = ndimage.gaussian_filter1d(field, float(sigma), axis=2, mode="nearest") if sigma >= 0.3 else field
        blurred += part * w[None, :, None]
    # Step 4: envelope, TGC, log compression, speckle reduction + anti-aliasing, scan conversion, gray map.
    intensity = blurred[0] * blurred[0] + blurred[1] * blurred[1]  # |envelope|^2: no square root needed
    disp = (10.0 * np.log10(intensity + 1e-12) + (tgc_db[:, None] - WHITE_DB)) * (1.0 / p.dynamic_range_db) + 1.0
    # Anti-aliasing: average NATIVE_FACTOR x NATIVE_FACTOR blocks (display domain, like downsampling a screen
    # capture), then the scanner's speckle reduction, then bilinear scan conversion.
    k = NATIVE_FACTOR
    disp = disp.reshape(disp.shape[0] // k, k, disp.shape[1] // k, k).mean(axis=(1, 3))
    if p.smoothing > 0:
        disp = ndimage.gaussian_filter(disp, p.smoothing / k, mode="nearest")
    img = ndimage.map_coordinates(disp, geom.display_coords, order=1, mode="nearest")
    img = np.clip(img, 0.0, 1.0)
    return (img if p.gamma == 1.0 else img**p.gamma) * geom.fov


def _smooth_curve(rng: np.random.Generator, n: int, *, amplitude_db: float) -> np.ndarray:
    """A smooth random curve over ``n`` samples (sum of three low-frequency cosines)."""
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    k = rng.uniform(0.5, 3.0, 3)
    ph = rng.uniform(0, 2 * np.pi, 3)
    amp = rng.normal(0, amplitude_db / 2, 3)
    return (amp[:, None] * np.cos(2 * np.pi * k[:, None] * t[None, :] + ph[:, None])).sum(0)


def draw_overlays(img: np.ndarray, geom: Geometry, rng: np.random.Generator,
                  calipers: tuple[tuple[float, float], ...] = ()) -> np.ndarray:
    """Burn the profile's text, depth ruler, gray bar, orientation mark and calipers into ``img`` ([0, 1]).

    Marks are drawn on a 2x canvas and box-averaged down, so at small sizes they blur like real downsampled
    overlays. ``calipers`` are (x, z) points in mm (drawn with probability ``profile.caliper_prob``).
    """
    p, size, style = geom.profile, geom.size, geom.profile.overlay
    n2 = 2 * size
    canvas = np.zeros((n2 + 8, n2 + 8), np.float32)  # margin so marks near the border need no bounds checks
    ink = style.text_gray / 255.0

    def put(r: int, c: int, h: int = 1, w: int = 1, value: float = ink) -> None:
        r, c = min(max(r, 0), n2), min(max(c, 0), n2)
        canvas[r:r + h, c:c + w] = value

    for (fx, fy, lines, chars) in style.text_blocks:  # pseudo-text: random glyphs, a line every 7 rows
        x0, y0 = int(fx * n2), int(fy * n2)
        for line in range(lines):
            n_chars = int(rng.integers(max(2, chars - 2), chars + 1))
            idx = rng.integers(len(_GLYPH_BITS), size=n_chars)
            row = np.zeros((5, n_chars, 4), np.float32)  # glyph + one blank column each
            row[:, :, :3] = _GLYPH_BITS[idx].transpose(1, 0, 2)
            row = row.reshape(5, 4 * n_chars)
            r, c = min(y0 + 7 * line, n2), min(x0, n2)
            canvas[r:r + 5, c:c + row.shape[1]] = np.maximum(canvas[r:r + 5, c:c + row.shape[1]],
                                                             row[:, : canvas.shape[1] - c] * ink)
    sp2 = p.depth_mm / n2
    if style.ruler != "none":  # depth ruler: a tick every 10 mm, longer every 50 mm, and the focus marker
        right = style.ruler == "right"
        col = n2 - 3 if right else 1
        for mm in range(10, int(p.depth_mm), 10):
            major = mm % 50 == 0
            put(int(mm / sp2), col - (1 if major and right else 0), 1, 2 if major else 1)
        f = int(p.focus_fraction * p.depth_mm / sp2)
        tip = col - 4 if right else col + 3
        put(f - 1, tip + (1 if right else 0), 3, 1)
        put(f, tip, 1, 2)
    if style.mark is not None:  # probe orientation mark
        r, c = int(style.mark[1] * n2), int(style.mark[0] * n2)
        put(r, c, 2, 3)
        put(r + 2, c + 1)
    if calipers and rng.random() < p.caliper_prob:
        for (x, z) in calipers:
            r, c = int(z / sp2), int(x / sp2 + n2 / 2)
            put(r - 2, c, 5, 1, 1.0)
            put(r, c - 2, 1, 5, 1.0)
    small = canvas[:n2, :n2].reshape(size, 2, size, 2).mean(axis=(1, 3))
    out = np.maximum(img, small)
    if style.gray_bar is not None:  # the gray-map bar: a vertical ramp white to black
        fx, fy, fh = style.gray_bar
        r0, c0, h = int(fy * size), int(fx * size), max(4, int(fh * size))
        h = min(h, size - r0)
        out[r0:r0 + h, c0:c0 + max(1, size // 48)] = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
    return out
