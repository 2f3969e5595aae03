"""SDEdit (Meng et al., ICLR 2022): image-to-image variations by partial noising and denoising.

An image ``x0`` is noised to the timestep ``t0 = strength * T`` of the forward process,
``x_t0 = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps`` (Ho et al. 2020, eq. 4; diffusers' ``add_noise``), then
denoised from ``t0`` to 0 with the model: strength 0 returns the image, strength 1 is a fresh sample. Private
Evolution uses it for the variations of its winners, with a strength that falls over the iterations. Applied to the
DP generator it is post-processing: no private data is read.
"""

from __future__ import annotations

import torch

from common.diffusion.sampling import _guided_output
from common.diffusion.schedulers import make_scheduler
from common.models.generator import ConditionalUNet


@torch.no_grad()
def sdedit(model: ConditionalUNet, images: torch.Tensor, *, plane: torch.Tensor, ga: torch.Tensor, strength: float,
           num_inference_steps: int = 20, guidance_scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Variations of ``images`` ``[N, 1, H, W]`` in [-1, 1] at ``strength`` in [0, 1] (DDIM, eta = 0).

    The DDIM solver runs the last ``round(strength * num_inference_steps)`` of its ``num_inference_steps`` steps,
    from the image noised to the first of them. Returns ``[N, 1, H, W]`` in [-1, 1] on the CPU.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} must be in [0, 1]")
    if images.ndim != 4 or images.shape[1] != 1 or len(plane) != len(images) or len(ga) != len(images):
        raise ValueError(f"images must be [N, 1, H, W] with one plane and GA each; got {tuple(images.shape)}")
    x0 = images.float().cpu()
    schedule = getattr(model, "scheduler_config", None)
    scheduler = (make_scheduler("ddim", schedule=schedule) if schedule is not None else
                 make_scheduler("ddim", num_train_timesteps=model.generator_config.num_train_timesteps,
                                prediction_type=model.generator_config.prediction_type))
    scheduler.set_timesteps(num_inference_steps)
    steps = int(round(strength * len(scheduler.timesteps)))
    if steps == 0 or len(x0) == 0:
        return x0.clone()
    timesteps = scheduler.timesteps[len(scheduler.timesteps) - steps:]
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x0.shape, generator=generator)
    x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(x0)))
    plane, ga = torch.as_tensor(plane).long(), torch.as_tensor(ga, dtype=torch.float32)
    cond = (plane, ga, None)
    uncond = (torch.full_like(plane, -1), torch.full_like(ga, float("nan")), None)
    was_training = model.training
    model.eval()
    try:
        for t in timesteps:
            out = _guided_output(model, scheduler.scale_model_input(x, t), t, cond, uncond, guidance_scale)
            x = scheduler.step(out, t, x).prev_sample
    finally:
        model.train(was_training)
    return x.clamp(-1.0, 1.0).float()
