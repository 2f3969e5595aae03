"""Downstream models trained at each site: a fetal-plane classifier and a gestational-age regressor.

Each is a backbone and a small head. The backbone is either a frozen public feature extractor
(``backbone="phantom_cnn"``, the default: the shipped encoder trained on public phantoms; or ``"scattering"``:
wavelet scattering; both normalised with phantom statistics: a DP head on public features is what learns at a few
dozen images per site) or a small GroupNorm CNN trained end to end (``backbone="cnn"``; no BatchNorm: Opacus' ``ModuleValidator`` accepts it, per-example gradients stay
independent). Only trainable weights are federated (:func:`federated_state`). Batches are the 4-tuples of
``common.data.tensors``:
``(images [B,1,H,W] in [-1,1], plane int64 [B], ga float32 [B] (NaN unknown), spacing float32 [B] (NaN unknown))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from common.core.config import ENCODER_FOLDERS
from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS, PLANES
from common.models.features import PhantomEncoderBackbone, ScatteringBackbone

if TYPE_CHECKING:
    from common.core.config import RunConfig

BACKBONES: tuple[str, ...] = ("phantom_cnn", "public_cnn", "public_size_cnn", "scattering", "cnn")
ENCODER_BACKBONES: tuple[str, ...] = tuple(ENCODER_FOLDERS)  # the shipped public encoders

_GA_CENTER = (GA_MIN_WEEKS + GA_MAX_WEEKS) / 2.0  # 27 weeks
_GA_SCALE = (GA_MAX_WEEKS - GA_MIN_WEEKS) / 2.0  # 13 weeks
_LOGVAR_RANGE = 6.0  # log-variance is kept within +-6 of the prior scale (numerical safety)


def _groups(channels: int) -> int:
    """Largest of 8, 4, 2, 1 dividing ``channels`` (GroupNorm needs an exact split)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _check_size(image_size: int, width: int) -> None:
    if image_size < 16 or image_size % 8:
        raise ValueError(f"image_size={image_size} must be a multiple of 8 and >= 16")
    if width < 2:
        raise ValueError(f"width={width} must be >= 2")


class ConvBackbone(nn.Module):
    """Conv -> GroupNorm -> SiLU, three stride-2 stages, global average pool: ``[B,1,H,W] -> [B, 4*width]``."""

    def __init__(self, image_size: int, width: int) -> None:
        super().__init__()
        _check_size(image_size, width)
        self.image_size = image_size
        chans = [width, 2 * width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(chans):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(_groups(c), c),
                       nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.out_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Penultimate embedding."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"expected images [B,1,{self.image_size},{self.image_size}], got {tuple(x.shape)}")
        return self.net(x).mean(dim=(2, 3))


def make_backbone(kind: str, image_size: int, width: int, scattering_j: int = 2, scattering_grid: int = 2, *,
                  flips: bool = False) -> nn.Module:
    """The feature extractor of a downstream model: ``"phantom_cnn"``, ``"public_cnn"`` (the encoder trained on
    phantoms + public real scans), ``"public_size_cnn"`` (the same data, plus the phantoms' apparent anatomy size as
    a second objective), ``"scattering"`` (frozen) or ``"cnn"`` (trained). ``flips``: the encoders' features
    averaged over the four flips of each image (:func:`common.models.features.flip_average`)."""
    if kind in ENCODER_FOLDERS:
        from common.models.assets import asset_folder

        return PhantomEncoderBackbone(image_size, asset_folder(ENCODER_FOLDERS[kind]), flips=flips)
    if kind == "scattering":
        return ScatteringBackbone(image_size, J=scattering_j, grid=scattering_grid)
    if kind == "cnn":
        return ConvBackbone(image_size, width)
    raise ValueError(f"backbone={kind!r} is not one of {BACKBONES}")


def is_frozen(backbone: nn.Module) -> bool:
    """Whether a backbone has nothing to train (its features cannot depend on any site's data)."""
    return not any(p.requires_grad for p in backbone.parameters())


def _head(d_in: int, d_out: int, hidden: int, *, zero: bool) -> nn.Module:
    """Linear (``hidden=0``) or one SiLU hidden layer; the output layer starts at zero on frozen features
    (a data-free init under which DP-SGD's first noisy steps start from the uniform prediction)."""
    if hidden < 0:
        raise ValueError(f"hidden={hidden} must be >= 0")
    out = nn.Linear(hidden or d_in, d_out)
    if zero:
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
    return out if hidden == 0 else nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), out)


def federated_state(model: nn.Module) -> dict[str, Tensor]:
    """The part of a downstream model's state that sites train and the server aggregates.

    Everything under a frozen backbone (its public weights and phantom statistics) is left out: it is rebuilt from
    the config by whoever builds the model, never trained, never sent.
    """
    frozen = is_frozen(model.backbone)  # type: ignore[arg-type]
    return {k: v for k, v in model.state_dict().items() if not (frozen and k.startswith("backbone."))}


def load_federated_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load what :func:`federated_state` gave (or its aggregate): exactly its keys, nothing else."""
    expected = set(federated_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing == ["log_hc_format"]:
            raise ValueError("these GA regressor weights predate the log-HC output (same shapes, another meaning): "
                             "retrain the regressor with this version")
        if missing == ["flip_views_format"]:
            raise ValueError("these GA regressor weights were trained on single-view features, before the regressor "
                             "read flip-averaged ones (same shapes, other features): retrain the regressor with this "
                             "version, or score the old checkpoint folder with `difusal evaluate` (it rebuilds it)")
        raise ValueError(f"downstream weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
                         " (was it trained with another train.downstream-backbone / width / hidden?)")
    model.load_state_dict({**model.state_dict(), **dict(state)}, strict=True)


@dataclass(frozen=True)
class DownstreamSpec:
    """How a run's classifier and regressor are built (the ``train.downstream-*`` and ``data`` keys).

    ``backbone``: ``"phantom_cnn"`` (:class:`common.models.features.PhantomEncoderBackbone`, frozen),
    ``"scattering"`` (:class:`common.models.features.ScatteringBackbone`, frozen, ``scattering_j`` scales and a
    ``scattering_grid``-square pooling grid) or ``"cnn"`` (:class:`ConvBackbone` of ``width`` channels, trained end
    to end). ``hidden``: hidden units of a frozen backbone's heads (0: linear).
    ``planes``: the classifier's label scope.
    """

    image_size: int = 64
    backbone: str = "phantom_cnn"
    width: int = 32
    hidden: int = 0
    scattering_j: int = 2
    scattering_grid: int = 4
    planes: tuple[int, ...] | None = None
    regressor_film: bool = True

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "DownstreamSpec":
        t = cfg.train
        return cls(image_size=cfg.data.image_size, backbone=t.downstream_backbone, width=t.downstream_width,
                   hidden=t.downstream_hidden, scattering_j=t.scattering_j, scattering_grid=t.scattering_grid,
                   planes=cfg.data.plane_scope(), regressor_film=t.regressor_film)

    def _kw(self) -> dict[str, Any]:
        return dict(backbone=self.backbone, hidden=self.hidden, scattering_j=self.scattering_j,
                    scattering_grid=self.scattering_grid)

    def classifier(self) -> "PlaneClassifier":
        return PlaneClassifier(image_size=self.image_size, width=self.width, planes=self.planes, **self._kw())

    def regressor(self, *, flips: bool = True) -> "GARegressor":
        """The GA regressor (``flips=False``: on single-view features, as checkpoints before them were trained)."""
        return GARegressor(self.image_size, self.width, planes=self.planes, flips=flips, film=self.regressor_film,
                           **self._kw())

    @property
    def frozen(self) -> bool:
        """Whether the backbone is a frozen public extractor (only the heads train)."""
        return self.backbone != "cnn"


class PlaneClassifier(nn.Module):
    """Fetal-plane classifier over :data:`PLANES`, restricted to the consortium's label scope.

    The head keeps one logit per plane of :data:`PLANES` (so the federated array shapes do not depend on the
    scope), and :meth:`forward` sets the logits of planes outside ``planes`` to ``-inf``: softmax puts exactly
    zero probability on them, argmax never picks them, and cross-entropy is taken over the in-scope logits
    only (their weights get zero gradient). The scope is a non-persistent buffer: it is not in the state dict
    (checkpoints and federated arrays are unchanged); whoever builds the model gives it from the config
    (``cfg.data.plane_scope()``).

    Parameters
    ----------
    num_classes:
        Number of plane labels (6).
    image_size:
        Input side length (multiple of 8, >= 16).
    width:
        Channels of the first stage (then 2x, 2x, 4x); the embedding has ``4 * width`` dims.
    planes:
        Indices of the in-scope planes (``None``: all ``num_classes``).
    backbone, hidden, scattering_j, scattering_grid:
        See :class:`DownstreamSpec`.
    """

    def __init__(self, num_classes: int = len(PLANES), image_size: int = 64, width: int = 32,
                 planes: Sequence[int] | None = None, *, backbone: str = "cnn", hidden: int = 0,
                 scattering_j: int = 2, scattering_grid: int = 2) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        scope = tuple(range(num_classes)) if planes is None else tuple(sorted({int(k) for k in planes}))
        if not scope or not all(0 <= k < num_classes for k in scope):
            raise ValueError(f"planes={planes!r} must be a non-empty set of indices in [0, {num_classes})")
        self.num_classes = num_classes
        self.planes = scope
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[list(scope)] = True
        self.register_buffer("scope_mask", mask, persistent=False)
        self.backbone = make_backbone(backbone, image_size, width, scattering_j, scattering_grid)
        self.head = _head(self.backbone.out_dim, num_classes, hidden, zero=is_frozen(self.backbone))
        public = getattr(self.backbone, "public_head", None)
        if public is not None and hidden == 0 and num_classes == public["weight"].shape[0]:
            # public warm start: the encoder folder ships a head fitted on public labelled scans (no privacy cost);
            # DP-SGD at the sites starts from it instead of from zero
            self.head.load_state_dict(public)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate embedding ``[B, 4*width]`` (for Frechet distances and novelty scores)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``; ``-inf`` for the planes outside the scope."""
        return self.head(self.features(x)).masked_fill(~self.scope_mask, float("-inf"))


_HADLOCK_P = 0.540 / 0.0003  # the depressed cubic of Hadlock's MA(HC), HC in cm: HC^3 + p HC + (8.96 - MA)/0.0003
_LOG_HC_MID, _LOG_HC_HALF = (math.log(15.0) + math.log(800.0)) / 2, (math.log(800.0) - math.log(15.0)) / 2
DEFAULT_FOV_MM = 150.0  # field of view assumed when an image has no pixel spacing (the head learns the correction)
_PRIOR_LOG_SIZE_STD = 0.15  # data-free prior scale of the log-size error (15 %), centre of the log-variance range


def ga_from_log_hc(z: Tensor) -> Tensor:
    """Hadlock 1984 GA (weeks) of a head circumference ``exp(z)`` mm (torch twin of ``biometry.ga_from_hc``)."""
    h = torch.exp(z) / 10.0
    return 8.96 + 0.540 * h + 0.0003 * h**3


def log_hc_from_ga(ga: Tensor) -> Tensor:
    """Inverse of :func:`ga_from_log_hc` (torch twin of ``biometry.hc_from_ga``); GA is floored at 9.5 weeks
    (Hadlock's curve reaches HC = 0 at 8.96 weeks)."""
    q = (8.96 - ga.clamp(min=9.5)) / 0.0003
    h = -2.0 * math.sqrt(_HADLOCK_P / 3) * torch.sinh(torch.asinh(1.5 * q / _HADLOCK_P * math.sqrt(3 / _HADLOCK_P)) / 3)
    return torch.log(10.0 * h)


def _dga_dlog_hc(z: Tensor) -> Tensor:
    """``d GA / d log HC`` (weeks): maps a log-size standard deviation to weeks (delta method)."""
    h = torch.exp(z) / 10.0
    return h * (0.540 + 0.0009 * h**2)


class GARegressor(nn.Module):
    """Heteroscedastic gestational-age regressor: predicts mean and log-variance of GA in weeks.

    The image alone does not fix GA: a head of 200 px is small at 0.5 mm/px and large at 1 mm/px. The pixel
    spacing enters as a scale input ``s = [log(spacing_mm), unknown]``: a known spacing gives ``[log sp, 0]``,
    a missing one (NaN) gives ``[0, 1]``, so the weights on the flag column act as a learned "unknown spacing"
    embedding. ``s`` modulates the image embedding by FiLM (Perez et al. 2018, ``h * (1 + gamma(s)) + beta(s)``)
    and is also concatenated to the head input.

    Output (``output="log_hc"``, every frozen backbone): the head reads the anatomy's *apparent size* off the
    image, ``a = log(HC / field of view)`` (what an image shows, whatever the zoom), and the physics does the rest:
    ``log HC = log(image_size * spacing) + a`` (a missing spacing uses :data:`DEFAULT_FOV_MM`), softly kept in
    [15, 800] mm, and GA is Hadlock's curve of HC (the curve the HC18 labels and the phantoms' anatomy follow).
    The variance is predicted for ``log HC`` and carried to weeks by the delta method, so an interval widens with
    GA as the growth curve steepens; :func:`regressor_loss` fits the Gaussian NLL in ``log HC``, where the error is
    homoscedastic. With a linear head the model is linear in the features: what a shipped public GA head
    (:func:`common.models.features.fit_public_ga_head`, fitted on phantoms at no privacy cost) warm-starts.
    ``output="weeks"`` (the end-to-end CNN, whose weights the shipped prior carries) maps the head's output
    affinely to weeks, as before.

    On the shipped encoders (``phantom_cnn``, ``public_cnn``) the regressor reads features averaged over the four
    flips of the image (``flips=True``, :func:`common.models.features.flip_average`): a head's size does not
    depend on the probe's orientation, and the average removes feature noise that does (HC18, 5 patient-grouped
    folds: 9.2 instead of 9.6 days under DP at eps = 10). The public warm-start head is the one fitted on the same
    flip-averaged features. A buffer ``flip_views_format`` marks such weights, so a checkpoint saved before (same
    shapes, features of single views) fails to load strictly instead of predicting off-scale GA.

    Parameters
    ----------
    image_size, width, backbone, hidden, scattering_j, scattering_grid:
        As for :class:`PlaneClassifier`. The CNN backbone keeps its one-hidden-layer head of ``4 * width`` units;
        a frozen backbone gets ``hidden`` units (0: the head is linear in the modulated features and log spacing).
    output:
        ``"log_hc"`` or ``"weeks"``; default: ``"weeks"`` for the ``cnn`` backbone, ``"log_hc"`` otherwise.
    planes:
        The consortium's label scope (``None``: every plane). The public GA head warm-starts a linear ``log_hc``
        head only when the scope is the brain plane alone (the HC18 preset); by default a bare regressor is a
        head-biometry one.
    flips:
        Flip-averaged features on the shipped encoders (default; ignored by the other backbones). ``False`` only
        to compare with single-view features.
    film:
        Whether the spacing FiLM trains (default). ``False`` keeps it at its zero init (``requires_grad`` off, the
        weights still in the state dict, so checkpoints of either kind load into either): the spacing then enters
        through the field of view and the head's input only, and DP-SGD trains the head alone.
    """

    def __init__(self, image_size: int = 64, width: int = 32, *, backbone: str = "cnn", hidden: int = 0,
                 scattering_j: int = 2, scattering_grid: int = 2, output: str | None = None,
                 planes: Sequence[int] | None = (PLANES.index("fetal_brain"),), flips: bool = True,
                 film: bool = True) -> None:
        super().__init__()
        flips = flips and backbone in ENCODER_BACKBONES
        self.backbone = make_backbone(backbone, image_size, width, scattering_j, scattering_grid, flips=flips)
        self.image_size = int(image_size)
        d = self.backbone.out_dim
        self.film = nn.Linear(2, 2 * d)
        frozen = is_frozen(self.backbone)
        self.output = output or ("log_hc" if frozen else "weeks")
        if self.output not in ("log_hc", "weeks"):
            raise ValueError(f"output={self.output!r} must be 'log_hc' or 'weeks'")
        self.head = _head(d + 2, 2, hidden if frozen else d, zero=frozen)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.film.requires_grad_(film)
        if self.output == "log_hc":
            # a format mark in the state dict: weights saved before the log-HC output (same shapes, other meaning)
            # fail to load strictly instead of predicting nonsense GA
            self.register_buffer("log_hc_format", torch.ones(1))
        if flips:
            # likewise for flip-averaged features: weights fitted on single views fail to load strictly
            self.register_buffer("flip_views_format", torch.ones(1))
        public = getattr(self.backbone, "public_ga_head", None)
        brain_only = planes is not None and tuple(sorted(set(planes))) == (PLANES.index("fetal_brain"),)
        self.public_warm_start = public is not None and hidden == 0 and self.output == "log_hc" and brain_only
        if self.public_warm_start:
            # public warm start: a head fitted on public brain phantoms (no privacy cost); DP-SGD starts from it. It
            # reads head size, so only a brain-plane consortium gets it (fitted on four planes it lost half its
            # accuracy on HC18 heads); other scopes start at zero
            self.head.load_state_dict(public)

    @staticmethod
    def scale_input(spacing: Tensor) -> Tensor:
        """``[B] spacing (mm, NaN unknown) -> [B, 2]`` = (log spacing or 0, unknown flag)."""
        known = torch.isfinite(spacing) & (spacing > 0)
        log_sp = torch.where(known, torch.log(torch.where(known, spacing, torch.ones_like(spacing))), 0.0)
        return torch.stack([log_sp, (~known).to(log_sp.dtype)], dim=1)

    def log_fov(self, spacing: Tensor) -> Tensor:
        """``log(image_size * spacing)`` (mm), :data:`DEFAULT_FOV_MM` where the spacing is unknown."""
        s = self.scale_input(spacing)
        return torch.where(s[:, 1] > 0, math.log(DEFAULT_FOV_MM), s[:, 0] + math.log(self.image_size))

    def features(self, x: Tensor) -> Tensor:
        """Image embedding ``[B, 4*width]`` before the spacing modulation (a feature space for image metrics)."""
        return self.backbone(x)

    def forward(self, x: Tensor, spacing: Tensor, *, log_hc: bool = False) -> tuple[Tensor, Tensor]:
        """``(mean_weeks [B], logvar_weeks2 [B])``; with ``log_hc=True`` (``output="log_hc"`` only), the
        ``(log HC mm, its log-variance)`` the weeks follow from."""
        return self.forward_features(self.backbone(x), spacing, log_hc=log_hc)

    def forward_features(self, h: Tensor, spacing: Tensor, *, log_hc: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`forward` from the backbone's features ``h = self.backbone(x)``: FiLM, head, output mapping."""
        s = self.scale_input(spacing.to(h.dtype))
        gamma, beta = self.film(s).chunk(2, dim=1)
        out = self.head(torch.cat([h * (1 + gamma) + beta, s], dim=1))
        if self.output == "weeks":
            if log_hc:
                raise ValueError("log_hc=True needs output='log_hc' (this regressor predicts weeks directly)")
            mean = _GA_CENTER + _GA_SCALE * out[:, 0]
            logvar = 2 * math.log(_GA_SCALE) - 2.0 + _LOGVAR_RANGE * torch.tanh(out[:, 1] / _LOGVAR_RANGE)
            return mean, logvar
        raw = self.log_fov(spacing).to(h.dtype) + out[:, 0]
        z = _LOG_HC_MID + _LOG_HC_HALF * torch.tanh((raw - _LOG_HC_MID) / _LOG_HC_HALF)
        logvar_z = 2 * math.log(_PRIOR_LOG_SIZE_STD) + _LOGVAR_RANGE * torch.tanh(out[:, 1] / _LOGVAR_RANGE)
        if log_hc:
            return z, logvar_z
        return ga_from_log_hc(z), logvar_z + 2 * torch.log(_dga_dlog_hc(z))


def log_size_output(regressor: GARegressor, log_hc: Tensor, spacing: Tensor) -> Tensor:
    """The first head output of a ``log_hc`` regressor that predicts ``log_hc`` (mm) at ``spacing``: the inverse of
    :meth:`GARegressor.forward_features`' output mapping (float64; a label at the edge of the soft range is held
    just inside it)."""
    u = ((log_hc.double() - _LOG_HC_MID) / _LOG_HC_HALF).clamp(-1 + 1e-9, 1 - 1e-9)
    return _LOG_HC_MID + _LOG_HC_HALF * torch.atanh(u) - regressor.log_fov(spacing).double()


def logvar_output(log_size_std: float) -> float:
    """The second head output (a bias) that makes a ``log_hc`` regressor predict ``log_size_std`` for log HC."""
    ratio = 2 * (math.log(log_size_std) - math.log(_PRIOR_LOG_SIZE_STD)) / _LOGVAR_RANGE
    return _LOGVAR_RANGE * math.atanh(max(-0.99, min(0.99, ratio)))


def fit_public_ga_head(regressor: GARegressor, *, n_per_profile: int = 150, seed: int = 0,
                       l2s: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0), planes: Sequence[str] = ("fetal_brain",)
                       ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Fit the linear head of a ``log_hc`` regressor on PUBLIC brain-plane phantoms of every scanner profile.

    The phantoms' anatomy follows Hadlock's growth of the GA they were drawn at and their pixel spacing is exact,
    so the head's target is known: the output that gives ``log HC(GA)`` (ridge regression of it on the head's
    input ``[features, log spacing, unknown flag]``, FiLM at zero). The ridge penalty is chosen by leave-one-
    scanner-profile-out error (a public stand-in for the shift to real scanners), and the log-variance output is
    set to that held-out error. No private data; what DP-SGD at the sites starts from.

    Returns ``({"weight", "bias"} of the head, info)``; info has the penalty, the held-out log-size RMSE and the
    image count.
    """
    from common.phantoms.biometry import hc_mm
    from common.phantoms.profiles import SCANNER_PROFILES
    from common.phantoms.simulator import make_phantoms

    if regressor.output != "log_hc" or not isinstance(regressor.head, nn.Linear):
        raise ValueError("fit_public_ga_head needs a linear-head regressor with output='log_hc' on a frozen backbone")
    size = regressor.image_size
    feats, targets, profile_of = [], [], []
    probs = [1.0 if name in planes else 0.0 for name in PLANES]
    for k, profile in enumerate(SCANNER_PROFILES):
        recs = make_phantoms(n_per_profile, size=size, seed=seed * 1000 + 500 + k, profile=profile,
                             plane_probs=probs, site="public", id_prefix=f"public-ga-{profile}")
        x = torch.from_numpy(np.stack([r.image for r in recs])).float()[:, None] / 127.5 - 1.0
        sp = torch.tensor([r.pixel_spacing_mm for r in recs], dtype=torch.float32)
        z = torch.log(torch.as_tensor(hc_mm(np.array([r.ga_weeks for r in recs])), dtype=torch.float64))
        with torch.no_grad():
            h = regressor.backbone(x).double()
            feats.append(torch.cat([h, regressor.scale_input(sp).double()], 1))
            targets.append(log_size_output(regressor, z, sp))
        profile_of += [k] * len(recs)
    x_all, y_all, groups = torch.cat(feats), torch.cat(targets), torch.tensor(profile_of)

    def ridge(x: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor]:
        mx, my = x.mean(0), y.mean()
        xc = x - mx
        w = torch.linalg.solve(xc.T @ xc + l2 * len(x) * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - my))
        return w, my - mx @ w

    heldout = {}
    for l2 in l2s:
        err = []
        for k in range(len(SCANNER_PROFILES)):
            tr = groups != k
            w, b = ridge(x_all[tr], y_all[tr], l2)
            err.append((x_all[~tr] @ w + b - y_all[~tr]) ** 2)
        heldout[l2] = float(torch.cat(err).mean().sqrt())
    best = min(heldout, key=heldout.get)
    w, b = ridge(x_all, y_all, best)
    weight = torch.zeros(2, x_all.shape[1])
    weight[0] = w.float()
    bias = torch.tensor([float(b), logvar_output(heldout[best])])
    info = {"l2": best, "heldout_log_size_rmse": {str(k): round(v, 4) for k, v in heldout.items()},
            "images": int(len(y_all)), "planes": list(planes), "profiles": list(SCANNER_PROFILES),
            "n_per_profile": n_per_profile, "seed": seed}
    return {"weight": weight, "bias": bias}, info


# -- per-example losses for common.privacy.dpsgd.train_private ---------------------------------------------------
def classifier_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Per-example cross-entropy ``[B]`` over the in-scope logits (the others are ``-inf``).

    A label outside the model's scope has no finite loss: it is refused (``ValueError``) rather than trained.
    """
    logits, labels = model(batch[0]), batch[1]
    finite = torch.isfinite(logits.detach().gather(1, labels.long()[:, None]))[:, 0]
    if not finite.all():
        bad = sorted({PLANES[int(k)] for k in labels[~finite]})
        raise ValueError(f"training labels {bad} are outside the classifier's label scope (data.planes); "
                         "records of those planes must not reach it")
    return F.cross_entropy(logits, labels, reduction="none")


def regressor_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Per-example negative log-likelihood ``[B]``; unknown GA (NaN) contributes 0 (constants dropped).

    ``output="log_hc"``: Laplace NLL of the label's log Hadlock HC, ``log b + |y - z| / b`` with ``2 b^2`` the
    predicted variance. Its gradient in the prediction has the same size for every example, so DP-SGD's per-example
    clipping does not truncate the large errors (which is what shrinks a Gaussian NLL's variance under DP: interval
    coverage fell to 0.6-0.8 in the HC18 study, 0.82-0.87 with this loss), and its optimum is the median, the MAE's.
    The Gaussian interval ``mean +- 1.645 std`` of :func:`ga_metrics` covers 90.3 % of a Laplace.
    ``output="weeks"``: Gaussian NLL in weeks (Kendall & Gal 2017, eq. 5), ``0.5 * (log s^2 + (y - mu)^2 / s^2)``.
    NaN targets are replaced before the arithmetic so that no NaN can leak into gradients through the mask.
    """
    images, ga, spacing = batch[0], batch[2], batch[3]
    known = torch.isfinite(ga)
    y = torch.where(known, ga, torch.full_like(ga, _GA_CENTER))
    if _output_of(model) == "log_hc":  # Laplace NLL of log HC (Hadlock's inverse of the GA label)
        z, logvar = model(images, spacing, log_hc=True)
        y = log_hc_from_ga(y.to(z.dtype))
        log_b = 0.5 * (logvar - math.log(2.0))  # a Laplace of scale b has variance 2 b^2
        return (log_b + torch.abs(y - z) * torch.exp(-log_b)) * known.to(z.dtype)
    mean, logvar = model(images, spacing)
    y = y.to(mean.dtype)
    nll = 0.5 * (logvar + (y - mean) ** 2 * torch.exp(-logvar))
    return nll * known.to(nll.dtype)


def _output_of(model: nn.Module) -> str:
    """The ``output`` of the :class:`GARegressor` inside ``model`` (an Opacus wrapper or a feature-head adapter)."""
    for m in model.modules():
        if isinstance(m, GARegressor):
            return m.output
    raise TypeError(f"{type(model).__name__} holds no GARegressor")


# -- inference --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_planes(model: PlaneClassifier, images: Tensor, *, batch_size: int = 256, device: str = "cpu") -> Tensor:
    """Class probabilities ``[N, num_classes]`` (eval mode, restored after)."""
    was = model.training
    model.eval()
    try:
        outs = [F.softmax(model(images[i:i + batch_size].to(device)), dim=1).cpu()
                for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs) if outs else torch.empty(0, model.num_classes)


@torch.no_grad()
def predict_ga(model: GARegressor, images: Tensor, spacing: Tensor, *, batch_size: int = 256,
               device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Predicted GA ``(mean, std)`` in weeks, each ``[N]``."""
    if spacing.shape != images.shape[:1]:
        raise ValueError(f"spacing must have shape [{images.shape[0]}], got {tuple(spacing.shape)}")
    was = model.training
    model.eval()
    means, stds = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            m, lv = model(images[i:i + batch_size].to(device), spacing[i:i + batch_size].to(device))
            means.append(m.cpu())
            stds.append(torch.exp(0.5 * lv).cpu())
    finally:
        model.train(was)
    if not means:
        return torch.empty(0), torch.empty(0)
    return torch.cat(means), torch.cat(stds)


def plane_metrics(pred: np.ndarray, labels: np.ndarray, planes: Sequence[int] | None = None,
                  num_classes: int = len(PLANES)) -> dict[str, Any]:
    """Classification metrics of predicted plane indices against true ones, per in-scope plane.

    Returns
    -------
    ``accuracy`` (over every example), ``macro_f1`` (mean F1 over the planes present in truth or prediction),
    ``per_plane_recall`` (``{plane name: recall}`` for each plane of ``planes`` (default: all ``num_classes``),
    NaN where the labels have none, plus any plane the labels hold outside the scope: 0, the model never
    predicts it), ``per_class_recall`` (the same recalls as a list over all ``num_classes``, NaN where absent)
    and ``n``.
    """
    pred, labels = np.asarray(pred).astype(int), np.asarray(labels).astype(int)
    scope = set(range(num_classes) if planes is None else planes)
    recalls, f1s, per_plane = [], [], {}
    for k in range(num_classes):
        tp, n_true, n_pred = int(((pred == k) & (labels == k)).sum()), int((labels == k).sum()), int((pred == k).sum())
        recalls.append(tp / n_true if n_true else float("nan"))
        if n_true or n_pred:
            f1s.append(2 * tp / (n_true + n_pred))
        if k in scope or n_true:
            per_plane[PLANES[k] if k < len(PLANES) else str(k)] = recalls[-1]
    n = int(len(labels))
    return {"accuracy": float((pred == labels).mean()) if n else float("nan"),
            "macro_f1": float(np.mean(f1s)) if f1s else float("nan"), "per_plane_recall": per_plane,
            "per_class_recall": recalls, "n": n}


def evaluate_classifier(model: PlaneClassifier, dataset: TensorDataset, *, device: str = "cpu") -> dict:
    """:func:`plane_metrics` of the model's predictions on ``dataset`` (per plane of the model's scope)."""
    images, labels = dataset.tensors[0], dataset.tensors[1].long()
    pred = predict_planes(model, images, device=device).argmax(dim=1)
    return plane_metrics(pred.numpy(), labels.numpy(), model.planes, model.num_classes)


def ga_metrics(mean: np.ndarray, std: np.ndarray, ga: np.ndarray, *, coverage_level: float = 0.9) -> dict[str, Any]:
    """GA metrics over the examples with known GA (finite ``ga``); NaN for all when there are none.

    ``mae_days``; ``coverage``: fraction inside the central Gaussian ``coverage_level`` interval
    ``mean +- z * std``; ``interval_width_days``: its mean width ``2 z std``; ``n_ga``.
    """
    if not 0 < coverage_level < 1:
        raise ValueError(f"coverage_level={coverage_level} must be in (0, 1)")
    mean, std, ga = (np.asarray(a, dtype=np.float64) for a in (mean, std, ga))
    known = np.isfinite(ga)
    if not known.any():
        return {"mae_days": float("nan"), "coverage": float("nan"), "interval_width_days": float("nan"), "n_ga": 0}
    z = NormalDist().inv_cdf(0.5 + coverage_level / 2)  # two-sided Gaussian quantile
    err = np.abs(mean[known] - ga[known])
    return {"mae_days": float(err.mean() * 7.0), "coverage": float((err <= z * std[known]).mean()),
            "interval_width_days": float((2 * z * std[known]).mean() * 7.0), "n_ga": int(known.sum())}


def evaluate_regressor(model: GARegressor, dataset: TensorDataset, *, coverage_level: float = 0.9,
                       device: str = "cpu") -> dict:
    """MAE (days), coverage and mean width (days) of the central Gaussian interval, n with known GA."""
    if not 0 < coverage_level < 1:
        raise ValueError(f"coverage_level={coverage_level} must be in (0, 1)")
    images, ga, spacing = dataset.tensors[0], dataset.tensors[2], dataset.tensors[3]
    known = torch.isfinite(ga)
    if not known.any():
        return {"mae_days": float("nan"), "coverage": float("nan"), "interval_width_days": float("nan"), "n": 0}
    mean, std = predict_ga(model, images[known], spacing[known], device=device)
    out = ga_metrics(mean.numpy(), std.numpy(), ga[known].numpy(), coverage_level=coverage_level)
    return {**{k: v for k, v in out.items() if k != "n_ga"}, "coverage_level": coverage_level, "n": out["n_ga"]}
