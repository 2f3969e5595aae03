"""Fine-tuning modes: LoRA adapters (peft), parameter subset, full; trainable-state exchange; Opacus compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from common.core.config import GeneratorConfig
from common.diffusion.loss import diffusion_loss
from common.diffusion.schedulers import make_scheduler
from common.models.generator import ConditionalUNet, build_generator, load_generator, save_generator
from common.models.lora import add_lora, load_trainable_state_dict, merged_copy, set_finetune_mode, trainable_state_dict

CFG = GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100, attention=True)



def _model(seed: int = 0, cfg: GeneratorConfig = CFG) -> ConditionalUNet:
    return build_generator(cfg, image_size=16, seed=seed)


def _inputs(b: int = 3) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn((b, 1, 16, 16), generator=gen), torch.tensor([3, 40, 80][:b]), torch.tensor([0, 2, 4][:b]),
            torch.tensor([18.0, 27.0, float("nan")][:b]))


def _randomise_adapters(model: ConditionalUNet, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_lora_trains_only_adapters_and_encoder() -> None:
    # Prepare
    model = _model()
    base_out = model.eval()(*_inputs()).detach()

    # Execute
    info = set_finetune_mode(model, "lora", rank=4)
    lora_out = model(*_inputs()).detach()

    # Assert
    assert info.trainable_names and all("lora_" in n or n.startswith("encoder.") for n in info.trainable_names)
    assert any("lora_" in n for n in info.trainable_names)
    assert all("lora_" in n or n.startswith("encoder.") for n, p in model.named_parameters() if p.requires_grad)
    assert info.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < info.trainable_fraction < 0.5
    assert any(".attentions." in m for m in info.adapted_modules) and any("conv1" in m for m in info.adapted_modules)
    torch.testing.assert_close(lora_out, base_out)  # B = 0 at init: the adapted model is the prior
    assert ModuleValidator.validate(model.train(), strict=False) == []


def test_lora_per_sample_grads_for_trainable_params_only() -> None:
    # Prepare
    model = _model()
    set_finetune_mode(model, "lora", rank=2)
    images, _, plane, ga = _inputs()
    batch = (images, plane, ga, torch.ones(3))

    # Execute
    gsm = GradSampleModule(model, loss_reduction="mean")
    diffusion_loss(gsm, batch, noise_scheduler=make_scheduler("ddpm", num_train_timesteps=100,
                   prediction_type="epsilon"), noise_multiplicity=2, generator=torch.Generator().manual_seed(0)
                   ).mean().backward()
    with_gs = {n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None}
    shapes = {p.grad_sample.shape[0] for p in model.parameters() if getattr(p, "grad_sample", None) is not None}
    gsm._close()

    # Assert
    assert with_gs == {n for n, p in model.named_parameters() if p.requires_grad}
    assert shapes == {3}


def test_trainable_state_dict_round_trip() -> None:
    # Prepare
    sender, receiver = _model(), _model()
    set_finetune_mode(sender, "lora", rank=4)
    set_finetune_mode(receiver, "lora", rank=4)
    _randomise_adapters(sender, seed=1)
    expected = sender.eval()(*_inputs()).detach()

    # Execute
    sd = trainable_state_dict(sender)
    load_trainable_state_dict(receiver, sd)
    got = receiver.eval()(*_inputs()).detach()

    # Assert
    assert set(sd) == {n for n, p in sender.named_parameters() if p.requires_grad}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in sd.values())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_load_trainable_state_dict_rejects_mismatches() -> None:
    # Prepare
    rank4, rank2, subset = _model(), _model(), _model()
    set_finetune_mode(rank4, "lora", rank=4)
    set_finetune_mode(rank2, "lora", rank=2)
    set_finetune_mode(subset, "subset")
    sd4 = trainable_state_dict(rank4)
    partial = dict(list(sd4.items())[1:])

    # Execute / Assert
    with pytest.raises(ValueError, match="shape mismatch"):
        load_trainable_state_dict(rank2, sd4)
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state_dict(rank4, partial)
    with pytest.raises(ValueError, match="unexpected"):
        load_trainable_state_dict(subset, sd4)
    with pytest.warns(UserWarning, match="missing"):
        load_trainable_state_dict(rank4, partial, strict=False)  # missing allowed (with a warning) when not strict


def test_subset_and_full_modes() -> None:
    # Prepare
    subset_model, full_model = _model(), _model()

    # Execute
    subset = set_finetune_mode(subset_model, "subset")
    full = set_finetune_mode(full_model, "full")

    # Assert
    prefixes = ("encoder.", "unet.time_embedding.")
    assert all(n.startswith(prefixes) or ".norm" in n or "group_norm" in n or "conv_norm_out" in n
               for n in subset.trainable_names)
    assert any("norm1" in n for n in subset.trainable_names) and any(n.startswith("unet.time_embedding.")
                                                                     for n in subset.trainable_names)
    assert not any("conv1.weight" in n for n in subset.trainable_names)
    assert full.trainable_params == full.total_params
    assert subset.trainable_params < full.trainable_params


def test_mode_conflicts_and_bad_targets_raise() -> None:
    # Prepare
    model = _model()
    set_finetune_mode(model, "lora", rank=4)
    no_attention = _model(cfg=GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100))

    # Execute / Assert
    with pytest.raises(ValueError, match="merged_copy"):
        set_finetune_mode(model, "full")
    with pytest.raises(ValueError, match="rank"):
        set_finetune_mode(model, "lora", rank=8)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, rank=4)
    with pytest.raises(ValueError, match="matches no layer"):
        add_lora(no_attention, rank=4, target="attn")
    with pytest.raises(ValueError, match="unknown"):
        set_finetune_mode(_model(), "partial", rank=4)  # type: ignore[arg-type]
    assert set_finetune_mode(model, "lora", rank=4).mode == "lora"  # same rank again is fine


def test_save_merges_lora_into_a_plain_generator(tmp_path: Path) -> None:
    # Prepare
    model = _model()
    set_finetune_mode(model, "lora", rank=4, target="all")
    _randomise_adapters(model, seed=2)
    expected = model.eval()(*_inputs()).detach()

    # Execute
    merged = merged_copy(model)
    loaded, _ = load_generator(save_generator(model, tmp_path / "gen", sidecar={"lora_rank": 4}))

    # Assert
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert any("lora_" in n for n, _ in model.named_parameters())  # the original keeps its adapters
    torch.testing.assert_close(merged.eval()(*_inputs()), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded.eval()(*_inputs()), expected, rtol=1e-4, atol=1e-5)
