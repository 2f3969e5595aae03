"""Conditional UNet: construction, DP compatibility, conditioning, save/load, schedulers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.models.attention_processor import Attention
from opacus.validators import ModuleValidator
from torch import nn

from common.core.config import GeneratorConfig
from common.diffusion.schedulers import make_scheduler
from common.models.generator import ConditionalUNet, build_generator, load_generator, norm_groups, save_generator

TINY = GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100)



def _inputs(b: int = 4, size: int = 32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((b, 1, size, size), generator=gen)
    t = torch.tensor([5, 50, 90, 10][:b])
    plane = torch.tensor([0, 1, 2, 5][:b])
    ga = torch.tensor([20.0, float("nan"), 30.0, 38.0][:b])
    return x, t, plane, ga


@pytest.mark.parametrize("attention", [False, True])
def test_build_is_opacus_strict_clean(attention: bool) -> None:
    # Prepare
    cfg = GeneratorConfig(block_out_channels=(8, 16), attention=attention)

    # Execute
    model = build_generator(cfg, image_size=32, seed=0)
    errors = ModuleValidator.validate(model, strict=False)

    # Assert
    assert errors == []
    ModuleValidator.validate(model, strict=True)  # raises on any problem
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert all(m.num_channels % m.num_groups == 0 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert groups == {2}
    assert model.unet.config.class_embed_type == "identity"
    has_attn = any(isinstance(m, Attention) for m in model.modules())
    assert has_attn == attention


def test_norm_groups_divides_all_channels() -> None:
    # Prepare / Execute / Assert
    assert norm_groups((32, 64, 64)) == 8
    assert norm_groups((64, 128, 256, 256)) == 16
    assert norm_groups((12, 20)) == 2
    assert norm_groups((12, 25)) == 1
    assert all(c % norm_groups((24, 36)) == 0 for c in (24, 36))


def test_build_is_seeded_and_restores_global_rng() -> None:
    # Prepare
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    # Execute
    a = build_generator(TINY, image_size=32, seed=7)
    after = torch.rand(1)
    b = build_generator(TINY, image_size=32, seed=7)
    c = build_generator(TINY, image_size=32, seed=8)

    # Assert
    assert torch.equal(after, expected_next)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_output_responds_to_each_condition() -> None:
    # Prepare
    model = build_generator(GeneratorConfig(block_out_channels=(8, 16), use_site_condition=True, max_sites=4),
                            image_size=32, seed=0).eval()
    x, t, plane, ga = _inputs()

    # Execute
    with torch.no_grad():
        base = model(x, t, plane, ga)
        other_plane = model(x, t, (plane + 1) % 6, ga)
        other_ga = model(x, t, plane, ga + 3.0)
        uncond_plane = model(x, t, torch.full_like(plane, -1), ga)
        with_site = model(x, t, plane, ga, torch.tensor([0, 1, 2, 3]))
        again = model(x, t, plane, ga)

    # Assert: every condition moves the output of every row (GA row 1 is NaN = null both times)
    assert torch.equal(base, again)
    assert base.shape == x.shape
    for changed in (other_plane, uncond_plane, with_site):
        assert ((changed - base).abs().amax(dim=(1, 2, 3)) > 1e-6).all()
    per_row = (other_ga - base).abs().amax(dim=(1, 2, 3))
    assert (per_row[[0, 2, 3]] > 1e-6).all() and per_row[1] == 0.0


def test_unknown_ga_uses_null_vector_without_nan() -> None:
    # Prepare
    model = build_generator(TINY, image_size=32, seed=0)
    x, t, plane, _ = _inputs()
    ga = torch.full((4,), float("nan"))

    # Execute
    out = model(x, t, plane, ga)
    out.pow(2).mean().backward()

    # Assert
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder.ga_null.weight.grad.abs().sum() > 0


def test_bad_condition_values_raise() -> None:
    # Prepare
    model = build_generator(TINY, image_size=32, seed=0)
    x, t, _, ga = _inputs()

    # Execute / Assert
    with pytest.raises(ValueError, match="plane indices"):
        model(x, t, torch.tensor([0, 1, 6, 2]), ga)
    with pytest.raises(ValueError, match="not divisible"):
        build_generator(GeneratorConfig(block_out_channels=(8, 8, 8, 8)), image_size=36, seed=0)


def test_save_load_round_trip_identical_outputs(tmp_path: Path) -> None:
    # Prepare
    cfg = GeneratorConfig(block_out_channels=(8, 16), attention=True, use_site_condition=True, max_sites=3)
    model = build_generator(cfg, image_size=32, seed=3).eval()
    x, t, plane, ga = _inputs()
    site = torch.tensor([0, -1, 2, 1])
    with torch.no_grad():
        expected = model(x, t, plane, ga, site)

    # Execute
    folder = save_generator(model, tmp_path / "gen", sidecar={"seed": 3, "epsilon": 1.5})
    loaded, sidecar = load_generator(folder)
    loaded.eval()
    with torch.no_grad():
        got = loaded(x, t, plane, ga, site)

    # Assert
    assert torch.equal(got, expected)
    assert isinstance(loaded, ConditionalUNet) and loaded.generator_config == cfg and loaded.image_size == 32
    assert sidecar["seed"] == 3 and sidecar["epsilon"] == 1.5 and sidecar["code_version"]
    assert (folder / "unet" / "config.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "condition_encoder" / "config.json").read_text())["use_site"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["gen"]  # no temp folder left behind


def test_save_overwrites_and_fp16_is_smaller_and_close(tmp_path: Path) -> None:
    # Prepare
    model = build_generator(TINY, image_size=32, seed=0).eval()
    x, t, plane, ga = _inputs()
    with torch.no_grad():
        expected = model(x, t, plane, ga)
    full = save_generator(model, tmp_path / "full", sidecar={})
    size32 = sum(p.stat().st_size for p in full.rglob("*.safetensors"))

    # Execute
    save_generator(build_generator(TINY, image_size=32, seed=1), tmp_path / "half", sidecar={"v": 1})
    half = save_generator(model, tmp_path / "half", sidecar={"v": 2}, dtype=torch.float16)
    size16 = sum(p.stat().st_size for p in half.rglob("*.safetensors"))
    loaded, sidecar = load_generator(half)
    with torch.no_grad():
        got = loaded.eval()(x, t, plane, ga)

    # Assert
    assert sidecar["v"] == 2 and sidecar["saved_dtype"] == "float16"
    assert next(loaded.parameters()).dtype == torch.float32
    assert size16 < 0.6 * size32
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "half"]


def test_load_bad_folder_raises_clear_errors(tmp_path: Path) -> None:
    # Prepare
    folder = save_generator(build_generator(TINY, image_size=32, seed=0), tmp_path / "gen", sidecar={})
    (folder / "generator.json").write_text("{not json")

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="not a generator folder"):
        load_generator(tmp_path / "missing")
    with pytest.raises(ValueError, match="malformed"):
        load_generator(folder)
    with pytest.raises(ValueError, match="JSON"):
        save_generator(build_generator(TINY, image_size=32, seed=0), tmp_path / "x", sidecar={"bad": object()})


@pytest.mark.parametrize(
    ("name", "cls"), [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler), ("dpmsolver", DPMSolverMultistepScheduler)]
)
def test_make_scheduler_shares_training_schedule(name: str, cls: type) -> None:
    # Prepare
    reference = make_scheduler("ddpm", num_train_timesteps=100, prediction_type="v_prediction")

    # Execute
    scheduler = make_scheduler(name, num_train_timesteps=100, prediction_type="v_prediction")

    # Assert
    assert isinstance(scheduler, cls)
    assert scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(scheduler.alphas_cumprod, reference.alphas_cumprod)
    assert scheduler.alphas_cumprod[-1] < 1e-3  # the scaled schedule reaches (almost) pure noise at T=100
    if name == "dpmsolver":
        assert scheduler.config.algorithm_type == "dpmsolver++"


def test_make_scheduler_unknown_name_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown"):
        make_scheduler("euler", num_train_timesteps=100, prediction_type="epsilon")  # type: ignore[arg-type]
