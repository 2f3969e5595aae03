"""An alternative to DP-SGD for the GA head, measured and NOT adopted: the head fitted from noisy sufficient statistics.

``python -m simulations.experiments.ga_heads --statistics`` adds the arm ``dp_stats_eps{e}`` built from the two
parts below (README "GA from noisy statistics" has the figures: on the HC18 training images, patient-grouped CV, it
was within the spread of DP-SGD's error and its 90 % intervals covered less than 85 %, so the product keeps DP-SGD).
The mechanism is a real one (calibrated, accounted in a :class:`PrivacyLedger`, tested in
``tests/test_ga_statistics.py``); the product does not call it.

1. The mechanism: sufficient-statistics perturbation (Vu & Slavkovic 2009; Wang 2018, "Revisiting differentially
private linear regression", whose AdaSSP is this mechanism with a data-dependent ridge). A linear model needs only
``A = X^T X``, ``b = X^T y``, ``c = y^T y`` and ``m = n``. A site releases them once, with Gaussian noise; the server
sums the sites' releases and solves the ridge problem. DP-SGD pays noise at each of hundreds of steps on every
weight; this pays it once on a few dozen numbers, at the price of a low-dimensional model.

Sensitivity. Rows are clipped to L2 norm 1 and targets to [-1, 1] before anything is summed (the caller scales
them; clipping makes the bound hold whatever it passes). The released vector is ``(upper triangle of A, b, w c,
w m)`` with ``w`` = :data:`TAIL_WEIGHT`: the sum of squares and the count only set the interval's width, so they get
a small weight and the model's statistics most of the sensitivity. Adding or removing one example changes it by
``(x_i x_j for i <= j, x y, w y^2, w)``, whose L2 norm is at most ``sqrt(||x||^4 + ||x||^2 y^2 + w^2 y^4 + w^2)
<= sqrt(2 + 2 w^2)`` = :data:`SENSITIVITY`. Adding ``N(0, (SENSITIVITY sigma)^2)`` to every entry is the Gaussian
mechanism with noise multiplier ``sigma``: Opacus' sampled Gaussian at ``q = 1``, one step, so the release is one
``(sigma, q=1)`` step of the model's accountant in the site's ledger (as a vote is, :mod:`common.privacy.votes`).
The budget is checked before the data is read: a release that would pass the model's share raises
:class:`StatisticsBudgetExhausted`. The noise is seeded (four draws summed and halved, as Opacus' secure mode).

2. The GA head's design. The regressor (a linear ``log_hc`` head on a frozen public encoder, its spacing FiLM at
zero) starts at its public warm start, the head fitted on public brain phantoms. The private scans add a correction
of that head in a few public directions: the residual ``y`` (the head output that would predict the true head size,
minus the public head's output, divided by ``target_scale``) is regressed on a row ``x`` defined by public data and
constants only (:func:`public_brain_features`, :func:`design_from_features`):

- the encoder's features projected on the top ``dims`` principal directions of public brain phantoms' features,
  each scaled by its public standard deviation and the block by ``1/sqrt(dims)``;
- log pixel spacing, centred at the spacing of the default field of view and divided by ``spacing_scale``;
- a constant 1 (the intercept);

the row divided by ``row_scale``. Rows are clipped to norm 1 for the release only: the fitted map is applied
unclipped, folded into the linear head (:func:`fold_into_head`), so the model stays the product's linear head; its
log-variance output becomes the residual variance the noisy statistics give. The settings are chosen by inner CV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.core.errors import BudgetExceededError, ConfigError
from common.models.downstream import DEFAULT_FOV_MM, GARegressor, log_hc_from_ga, log_size_output, logvar_output
from common.privacy.ledger import PrivacyLedger
from common.privacy.votes import gaussian_noise, plan_gaussian_release

STATISTICS_SAMPLE_RATE = 1.0  # every private example enters the one release: the Gaussian mechanism, q = 1
TAIL_WEIGHT = 0.25  # the weight of y^T y and n in the released vector (they only set the interval's width)
SENSITIVITY = math.sqrt(2.0 + 2.0 * TAIL_WEIGHT ** 2)  # L2 change from one example with ||x|| <= 1, |y| <= 1


class StatisticsBudgetExhausted(BudgetExceededError):
    """The release would take the model's spend past its share of the site budget."""


def vector_length(dim: int) -> int:
    """Entries of a released vector for rows of ``dim`` features: ``dim (dim + 1) / 2 + dim + 2``."""
    return dim * (dim + 1) // 2 + dim + 2


def clip_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to L2 norm <= 1 and targets clipped to [-1, 1] (what makes the sensitivity hold)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"rows must be [n, d] and targets [n], got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("rows and targets must be finite (drop examples without a label or spacing first)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1.0), np.clip(y, -1.0, 1.0)


def clean_statistics(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The exact vector ``(upper triangle of X^T X row by row, X^T y, w y^T y, w n)`` of clipped rows (no noise;
    ``w`` = :data:`TAIL_WEIGHT`)."""
    x, y = clip_rows(x, y)
    iu = np.triu_indices(x.shape[1])
    return np.concatenate([(x.T @ x)[iu], x.T @ y, [TAIL_WEIGHT * (y @ y), TAIL_WEIGHT * float(len(y))]])


@dataclass(frozen=True)
class NoisyStatistics:
    """One site's release and what it cost."""

    vector: np.ndarray  # float64 [vector_length(dim)]: the only thing that leaves the site
    dim: int
    noise_std: float  # sigma * SENSITIVITY
    noise_multiplier: float
    epsilon: float  # the model's cumulative epsilon after this release (inf without a ledger)
    delta: float


def release_statistics(ledger: PrivacyLedger | None, model_key: str, x: np.ndarray, y: np.ndarray, *,
                       noise_seed: int | None, noise_multiplier: float | None = None,
                       planned_releases: int = 1) -> NoisyStatistics:
    """Check ``model_key``'s budget, compute the clipped statistics, add the calibrated noise, charge the ledger.

    ``ledger`` None (no DP at this site) needs an explicit ``noise_multiplier`` (0 allowed) and reports epsilon inf.
    With a ledger, sigma is derived at the first release so that ``planned_releases`` releases spend the model's
    whole share (:meth:`PrivacyLedger.plan`, q = 1), unless ``noise_multiplier`` fixes it.

    Raises
    ------
    StatisticsBudgetExhausted
        Before the data is read, when the release would exceed ``model_key``'s share of the budget.
    """
    if ledger is None:
        if noise_multiplier is None:
            raise ConfigError("a site without a privacy ledger needs an explicit statistics noise multiplier")
        sigma, eps, delta = float(noise_multiplier), math.inf, 0.0
    else:
        sigma = plan_gaussian_release(ledger, model_key, planned=planned_releases, noise_multiplier=noise_multiplier,
                                      error=StatisticsBudgetExhausted, what="the statistics release")
    clean = clean_statistics(x, y)
    std = sigma * SENSITIVITY
    noisy = clean + (gaussian_noise(len(clean), std=std, seed=noise_seed) if std > 0 else 0.0)
    if ledger is not None:
        ledger.accountant_for(model_key).step(noise_multiplier=sigma, sample_rate=STATISTICS_SAMPLE_RATE)
        eps, delta = ledger.epsilon(model_key), ledger.budget(model_key)[1]
    return NoisyStatistics(vector=np.asarray(noisy, np.float64), dim=int(np.asarray(x).shape[1]),
                           noise_std=float(std), noise_multiplier=float(sigma), epsilon=float(eps), delta=float(delta))


def unpack(vector: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(A [dim, dim] symmetric, b [dim], c, m)`` of a (summed) released vector."""
    vector = np.asarray(vector, np.float64)
    if vector.shape != (vector_length(dim),):
        raise ValueError(f"a statistics vector of {dim} features has {vector_length(dim)} entries, got {vector.shape}")
    n_tri = dim * (dim + 1) // 2
    a = np.zeros((dim, dim))
    a[np.triu_indices(dim)] = vector[:n_tri]
    a = a + np.triu(a, 1).T
    return a, vector[n_tri:n_tri + dim], float(vector[-2]) / TAIL_WEIGHT, float(vector[-1]) / TAIL_WEIGHT


def solve_ridge(vector: np.ndarray, dim: int, ridge: float) -> tuple[np.ndarray, float]:
    """Ridge weights ``(A_+ + ridge I)^-1 b`` and the residual variance per example, from summed statistics.

    ``A_+`` is the noisy ``A`` projected onto the positive semidefinite cone (its negative eigenvalues are noise).
    The residual variance ``(c - 2 w.b + w.A_+ w) / m`` uses the noisy sum of squares and count (post-processing:
    no privacy cost), floored at a small positive value and with ``m`` at least 1.
    """
    if not ridge > 0:
        raise ValueError(f"ridge={ridge!r} must be > 0 (the noisy Gram matrix may be singular)")
    a, b, c, m = unpack(vector, dim)
    ev, q = np.linalg.eigh(a)
    a_psd = (q * np.clip(ev, 0.0, None)) @ q.T
    w = np.linalg.solve(a_psd + ridge * np.eye(dim), b)
    rss = c - 2.0 * w @ b + w @ a_psd @ w
    return w, float(max(rss, 1e-6) / max(m, 1.0))


# Public brain phantoms per scanner profile behind the design (the public GA head's own recipe uses 150).
DESIGN_PHANTOMS_PER_PROFILE = 100
DESIGN_SEED = 7


def check_regressor(regressor: GARegressor) -> None:
    """Raise :class:`ConfigError` unless ``regressor`` can take a statistics fit: a linear ``log_hc`` head on a frozen
    backbone with its spacing FiLM kept at zero."""
    if regressor.output != "log_hc" or not isinstance(regressor.head, torch.nn.Linear):
        raise ConfigError("a statistics fit needs a linear GA head on a frozen public backbone "
                          "(train.downstream-backbone other than 'cnn', train.downstream-hidden=0)")
    if any(p.requires_grad for p in regressor.film.parameters()):
        raise ConfigError("a statistics fit needs the spacing FiLM frozen at zero (film=False): the correction is "
                          "linear in the unmodulated features")


@dataclass(frozen=True)
class StatisticsDesign:
    """The public map from (features, spacing) to a statistics row, and the target's scale."""

    mean: np.ndarray  # float64 [d]: public features' mean
    basis: np.ndarray  # float64 [dims, d]: principal directions / their public std / sqrt(dims)
    spacing_center: float  # log spacing (mm) of the default field of view at this image size (a constant)
    spacing_scale: float  # the centred log spacing is divided by it (a setting: smaller weighs spacing more)
    row_scale: float  # the row is divided by it (then clipped to norm 1 for the release)
    target_scale: float  # the residual is divided by it (then clipped to [-1, 1])

    @property
    def dims(self) -> int:
        return int(self.basis.shape[0])

    @property
    def row_dim(self) -> int:
        return self.dims + 2

    def rows(self, features: Tensor | np.ndarray, spacing: Tensor | np.ndarray) -> np.ndarray:
        """``[n, dims + 2]`` rows (before clipping): (projected features, centred log spacing, 1) / row_scale."""
        h = np.asarray(features, np.float64)
        sp = np.asarray(spacing, np.float64)
        if h.ndim != 2 or h.shape[1] != self.mean.shape[0] or sp.shape != (h.shape[0],):
            raise ValueError(f"features must be [n, {self.mean.shape[0]}] and spacing [n], got {h.shape}, {sp.shape}")
        if not (np.isfinite(sp).all() and (sp > 0).all()):
            raise ValueError("every row needs a known pixel spacing (> 0)")
        z = (h - self.mean) @ self.basis.T
        s = (np.log(sp) - self.spacing_center) / self.spacing_scale
        return np.concatenate([z, s[:, None], np.ones((len(h), 1))], axis=1) / self.row_scale

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "basis": self.basis,
                "scalars": np.array([self.spacing_center, self.spacing_scale, self.row_scale, self.target_scale])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> StatisticsDesign:
        """The design a request carries; a malformed one is a ``ValueError`` that says what is wrong."""
        try:
            mean = np.asarray(arrays["mean"], np.float64)
            basis = np.asarray(arrays["basis"], np.float64)
            center, sp_scale, scale, target = (float(v) for v in np.asarray(arrays["scalars"], np.float64))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"statistics design needs 'mean' [d], 'basis' [k, d] and 4 'scalars': {exc}") from exc
        if mean.ndim != 1 or basis.ndim != 2 or basis.shape[1] != mean.shape[0] or not 1 <= basis.shape[0] <= 64:
            raise ValueError(f"statistics design: mean {mean.shape} and basis {basis.shape} do not fit (1-64 dims)")
        if not (np.isfinite(mean).all() and np.isfinite(basis).all() and min(sp_scale, scale, target) > 0
                and math.isfinite(center) and max(sp_scale, scale, target) < math.inf):
            raise ValueError("statistics design: non-finite entries or a non-positive scale")
        return cls(mean, basis, center, sp_scale, scale, target)


def public_brain_features(regressor: GARegressor, *, n_per_profile: int = DESIGN_PHANTOMS_PER_PROFILE,
                          seed: int = DESIGN_SEED) -> np.ndarray:
    """Features ``[n, d]`` of public brain phantoms of every scanner profile."""
    from common.core.records import PLANES
    from common.phantoms.profiles import SCANNER_PROFILES
    from common.phantoms.simulator import make_phantoms

    probs = [1.0 if name == "fetal_brain" else 0.0 for name in PLANES]
    feats = []
    for k, profile in enumerate(SCANNER_PROFILES):
        recs = make_phantoms(n_per_profile, size=regressor.image_size, seed=seed * 1000 + k, profile=profile,
                             plane_probs=probs, site="public", id_prefix=f"public-design-{profile}")
        feats.append(_features(regressor, recs))
    return np.concatenate(feats)


def _features(regressor: GARegressor, records: list) -> np.ndarray:
    """The frozen backbone's features ``[n, d]`` of ``records``' images (uint8, scaled to [-1, 1])."""
    x = torch.from_numpy(np.stack([r.image for r in records])).float()[:, None] / 127.5 - 1.0
    with torch.no_grad():
        return regressor.backbone(x).double().numpy()


def public_real_features(regressor: GARegressor, source: str, root: str, *, plane: str | None = "fetal_brain"
                         ) -> np.ndarray:
    """Features ``[n, d]`` of a public real dataset's images (``plane``: only that plane's, None: all) in a supported
    layout: directions that real scans vary along, where the phantoms' are not those (public data, no privacy cost)."""
    from common.core.records import PLANES
    from common.data.loaders import load_source

    if plane is not None and plane not in PLANES:
        raise ConfigError(f"unknown plane {plane!r}; one of {PLANES}")
    recs = load_source(source, root, image_size=regressor.image_size).records
    if plane is not None:
        recs = [r for r in recs if r.plane == PLANES.index(plane)]
    if len(recs) < 2:
        raise ConfigError(f"{source} at {root}: {len(recs)} images of plane {plane!r}; the design needs at least 2")
    return _features(regressor, recs)


def design_from_features(features: np.ndarray, *, image_size: int, dims: int, spacing_scale: float,
                         row_scale: float, target_scale: float) -> StatisticsDesign:
    """The public design (see the module docstring) from public images' features (brain phantoms by default)."""
    if not 1 <= dims <= 64:
        raise ConfigError(f"dims={dims!r} must be in 1..64")
    if not min(target_scale, row_scale, spacing_scale) > 0:
        raise ConfigError(f"the statistics design's scales (spacing {spacing_scale!r}, row {row_scale!r}, target "
                          f"{target_scale!r}) must be > 0")
    mean = features.mean(0)
    _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
    dims = min(dims, vt.shape[0], len(features) - 1)  # centred: at most n - 1 directions carry variance
    std = ((features - mean) @ vt[:dims].T).std(0)
    basis = vt[:dims] / np.maximum(std, 1e-8)[:, None] / math.sqrt(dims)
    return StatisticsDesign(mean, basis, math.log(DEFAULT_FOV_MM / image_size), float(spacing_scale),
                            float(row_scale), float(target_scale))


def residual_targets(regressor: GARegressor, features: Tensor, spacing: Tensor, ga_weeks: Tensor) -> np.ndarray:
    """``[n]`` what the head's first output misses: the output that predicts the true log HC minus the head's."""
    with torch.no_grad():
        x = torch.cat([features.double(), regressor.scale_input(spacing.double())], 1)
        current = x @ regressor.head.weight[0].double() + regressor.head.bias[0].double()
        want = log_size_output(regressor, log_hc_from_ga(ga_weeks.double()), spacing)
    return (want - current).numpy()


def statistics_rows(regressor: GARegressor, design: StatisticsDesign, features: Tensor, spacing: Tensor,
                    ga_weeks: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A site's rows and scaled targets (not yet clipped; :func:`release_statistics` clips them)."""
    return (design.rows(features, spacing),
            residual_targets(regressor, features, spacing, ga_weeks) / design.target_scale)


def fold_into_head(regressor: GARegressor, design: StatisticsDesign, weights: np.ndarray,
                   residual_variance: float) -> None:
    """Add the fitted correction ``target_scale * w . row`` to the head's first output (in place) and set its
    log-variance output to the fitted residual variance (the features' weights of that output to zero).

    At prediction the row is not clipped (a fitted linear map, applied as one): rows of real scans lie well inside
    norm 1 with the chosen design (README)."""
    check_regressor(regressor)
    w = np.asarray(weights, np.float64) * design.target_scale
    if w.shape != (design.row_dim,) or not np.isfinite(w).all():
        raise ValueError(f"weights must be {design.row_dim} finite numbers, got {w.shape}")
    d = design.mean.shape[0]
    w = w / design.row_scale
    on_features = w[:design.dims] @ design.basis
    on_log_spacing = w[design.dims] / design.spacing_scale
    offset = w[design.dims + 1] - on_features @ design.mean - on_log_spacing * design.spacing_center
    std = math.sqrt(max(residual_variance, 1e-12)) * design.target_scale
    with torch.no_grad():
        head = regressor.head
        head.weight[0, :d] += torch.as_tensor(on_features, dtype=head.weight.dtype)
        head.weight[0, d] += float(on_log_spacing)  # the head's input: [features, log spacing, unknown flag]
        head.bias[0] += float(offset)
        head.weight[1].zero_()
        head.bias[1] = logvar_output(std)
