"""Image-generation metrics."""

from __future__ import annotations

import numpy as np
from scipy import linalg


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID eq. 6).

    ``d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, with the matrix square root from
    ``scipy.linalg.sqrtm``; when it is not finite (singular covariances, few samples) ``eps * I`` is
    added to both covariances, as pytorch-fid does.

    Parameters
    ----------
    feats_a, feats_b: ``[N, D]`` and ``[M, D]`` feature arrays, N, M >= 2.
    eps: diagonal offset used only when the plain square root is not finite.

    Returns
    -------
    The squared Fréchet distance (>= 0).
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with the same D; got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(
            f"need at least 2 rows per feature set to estimate a covariance; got {a.shape[0]}, {b.shape[0]}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or inf")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    # Round-off can leave a tiny imaginary part; a large one means the product was badly conditioned.
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    d2 = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(d2, 0.0)
