"""How a site generates and scores candidates for the coordinator (all post-processing of DP models).

Scores (higher = more of it): ``quality`` = the global plane classifier's probability of the requested
plane; ``uncertainty`` = normalised predictive entropy of the classifier plus the GA regressor's normalised
predicted std (where the downstream models would learn the most); ``novelty`` = distance, in the
classifier's feature space, to the nearest image the shared set already holds. ``memorization`` (optional)
reads the site's private images and is therefore NOT covered by DP; candidates carry a flag when it ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.active_learning.acquisition import entropy, novelty
from common.core.config import RunConfig
from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS
from common.diffusion.sampling import sample, to_uint8
from common.models.bundle import ModelBundle
from common.models.downstream import predict_ga, predict_planes

SCORE_NAMES: tuple[str, ...] = ("quality", "uncertainty", "entropy", "ga_std", "ga_error", "novelty")


@dataclass(frozen=True)
class Candidates:
    """Generated images with their conditions and scores."""

    images: np.ndarray  # uint8 [N, H, W]
    plane: np.ndarray  # int64 [N]
    ga: np.ndarray  # float32 [N] weeks
    scores: dict[str, np.ndarray]  # each float32 [N]


def generate(bundle: ModelBundle, cfg: RunConfig, plane: np.ndarray, ga: np.ndarray, *, seed: int) -> np.ndarray:
    """Sample one image per requested (plane, GA) with the configured solver and guidance; uint8 [N, H, W]."""
    images = sample(
        bundle.generator,
        plane=torch.as_tensor(plane, dtype=torch.long),
        ga=torch.as_tensor(ga, dtype=torch.float32),
        scheduler_name=cfg.sampling.scheduler,
        num_inference_steps=cfg.sampling.num_inference_steps,
        guidance_scale=cfg.sampling.guidance_scale,
        seed=seed,
    )
    return to_uint8(images)


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, 1, H, W] in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]


@torch.no_grad()
def features(bundle: ModelBundle, images: np.ndarray) -> np.ndarray:
    """Penultimate-layer features of the global plane classifier (the run's feature space)."""
    bundle.classifier.eval()
    x = to_model_input(images)
    return torch.cat([bundle.classifier.features(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy() \
        if len(x) else np.zeros((0, 1), np.float32)


def score(bundle: ModelBundle, images: np.ndarray, plane: np.ndarray, ga: np.ndarray,
          *, bank: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Quality, uncertainty (and its parts), GA consistency and novelty of each candidate.

    Synthetic images have no known pixel spacing; the GA regressor is fed NaN (its "unknown spacing" input).
    """
    x = to_model_input(images)
    probs = predict_planes(bundle.classifier, x).numpy()  # zero outside the label scope
    scope = list(bundle.classifier.planes)  # entropy over the in-scope planes, normalised to [0, 1]
    ent = entropy(probs[:, scope]) / np.log(len(scope)) if len(scope) > 1 else np.zeros(len(x))
    mean, std = predict_ga(bundle.regressor, x, torch.full((len(x),), float("nan")))
    ga_std = std.numpy() / (GA_MAX_WEEKS - GA_MIN_WEEKS)
    out = {
        "quality": probs[np.arange(len(plane)), plane],
        "entropy": ent,
        "ga_std": ga_std,
        "uncertainty": ent + ga_std,
        "ga_error": np.abs(mean.numpy() - ga),
        "novelty": novelty(features(bundle, images), bank),
    }
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def nearest_private_ratio(images: np.ndarray, private: np.ndarray, *, k: int = 10) -> np.ndarray:
    """Memorization check (reads private images; not covered by DP).

    For each candidate, the l2 distance (images normalised to zero mean, unit norm) to its nearest private
    image divided by the mean distance to its ``k`` nearest: near 0 means an isolated near-copy, the
    adaptive criterion of Carlini et al. 2023 ("Extracting training data from diffusion models").
    """
    a = _normalise(images)
    b = _normalise(private)
    d = np.sqrt(np.maximum(2.0 - 2.0 * a @ b.T, 0.0))
    d.sort(axis=1)
    kk = min(k, d.shape[1])
    return (d[:, 0] / (d[:, :kk].mean(axis=1) + 1e-12)).astype(np.float32)


def _normalise(images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
