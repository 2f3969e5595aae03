"""The training noise schedule and the samplers, as diffusers schedulers."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from common.core.config import SchedulerName

# Linear betas of Ho et al. (2020), 1e-4..0.02 at T=1000, scaled by 1000/T as improved-diffusion's
# get_named_beta_schedule("linear") does, so that alpha_bar_T ~ 4e-5 for any T (diffusers' unscaled
# betas leave alpha_bar_T ~ e^-1 at T=100, the smoke preset). Not the cosine schedule: it drives
# alpha_bar_T to 2e-9, so with epsilon prediction x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) is amplified
# ~2e4x at the first solver step and DPM-Solver++ diverged in our measurement (|x| ~ 1e4).
BETA_START_T1000, BETA_END_T1000 = 1e-4, 0.02

AnyScheduler = DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler


def make_scheduler(name: SchedulerName, *, num_train_timesteps: int, prediction_type: str) -> AnyScheduler:
    """A diffusers noise scheduler sharing the training schedule (linear betas scaled to T).

    Parameters
    ----------
    name: ``"ddpm"`` (ancestral, Ho et al. 2020), ``"ddim"`` (Song et al. 2021, eta=0, trailing timesteps)
        or ``"dpmsolver"`` (DPM-Solver++ 2M, Lu et al. 2022).
    num_train_timesteps: T of the training schedule.
    prediction_type: ``"epsilon"`` or ``"v_prediction"``.

    Returns
    -------
    The scheduler.
    """
    scale = 1000.0 / num_train_timesteps
    common = {
        "num_train_timesteps": num_train_timesteps, "beta_schedule": "linear", "prediction_type": prediction_type,
        "beta_start": BETA_START_T1000 * scale, "beta_end": min(BETA_END_T1000 * scale, 0.999),
    }
    # Every sampler clips its x0 estimate to the data range [-1, 1] (DDPM/DDIM clip_sample, DPM-Solver++
    # thresholding with sample_max_value=1, which is then a plain clip): pixel-space images, Ho et al. 2020.
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=True)
    if name == "ddim":
        # "trailing" spacing starts sampling at t = T-1 (Lin et al. 2024, Table 2), better at few steps.
        return DDIMScheduler(**common, timestep_spacing="trailing", clip_sample=True)
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0
        )
    raise ValueError(f"scheduler {name!r} is unknown; choose one of ['ddpm', 'ddim', 'dpmsolver']")
