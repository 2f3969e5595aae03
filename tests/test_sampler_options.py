"""Sampler settings (Karras sigmas, final sigma, spacing, order) are options of the solver, never of the schedule."""

from __future__ import annotations

import pytest
import torch

from common.core.config import GeneratorConfig
from common.diffusion.sampling import sample
from common.models.generator import build_generator
from common.models.noise_schedule import make_scheduler


def test_options_reach_the_solver_and_keep_the_training_schedule():
    base = make_scheduler("dpmsolver", num_train_timesteps=1000, prediction_type="epsilon")
    k = make_scheduler("dpmsolver", num_train_timesteps=1000, prediction_type="epsilon",
                       options={"use_karras_sigmas": True, "final_sigmas_type": "zero", "solver_order": 3})
    assert k.config.use_karras_sigmas and k.config.final_sigmas_type == "zero" and k.config.solver_order == 3
    assert not base.config.use_karras_sigmas and base.config.solver_order == 2
    assert torch.equal(base.betas, k.betas)  # same noise levels as the model was trained with
    base.set_timesteps(20)
    k.set_timesteps(20)
    assert not torch.equal(base.timesteps, k.timesteps)  # Karras sigmas move the 20 sampled timesteps
    ddim = make_scheduler("ddim", num_train_timesteps=1000, prediction_type="epsilon",
                          options={"timestep_spacing": "linspace"})
    assert ddim.config.timestep_spacing == "linspace"


@pytest.mark.parametrize("bad", [{"beta_start": 0.001}, {"num_train_timesteps": 10}, {"use_karras_sigmas": True}])
def test_schedule_keys_and_foreign_options_are_refused(bad):
    name = "ddim" if "use_karras_sigmas" in bad else "dpmsolver"
    with pytest.raises(ValueError, match="not settable"):
        make_scheduler(name, num_train_timesteps=1000, prediction_type="epsilon", options=bad)


def test_sample_passes_options_and_stays_deterministic():
    model = build_generator(GeneratorConfig(block_out_channels=(8, 16, 16), num_train_timesteps=50),
                            image_size=16, seed=0)
    cond = dict(plane=torch.tensor([0, 1]), ga=torch.tensor([20.0, 30.0]), num_inference_steps=5, seed=3)
    a = sample(model, **cond)
    b = sample(model, **cond, sampler_options={"use_karras_sigmas": True})
    c = sample(model, **cond, sampler_options={"use_karras_sigmas": True})
    assert torch.equal(b, c) and not torch.equal(a, b)
