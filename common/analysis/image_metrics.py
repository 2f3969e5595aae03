"""How good is a synthetic image set: LPIPS, Fréchet distance, KID, k-NN precision/recall, diversity.

Every set-level metric here is computed in a *named* feature space given by the caller (in this project: the
penultimate layer of a plane classifier trained on the run's real data, see :mod:`common.analysis.evaluation`), because
the Inception network of FID/KID is not available offline. Numbers from different feature spaces are not
comparable, so every result dict carries ``feature_space``.

LPIPS (Zhang et al. 2018) needs ImageNet AlexNet weights. They are never downloaded here: :func:`load_lpips`
reads them from the torch hub cache and fails with instructions when the file is missing.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.analysis.metrics import frechet_distance

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet (AlexNet_Weights.IMAGENET1K_V1)
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
LPIPS_MIN_SIZE = 64  # AlexNet's stride-4 conv + 3 max-pools need >= ~40 px; smaller images are upsampled


# -- LPIPS -----------------------------------------------------------------------------------------------
def alexnet_weights_path() -> Path:
    """Where :func:`load_lpips` looks for the AlexNet weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def load_lpips(*, weights: Path | None = None, device: str = "cpu") -> nn.Module:
    """Calibrated LPIPS-AlexNet (Zhang et al. 2018, v0.1) from local files only.

    Parameters
    ----------
    weights:
        The torchvision AlexNet ImageNet state dict; default :func:`alexnet_weights_path`.
    device:
        Torch device of the returned model.

    Returns
    -------
    The ``lpips.LPIPS`` module in eval mode (inputs ``[N, 3, H, W]`` in [-1, 1]).
    """
    import lpips
    import torchvision

    path = Path(weights) if weights is not None else alexnet_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the ImageNet AlexNet weights at {path}, and this project never downloads at run time. "
            f"Provide them once: download {ALEXNET_URL} on a machine with network access and copy the file to "
            f"{path} (the folder is $TORCH_HOME/hub/checkpoints; set TORCH_HOME to choose it)."
        )
    # pnet_rand=False would call torchvision.models.alexnet(pretrained=True), which downloads; with pnet_rand=True
    # the trunk is built untrained (every weight of it is replaced below, or this function fails), and
    # pretrained=True only loads the linear heads shipped inside the lpips package (lpips/weights/v0.1/alex.pth).
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" warnings
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    alex = torchvision.models.alexnet(weights=None)
    try:
        alex.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, KeyError, OSError) as err:
        raise ValueError(f"{path} is not torchvision's AlexNet state dict ({err}); re-copy {ALEXNET_URL}") from err
    # lpips' alexnet splits torchvision's `features` into slice1..5, keeping each layer's index as its name.
    for sl in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for name, layer in sl.named_children():
            layer.load_state_dict(alex.features[int(name)].state_dict())
    return model.to(device).eval()


def _to_lpips_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W]`` or float ``[N, 1, H, W]`` in [-1, 1] -> float ``[N, 3, S, S]`` in [-1, 1], S >= 64."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"numpy images must be uint8 [N, H, W]; got {images.dtype} {images.shape}")
        x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    else:
        x = images.float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"tensor images must be [N, 1 or 3, H, W]; got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 identical channels
    if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
        x = F.interpolate(x, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def lpips_distance(model: nn.Module, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *,
                   batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Paired LPIPS ``d(a[i], b[i])`` for ``i < N``: float64 ``[N]``.

    Parameters
    ----------
    model:
        From :func:`load_lpips` (the tests pass one loaded with a stand-in AlexNet state dict).
    a, b:
        Same number of images, uint8 ``[N, H, W]`` or float ``[N, 1|3, H, W]`` in [-1, 1].
    """
    xa, xb = _to_lpips_input(a), _to_lpips_input(b)
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must hold as many images of one size; got {tuple(xa.shape)} and {tuple(xb.shape)}")
    out = [model(xa[i:i + batch_size].to(device), xb[i:i + batch_size].to(device)).reshape(-1).cpu()
           for i in range(0, xa.shape[0], batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def lpips_diversity(model: nn.Module, images: np.ndarray, *, max_pairs: int = 256, seed: int = 0,
                    device: str = "cpu") -> float:
    """Mean LPIPS over random distinct pairs of one set (higher = more diverse)."""
    i, j = _random_pairs(len(images), max_pairs, seed)
    return float(lpips_distance(model, images[i], images[j], device=device).mean())


# -- feature-space metrics --------------------------------------------------------------------------------
def _check_feats(name: str, x: np.ndarray, min_rows: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < min_rows:
        raise ValueError(f"{name} must be [N, D] with N >= {min_rows}; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]``."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _random_pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of up to ``max_pairs`` distinct pairs ``i != j`` (all pairs when there are few)."""
    if n < 2:
        raise ValueError(f"need at least 2 items for pairwise statistics; got {n}")
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False)
        i, j = i[pick], j[pick]
    return i, j


@dataclass(frozen=True)
class KIDResult:
    """Kernel Inception Distance over random subsets: mean and std of the unbiased MMD^2 estimates."""

    kid: float
    kid_std: float
    num_subsets: int
    subset_size: int


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Bińkowski et al. 2018, eq. 2 and Sec. 4)."""
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 50,
                              subset_size: int = 1000, seed: int = 0) -> KIDResult:
    """KID between two feature sets (unbiased, so it can be slightly negative for equal distributions).

    Parameters
    ----------
    real, fake:
        ``[N, D]`` and ``[M, D]`` features (N, M >= 2) of one feature space.
    num_subsets, subset_size:
        Subsets drawn without replacement from each set (size capped at ``min(N, M)``), as in the reference
        implementation; with ``subset_size >= min(N, M)`` every subset of the smaller set is the whole set.
    seed:
        Subset sampling.
    """
    a, b = _check_feats("real", real, 2), _check_feats("fake", fake, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and subset_size >= 2; got {num_subsets}, {subset_size}")
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = [_mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
            for _ in range(num_subsets)]
    return KIDResult(float(np.mean(vals)), float(np.std(vals)), num_subsets, size)


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds."""

    precision: float
    recall: float
    k: int


def _within_manifold(ref: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Whether each query lies in some ball B(ref_i, distance to ref_i's k-th nearest other ref) (paper eq. 1)."""
    d_ref = _pairwise(ref, ref)
    np.fill_diagonal(d_ref, np.inf)  # a point is not its own neighbour
    radius = np.sort(d_ref, axis=1)[:, k - 1]
    return (_pairwise(query, ref) <= radius[None, :] + 1e-9).any(axis=1)


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> PrecisionRecall:
    """Precision: share of ``fake`` inside the real manifold; recall: share of ``real`` inside the fake one.

    Parameters
    ----------
    real, fake:
        ``[N, D]`` and ``[M, D]`` features of one feature space, each with more than ``k`` rows.
    k:
        Neighbourhood size of the k-NN balls (the paper uses 3).
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    a, b = _check_feats("real", real, k + 1), _check_feats("fake", fake, k + 1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    return PrecisionRecall(float(_within_manifold(a, b, k).mean()), float(_within_manifold(b, a, k).mean()), k)


def mean_pairwise_distance(feats: np.ndarray, *, max_pairs: int = 4096, seed: int = 0) -> float:
    """Intra-set diversity: mean Euclidean distance over (up to ``max_pairs`` random) distinct pairs."""
    x = _check_feats("feats", feats, 2)
    i, j = _random_pairs(len(x), max_pairs, seed)
    return float(np.linalg.norm(x[i] - x[j], axis=1).mean())


def nearest_neighbours(query: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of and the Euclidean distance to its nearest ``bank`` row."""
    q, b = _check_feats("query", query, 1), _check_feats("bank", bank, 1)
    d = _pairwise(q, b)
    idx = d.argmin(axis=1)
    return idx, d[np.arange(len(q)), idx]


def feature_set_metrics(real: np.ndarray, fake: np.ndarray, *, feature_space: str, k: int = 3,
                        kid_subsets: int = 50, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FD, KID, precision/recall and diversity of ``fake`` against ``real`` in the named feature space.

    Parameters
    ----------
    real, fake:
        ``[N, D]`` / ``[M, D]`` features, N, M > ``k``.
    feature_space:
        What produced the features (written into the result; numbers are only comparable within one space).

    Returns
    -------
    ``{"feature_space", "n_real", "n_fake", "fd", "kid", "kid_std", "kid_subset_size", "precision", "recall",
    "knn_k", "diversity_fake", "diversity_real"}``.
    """
    kid = kernel_inception_distance(real, fake, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    pr = precision_recall(real, fake, k=k)
    return {
        "feature_space": feature_space, "n_real": int(len(real)), "n_fake": int(len(fake)),
        "fd": frechet_distance(real, fake), "kid": kid.kid, "kid_std": kid.kid_std,
        "kid_subset_size": kid.subset_size, "precision": pr.precision, "recall": pr.recall, "knn_k": pr.k,
        "diversity_fake": mean_pairwise_distance(fake, seed=seed),
        "diversity_real": mean_pairwise_distance(real, seed=seed),
    }


def as_dict(result: KIDResult | PrecisionRecall) -> dict[str, Any]:
    """Plain dict of a metric result (for JSON)."""
    return asdict(result)
