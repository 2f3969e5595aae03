"""Parameter-efficient fine-tuning of the generator: LoRA adapters (peft), a parameter subset, or all.

LoRA (Hu et al. 2022, eq. 3): ``W x + (alpha / r) * B A x`` with ``B`` initialised to zero, so the adapted
model starts equal to the prior. Adapters are plain ``nn.Linear`` / ``nn.Conv2d`` leaves (peft's
``lora_A`` / ``lora_B``), so Opacus computes per-sample gradients for them only (frozen base weights get
none), and ``ModuleValidator.validate(strict=True)`` stays clean. The federation exchanges only
:func:`trainable_state_dict`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# Typed on nn.Module (the generator is one), so this module sits below common.models.generator.
ModuleT = TypeVar("ModuleT", bound=nn.Module)

LoraTarget = Literal["attn", "conv", "attn+conv", "all"]
FinetuneMode = Literal["lora", "subset", "full"]
_ATTN_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
_CONV_SUFFIXES = ("conv1", "conv2")


@dataclass(frozen=True)
class FinetuneInfo:
    """What a fine-tuning mode leaves trainable."""

    mode: str
    trainable_names: tuple[str, ...]
    trainable_params: int
    total_params: int
    adapted_modules: tuple[str, ...] = ()

    @property
    def trainable_fraction(self) -> float:
        """Share of all parameters that train."""
        return self.trainable_params / max(self.total_params, 1)


def _target_names(unet: nn.Module, target: str) -> list[str]:
    """Names (inside the UNet) of the Linear / Conv2d modules the target selects."""
    if target not in ("attn", "conv", "attn+conv", "all"):
        raise ValueError(f"target={target!r} is unknown; choose attn, conv, attn+conv or all")
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        is_attn = ".attentions." in f".{name}" and name.endswith(_ATTN_SUFFIXES)
        is_conv = ".resnets." in name and name.endswith(_CONV_SUFFIXES)
        if target == "all" or (is_attn and "attn" in target) or (is_conv and "conv" in target):
            names.append(name)
    return names


def lora_modules(model: nn.Module) -> list[str]:
    """Names of the modules carrying injected adapters."""
    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def add_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    target: LoraTarget = "attn+conv",
    dropout: float = 0.0,
    train_encoder: bool = True,
) -> list[str]:
    """Inject LoRA adapters into ``model.unet`` and freeze everything else.

    Parameters
    ----------
    model: the generator (modified in place).
    rank: LoRA rank r >= 1.
    alpha: LoRA alpha (default ``rank``: scale 1).
    target: which UNet layers get adapters: attention projections, resnet 3x3 convs, both, or every
        Linear/Conv2d.
    dropout: LoRA dropout on the adapter input.
    train_encoder: keep the condition encoder trainable (small; it is how new sites/conditions are learned).

    Returns
    -------
    Names (in ``model``) of the adapted modules.
    """
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters; build or load a fresh generator first")
    names = _target_names(model.unet, target)
    if not names:
        raise ValueError(f"target={target!r} matches no layer (attention needs generator.attention=True)")
    config = LoraConfig(
        r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=dropout,
        target_modules=names, bias="none",
    )
    inject_adapter_in_model(config, model.unet)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or (train_encoder and name.startswith("encoder.")))
    return [f"unet.{n}" for n in names]


def set_finetune_mode(
    model: nn.Module, mode: FinetuneMode, *, rank: int = 8, alpha: float | None = None,
    target: LoraTarget = "attn+conv",
) -> FinetuneInfo:
    """Select what trains: ``"lora"`` (adapters + encoder), ``"subset"`` (encoder, norms, time embedding) or ``"full"``.

    Parameters
    ----------
    model: the generator (modified in place).
    mode: ``"lora"``, ``"subset"`` or ``"full"``.
    rank: LoRA rank (``"lora"`` only).
    alpha: LoRA alpha (``"lora"`` only; default ``rank``).
    target: LoRA target layers (``"lora"`` only).

    Returns
    -------
    :class:`FinetuneInfo` with the trainable parameter names and counts.
    """
    adapted = lora_modules(model)
    if mode == "lora":
        if not adapted:
            adapted = add_lora(model, rank=rank, alpha=alpha, target=target)
        else:
            ranks = {m.r["default"] for _, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
            if ranks != {rank}:
                raise ValueError(f"model already has LoRA rank {sorted(ranks)}, asked for rank={rank}")
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name or name.startswith("encoder."))
    elif mode in ("subset", "full"):
        if adapted:
            raise ValueError(f"mode={mode!r} on a model with LoRA adapters: save/merge it (merged_copy) first")
        norm_names = {f"{n}." for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
        for name, p in model.named_parameters():
            in_subset = (
                name.startswith("encoder.") or name.startswith("unet.time_embedding.")
                or any(name.startswith(prefix) for prefix in norm_names)
            )
            p.requires_grad_(mode == "full" or in_subset)
    else:
        raise ValueError(f"mode={mode!r} is unknown; choose lora, subset or full")
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    return FinetuneInfo(
        mode=mode,
        trainable_names=trainable,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        adapted_modules=tuple(adapted) if mode == "lora" else (),
    )


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters that require grad (what a site sends back)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy ``state_dict`` into the model's trainable parameters.

    Parameters
    ----------
    model: the generator, in the same fine-tuning mode as the sender's.
    state_dict: name -> tensor, as from :func:`trainable_state_dict`.
    strict: raise on missing or unexpected names (shape mismatches always raise).
    """
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - (expected if strict else set(params)))
    if missing or unexpected:
        text = (
            f"trainable state dict does not match the model's fine-tuning mode: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
        if strict:
            raise ValueError(f"{text}; call set_finetune_mode the same way on both sides")
        warnings.warn(f"{text}; loading the {len(state_dict) - len(unexpected)} matching tensors", stacklevel=2)
    bad = [
        f"{n}: got {tuple(t.shape)}, expected {tuple(params[n].shape)}"
        for n, t in state_dict.items() if n in params and tuple(t.shape) != tuple(params[n].shape)
    ]
    if bad:
        raise ValueError(f"shape mismatch in trainable state dict (different rank or model size?): {bad[:5]}")
    with torch.no_grad():
        for n, t in state_dict.items():
            if n in params and n not in unexpected:
                params[n].copy_(t.to(params[n].device, params[n].dtype))


def merged_copy(model: ModuleT) -> ModuleT:
    """A deep copy with every LoRA adapter merged into its base weight and the peft wrappers removed."""
    merged = copy.deepcopy(model)
    for name in lora_modules(merged):
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        layer = getattr(parent, child)
        layer.merge()  # W <- W + (alpha / r) B A
        setattr(parent, child, layer.get_base_layer())
    merged.requires_grad_(True)
    return merged
