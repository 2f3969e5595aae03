"""Frozen feature extractors for private downstream heads: nothing here is learned from private data.

A small DP head (a softmax layer trained with DP-SGD) on fixed features beats end-to-end DP training at a few
dozen images per site (Tramèr & Boneh, ICLR 2021: wavelet scattering + DP linear). Every extractor here maps a
batch of grayscale images ``[N, H, W]`` (``uint8`` in 0..255, or float in [0, 1]) to ``float32 [N, dim]``
features, deterministically, without gradients, and with weights that are either handcrafted (pixels, wavelet
scattering) or trained on public data only (phantoms of every scanner profile; the shipped prior, itself
pretrained on phantoms). Standardisation uses statistics of phantoms only (:func:`phantom_statistics`): it has no
argument through which a private image could enter.

Extractors: :class:`PixelExtractor` (downsampled pixels, the baseline), :class:`Scattering` (kymatio's 2D
scattering; kymatio is imported when one is built), :class:`PhantomEncoderExtractor` (a small GroupNorm CNN
trained here on augmented phantom plane classification, :func:`train_phantom_encoder`, saved as safetensors) and
:class:`UNetEncoderExtractor` (down and mid block activations of the shipped generator UNet at a small timestep).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.core.config import ENCODER_FOLDERS
from common.core.records import PLANES
from common.phantoms.biometry import hc_from_ga
from common.phantoms.profiles import SCANNER_PROFILES
from common.phantoms.simulator import make_phantoms

_BATCH = 64  # images per forward pass (results do not depend on it: every extractor works image by image)
PHANTOM_STATS_SEED = 90_210  # fixed public phantom stream for normalisation statistics
ENCODER_FORMAT = "difusal-phantom-encoder/1"
PHANTOM_ENCODER_ASSET = ENCODER_FOLDERS["phantom_cnn"]  # EncoderConfig() defaults, seed 0
# phantoms + public labelled real scans (its encoder.json lists every source)
PUBLIC_ENCODER_ASSET = ENCODER_FOLDERS["public_cnn"]
# the same data, trained with the apparent-size objective (EncoderConfig.size_weight)
PUBLIC_SIZE_ENCODER_ASSET = ENCODER_FOLDERS["public_size_cnn"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """A frozen map from grayscale images ``[N, H, W]`` to ``float32 [N, dim]`` features."""

    name: str
    dim: int

    def __call__(self, images: np.ndarray) -> np.ndarray:
        ...


def as_unit_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images ``[N, H, W]`` (``uint8`` 0..255, or float in [0, 1]) as ``float32 [N, 1, H, W]`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected grayscale images [N, H, W], got shape {tuple(x.shape)}")
    x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
    return x[:, None]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 1, H, W]`` to ``[N, 1, size, size]`` (area average when shrinking, bilinear otherwise)."""
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] >= size and x.shape[-2] >= size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _grid_pool(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Average ``[N, C, h, w]`` over a ``grid x grid`` partition of the plane, flattened to ``[N, C*grid*grid]``."""
    return F.adaptive_avg_pool2d(x, grid).flatten(1)


def _batched(fn, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = [fn(x[i:i + _BATCH]) for i in range(0, x.shape[0], _BATCH)]
    return torch.cat(out).to(torch.float32).numpy()


class PixelExtractor:
    """Area-downsampled pixels in [0, 1] (``size x size`` values): what the features have to beat."""

    def __init__(self, size: int = 16) -> None:
        self.size = int(size)
        self.name = f"pixels{self.size}"
        self.dim = self.size * self.size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _batched(lambda b: _resize(b, self.size).flatten(1), as_unit_float(images))


def scattering_channels(J: int, L: int) -> int:
    """Channels of an order-2 2D scattering transform: ``1 + J*L + L*L*J*(J-1)/2``."""
    return 1 + J * L + L * L * J * (J - 1) // 2


class Scattering:
    """Log-compressed, grid-pooled order-2 wavelet scattering (kymatio 2D) at ``size`` px: the one implementation.

    A plain object, not an ``nn.Module``: the filters are a function of ``(J, L, size)``, rebuilt, never stored.
    """

    def __init__(self, J: int = 2, L: int = 8, size: int = 64, grid: int = 1) -> None:
        # kymatio's package import pulls its 3D module, which fails with current SciPy; the 2D frontend does not.
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        self.J, self.L, self.size, self.grid = int(J), int(L), int(size), int(grid)
        if self.size % (2 ** self.J) or self.size // (2 ** self.J) < self.grid:
            raise ValueError(f"scattering at {self.size} px with J={self.J} leaves {self.size // 2 ** self.J} px "
                             f"maps: too small for a {self.grid}x{self.grid} grid (lower J or grid, or raise size)")
        self._transform = ScatteringTorch2D(J=self.J, shape=(self.size, self.size), L=self.L)
        self.name = f"scattering_J{self.J}_L{self.L}_{self.size}px_g{self.grid}"
        self.dim = scattering_channels(self.J, self.L) * self.grid * self.grid

    @torch.no_grad()
    def raw(self, x01: Tensor) -> Tensor:
        """``[B, 1, H, W]`` images in [0, 1] -> ``log(1 + S / 0.01)`` averaged over the grid: ``[B, dim]``."""
        if self._transform.tensor0.device != x01.device:
            self._transform.to(x01.device)
        s = self._transform(_resize(x01, self.size)[:, 0].contiguous())
        return torch.log1p(_grid_pool(s, self.grid) / 0.01)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """:class:`FeatureExtractor` form: uint8 or [0, 1] images ``[N, H, W]`` -> ``float32 [N, dim]``."""
        return _batched(self.raw, as_unit_float(images))


class _FrozenBackbone(nn.Module):
    """What every frozen backbone does after its raw features: phantom-statistics standardisation (buffers ``mean``,
    ``std``, computed once per process and setting from the fixed public phantom stream) and unit norm per image.
    Subclasses set ``out_dim`` and implement :meth:`raw` on ``[B, 1, H, W]`` images in [0, 1]."""

    image_size: int
    out_dim: int

    def _set_statistics(self, key: tuple[Any, ...], extractor: FeatureExtractor) -> None:
        if key not in _STATS_CACHE:
            _STATS_CACHE[key] = phantom_statistics(extractor, size=self.image_size)
        stats = _STATS_CACHE[key]
        self.register_buffer("mean", torch.from_numpy(stats.mean.copy()))
        self.register_buffer("std", torch.from_numpy(stats.std.copy()))

    def raw(self, x01: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Standardised unit-norm features ``[B, out_dim]`` of images ``[B, 1, H, W]`` in [-1, 1] (no gradient)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images [B,1,H,W], got {tuple(x.shape)}")
        z = (self.raw((x.float() + 1.0) * 0.5) - self.mean) / self.std
        return z / z.norm(dim=1, keepdim=True).clamp_min(1e-8)


class ScatteringBackbone(_FrozenBackbone):
    """Frozen wavelet-scattering features for a DP head to stand on (Tramèr & Boneh, ICLR 2021).

    ``[B, 1, H, W]`` images in [-1, 1] (the downstream batches of :mod:`common.data.tensors`) go through
    :class:`Scattering` (resized to ``size`` px, default ``min(64, image_size)``), are standardised with the mean
    and std of the same features over public phantoms of every scanner profile (:func:`phantom_statistics`, fixed
    seed) and scaled to unit L2 norm per image. Every step is fixed or computed from public data: nothing a site
    trains on can change these features, and the unit norm bounds a linear head's per-example gradient by the
    features alone.

    The module has no parameters. The phantom statistics are buffers (``mean``, ``std``; a checkpoint carries the
    normalisation it was trained with); the transform is a plain attribute, not a submodule, so its filters are
    never stored or sent.
    """

    def __init__(self, image_size: int, *, J: int = 2, L: int = 8, grid: int = 2, size: int | None = None) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.scattering = Scattering(J=J, L=L, size=min(64, self.image_size) if size is None else size, grid=grid)
        self.out_dim = self.scattering.dim
        sc = self.scattering
        self._set_statistics((self.image_size, sc.J, sc.L, sc.grid, sc.size), sc)

    @property
    def name(self) -> str:
        return self.scattering.name

    def raw(self, x01: Tensor) -> Tensor:
        return self.scattering.raw(x01)


_STATS_CACHE: dict[tuple[Any, ...], "FeatureStats"] = {}


# -- (b) an encoder trained on public phantoms ------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderConfig:
    """Shape and training settings of the phantom encoder (stored beside its weights)."""

    size: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 96)
    images_per_profile: int = 400
    steps: int = 700
    batch_size: int = 48
    lr: float = 2e-3
    seed: int = 0
    public_batch: int = 16  # images per step from the public real scans, when any are given
    # draw the public images plane-balanced (a plane, then one of its images) instead of uniformly: for public sets
    # dominated by one plane (HC18 is brain only), so that the encoder does not learn the public plane mix
    public_balanced: bool = False
    # weight of an auxiliary objective on the phantoms of the fetal planes: regress the anatomy's apparent size
    # (:func:`apparent_size`, known exactly for a phantom and its augmentation) from the pooled features, so that
    # they carry what a GA head reads. 0: plane classification only (every encoder trained before this option)
    size_weight: float = 0.0


class PublicImages(Protocol):
    """Labelled public real scans for the encoder (:class:`common.data.public.PublicImages`): no site's data."""

    images: np.ndarray  # uint8 [N, H, W]
    planes: np.ndarray  # int64 [N], indices into PLANES
    source: dict[str, Any]  # what an auditor needs: layout, folder, image count, pixel digest


# the planes whose phantom anatomy grows with GA (the size objective's examples); maternal cervix and "other" do not
SIZE_PLANES: tuple[int, ...] = tuple(PLANES.index(p) for p in ("fetal_brain", "fetal_abdomen", "fetal_femur",
                                                                "fetal_thorax"))


def apparent_size(ga_weeks: Tensor, spacing_mm: Tensor, size: int, zoom: Tensor | float = 1.0) -> Tensor:
    """``log(HC(GA) / field of view) + log(zoom)``: how large the fetus of that GA looks in a ``size`` px image of
    that pixel spacing, magnified ``zoom`` times (an augmentation's scale). The GA regressor's ``log_hc`` output
    reads this quantity off a brain image; the other fetal planes' anatomy follows the same GA, so their apparent
    size moves with it (each plane gets its own output of the encoder's size head)."""
    hc = torch.as_tensor(hc_from_ga(np.asarray(ga_weeks, dtype=np.float64)), dtype=torch.float32)
    return torch.log(hc) - torch.log(spacing_mm.float() * size) + torch.log(torch.as_tensor(zoom, dtype=torch.float32))


def _plane_size(size_pred: Tensor, planes: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's own plane's output of the size head ``[N, num_classes]``, and the mask of the images whose
    plane grows with GA (:data:`SIZE_PLANES`): the examples the size objective is fitted and scored on."""
    return size_pred.gather(1, planes[:, None])[:, 0], torch.isin(planes, torch.tensor(SIZE_PLANES))


class PhantomEncoder(nn.Module):
    """A strided stem, then conv3x3-GroupNorm-SiLU-avgpool blocks; global pooling; a linear plane head; with
    ``size_head``, also a linear head from the pooled features to each plane's apparent size (training only)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96), num_classes: int = len(PLANES), *,
                 size_head: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 5, stride=2, padding=2),
                                   nn.GroupNorm(4, widths[0]), nn.SiLU()]
        c_in = widths[0]
        for c in widths[1:]:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.feature_dim = 2 * c_in
        self.size_head = nn.Linear(self.feature_dim, num_classes) if size_head else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean and standard deviation of the last block's channels: ``[N, 2 * widths[-1]]``."""
        return self._pool(self.trunk(x * 2.0 - 1.0))

    @staticmethod
    def _pool(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x * 2.0 - 1.0).mean(dim=(2, 3)))

    def forward_with_size(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(plane logits, apparent size per plane [N, num_classes] in standardised units)`` from one trunk pass."""
        if self.size_head is None:
            raise ValueError("this encoder has no size head (EncoderConfig.size_weight = 0)")
        h = self.trunk(x * 2.0 - 1.0)
        return self.head(h.mean(dim=(2, 3))), self.size_head(self._pool(h))


def augment(x: torch.Tensor, gen: torch.Generator, *, return_zoom: bool = False
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heavy random augmentation of ``[N, 1, H, W]`` images in [0, 1]: affine (rotation +-35 deg, scale 0.7-1.35,
    shift +-15 %, flip), gamma 0.5-2, contrast/brightness, blur, multiplicative speckle, additive noise, cut-out.
    With ``return_zoom``, also each image's magnification ``[N]`` (the affine scale: anatomy looks that much larger)."""
    n, dev = x.shape[0], x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((n, *shape), generator=gen).to(dev)

    angle = u(-0.61, 0.61)
    scale = u(0.7, 1.35)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(dev)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, u(-0.15, 0.15)], 1),
                         torch.stack([sin * flip, cos, u(-0.15, 0.15)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    y = y.clamp(0, 1) ** torch.exp(u(-0.7, 0.7, 1, 1, 1))
    y = y * u(0.6, 1.5, 1, 1, 1) + u(-0.1, 0.1, 1, 1, 1)
    blur = torch.rand(n, generator=gen).to(dev) < 0.4
    if bool(blur.any()):
        k = torch.tensor([1.0, 2.0, 1.0], device=dev)
        k = (k[:, None] * k[None, :] / 16.0)[None, None]
        y = torch.where(blur[:, None, None, None], F.conv2d(y, k, padding=1), y)
    speckle = torch.randn(y.shape, generator=gen).to(dev) * u(0.0, 0.35, 1, 1, 1)
    y = y * (1.0 + speckle) + torch.randn(y.shape, generator=gen).to(dev) * u(0.0, 0.05, 1, 1, 1)
    side = x.shape[-1]
    cut = torch.rand(n, generator=gen) < 0.3
    for i in torch.nonzero(cut).flatten().tolist():
        h = int(torch.randint(side // 8, side // 3, (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(0, side - h, (2,), generator=gen))
        y[i, :, r:r + h, c:c + h] = 0.0
    return (y.clamp(0, 1), scale.cpu()) if return_zoom else y.clamp(0, 1)


def _phantom_images(n_per_profile: int, *, size: int, seed: int, with_ga: bool = False) -> tuple[np.ndarray, ...]:
    """``n_per_profile`` phantoms of every scanner profile (uniform planes): uint8 images and plane labels (and,
    ``with_ga``, GA weeks and pixel spacing in mm)."""
    images, labels, ga, spacing = [], [], [], []
    for k, profile in enumerate(SCANNER_PROFILES):
        for r in make_phantoms(int(n_per_profile), size=size, seed=seed * 1000 + k, profile=profile,
                               site="public", id_prefix=f"public-{profile}"):
            images.append(r.image)
            labels.append(r.plane)
            ga.append(r.ga_weeks)
            spacing.append(r.pixel_spacing_mm)
    out = (np.stack(images), np.asarray(labels, dtype=np.int64))
    return out + (np.asarray(ga, np.float32), np.asarray(spacing, np.float32)) if with_ga else out


def public_indices(planes: Tensor, n: int, gen: torch.Generator, *, balanced: bool) -> Tensor:
    """``n`` indices into the public images: uniform, or ``balanced`` (a plane uniformly among those present, then
    one of its images uniformly), so that a public set dominated by one plane does not set the encoder's plane mix."""
    if not balanced:
        return torch.randint(0, len(planes), (n,), generator=gen)
    by_plane = [torch.nonzero(planes == c).flatten() for c in torch.unique(planes)]
    which = torch.randint(0, len(by_plane), (n,), generator=gen).tolist()
    return torch.stack([by_plane[c][torch.randint(0, len(by_plane[c]), (1,), generator=gen)[0]] for c in which])


def train_phantom_encoder(folder: str | Path, cfg: EncoderConfig = EncoderConfig(), *, log_every: int = 100,
                          public: Sequence[PublicImages] = ()) -> Path:
    """Train :class:`PhantomEncoder` on augmented plane classification of phantoms (and, when ``public`` is given,
    of public labelled real scans: ``cfg.public_batch`` of them join every batch); save to ``folder``.

    Public data only. Writes ``encoder.safetensors`` and ``encoder.json`` (config, phantom accuracy, wall time, and
    every source: the phantom profiles and each public folder with its image count and pixel digest). Resumable in
    the coarse sense: an existing complete folder is returned as is.
    """
    folder = Path(folder)
    if (folder / "encoder.safetensors").is_file() and (folder / "encoder.json").is_file():
        return folder
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels, ga, spacing = _phantom_images(cfg.images_per_profile, size=cfg.size, seed=cfg.seed + 1,
                                                  with_ga=True)
    held_images, held_labels, held_ga, held_spacing = _phantom_images(40, size=cfg.size, seed=cfg.seed + 7,
                                                                      with_ga=True)
    x_all, y_all = as_unit_float(images), torch.from_numpy(labels)
    if cfg.size_weight > 0:  # standardised with the public phantoms' own mean and std
        size_raw = apparent_size(torch.from_numpy(ga), torch.from_numpy(spacing), cfg.size)
        fetal = torch.isin(y_all, torch.tensor(SIZE_PLANES))
        size_center, size_scale = float(size_raw[fetal].mean()), float(size_raw[fetal].std())
        size_target = (size_raw - size_center) / size_scale
    if public:
        x_pub = torch.cat([as_unit_float(p.images) for p in public])
        y_pub = torch.from_numpy(np.concatenate([p.planes for p in public]))
        if x_pub.shape[-1] != cfg.size:
            raise ValueError(f"public images are {x_pub.shape[-1]} px; the encoder trains at {cfg.size} px")
    model = PhantomEncoder(cfg.widths, size_head=cfg.size_weight > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=gen)
        xb, yb = x_all[idx], y_all[idx]
        if public:
            j = public_indices(y_pub, cfg.public_batch, gen, balanced=cfg.public_balanced)
            xb, yb = torch.cat([xb, x_pub[j]]), torch.cat([yb, y_pub[j]])
        if cfg.size_weight > 0:  # phantoms first in the batch: their apparent size under the augmentation is known
            xa, zoom = augment(xb, gen, return_zoom=True)
            logits, size_pred = model.forward_with_size(xa)
            pred, m = _plane_size(size_pred[: len(idx)], y_all[idx])
            target = size_target[idx] + torch.log(zoom[: len(idx)]) / size_scale
            size_loss = F.mse_loss(pred[m], target[m]) if bool(m.any()) else pred.sum() * 0.0
            loss = F.cross_entropy(logits, yb) + cfg.size_weight * size_loss
        else:
            loss = F.cross_entropy(model(augment(xb, gen)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  phantom encoder step {step + 1}/{cfg.steps} loss {float(loss):.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        acc = float((model(as_unit_float(held_images)).argmax(1).numpy() == held_labels).mean())
        extra: dict[str, Any] = {}
        if model.size_head is not None:  # held-out apparent-size error (log units) on unaugmented fetal-plane phantoms
            _, size_pred = model.forward_with_size(as_unit_float(held_images))
            pred, m = _plane_size(size_pred, torch.from_numpy(held_labels))
            pred = pred * size_scale + size_center
            truth = apparent_size(torch.from_numpy(held_ga), torch.from_numpy(held_spacing), cfg.size)
            extra["phantom_heldout_size_rmse_log"] = round(float(((pred - truth)[m] ** 2).mean().sqrt()), 4)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "encoder.safetensors"))
    meta = {"format": ENCODER_FORMAT, "config": asdict(cfg), "phantom_heldout_accuracy": acc,
            "train_seconds": round(time.perf_counter() - t0, 1), "data": "phantoms of every scanner profile: "
            + ", ".join(SCANNER_PROFILES) + ("; public real scans: " + ", ".join(
                f"{p.source['layout']} ({p.source['images']} images)" for p in public) if public else ""),
            "public_sources": [p.source for p in public], **extra}
    (folder / "encoder.json").write_text(json.dumps(meta, indent=2))
    return folder


def flip_average(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` averaged over the four flips of ``[B, 1, H, W]`` images (none, left-right, up-down, both).

    The average is the same for an image and any of its flips (the four flips form a group), so features of
    anatomy whose size or plane does not depend on orientation lose the part of their noise that does: on HC18
    heads a linear GA head on flip-averaged ``public_cnn`` features errs 7.0 days non-privately and 9.2 under DP at
    eps = 10, against 7.8 and 9.6 without (README, "Flip-averaged features for the GA regressor")."""
    return (fn(x) + fn(x.flip(-1)) + fn(x.flip(-2)) + fn(x.flip(-2, -1))) / 4


class PhantomEncoderExtractor:
    """Pooled last-block features (mean and std per channel) of a :class:`PhantomEncoder` trained on phantoms;
    with ``flips=True`` averaged over the four flips of each image (:func:`flip_average`)."""

    def __init__(self, folder: str | Path, *, flips: bool = False) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "encoder.json").read_text())
        if meta.get("format") != ENCODER_FORMAT:
            raise ValueError(f"{folder} is not a phantom encoder folder (format {meta.get('format')!r})")
        self.meta = meta
        cfg = meta["config"]
        self.size = int(cfg["size"])
        self.model = PhantomEncoder(tuple(cfg["widths"]), size_head=float(cfg.get("size_weight", 0.0)) > 0)
        self.model.load_state_dict(load_file(str(folder / "encoder.safetensors")), strict=True)
        # the size head served training only: without it every encoder's state dict has the same keys (a checkpoint
        # keeps its backbone's weights)
        self.model.size_head = None
        self.model.eval().requires_grad_(False)
        self.flips = bool(flips)
        self.name = "phantom_cnn_flips" if self.flips else "phantom_cnn"
        self.dim = self.model.feature_dim

    def features01(self, x01: torch.Tensor) -> torch.Tensor:
        """Features of ``[B, 1, H, W]`` images in [0, 1] (no gradient bookkeeping here: callers decide)."""
        one = lambda v: self.model.features(_resize(v, self.size))  # noqa: E731
        return flip_average(one, x01) if self.flips else one(x01)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _batched(self.features01, as_unit_float(images))


def public_ga_head_file(image_size: int, *, flips: bool = False) -> str:
    """File name of an encoder folder's public GA warm-start head for images of ``image_size`` px (fitted on
    flip-averaged features when ``flips``: a head only fits the features it was fitted on)."""
    return f"public_ga_head_{int(image_size)}{'_flips' if flips else ''}.safetensors"


def public_head_file(image_size: int) -> str:
    """File name of an encoder folder's public warm-start head for images of ``image_size`` px."""
    return f"public_head_{int(image_size)}.safetensors"


def fit_softmax(z: Tensor, y: Tensor, *, num_classes: int, l2: float, max_iter: int = 200,
                weight: Tensor | None = None) -> nn.Linear:
    """Non-private multinomial logistic regression on fixed features ``z`` (zero init, full-batch L-BFGS, L2 ``l2``
    on the weights). ``weight`` (one non-negative number per row, not all zero) makes the loss the weighted mean of the
    rows' cross-entropies; ``None`` is the plain mean."""
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=z.dtype)
        if weight.shape != (len(z),) or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()) \
                or float(weight.sum()) <= 0:
            raise ValueError(f"weight must hold one finite non-negative number per row ({len(z)}), not all zero; "
                             f"got shape {tuple(weight.shape)}")
    head = nn.Linear(z.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        ce = F.cross_entropy(head(z), y) if weight is None else \
            (F.cross_entropy(head(z), y, reduction="none") * weight).sum() / weight.sum()
        loss = ce + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def fit_public_head(backbone: nn.Module, images: np.ndarray, planes: np.ndarray, *, l2: float = 1e-4,
                    num_classes: int = len(PLANES)) -> tuple[dict[str, Tensor], float]:
    """:func:`fit_softmax` on ``backbone``'s features of PUBLIC labelled images (uint8 ``[N, H, W]`` at the
    backbone's image size): ``({"weight", "bias"}, training accuracy)``. Planes absent from the public images get a
    low logit; the classifier's label scope masks what is out of scope."""
    with torch.no_grad():
        z = backbone(as_unit_float(images) * 2.0 - 1.0)
    y = torch.as_tensor(planes, dtype=torch.long)
    head = fit_softmax(z, y, num_classes=num_classes, l2=l2, max_iter=500)
    with torch.no_grad():
        acc = float((head(z).argmax(1) == y).float().mean())
    return {k: v.detach().contiguous() for k, v in head.state_dict().items()}, acc


class PhantomEncoderBackbone(_FrozenBackbone):
    """The shipped phantom encoder (:func:`train_phantom_encoder`, public phantoms only), frozen, as a backbone.

    Images are resized to the encoder's size (64 px) and pooled to its last block's channel means and stds, then
    standardised and scaled as every :class:`_FrozenBackbone`. Its weights are parameters with
    ``requires_grad=False``: no site trains them (they are never sent:
    :func:`common.models.downstream.federated_state`), and a checkpoint keeps them. The encoder has GroupNorm only,
    so train and eval mode compute the same features.
    """

    def __init__(self, image_size: int, folder: str | Path | None = None, *, flips: bool = False) -> None:
        super().__init__()
        from common.models.assets import asset_folder

        folder = Path(folder) if folder is not None else asset_folder(PHANTOM_ENCODER_ASSET)
        if not (folder / "encoder.safetensors").is_file():
            raise FileNotFoundError(f"phantom encoder weights missing at {folder}: set $DIFUSAL_ASSETS to the "
                                    "project's common/assets, or train them with "
                                    "common.models.features.train_phantom_encoder(folder)")
        extractor = PhantomEncoderExtractor(folder, flips=flips)
        self.image_size = int(image_size)
        self.encoder = extractor.model
        self._extractor = extractor  # a plain attribute: its model is self.encoder, stored once
        self.flips = extractor.flips
        self.size = extractor.size
        self.out_dim = extractor.dim
        self.requires_grad_(False)
        self._set_statistics(("phantom_cnn", self.image_size, str(folder), self.flips), extractor)
        # a softmax head fitted on the folder's PUBLIC labelled scans at this image size (fit_public_head), if shipped:
        # the classifier's public warm start. Not a parameter or buffer: never in a state dict, never sent.
        head = folder / public_head_file(self.image_size)
        self.public_head = ({k: v.clone() for k, v in load_file(str(head)).items()} if head.is_file() else None)
        # and a GA head fitted on public phantoms (common.models.downstream.fit_public_ga_head): the regressor's
        ga_head = folder / public_ga_head_file(self.image_size, flips=self.flips)
        self.public_ga_head = ({k: v.clone() for k, v in load_file(str(ga_head)).items()} if ga_head.is_file()
                               else None)
        meta = extractor.meta
        # what a checkpoint's sidecar says this backbone (and its warm-start head) learned from: public data only
        self.provenance = {"encoder": folder.name, "data": meta.get("data"),
                           "public_sources": meta.get("public_sources", []),
                           "public_head": head.name if self.public_head is not None else None,
                           "public_ga_head": ga_head.name if self.public_ga_head is not None else None,
                           "flip_averaged": self.flips}

    def raw(self, x01: Tensor) -> Tensor:
        return self._extractor.features01(x01)


# -- (c) the shipped generator's encoder ------------------------------------------------------------------------
class UNetEncoderExtractor:
    """Down-block and mid-block activations of the shipped generator UNet, each averaged over space.

    The image (resized to the prior's size, scaled to [-1, 1]) goes in clean at ``timestep`` (a small noise level,
    so the network sees the nearly clean images it denoises there), conditioned on the null plane and unknown GA.
    """

    def __init__(self, generator_folder: str | Path, timestep: int = 20, grid: int = 1) -> None:
        from common.models.generator import load_generator

        self._model, _ = load_generator(Path(generator_folder))
        self._model.eval().requires_grad_(False)
        self.size = int(self._model.image_size)
        self.timestep, self.grid = int(timestep), int(grid)
        unet = self._model.unet
        self._blocks = [*unet.down_blocks, unet.mid_block]
        channels = [int(b.resnets[-1].out_channels) for b in self._blocks]
        self.name = f"unet_encoder_t{self.timestep}_g{self.grid}"
        self.dim = sum(channels) * self.grid * self.grid

    def _one(self, b: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)

        handles = [blk.register_forward_hook(hook) for blk in self._blocks]
        try:
            x = _resize(b, self.size) * 2.0 - 1.0
            n = x.shape[0]
            self._model(x, torch.full((n,), self.timestep, dtype=torch.long), torch.full((n,), -1),
                        torch.full((n,), float("nan")))
        finally:
            for h in handles:
                h.remove()
        return torch.cat([_grid_pool(h, self.grid) for h in captured], dim=1)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _batched(self._one, as_unit_float(images))


# -- normalisation from public statistics ---------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureStats:
    """Per-feature mean and standard deviation over public phantoms, and where they came from."""

    mean: np.ndarray
    std: np.ndarray
    n_images: int
    seed: int

    def apply(self, features: np.ndarray, *, unit_norm: bool = True) -> np.ndarray:
        """``(f - mean) / std``, then (``unit_norm``) each row scaled to Euclidean norm 1: a per-example operation,
        so a DP head's per-example gradient norm is bounded by the features alone."""
        z = (np.asarray(features, np.float32) - self.mean) / self.std
        if unit_norm:
            z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)
        return z.astype(np.float32)


def phantom_statistics(extractor: FeatureExtractor, *, n_per_profile: int = 40, size: int = 64,
                       seed: int = PHANTOM_STATS_SEED) -> FeatureStats:
    """Mean and std of ``extractor``'s features over ``n_per_profile`` phantoms of every scanner profile.

    Public data only: the function has no argument for private images, so no statistic of them can leak into the
    normalisation. The std is floored at 1e-3 of its median (features constant on phantoms do not explode).
    """
    images, _ = _phantom_images(n_per_profile, size=size, seed=seed)
    f = extractor(images)
    mean, std = f.mean(axis=0), f.std(axis=0)
    std = np.maximum(std, 1e-3 * max(float(np.median(std)), 1e-8))
    return FeatureStats(mean.astype(np.float32), std.astype(np.float32), int(images.shape[0]), int(seed))


def extractor_seconds_per_image(extractor: FeatureExtractor, images: np.ndarray, repeats: int = 1) -> float:
    """Wall seconds per image of ``extractor`` on ``images`` (best of ``repeats``)."""
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        extractor(images)
        best = min(best, time.perf_counter() - t0)
    return best / max(1, len(images))
