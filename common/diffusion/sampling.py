"""Classifier-free-guided sampling with diffusers schedulers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from common.core.config import SchedulerName
from common.diffusion.schedulers import make_scheduler
from common.models.generator import ConditionalUNet


def _guided_output(
    model: ConditionalUNet, x: torch.Tensor, t: torch.Tensor, cond: tuple, uncond: tuple, guidance_scale: float
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): ``u + s * (c - u)``; s=0 -> u, s=1 -> c."""
    if guidance_scale == 0.0:
        return model(x, t, *uncond)
    if guidance_scale == 1.0:
        return model(x, t, *cond)
    both = [torch.cat([c, u]) if c is not None else None for c, u in zip(cond, uncond)]
    out_c, out_u = model(torch.cat([x, x]), t, *both).chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


@torch.no_grad()
def sample(
    model: ConditionalUNet,
    *,
    plane: torch.Tensor,
    ga: torch.Tensor,
    site: torch.Tensor | None = None,
    scheduler_name: SchedulerName = "dpmsolver",
    num_inference_steps: int = 20,
    guidance_scale: float = 2.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    sampler_options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Draw one image per condition row with a diffusers scheduler and classifier-free guidance.

    Parameters
    ----------
    model: the generator (its config gives T and the prediction type).
    plane: ``[N]`` plane indices (-1 = unconditional).
    ga: ``[N]`` gestational ages in weeks (NaN = unconditional / unknown).
    site: ``[N]`` site indices or None.
    scheduler_name: ``"ddpm"``, ``"ddim"`` or ``"dpmsolver"``.
    num_inference_steps: solver steps (``ddpm`` with T steps is the reference ancestral sampler).
    guidance_scale: s; 0 = unconditional, 1 = conditional without guidance.
    seed: the initial noise (and DDPM's per-step noise) depends only on this, not on the conditions.
    batch_size: rows per model call (guidance doubles it).
    device: where to sample.
    sampler_options: solver settings (:data:`common.models.noise_schedule.SAMPLER_OPTIONS`), e.g. Karras sigmas.

    Returns
    -------
    Float tensor ``[N, 1, H, W]`` in [-1, 1], on the CPU.
    """
    plane = torch.as_tensor(plane).long().reshape(-1)
    ga = torch.as_tensor(ga, dtype=torch.float32).reshape(-1)
    n = plane.shape[0]
    if ga.shape[0] != n or (site is not None and torch.as_tensor(site).reshape(-1).shape[0] != n):
        raise ValueError(f"plane, ga (and site) must have the same length; got {n}, {ga.shape[0]}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 0")
    if num_inference_steps < 1 or batch_size < 1:
        raise ValueError("num_inference_steps and batch_size must be >= 1")
    size = model.image_size
    was_training = model.training
    model.eval().to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # All initial noise up front: with a deterministic solver a sample depends on (seed, row), not batch_size.
    noise = torch.randn((n, 1, size, size), generator=generator)
    out = []
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            m = stop - start
            cond = (
                plane[start:stop].to(device), ga[start:stop].to(device),
                torch.as_tensor(site).reshape(-1)[start:stop].long().to(device) if site is not None else None,
            )
            uncond = (torch.full((m,), -1, device=device), torch.full((m,), float("nan"), device=device),
                      torch.full((m,), -1, device=device) if site is not None else None)
            # the model's own training schedule (saved with its weights), never today's constants; a stand-in
            # model without one (the audit's empirical denoiser) gets the default schedule of its config
            schedule = getattr(model, "scheduler_config", None)
            scheduler = (make_scheduler(scheduler_name, schedule=schedule, options=sampler_options)
                         if schedule is not None else
                         make_scheduler(scheduler_name, num_train_timesteps=model.generator_config.num_train_timesteps,
                                        prediction_type=model.generator_config.prediction_type,
                                        options=sampler_options))
            scheduler.set_timesteps(num_inference_steps, device=device)
            x = noise[start:stop].to(device) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(x, t)
                model_out = _guided_output(model, model_in, t, cond, uncond, guidance_scale)  # t broadcasts
                step_noise_gen = generator if scheduler_name == "ddpm" else None
                x = scheduler.step(model_out, t, x, generator=step_noise_gen).prev_sample
            out.append(x.clamp(-1.0, 1.0).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty((0, 1, size, size))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] ``[N, 1, H, W]`` to grayscale ``uint8`` ``[N, H, W]`` (the record image format)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [N, 1, H, W]; got {tuple(images.shape)}")
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return arr[:, 0].numpy().astype(np.uint8)
