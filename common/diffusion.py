"""DDPM training loss (per example, with DPDM noise multiplicity) and classifier-free-guided sampling.

The math lives here, apart from the network (improved-diffusion's ``gaussian_diffusion.py`` split);
noise schedules and solvers are diffusers schedulers (:func:`common.generator.make_scheduler`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from common.generator import ConditionalUNet, SchedulerName, make_scheduler

LossFn = Callable[[nn.Module, tuple], torch.Tensor]


def _drop(cond: torch.Tensor, keep: torch.Tensor, null: float) -> torch.Tensor:
    """Replace entries of ``cond`` where ``keep`` is False by the null token."""
    return torch.where(keep, cond, torch.full_like(cond, null))


def diffusion_loss(
    model: nn.Module,
    batch: tuple[torch.Tensor, ...],
    *,
    noise_scheduler: DDPMScheduler,
    noise_multiplicity: int = 1,
    cond_dropout: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-example DDPM loss ``[B]``, averaged over K noise/timestep draws per example.

    Target: the scheduler's ``prediction_type``. The default is ``"epsilon"`` (Ho et al. 2020, eq. 14,
    "L_simple"): it is what every diffusers solver expects by default and the best-studied objective at
    32-64 px; ``"v_prediction"`` (Salimans & Ho 2022, sec. 4) is available through the config and is
    better behaved at high noise levels (large t), where epsilon-prediction makes x0 estimates blow up.

    Noise multiplicity (Dockhorn et al. 2022, DPDM, eq. 8): each example's loss is the mean of K
    independent (t, noise) draws, so its one clipped gradient has lower variance at no privacy cost.
    The K draws are K *separate* forward calls of B rows, not one call of K*B rows: Opacus (hooks and
    functorch modes alike) computes per-sample gradients per row of each layer's input, and sums the
    contributions of repeated calls of a layer into the same row (its tied-parameter support, the
    ``_forward_counter`` / ``_current_grad_sample`` accumulation of ``GradSampleModule``). K separate calls
    therefore give exactly B per-sample gradients, each d(loss_i)/d(theta); a K*B-row call would give K*B
    rows, i.e. K clipped contributions per example and a K-times larger sensitivity.

    Parameters
    ----------
    model: a :class:`ConditionalUNet` (possibly wrapped by Opacus).
    batch: ``(images [B,1,H,W] in [-1,1], plane [B] int64, ga [B] float32 (NaN unknown), spacing [B])``,
        optionally followed by ``site [B] int64``.
    noise_scheduler: the training :class:`DDPMScheduler` (schedule and prediction type).
    noise_multiplicity: K >= 1.
    cond_dropout: probability of replacing each condition (plane, GA, site) independently by its null
        token (classifier-free guidance training, Ho & Salimans 2022, Alg. 1).
    generator: RNG for timesteps, noise and dropout (default: the global RNG).

    Returns
    -------
    Tensor ``[B]`` of per-example losses.
    """
    if noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity={noise_multiplicity} must be >= 1")
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"cond_dropout={cond_dropout} must be in [0, 1)")
    if len(batch) < 3:
        raise ValueError("batch must be (images, plane, ga, spacing[, site]); got fewer than 3 tensors")
    images, plane, ga = batch[0], batch[1], batch[2]
    site = batch[4] if len(batch) > 4 else None
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(images.shape)}")
    device = images.device
    rng_device = generator.device if generator is not None else device
    b = images.shape[0]
    num_t = int(noise_scheduler.config.num_train_timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    plane = plane.to(device).long()
    ga = ga.to(device).float()
    site = site.to(device).long() if site is not None else None
    losses = []
    for _ in range(noise_multiplicity):
        t = torch.randint(0, num_t, (b,), generator=generator, device=rng_device).to(device)
        noise = torch.randn(images.shape, generator=generator, device=rng_device).to(device, images.dtype)
        keep = torch.rand((3, b), generator=generator, device=rng_device).to(device) >= cond_dropout
        noisy = noise_scheduler.add_noise(images, noise, t)  # x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(images, noise, t)  # v = sqrt(abar) eps - sqrt(1-abar) x0
        else:
            raise ValueError(f"prediction_type={prediction_type!r} is not supported; use epsilon or v_prediction")
        site_k = _drop(site, keep[2], -1) if site is not None else None
        pred = model(noisy, t, _drop(plane, keep[0], -1), _drop(ga, keep[1], float("nan")), site_k)
        losses.append(((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)))
    return torch.stack(losses).mean(dim=0)


def make_loss_fn(
    noise_scheduler: DDPMScheduler, *, noise_multiplicity: int, cond_dropout: float, seed: int
) -> LossFn:
    """A ``loss_fn(model, batch) -> [B]`` for ``train_private``, with its own seeded CPU RNG.

    Parameters
    ----------
    noise_scheduler: training scheduler.
    noise_multiplicity: K draws per example (DPDM).
    cond_dropout: classifier-free guidance dropout probability.
    seed: seeds the loss' RNG (timesteps, noise, dropout), independent of the global RNG.

    Returns
    -------
    The loss function.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        """Per-example diffusion loss of ``batch``."""
        return diffusion_loss(
            model, batch, noise_scheduler=noise_scheduler, noise_multiplicity=noise_multiplicity,
            cond_dropout=cond_dropout, generator=generator,
        )

    return loss_fn


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
    cfg = model.generator_config
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
            scheduler = make_scheduler(
                scheduler_name, num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type
            )
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
