"""DP-FedSGD of the plane classifier under example-level distributed DP (``privacy.distributed-classifier``).

A site's part of one step is :func:`clipped_gradient_sum`: the gradient of the classifier's loss for each of its
training images, each clipped to L2 norm ``max_grad_norm`` over the classifier's federated arrays, summed. The
site adds its discrete-Gaussian share of the noise (:mod:`common.privacy.distributed_dp`) and SecAgg+ sums the
sites' vectors; the server divides the noisy sum by a public constant and takes a step of :class:`ServerAdam`
(Kingma & Ba 2015) on the classifier. The vector's coordinates follow
:func:`common.models.downstream.federated_state` (the arrays the server aggregates).
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import numpy as np
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from common.core.errors import ConfigError
from common.models.downstream import federated_state


def trainable_names(model: nn.Module) -> list[str]:
    """The federated arrays of ``model``, each of which must be a trainable parameter (their order is the vector's)."""
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    names = list(federated_state(model))
    stray = [n for n in names if n not in params]
    if stray:
        raise ConfigError(f"DP-FedSGD trains every federated array of the classifier, but {stray[:3]} are not "
                          "trainable parameters (buffers or frozen weights); use a frozen-backbone classifier "
                          "(train.downstream-backbone) or per-site DP-SGD")
    return names


def clipped_gradient_sum(model: nn.Module, loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
                         data: TensorDataset, *, clip: float, batch_size: int = 64) -> np.ndarray:
    """Sum over the examples of ``data`` of the loss gradient, each example's clipped to L2 norm ``clip`` (float64).

    Per-example gradients come from Opacus' ``GradSampleModule`` hooks (what DP-SGD uses), over batches of
    ``batch_size``; ``loss_fn`` must return one loss per example. The hooks are removed afterwards.
    """
    names = trainable_names(model)
    params = dict(model.named_parameters())
    total = np.zeros(sum(params[n].numel() for n in names), dtype=np.float64)
    was_training = model.training
    model.train()  # Opacus records activations in training mode only (the downstream models have no dropout or BN)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        for start in range(0, len(data), batch_size):
            batch = tuple(t[start:start + batch_size] for t in data.tensors)
            wrapped.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # frozen features: no input needs a gradient, which is the point
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss_fn(wrapped, batch).sum().backward()
            n = len(batch[0])
            per = torch.cat([(params[k].grad_sample if params[k].grad_sample is not None
                              else torch.zeros(n, *params[k].shape)).detach().double().reshape(n, -1)
                             for k in names], dim=1)
            norms = per.norm(dim=1)
            scale = torch.where(norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms))
            total += (per * scale[:, None]).sum(0).numpy()
    finally:
        wrapped._close()  # hooks and grad_sample attributes removed: the model is as it came
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return total


class ServerAdam:
    """Adam on a flat float64 vector of parameters, its moments restorable from named arrays (checkpoints)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.t = 0

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """The parameters after one Adam step on ``grad`` (PyTorch's update, bias-corrected)."""
        params, grad = np.asarray(params, np.float64), np.asarray(grad, np.float64)
        if self.m is None or self.m.shape != grad.shape:
            self.m, self.v, self.t = np.zeros_like(grad), np.zeros_like(grad), 0
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        return params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays of the moments and the step count (empty before the first step)."""
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m.copy(), "v": self.v.copy(), "t": np.array([self.t], dtype=np.int64)}

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_arrays`."""
        if not state:
            return
        self.m, self.v = np.asarray(state["m"], np.float64), np.asarray(state["v"], np.float64)
        self.t = int(np.asarray(state["t"]).ravel()[0])
