"""LoRA layers fused for training: one convolution with ``W + s·BA``, and low-rank (per-sample) gradients.

peft computes a LoRA layer as ``W x + s · B (A x)``: the base convolution plus two small ones (rank r). On a CPU the
small ones are slow out of proportion to their size (a rank-8 3x3 convolution costs a quarter of the 64-channel
base convolution, the 1x1 another quarter: ``simulations/benchmarks/results/dp_step_time_idle.json``), and Opacus
then computes per-sample gradients of both through their own unfolded inputs.

While :func:`fused_lora` is active, each eligible peft layer is replaced by a module that holds the *same*
parameter objects and computes

- forward: ``conv(x, [W + s·B·A ; A])``, one convolution of the base layer's size plus r output channels, which are
  the adapter's low-rank input ``A x`` (merging costs r·out·in·k² flops);
- backward to the input: ``conv_transpose(g, W + s·B·A)``, skipped when the input needs no gradient;
- gradients of ``A`` and ``B`` in low rank, never forming a full-size weight gradient (batch-summed for plain
  training; per example, through Opacus' ``register_grad_sampler``, for DP-SGD):

  ``grad B_n = s · g_n · (A U_n)ᵀ``, ``grad A_n = s · (Bᵀ g_n) · U_nᵀ``, with ``U_n`` example n's unfolded input
  (for a Linear layer, ``U_n`` is its input rows). ``A U_n`` is the forward's extra channels; ``grad A_n`` of a
  convolution is computed without unfolding, as one weight gradient of a convolution grouped by example.

These are the gradients of the same function (``W`` frozen), so the trained adapters are those peft would train,
up to floating-point rounding (``tests/test_fused_lora.py`` compares them with peft + functorch per example). On
exit the peft layers are put back; the parameters trained in place stay in them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from peft.tuners.lora.layer import Conv2d as PeftConv2d
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import Tensor, nn

ADAPTER = "default"


def _eligible(layer: nn.Module) -> bool:
    """A vanilla peft LoRA layer (one active adapter, no dropout, DoRA or LoRA bias) that fusing keeps exact."""
    if not isinstance(layer, (PeftConv2d, PeftLinear)):
        return False
    base = layer.base_layer
    if (layer.merged or layer.disable_adapters or list(layer.active_adapters) != [ADAPTER]
            or set(layer.lora_A) != {ADAPTER} or layer.lora_variant or layer.lora_bias.get(ADAPTER)
            or not isinstance(layer.lora_dropout[ADAPTER], nn.Identity)):
        return False
    if isinstance(layer, PeftConv2d):
        return (type(base) is nn.Conv2d and base.groups == 1 and base.dilation == (1, 1)
                and base.padding_mode == "zeros" and not isinstance(base.padding, str))
    return type(base) is nn.Linear


class _FusedBase(nn.Module):
    """Shares the base weight/bias (frozen) and the adapters (``lora_A``, ``lora_B``) with a peft layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        base = layer.base_layer
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = layer.lora_A[ADAPTER].weight
        self.lora_B = layer.lora_B[ADAPTER].weight
        self.scaling = float(layer.scaling[ADAPTER])
        self.per_sample = False  # True under DP-SGD: Opacus' grad sampler gives the adapters' gradients
        self.low_rank_inputs: list[Tensor] = []  # ``A x`` of each forward call for the grad sampler (last in first out)

    def forward(self, x: Tensor) -> Tensor:
        """Same output as the peft layer."""
        # A forward without autograd (an evaluation inside training) is never backpropagated: nothing to stash.
        stash = self.per_sample and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        return _FusedFunction.apply(x, self.lora_A, self.lora_B, self, stash)

    def stacked_weight(self) -> Tensor:
        """``[W + s·B·A ; A]``: one product gives the layer's output and the adapter's low-rank input ``A x``."""
        delta = (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).view(self.weight.shape)
        return torch.cat([self.weight + self.scaling * delta, self.lora_A.view(-1, *self.weight.shape[1:])])

    def split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """The stacked product's output channels (plus bias) and its ``A x`` channels."""
        n_out = self.weight.shape[0]
        dim = self.channel_dim
        y = out.narrow(dim, 0, n_out)
        low = out.narrow(dim, n_out, out.shape[dim] - n_out).contiguous()
        if self.bias is None:
            return y.contiguous(), low
        return y + (self.bias.view(-1, *[1] * (y.ndim - 2)) if dim == 1 else self.bias), low  # a new, contiguous tensor

    def adapter_grads(self, x: Tensor, low: Tensor, grad_out: Tensor) -> dict[str, Tensor]:
        """Per-example gradients of ``A`` and ``B`` (leading batch dimension), in low rank; ``low`` is ``A x``."""
        n = x.shape[0]
        g, u = grad_out.reshape(n, grad_out.shape[1], -1), low.reshape(n, low.shape[1], -1)
        if self.channel_dim != 1:  # Linear: [n, ..., features] -> [n, features, rows]
            g = grad_out.reshape(n, -1, grad_out.shape[-1]).transpose(1, 2)
            u = low.reshape(n, -1, low.shape[-1]).transpose(1, 2)
        grad_b = torch.bmm(g, u.transpose(1, 2))  # [n, out, r]
        back = self.lora_B.flatten(1).t() @ g  # Bᵀ g: [n, r, rows]
        return {"A": self.scaling * self.a_grad(x, back, grad_out.shape),
                "B": self.scaling * grad_b.view(n, *self.lora_B.shape)}


class _FusedFunction(torch.autograd.Function):
    """``layer(x; W + s·B·A)`` with the adapters' gradients in low rank (or none, when Opacus computes them)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lora_a: Tensor, lora_b: Tensor, module: _FusedBase, stash: bool) -> Tensor:
        with torch.no_grad():
            stacked = module.stacked_weight()
            y, low = module.split(module.apply_weight(x, stacked))
        merged = stacked[:module.weight.shape[0]]
        ctx.module, ctx.input_shape = module, x.shape
        if module.per_sample:
            if stash:
                module.low_rank_inputs.append(low)  # Opacus' grad sampler pops it in the backward pass
            ctx.save_for_backward(merged)
        else:
            ctx.save_for_backward(merged, x, low)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        module: _FusedBase = ctx.module
        merged = ctx.saved_tensors[0]
        grad_x = module.input_grad(ctx.input_shape, merged, grad_out) if ctx.needs_input_grad[0] else None
        grad_a = grad_b = None
        if not module.per_sample and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            _, x, low = ctx.saved_tensors
            grads = module.adapter_grads(x, low, grad_out)
            grad_a, grad_b = grads["A"].sum(0), grads["B"].sum(0)
        return grad_x, grad_a, grad_b, None, None


class FusedLoraConv2d(_FusedBase):
    """A peft LoRA ``Conv2d`` as one convolution with the merged weight (see the module docstring)."""

    channel_dim = 1

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        base = layer.base_layer
        self.stride, self.padding = base.stride, base.padding

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base convolution with ``weight`` (no bias)."""
        return F.conv2d(x, weight, None, self.stride, self.padding)

    def input_grad(self, input_shape: torch.Size, weight: Tensor, grad_out: Tensor) -> Tensor:
        """Gradient of the loss with respect to the input."""
        return torch.nn.grad.conv2d_input(input_shape, weight, grad_out, self.stride, self.padding)

    def a_grad(self, x: Tensor, back: Tensor, out_shape: torch.Size) -> Tensor:
        """Per-example gradients of the rank-r convolution ``A`` given ``Bᵀ g``: one weight gradient of a
        convolution grouped by example (the batch folded into the channels)."""
        n, r = x.shape[0], self.lora_A.shape[0]
        back = back.reshape(1, n * r, *out_shape[2:])
        weight = self.lora_A.repeat(n, 1, 1, 1)
        grad = torch.ops.aten.convolution_backward(
            back, x.reshape(1, -1, *x.shape[2:]), weight, None, list(self.stride), list(self.padding), [1, 1], False,
            [0, 0], n, [False, True, False])[1]
        return grad.view(n, *self.lora_A.shape)


class FusedLoraLinear(_FusedBase):
    """A peft LoRA ``Linear`` as one matrix product with the merged weight (see the module docstring)."""

    channel_dim = -1

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base linear map with ``weight`` (no bias)."""
        return F.linear(x, weight)

    def input_grad(self, input_shape: torch.Size, weight: Tensor, grad_out: Tensor) -> Tensor:
        """Gradient of the loss with respect to the input."""
        return grad_out @ weight

    def a_grad(self, x: Tensor, back: Tensor, out_shape: torch.Size) -> Tensor:
        """Per-example gradients of ``A`` given ``Bᵀ g`` ``[n, r, rows]``."""
        return torch.bmm(back, x.reshape(x.shape[0], -1, x.shape[-1]))


@register_grad_sampler([FusedLoraConv2d, FusedLoraLinear])
def _fused_grad_sample(layer: _FusedBase, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Opacus' per-example gradients of a fused layer's trainable adapters (hooks mode)."""
    grads = layer.adapter_grads(activations[0], layer.low_rank_inputs.pop(), backprops)
    return {p: grads[key] for key, p in (("A", layer.lora_A), ("B", layer.lora_B)) if p.requires_grad}


def fusable_layers(model: nn.Module) -> list[str]:
    """Names of the peft LoRA layers of ``model`` that :func:`fused_lora` would fuse."""
    return [name for name, m in model.named_modules() if _eligible(m)]


@contextmanager
def fused_lora(model: nn.Module, *, per_sample: bool = False) -> Iterator[list[str]]:
    """Replace every eligible peft LoRA layer of ``model`` by its fused form for the duration of the block.

    Parameters
    ----------
    model: modified in place, restored on exit (also on an exception).
    per_sample: the adapters' gradients come from Opacus' grad sampler (DP-SGD in ``hooks`` mode), so the
        autograd backward leaves them out; otherwise it returns their batch-summed gradients.

    Yields
    ------
    The names of the fused layers (empty when the model has none: the block then runs on the model as it is).
    """
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    names = fusable_layers(model)
    try:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = parent._modules[child]
            fused = (FusedLoraConv2d if isinstance(layer, PeftConv2d) else FusedLoraLinear)(layer)
            fused.per_sample = per_sample
            fused.train(layer.training)
            parent._modules[child] = fused
            replaced.append((parent, child, layer))
        yield names
    finally:
        for parent, child, layer in reversed(replaced):
            parent._modules[child].low_rank_inputs.clear()
            parent._modules[child] = layer
