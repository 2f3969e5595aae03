"""Generator folders are diffusers-native: the scheduler config travels with the weights, the parts load with
``from_pretrained``, and legacy folders (the shipped prior-demo) keep loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

import common.models.noise_schedule as schedulers
from common.core.config import GeneratorConfig
from common.diffusion.sampling import sample
from common.models.generator import (
    ENCODER_DIR,
    SCHEDULER_DIR,
    SCHEDULER_JSON,
    UNET_DIR,
    ConditionEncoder,
    build_generator,
    load_generator,
    save_generator,
)

TINY = GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100)
PRIOR = Path(__file__).resolve().parents[1] / "common" / "assets" / "prior-demo" / "generator"


def _draw(model: torch.nn.Module, name: str = "ddim") -> torch.Tensor:
    return sample(model, plane=torch.tensor([0, 3, -1]), ga=torch.tensor([20.0, float("nan"), 30.0]),
                  scheduler_name=name, num_inference_steps=3, seed=5)


def test_scheduler_config_round_trips_and_a_changed_constant_does_not_change_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    model = build_generator(TINY, image_size=16, seed=0)
    folder = save_generator(model, tmp_path / "gen", sidecar={})
    saved_betas = DDPMScheduler.from_pretrained(str(folder), subfolder=SCHEDULER_DIR).betas.clone()

    # Execute
    monkeypatch.setattr(schedulers, "BETA_END_T1000", 0.03)
    loaded, _ = load_generator(folder)
    fresh = build_generator(TINY, image_size=16, seed=0)

    # Assert
    assert json.loads((folder / SCHEDULER_DIR / SCHEDULER_JSON).read_text())["num_train_timesteps"] == 100
    assert torch.equal(loaded.noise_scheduler("ddpm").betas, saved_betas)
    assert torch.equal(model.noise_scheduler("ddpm").betas, saved_betas)
    assert not torch.equal(fresh.noise_scheduler("ddpm").betas, saved_betas)  # the constant did change
    for name in ("ddim", "dpmsolver"):
        assert torch.equal(loaded.noise_scheduler(name).alphas_cumprod, model.noise_scheduler(name).alphas_cumprod)


def test_from_pretrained_parts_and_loaded_folder_give_the_same_samples(tmp_path: Path) -> None:
    # Prepare
    model = build_generator(GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100, attention=True),
                            image_size=16, seed=1)
    expected = _draw(model)

    # Execute
    folder = save_generator(model, tmp_path / "gen", sidecar={"seed": 1})
    encoder = ConditionEncoder.from_pretrained(str(folder), subfolder=ENCODER_DIR, local_files_only=True)
    unet = UNet2DModel.from_pretrained(str(folder / UNET_DIR), local_files_only=True)
    loaded, _ = load_generator(folder)

    # Assert
    assert torch.equal(_draw(loaded), expected)
    assert encoder.config.embed_dim == model.encoder.embed_dim
    for a, b in zip(encoder.state_dict().values(), model.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(unet.state_dict().values(), model.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["missing", "not json", "not a scheduler"])
def test_missing_or_corrupt_scheduler_config_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    # Prepare
    folder = save_generator(build_generator(TINY, image_size=16, seed=0), tmp_path / "gen", sidecar={})
    path = folder / SCHEDULER_DIR / SCHEDULER_JSON
    if damage == "missing":
        path.unlink()
    else:
        path.write_text("{truncated" if damage == "not json" else json.dumps({"_class_name": "DDPMScheduler"}))

    # Execute / Assert
    with pytest.raises((FileNotFoundError, ValueError), match="scheduler_config.json.*restore"):
        load_generator(folder)


def test_legacy_prior_demo_loads_and_resaves_with_the_same_samples(tmp_path: Path) -> None:
    # Prepare
    assert (PRIOR / "condition_encoder.json").exists() and not (PRIOR / SCHEDULER_DIR).exists()
    legacy, sidecar = load_generator(PRIOR)
    expected = _draw(legacy, "dpmsolver")

    # Execute
    folder = save_generator(legacy, tmp_path / "gen", sidecar=sidecar)
    resaved, _ = load_generator(folder)

    # Assert
    assert (folder / SCHEDULER_DIR / SCHEDULER_JSON).is_file() and (folder / ENCODER_DIR / "config.json").is_file()
    assert torch.equal(_draw(resaved, "dpmsolver"), expected)


def test_a_prior_of_another_image_size_is_refused_with_the_fix() -> None:
    from common.core.config import RunConfig
    from common.core.errors import ConfigError
    from common.models.assets import ASSETS
    from common.models.bundle import build_bundle

    prior = ASSETS / "prior-demo64"
    with pytest.raises(ConfigError, match="pretrained at 64 px but data.image-size=32; set data.image-size=64"):
        build_bundle(RunConfig.from_flat({"preset": "demo", "prior": str(prior)}))
    bundle = build_bundle(RunConfig.from_flat({"preset": "demo", "prior": str(prior), "data.image-size": 64}))
    assert not bundle.prior_id.startswith("init:")  # loaded from the prior folder, not a fresh init


def test_the_shipped_prior_is_the_one_pretrained_at_the_runs_image_size(tmp_path, monkeypatch) -> None:
    from common.core.config import RunConfig
    from common.core.errors import ConfigError
    from common.models.assets import ASSETS, ASSETS_ENV
    from common.models.bundle import build_bundle, resolve_prior, shipped_prior_folder

    # the project's assets: 32 px demo prior and its 64 px twin, chosen by data.image-size
    assert resolve_prior(RunConfig.from_flat({"preset": "demo", "prior": "shipped"})) == ASSETS / "prior-demo"
    cfg64 = RunConfig.from_flat({"preset": "demo", "prior": "shipped", "data.image-size": 64})
    assert resolve_prior(cfg64) == ASSETS / "prior-demo64"
    assert build_bundle(cfg64).generator.image_size == 64
    # the demo64 preset (what `difusal demo` runs) finds the same 64 px prior under its own name
    assert resolve_prior(RunConfig.from_flat({"preset": "demo64", "prior": "shipped"})) == ASSETS / "prior-demo64"
    # Prepare: an assets folder with the 32 px prior only
    for name in ("prior-demo", "phantom-encoder"):
        (tmp_path / name).symlink_to(ASSETS / name, target_is_directory=True)
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path))
    # Execute / Assert: no prior of that size: the preset's own folder, whose size the bundle refuses with the fix
    assert shipped_prior_folder("demo", 64) == tmp_path / "prior-demo"
    with pytest.raises(ConfigError, match="pretrained at 32 px but data.image-size=64"):
        build_bundle(RunConfig.from_flat({"preset": "demo", "prior": "shipped", "data.image-size": 64}))
