"""The training noise schedule and the samplers, as diffusers schedulers (below the diffusion layer: a generator
folder saves and loads its schedule, :mod:`common.models.generator`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from common.core.config import SchedulerName

# Linear betas of Ho et al. (2020), 1e-4..0.02 at T=1000, scaled by 1000/T as improved-diffusion's
# get_named_beta_schedule("linear") does, so that alpha_bar_T ~ 4e-5 for any T (diffusers' unscaled
# betas leave alpha_bar_T ~ e^-1 at T=100, the smoke preset). Not the cosine schedule: it drives
# alpha_bar_T to 2e-9, so with epsilon prediction x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) is amplified
# ~2e4x at the first solver step and DPM-Solver++ diverged in our measurement (|x| ~ 1e4).
BETA_START_T1000, BETA_END_T1000 = 1e-4, 0.02

AnyScheduler = DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler


# The keys of a saved scheduler config that define the training schedule (the rest are sampler settings).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr")


def training_schedule(num_train_timesteps: int, prediction_type: str) -> dict[str, Any]:
    """The training schedule of a new model: linear betas scaled to T (the constants above)."""
    scale = 1000.0 / num_train_timesteps
    return {
        "num_train_timesteps": num_train_timesteps, "beta_schedule": "linear", "prediction_type": prediction_type,
        "beta_start": BETA_START_T1000 * scale, "beta_end": min(BETA_END_T1000 * scale, 0.999),
    }


# Sampler settings a caller may change (the diffusers keyword arguments of the solver; never the training schedule).
SAMPLER_OPTIONS = {
    "ddpm": ("timestep_spacing",),
    "ddim": ("timestep_spacing",),
    "dpmsolver": ("timestep_spacing", "use_karras_sigmas", "final_sigmas_type", "solver_order", "lower_order_final",
                  "euler_at_final", "algorithm_type"),
}


def make_scheduler(
    name: SchedulerName,
    *,
    num_train_timesteps: int | None = None,
    prediction_type: str | None = None,
    schedule: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> AnyScheduler:
    """A diffusers noise scheduler sharing the training schedule.

    The schedule is ``schedule`` (a saved scheduler config, e.g. a loaded generator's ``scheduler_config``:
    only :data:`SCHEDULE_KEYS` are read) or, without it, :func:`training_schedule` of
    ``num_train_timesteps`` and ``prediction_type`` (a new model).

    Parameters
    ----------
    name: ``"ddpm"`` (ancestral, Ho et al. 2020), ``"ddim"`` (Song et al. 2021, eta=0, trailing timesteps)
        or ``"dpmsolver"`` (DPM-Solver++ 2M, Lu et al. 2022).
    num_train_timesteps: T of the training schedule (without ``schedule``).
    prediction_type: ``"epsilon"`` or ``"v_prediction"`` (without ``schedule``).
    schedule: a saved scheduler config; takes precedence over the two above.
    options: sampler settings of :data:`SAMPLER_OPTIONS` (e.g. ``{"use_karras_sigmas": True}``) over the defaults
        below; anything else is refused (a training-schedule key would silently change the model's noise levels).

    Returns
    -------
    The scheduler.
    """
    if schedule is not None:
        common = {k: schedule[k] for k in SCHEDULE_KEYS if k in schedule}
    elif num_train_timesteps is None or prediction_type is None:
        raise ValueError("make_scheduler needs schedule= or both num_train_timesteps= and prediction_type=")
    else:
        common = training_schedule(num_train_timesteps, prediction_type)
    # Every sampler clips its x0 estimate to the data range [-1, 1] (DDPM/DDIM clip_sample, DPM-Solver++
    # thresholding with sample_max_value=1, which is then a plain clip): pixel-space images, Ho et al. 2020.
    if name not in SAMPLER_OPTIONS:
        raise ValueError(f"scheduler {name!r} is unknown; choose one of {sorted(SAMPLER_OPTIONS)}")
    extra = dict(options or {})
    unknown = sorted(set(extra) - set(SAMPLER_OPTIONS[name]))
    if unknown:
        raise ValueError(f"sampler options {unknown} are not settable for {name!r}; allowed: {SAMPLER_OPTIONS[name]}")
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=True, **extra)
    if name == "ddim":
        # "trailing" spacing starts sampling at t = T-1 (Lin et al. 2024, Table 2), better at few steps.
        return DDIMScheduler(**common, clip_sample=True, **{"timestep_spacing": "trailing", **extra})
    return DPMSolverMultistepScheduler(
        **common, thresholding=True, sample_max_value=1.0,
        **{"algorithm_type": "dpmsolver++", "solver_order": 2, **extra})
