"""DP-SGD training of one model at one site with Opacus, charged to the site's ledger."""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, get_args

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common.core.config import GradSampleMode, OptimizerName
from common.core.errors import BudgetExceededError, ConfigError, DataError
from common.privacy.fused_lora import fused_lora
from common.privacy.ledger import PrivacyLedger

GRAD_SAMPLE_MODES = get_args(GradSampleMode)
OPTIMIZERS = get_args(OptimizerName)
LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
_OPTIMIZER_CLASSES: dict[OptimizerName, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class PrivateTrainResult:
    """Outcome of one :func:`train_private` call (``epsilon`` is the model's cumulative spend)."""

    steps: int
    losses: list[float]
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    stopped_by_budget: bool
    message: str


@dataclass(frozen=True)
class ProximalTerm:
    """FedProx's proximal term (mu/2)·||w - w_global||² on a model's trainable parameters (Li et al. 2020).

    ``anchor`` is w_global: one detached copy per trainable parameter, in ``model.parameters()`` order. The term is
    applied as its gradient, mu·(w - w_global), added to ``p.grad`` right before each optimizer update; the losses
    :func:`train_private` reports stay the data loss alone.

    It costs no privacy. Under DP-SGD it is added *after* Opacus has clipped, summed, noised and scaled the
    per-example gradients, never through them: it depends only on the current weights and on w_global, not on any
    private example. Each update is then a function of the previous weights, w_global and the privatized gradient,
    which is post-processing of the DP-SGD mechanism; the accountant sees the same (sigma, q) per step with or
    without it. (Put through per-example clipping it would instead use up each example's norm bound C and be
    divided by the batch size.) w_global is the global model the server sent: for this site already the output of
    DP training, accounted in earlier rounds.
    """

    mu: float
    anchor: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        if not (self.mu >= 0 and self.mu < float("inf")):
            raise ValueError(f"proximal mu must be finite and >= 0; got {self.mu!r}")

    @classmethod
    def at(cls, model: nn.Module, mu: float) -> "ProximalTerm":
        """The term anchored at ``model``'s trainable weights now (at the start of a round: the global weights)."""
        return cls(float(mu), tuple(p.detach().clone() for p in model.parameters() if p.requires_grad))

    def check(self, params: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` unless the anchor has one tensor of the right shape per parameter of ``params``."""
        shapes = [tuple(p.shape) for p in params]
        if shapes != [tuple(w.shape) for w in self.anchor]:
            raise ValueError(f"proximal anchor does not match the trainable parameters: {len(self.anchor)} anchor "
                             f"tensors for {len(shapes)} parameters, or their shapes differ")

    @torch.no_grad()
    def add_gradient(self, params: Sequence[Tensor]) -> None:
        """``p.grad += mu·(p - w_global)`` for every parameter (a missing ``p.grad`` counts as zero)."""
        for p, w0 in zip(params, self.anchor, strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p - w0.to(p.device), alpha=self.mu)


class TailAverage:
    """Running mean of ``params`` over the optimizer steps after ``steps - ceil(fraction * steps)``.

    Registered as a step post-hook on the optimizer that updates ``params`` (under DP-SGD: the optimizer Opacus
    wraps, whose step runs after the noise is added), so it sees exactly the iterates training produces.
    :meth:`apply` writes the mean into the parameters; a run that stopped before the window (budget) keeps its last
    iterate, one that stopped inside it the mean of the iterates it reached.
    """

    def __init__(self, params: Sequence[Tensor], steps: int, fraction: float) -> None:
        self.params = list(params)
        self.start = steps - math.ceil(fraction * steps)
        self.count, self.done = 0, 0
        self.mean = [torch.zeros_like(p) for p in self.params]

    def __call__(self, *_: Any) -> None:
        self.done += 1
        if self.done > self.start:
            self.count += 1
            with torch.no_grad():
                for m, p in zip(self.mean, self.params):
                    m.add_(p.detach() - m, alpha=1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        if self.count:
            for m, p in zip(self.mean, self.params):
                p.copy_(m)


def validate_for_dp(model: nn.Module) -> None:
    """Raise :class:`ConfigError` listing every reason ``model`` cannot be trained with DP-SGD."""
    was_training = model.training
    model.train()
    try:
        problems = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    finally:
        model.train(was_training)
    # A frozen BatchNorm (skipped by Opacus) still mixes the examples of a batch through its statistics.
    problems += [f"{name}: frozen {type(m).__name__} mixes the examples of a batch" for name, m in
                 model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and not any(p.requires_grad for p in m.parameters())]
    if problems:
        raise ConfigError(f"{type(model).__name__} is not DP-compatible (Opacus ModuleValidator): "
                          + "; ".join(problems) + ". Fix: replace BatchNorm by GroupNorm (ModuleValidator.fix).")


def _per_example_loss(loss_fn: LossFn, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """``loss_fn(model, batch)``, checked to be a ``[B]`` vector of per-example losses."""
    loss = loss_fn(model, batch)
    if loss.ndim != 1 or loss.shape[0] != batch[0].shape[0]:
        raise ValueError(f"loss_fn must return per-example losses of shape [{batch[0].shape[0]}], got "
                         f"{tuple(loss.shape)}; use reduction='none' and reduce the non-batch dims")
    return loss


def _batches(loader: DataLoader, dev: torch.device) -> Iterator[tuple[Tensor, ...]]:
    """Endless batches of ``loader`` on ``dev`` (a new epoch starts when one ends)."""
    while True:
        for batch in loader:
            yield tuple(t.to(dev) for t in batch)


def train_private(
    model: nn.Module, loss_fn: LossFn, dataset: TensorDataset, *, steps: int, batch_size: int, lr: float,
    ledger: PrivacyLedger | None, model_key: str, planned_total_steps: int, max_grad_norm: float = 1.0,
    grad_sample_mode: str = "functorch", seed: int = 0, device: str = "cpu", optimizer: OptimizerName = "adam",
    strict: bool = False, noise_multiplier: float | None = None, noise_seed: int | None = None,
    proximal: ProximalTerm | None = None, fuse_lora: bool = True, tail_average: float = 0.0,
) -> PrivateTrainResult:
    """Train the ``requires_grad`` parameters of ``model`` in place, with DP-SGD when a ledger is given.

    Parameters
    ----------
    model:
        Trained in place; afterwards it has no Opacus hooks, ``grad_sample`` attributes or ``_module.`` prefixes.
    loss_fn:
        ``loss_fn(model, batch) -> Tensor[B]`` per-example losses (reduced here by the mean).
    dataset:
        Private (or, with ``ledger=None``, public) examples; batches are tuples of its tensors.
    steps, batch_size, lr:
        Optimiser steps of this call; expected batch size (Poisson rate ``q = 1/ceil(N/batch_size)``); rate.
    ledger:
        The site's :class:`PrivacyLedger`; ``None`` trains without DP on shuffled batches (epsilon 0).
    model_key:
        Which budget/accountant of the ledger to use ("generator", "classifier", "regressor").
    planned_total_steps:
        Steps of this model over the whole run; fixes the noise multiplier at its first use.
    max_grad_norm, grad_sample_mode, optimizer:
        Clipping bound ``C``; Opacus per-sample gradient mode; one of :data:`OPTIMIZERS` (:data:`OptimizerName`).
    seed, device:
        Seeds the public randomness (shuffling without DP, the global RNG: forked, restored after); torch device.
    noise_seed:
        Seeds the *private* randomness of DP-SGD: Poisson sampling and the Gaussian noise. It must be unknown to
        whoever sees the trained weights, or the noise can be regenerated and subtracted. A site passes a seed
        derived from its secret (:func:`common.federated.local_update.dp_noise_seed`); ``None`` draws a fresh
        one from the operating system (:mod:`secrets`). Only ``privacy.insecure-reproducible-noise`` passes a
        seed anyone can know, and everything it produces is marked not private.
    strict:
        Raise :class:`BudgetExceededError` instead of stopping when the next step would exceed the budget.
    noise_multiplier:
        Overrides the derived noise multiplier at the model's first use (required if the ledger has no target).
    proximal:
        FedProx's :class:`ProximalTerm` (anchored at the round's global weights), or ``None`` for plain local
        training. Its gradient joins the update after DP-SGD's clipping and noise (no privacy cost).
    fuse_lora:
        Train peft LoRA layers in their fused form (:mod:`common.privacy.fused_lora`: one convolution with the
        merged weight, adapters' gradients in low rank): the same gradients, per example under DP, in fewer flops.
        Where a layer is fused, DP-SGD runs in Opacus' ``hooks`` mode, whose grad sampler the fused layers register
        (``ghost`` mode keeps the peft layers). ``False`` keeps peft's layers and ``grad_sample_mode`` as given.
    tail_average:
        Fraction of this call's steps whose iterates are averaged into the weights it leaves (Polyak-Ruppert tail
        averaging; ``0`` keeps the last iterate). With ``0.5`` the trained parameters end as the mean of the
        iterates after steps ``ceil(steps/2) .. steps``. Under DP the average is post-processing of iterates that
        DP-SGD already released (no privacy cost); it damps the noise those iterates carry.

    Returns
    -------
    PrivateTrainResult
        Steps done, per-step mean losses (NaN for an empty Poisson batch), cumulative epsilon, DP settings.
    """
    if steps < 0 or batch_size < 1 or not lr > 0 or not max_grad_norm > 0 or not 0.0 <= tail_average <= 1.0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0, max_grad_norm > 0, 0 <= tail_average <= 1; got "
                         f"{steps}, {batch_size}, {lr}, {max_grad_norm}, {tail_average}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES or optimizer not in OPTIMIZERS:
        raise ValueError(f"grad_sample_mode must be in {list(GRAD_SAMPLE_MODES)} and optimizer in {list(OPTIMIZERS)};"
                         f" got {grad_sample_mode!r}, {optimizer!r}")
    if len(dataset) == 0:
        raise DataError("train_private got an empty dataset: the site has no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    if proximal is not None:
        proximal.check(params)
    if ledger is not None:
        validate_for_dp(model)
    dev = torch.device(device)
    was_training = model.training
    model.to(dev).train()
    opt = _OPTIMIZER_CLASSES[optimizer](params, lr=lr)
    average = TailAverage(params, steps, tail_average) if tail_average > 0 else None
    if average is not None:
        opt.register_step_post_hook(average)
    per_sample = ledger is not None
    fuse = fuse_lora and not (per_sample and grad_sample_mode == "ghost")
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []), \
            (fused_lora(model, per_sample=per_sample) if fuse else contextlib.nullcontext([])) as fused:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        try:
            if ledger is None:
                result = _train_public(model, loss_fn, dataset, opt, steps, batch_size, gen, dev, proximal)
            else:
                private_seed = secrets.randbits(63) if noise_seed is None else int(noise_seed)
                result = _train_dp(model, loss_fn, dataset, opt, ledger, model_key, steps, batch_size,
                                   planned_total_steps, max_grad_norm, "hooks" if fused else grad_sample_mode,
                                   private_seed, dev, strict, noise_multiplier, proximal)
            if average is not None:
                average.apply()
            return result
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)


def _train_public(model: nn.Module, loss_fn: LossFn, dataset: TensorDataset, opt: torch.optim.Optimizer,
                  steps: int, batch_size: int, gen: torch.Generator, dev: torch.device,
                  proximal: ProximalTerm | None) -> PrivateTrainResult:
    """Ordinary shuffled minibatch training (public data, no DP)."""
    batches = _batches(DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen), dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = _per_example_loss(loss_fn, model, batch).mean()
        loss.backward()
        if proximal is not None:
            proximal.add_gradient(trainable)
        opt.step()
        losses.append(float(loss.detach()))
    return PrivateTrainResult(steps, losses, 0.0, 0.0, 0.0, 0.0, False, f"trained {steps} steps without DP")


def _engine_with_private_rng(accountant: str, private_seed: int, dev: torch.device) -> PrivacyEngine:
    """A ``PrivacyEngine`` whose Poisson sampler and noise draw from one generator seeded by ``private_seed``.

    Opacus' ``secure_mode=True`` would take that generator from ``torchcsprng`` (unmaintained, not installable
    for current torch). Its other half is kept: with ``secure_mode`` set, each noise draw sums four Gaussian
    samples (Holohan & Braghin 2021), which defeats the floating-point attack on the noise's low bits
    (Jin et al. 2022). The generator is torch's Mersenne Twister, seeded with 63 bits that only the site knows
    (derived from its 256-bit secret, :mod:`common.privacy.site_state`); it is not a CSPRNG, which the README states.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
    engine.secure_mode = True  # noise as four summed draws; sampler and noise take engine.secure_rng
    engine.secure_rng = torch.Generator(device=dev).manual_seed(int(private_seed))
    return engine


def _dp_step(dp_opt: DPOptimizer, params: Sequence[Tensor], proximal: ProximalTerm | None) -> None:
    """``dp_opt.step()``, with FedProx's proximal gradient added between the privatisation and the update.

    ``DPOptimizer.step`` is ``pre_step()`` (clip, sum, noise, scale into ``p.grad``; its step hook records
    (sigma, q) in the ledger's accountant), then ``original_optimizer.step()``; the same two calls here, with
    ``proximal.add_gradient`` between them, so the proximal gradient mu·(w - w_global) is neither clipped nor
    noised nor charged: it reads no private data (:class:`ProximalTerm`).
    """
    if dp_opt.pre_step():
        if proximal is not None:
            proximal.add_gradient(params)
        dp_opt.original_optimizer.step()


def _check_private_rng(engine: PrivacyEngine, dp_opt: Any, loader: DataLoader) -> None:
    """Fail loudly if this Opacus version no longer routes sampling and noise through ``engine.secure_rng``."""
    sampler = getattr(loader, "batch_sampler", None)
    if (getattr(dp_opt, "generator", None) is not engine.secure_rng or not getattr(dp_opt, "secure_mode", False)
            or getattr(sampler, "generator", None) is not engine.secure_rng):
        raise RuntimeError(
            "Opacus did not take the site's private generator for Poisson sampling and DP noise (its internals "
            "changed); refusing to train with noise that may be predictable. Pin opacus to a tested version (>=1.5)."
        )


def _train_dp(model: nn.Module, loss_fn: LossFn, dataset: TensorDataset, opt: torch.optim.Optimizer,
              ledger: PrivacyLedger, key: str, steps: int, batch_size: int, planned: int, clip: float, mode: str,
              private_seed: int, dev: torch.device, strict: bool,
              sigma_override: float | None, proximal: ProximalTerm | None) -> PrivateTrainResult:
    """DP-SGD through Opacus with the ledger's accountant attached, so that its history continues."""
    q = 1.0 / len(DataLoader(dataset, batch_size=batch_size))  # Opacus' convention for the Poisson rate
    plan = ledger.plan(key, sample_rate=q, planned_total_steps=planned, noise_multiplier=sigma_override)
    sigma = plan.noise_multiplier
    engine = _engine_with_private_rng(ledger.accountant, private_seed, dev)
    engine.accountant = ledger.accountant_for(key)  # before make_private: its step hook binds this accountant
    made = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(dataset, batch_size=batch_size),
        noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=True, grad_sample_mode=mode, wrap_model=False,
    )  # wrap_model=False: hooks on the original model, so no "_module." wrapper ever exists
    hooks, dp_opt, loader = made[0], made[1], made[-1]
    _check_private_rng(engine, dp_opt, loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    done, message, batches = 0, "", _batches(loader, dev)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # functorch mode asks torch for CPU autocast in float32, which torch declines (harmless, two lines a step)
            warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
            for _ in range(steps):
                if ledger.would_exceed(key, noise_multiplier=sigma, sample_rate=q):
                    eps_budget, delta = ledger.budget(key)
                    message = (f"stopped after {done}/{steps} steps: one more step would take {key!r} past its "
                               f"budget epsilon={eps_budget:.4g} (spent {ledger.epsilon(key):.4g}, delta={delta:.3g})")
                    if strict:
                        raise BudgetExceededError(message)
                    break
                batch = next(batches)
                dp_opt.zero_grad(set_to_none=True)
                n, step_loss = batch[0].shape[0], float("nan")
                if n > 0:
                    loss = _per_example_loss(loss_fn, model, batch)
                    if mode == "ghost":  # two backward passes: norms, then the clipped sum (Li et al. 2022)
                        DPTensorFastGradientClipping(hooks, dp_opt, loss, "mean").backward()
                    else:
                        loss.mean().backward()
                    step_loss = float(loss.detach().mean())
                losses.append(step_loss)
                # An empty Poisson batch, or a parameter this batch did not use, still gets the noise-only update
                # the privacy analysis assumes: give it a zero (per-example) gradient.
                for p in trainable:
                    if mode == "ghost" and p.grad is None:
                        p.grad = torch.zeros_like(p)
                    elif mode != "ghost" and getattr(p, "grad_sample", None) is None:
                        p.grad_sample = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
                _dp_step(dp_opt, trainable, proximal)
                done += 1
    finally:
        hooks.cleanup()
        for obj, attrs in [(p, ("summed_grad", "grad_sample")) for p in model.parameters()] + [
                (m, ("activations", "max_batch_len")) for m in model.modules()]:
            for attr in attrs:
                if hasattr(obj, attr):
                    delattr(obj, attr)
    eps, delta = ledger.epsilon(key), ledger.budget(key)[1]
    message = message or f"trained {done} DP steps (sigma={sigma:.4g}, q={q:.4g}, C={clip}); epsilon={eps:.4g}"
    return PrivateTrainResult(done, losses, eps, delta, sigma, q, done < steps, message)

