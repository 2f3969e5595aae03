"""DDPM training loss (per example, with DPDM noise multiplicity) and classifier-free-guided sampling.

The math lives here, apart from the network (improved-diffusion's ``gaussian_diffusion.py`` split);
noise schedules and solvers are diffusers schedulers (:func:`common.diffusion.schedulers.make_scheduler`).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

from common.privacy.dpsgd import LossFn


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
