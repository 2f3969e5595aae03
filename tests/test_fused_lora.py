"""Fused LoRA layers (``common.privacy.fused_lora``): the same function and gradients as peft's, per example too."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils.data import TensorDataset

from common.core.config import GeneratorConfig
from common.diffusion.loss import make_loss_fn
from common.diffusion.schedulers import make_scheduler
from common.models.generator import build_generator
from common.models.lora import set_finetune_mode, trainable_state_dict
from common.privacy.dpsgd import train_private
from common.privacy.fused_lora import FusedLoraConv2d, FusedLoraLinear, fusable_layers, fused_lora
from common.privacy.ledger import PrivacyLedger


class _Toy(nn.Module):
    """A strided convolution and a linear layer over its pixels: both LoRA kinds, a bias each, a loss per example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.conv(x)).permute(0, 2, 3, 1)).pow(2).mean((1, 2, 3))


def _toy(dropout: float = 0.0) -> _Toy:
    torch.manual_seed(0)
    model = _Toy()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["conv", "proj"]),
                            model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # peft starts B at zero; a non-zero B tests both factors' gradients
            p.data.normal_()
    return model


def _per_sample(model: nn.Module, x: torch.Tensor, *, fuse: bool, calls: int = 1) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Full backward hook is firing ..." on the first layer
        with fused_lora(model, per_sample=True) if fuse else torch.enable_grad():
            gsm = GradSampleModule(model, force_functorch=not fuse)
            sum(model(x) for _ in range(calls)).mean().backward()
            out = {n: p.grad_sample.clone() for n, p in params.items()}
            gsm._close()
    return out


def test_fused_layers_compute_peft_output_and_gradients() -> None:
    # Prepare
    x = torch.randn(4, 3, 9, 9)
    peft_model, fused_model = _toy(), _toy()
    peft_model(x).mean().backward()

    # Execute
    with fused_lora(fused_model) as names:
        kinds = {type(fused_model.conv), type(fused_model.proj)}
        out = fused_model(x)
        out.mean().backward()

    # Assert
    assert names == ["conv", "proj"] and kinds == {FusedLoraConv2d, FusedLoraLinear}
    torch.testing.assert_close(out, peft_model(x))
    for (name, p), q in zip(peft_model.named_parameters(), fused_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("calls", [1, 2])
def test_per_example_gradients_equal_functorch_on_peft_layers(calls: int) -> None:
    # Prepare: two calls of the model per step sum into the same rows (noise multiplicity)
    x = torch.randn(5, 3, 9, 9)

    # Execute
    reference = _per_sample(_toy(), x, fuse=False, calls=calls)
    fused = _per_sample(_toy(), x, fuse=True, calls=calls)

    # Assert
    assert set(fused) == set(reference) and len(fused) == 4
    for name, grad in reference.items():
        assert fused[name].shape[0] == 5
        torch.testing.assert_close(fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_peft_layers_come_back_with_the_trained_weights() -> None:
    # Prepare
    model = _toy()
    keys = list(model.state_dict())
    adapter = model.conv.lora_A["default"].weight

    # Execute
    with fused_lora(model):
        with torch.no_grad():
            model.conv.lora_A.add_(1.0)  # the fused layer holds the peft layer's parameter object
    after = model.conv.lora_A["default"].weight

    # Assert
    assert type(model.conv).__module__.startswith("peft") and list(model.state_dict()) == keys
    assert after is adapter and torch.all(after == adapter)
    assert fusable_layers(_toy(dropout=0.1)) == []  # dropout on the adapter input: fusing would change the function


def test_dp_lora_training_is_the_same_fused_or_not() -> None:
    # Prepare: the generator with LoRA, the same private noise seed, three DP-SGD steps (plain SGD: Adam would hide
    # a gradient that is off by a constant factor)
    cfg = GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100, attention=True)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand((12, 1, 16, 16), generator=gen) * 2 - 1, torch.randint(0, 6, (12,), generator=gen),
                         20 + 10 * torch.rand(12, generator=gen), torch.full((12,), 0.3))
    trained = {}

    # Execute
    for fuse in (False, True):
        model = build_generator(cfg, image_size=16, seed=0)
        torch.manual_seed(1)
        set_finetune_mode(model, "lora", rank=4)
        fused_names = fusable_layers(model)
        ledger = PrivacyLedger(target_epsilon=None, target_delta=1e-5, accountant="rdp")
        loss_fn = make_loss_fn(make_scheduler("ddpm", num_train_timesteps=100, prediction_type="epsilon"),
                               noise_multiplicity=2, cond_dropout=0.1, seed=0)
        result = train_private(model, loss_fn, data, steps=3, batch_size=6, lr=0.5, ledger=ledger, optimizer="sgd",
                               model_key="generator", planned_total_steps=3, noise_multiplier=0.5, noise_seed=7,
                               fuse_lora=fuse)
        trained[fuse] = (trainable_state_dict(model), result)

    # Assert
    assert any(".attentions." in n for n in fused_names) and any("conv1" in n for n in fused_names)
    (plain, plain_result), (fused, fused_result) = trained[False], trained[True]
    assert list(fused) == list(plain) and fused_result.steps == plain_result.steps == 3
    assert fused_result.epsilon == plain_result.epsilon > 0
    moved = max((plain[k] - build_generator(cfg, image_size=16, seed=0).state_dict().get(k, plain[k])).abs().max()
                for k in plain if k.startswith("encoder."))
    assert moved > 1e-3  # the comparison is between weights that trained
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-3, atol=1e-5, msg=key)
