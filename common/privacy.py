"""Differential privacy at one site: the per-site epsilon ledger and DP-SGD training with Opacus.

DP-SGD (Abadi et al. 2016): per-example gradients are clipped to L2 norm ``C`` (``max_grad_norm``), summed,
Gaussian noise ``N(0, sigma^2 C^2)`` is added and the sum is divided by the expected batch size; batches are
Poisson-sampled with rate ``q`` so that the RDP (Mironov 2017) or PRV (Gopi et al. 2021) accountant applies.

Budget choice. A site's budget ``(target_epsilon, target_delta)`` is split across the models trained on its
private data ("generator", "classifier", "regressor") by ``budget_split`` fractions: model ``m`` may spend
``(eps * f_m, delta * f_m)``. Each model has its own accountant and its budget is checked before every step,
so by basic composition (Dwork & Roth 2014, Thm 3.16) the site never spends more than
``(sum_m eps_m, sum_m delta_m) <= (target_epsilon, target_delta)``: the site total *is* what is enforced.
:meth:`PrivacyLedger.total_epsilon` reports that basic-composition sum; :meth:`PrivacyLedger.joint_epsilon`
the tighter composition of all histories in one accountant (information only).
"""

from __future__ import annotations

import math
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import BudgetExceededError, ConfigError, DataError

LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
DEFAULT_BUDGET_SPLIT: Mapping[str, float] = {"generator": 0.6, "classifier": 0.2, "regressor": 0.2}
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
OPTIMIZERS = ("adam", "adamw", "sgd")
_LEDGER_FORMAT = "difusal-privacy-ledger/1"
# RDP orders. Opacus' default list has 99 fractional orders whose log-moments are slow series (about 0.2-0.8 s
# per epsilon on this CPU); integer orders have a closed form (Mironov et al. 2019, Sec. 3.3) and cost ~1 ms.
# The bound is slightly looser (never tighter), so the guarantee is kept; every call here uses the same list.
RDP_ORDERS: tuple[float, ...] = (*range(2, 65), 80, 96, 128, 192, 256, 512)


@contextmanager
def _integer_orders_quiet() -> Iterator[None]:
    """Silence Opacus' "Optimal order is the smallest alpha" hint for :data:`RDP_ORDERS` (a tightness hint, not a
    soundness issue). Measured here: adding orders 1.25/1.5/1.75 left epsilon unchanged at the demo's sample
    rates and noise (e.g. q=0.17, sigma=0.7, 24 steps: 14.373 either way) and doubled the cost of each call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        yield


def _accountant_kwargs(accountant: str) -> dict[str, Any]:
    """Extra ``get_epsilon`` arguments of an accountant (the RDP orders for ``"rdp"``)."""
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


def _check_budget(target_epsilon: float | None, target_delta: float, accountant: str) -> None:
    """Raise :class:`ConfigError` for an invalid (epsilon, delta, accountant)."""
    if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon={target_epsilon!r} must be a positive finite number")
    if not 0 < target_delta < 1:
        raise ConfigError(f"target_delta={target_delta!r} must be in (0, 1); typically < 1/n_private_examples")
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant={accountant!r} is not supported; choose one of {list(ACCOUNTANTS)}")


def noise_multiplier_for(
    *, target_epsilon: float, target_delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp"
) -> float:
    """Noise multiplier (Opacus' binary search) keeping ``total_steps`` DP-SGD steps within the target.

    Parameters
    ----------
    target_epsilon, target_delta:
        Budget to reach after *all* steps of the run (rounds x local steps), not after one round.
    sample_rate, total_steps:
        Poisson sampling rate ``q`` in (0, 1]; steps planned for the whole federated run.
    accountant:
        ``"rdp"`` or ``"prv"``; the same accountant must track the spend later.

    Returns
    -------
    float
        ``sigma`` with ``epsilon(sigma, q, total_steps) <= target_epsilon`` (within 0.01 of it) under ``accountant``.
    """
    _check_budget(target_epsilon, target_delta, accountant)
    if not 0 < sample_rate <= 1 or total_steps < 1:
        raise ConfigError(f"need 0 < sample_rate <= 1 and total_steps >= 1; got {sample_rate!r}, {total_steps!r}")
    try:
        with _integer_orders_quiet():
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                              sample_rate=sample_rate, steps=int(total_steps),
                                              accountant=accountant, **_accountant_kwargs(accountant)))
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={target_delta} with q={sample_rate} "
            f"over {total_steps} steps ({err}); raise the budget or plan fewer steps"
        ) from err


@dataclass(frozen=True)
class ModelPlan:
    """Fixed DP-SGD parameters of one model, chosen at its first use."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    # True when sigma was derived from the budget for planned_steps (then those steps provably fit it);
    # False when it was given, and every step must be checked against the budget.
    derived: bool = False


class PrivacyLedger:
    """One site's privacy spend for the whole run: one Opacus accountant per model, restorable from JSON.

    Parameters
    ----------
    target_epsilon, target_delta:
        Site total budget, split across models by ``budget_split``; epsilon ``None`` tracks spend without a budget.
    accountant:
        ``"rdp"`` or ``"prv"``.
    budget_split:
        Fraction of the site budget per model key (positive, sum <= 1); default :data:`DEFAULT_BUDGET_SPLIT`.
    """

    def __init__(self, *, target_epsilon: float | None, target_delta: float, accountant: str = "rdp",
                 budget_split: Mapping[str, float] | None = None) -> None:
        _check_budget(target_epsilon, target_delta, accountant)
        split = {str(k): float(v) for k, v in (DEFAULT_BUDGET_SPLIT if budget_split is None else budget_split).items()}
        if not split or any(not f > 0 for f in split.values()) or sum(split.values()) > 1 + 1e-9:
            raise ConfigError(f"budget_split={split!r} needs positive fractions summing to at most 1")
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.target_delta = float(target_delta)
        self.accountant = accountant
        self.budget_split = split
        self._accountants: dict[str, IAccountant] = {}
        self._plans: dict[str, ModelPlan] = {}
        # False once any step drew its noise from a seed others can know (privacy.insecure-reproducible-noise);
        # sticky for the whole run, and reported with every figure of this ledger.
        self.private_noise = True

    def mark_noise_not_private(self) -> None:
        """Record that this ledger's steps use reproducible, public-seeded noise: its epsilon is not a guarantee."""
        self.private_noise = False

    def budget(self, model: str) -> tuple[float | None, float]:
        """``(epsilon, delta)`` that ``model`` may spend (epsilon ``None`` when the ledger has no target)."""
        if model not in self.budget_split:
            raise ConfigError(f"unknown model key {model!r}; this ledger budgets {sorted(self.budget_split)}")
        f = self.budget_split[model]
        return (None if self.target_epsilon is None else self.target_epsilon * f), self.target_delta * f

    def accountant_for(self, model: str) -> IAccountant:
        """The live accountant of ``model`` (created empty at first use), to attach to a ``PrivacyEngine``."""
        self.budget(model)
        return self._accountants.setdefault(model, create_accountant(mechanism=self.accountant))

    def plan(self, model: str, *, sample_rate: float, planned_total_steps: int,
             noise_multiplier: float | None = None) -> ModelPlan:
        """Fix at first use (derive sigma from the model's budget) or return the model's :class:`ModelPlan`."""
        eps, delta = self.budget(model)
        if model in self._plans:
            if self._plans[model].sample_rate != sample_rate:
                warnings.warn(f"{model!r}: sample rate {sample_rate} differs from the planned "
                              f"{self._plans[model].sample_rate}; the budget check still applies", stacklevel=2)
            return self._plans[model]
        derived = noise_multiplier is None
        if noise_multiplier is None:
            if eps is None:
                raise ConfigError(f"ledger has no target_epsilon: pass noise_multiplier for {model!r}, or use "
                                  "ledger=None for non-private (public-data) training")
            noise_multiplier = noise_multiplier_for(target_epsilon=eps, target_delta=delta, sample_rate=sample_rate,
                                                    total_steps=planned_total_steps, accountant=self.accountant)
        if not noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier={noise_multiplier!r} must be > 0 for DP training")
        self._plans[model] = ModelPlan(float(noise_multiplier), float(sample_rate), int(planned_total_steps), derived)
        return self._plans[model]

    def _eps(self, history: list, delta: float) -> float:
        """Epsilon at ``delta`` of an accountant history (0 when empty)."""
        acc = create_accountant(mechanism=self.accountant)
        acc.history = [tuple(h) for h in history]
        if not acc.history:
            return 0.0
        with _integer_orders_quiet():
            return float(acc.get_epsilon(delta=delta, **_accountant_kwargs(self.accountant)))

    def steps(self, model: str) -> int:
        """DP-SGD steps accounted so far for ``model``."""
        return sum(int(n) for _, _, n in self.accountant_for(model).history)

    def epsilon(self, model: str) -> float:
        """Cumulative epsilon of ``model`` at its delta share."""
        return self._eps(self.accountant_for(model).history, self.budget(model)[1])

    def would_exceed(self, model: str, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        """Whether ``steps`` more steps would take ``model`` past its epsilon budget (simulated on a copy)."""
        eps_budget, delta = self.budget(model)
        if eps_budget is None:
            return False
        acc, plan = self.accountant_for(model), self._plans.get(model)
        # Fast path: a history of planned steps only stays within budget up to planned_steps, since
        # noise_multiplier_for guaranteed epsilon(sigma, q, planned_steps) <= budget and epsilon grows with steps.
        key = None if plan is None else (plan.noise_multiplier, plan.sample_rate)
        if (key == (noise_multiplier, sample_rate) and all((s, q) == key for s, q, _ in acc.history)
                and plan is not None and plan.derived and self.steps(model) + steps <= plan.planned_steps):
            return False
        sim = create_accountant(mechanism=self.accountant)
        sim.history = [tuple(h) for h in acc.history]
        for _ in range(steps):  # step() exactly as training would, so merged histories match
            sim.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return self._eps(sim.history, delta) > eps_budget

    def exhausted(self, model: str) -> bool:
        """Whether one more planned step of ``model`` would exceed its budget (False before first use)."""
        self.budget(model)
        plan = self._plans.get(model)
        return plan is not None and self.would_exceed(model, noise_multiplier=plan.noise_multiplier,
                                                      sample_rate=plan.sample_rate)

    def total_epsilon(self) -> float:
        """Site-wide spend by basic composition: the sum of the models' epsilons (at the sum of their deltas)."""
        return sum(self.epsilon(m) for m in self._accountants)

    def joint_epsilon(self) -> float:
        """Site-wide epsilon at ``target_delta``, composing every model's history in one accountant (tighter)."""
        return self._eps([h for acc in self._accountants.values() for h in acc.history], self.target_delta)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per model: epsilon, delta, steps, noise_multiplier, sample_rate, accountant, exhausted, budget, private_noise
        and the accountant's history (what an auditor recomputes epsilon from)."""
        out: dict[str, dict[str, Any]] = {}
        for m in self.budget_split:
            plan, (eps_budget, delta) = self._plans.get(m), self.budget(m)
            out[m] = {"epsilon": self.epsilon(m), "delta": delta, "steps": self.steps(m),
                      "noise_multiplier": plan and plan.noise_multiplier, "sample_rate": plan and plan.sample_rate,
                      "planned_steps": plan and plan.planned_steps, "accountant": self.accountant,
                      "exhausted": self.exhausted(m), "budget_epsilon": eps_budget,
                      "private_noise": self.private_noise,
                      # every (sigma, q, steps) segment: q changes when released images join a DP dataset
                      "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant_for(m).history]}
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: budgets, plans and every accountant's history."""
        models = {}
        for m in sorted(set(self._accountants) | set(self._plans)):
            plan = self._plans.get(m)
            hist = self._accountants[m].history if m in self._accountants else []
            models[m] = {"history": [[float(s), float(q), int(n)] for s, q, n in hist],
                         "plan": None if plan is None else [plan.noise_multiplier, plan.sample_rate,
                                                            plan.planned_steps, plan.derived]}
        return {"format": _LEDGER_FORMAT, "target_epsilon": self.target_epsilon, "target_delta": self.target_delta,
                "accountant": self.accountant, "budget_split": dict(self.budget_split), "models": models,
                "private_noise": self.private_noise}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`state_dict` output; epsilon then continues exactly."""
        if d.get("format") != _LEDGER_FORMAT:
            raise DataError(f"not a privacy ledger state (format={d.get('format')!r}, expected {_LEDGER_FORMAT!r})")
        try:
            ledger = cls(target_epsilon=d["target_epsilon"], target_delta=d["target_delta"],
                         accountant=d["accountant"], budget_split=d["budget_split"])
            for m, entry in d["models"].items():
                ledger.accountant_for(m).history = [(float(s), float(q), int(n)) for s, q, n in entry["history"]]
                if entry["plan"] is not None:
                    s, q, n, *derived = entry["plan"]  # a 3-item plan (older state) is checked every step
                    ledger._plans[m] = ModelPlan(float(s), float(q), int(n), bool(derived and derived[0]))
            # A state without the key predates site-secret noise: its noise was seeded from the public run seed.
            ledger.private_noise = d.get("private_noise") is True
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise DataError(f"malformed privacy ledger state ({err!r}); re-save it with state_dict()") from err
        return ledger


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
    grad_sample_mode: str = "functorch", seed: int = 0, device: str = "cpu", optimizer: str = "adam",
    strict: bool = False, noise_multiplier: float | None = None, noise_seed: int | None = None,
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
        Clipping bound ``C``; Opacus per-sample gradient mode; ``"adam"``, ``"adamw"`` or ``"sgd"``.
    seed, device:
        Seeds the public randomness (shuffling without DP, the global RNG: forked, restored after); torch device.
    noise_seed:
        Seeds the *private* randomness of DP-SGD: Poisson sampling and the Gaussian noise. It must be unknown to
        whoever sees the trained weights, or the noise can be regenerated and subtracted. A site passes a seed
        derived from its secret (:func:`common.local_update.dp_noise_seed`); ``None`` draws a fresh
        one from the operating system (:mod:`secrets`). Only ``privacy.insecure-reproducible-noise`` passes a
        seed anyone can know, and everything it produces is marked not private.
    strict:
        Raise :class:`BudgetExceededError` instead of stopping when the next step would exceed the budget.
    noise_multiplier:
        Overrides the derived noise multiplier at the model's first use (required if the ledger has no target).

    Returns
    -------
    PrivateTrainResult
        Steps done, per-step mean losses (NaN for an empty Poisson batch), cumulative epsilon, DP settings.
    """
    if steps < 0 or batch_size < 1 or not lr > 0 or not max_grad_norm > 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0, max_grad_norm > 0; got {steps}, {batch_size}, "
                         f"{lr}, {max_grad_norm}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES or optimizer not in OPTIMIZERS:
        raise ValueError(f"grad_sample_mode must be in {list(GRAD_SAMPLE_MODES)} and optimizer in {list(OPTIMIZERS)};"
                         f" got {grad_sample_mode!r}, {optimizer!r}")
    if len(dataset) == 0:
        raise DataError("train_private got an empty dataset: the site has no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    if ledger is not None:
        validate_for_dp(model)
    dev = torch.device(device)
    was_training = model.training
    model.to(dev).train()
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer](params, lr=lr)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        try:
            if ledger is None:
                return _train_public(model, loss_fn, dataset, opt, steps, batch_size, gen, dev)
            private_seed = secrets.randbits(63) if noise_seed is None else int(noise_seed)
            return _train_dp(model, loss_fn, dataset, opt, ledger, model_key, steps, batch_size, planned_total_steps,
                             max_grad_norm, grad_sample_mode, private_seed, dev, strict, noise_multiplier)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)


def _train_public(model: nn.Module, loss_fn: LossFn, dataset: TensorDataset, opt: torch.optim.Optimizer,
                  steps: int, batch_size: int, gen: torch.Generator, dev: torch.device) -> PrivateTrainResult:
    """Ordinary shuffled minibatch training (public data, no DP)."""
    batches = _batches(DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen), dev)
    losses: list[float] = []
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = _per_example_loss(loss_fn, model, batch).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return PrivateTrainResult(steps, losses, 0.0, 0.0, 0.0, 0.0, False, f"trained {steps} steps without DP")


def _engine_with_private_rng(accountant: str, private_seed: int, dev: torch.device) -> PrivacyEngine:
    """A ``PrivacyEngine`` whose Poisson sampler and noise draw from one generator seeded by ``private_seed``.

    Opacus' ``secure_mode=True`` would take that generator from ``torchcsprng`` (unmaintained, not installable
    for current torch). Its other half is kept: with ``secure_mode`` set, each noise draw sums four Gaussian
    samples (Holohan & Braghin 2021), which defeats the floating-point attack on the noise's low bits
    (Jin et al. 2022). The generator is torch's Mersenne Twister, seeded with 63 bits that only the site knows
    (derived from its 256-bit secret, :mod:`common.site_state`); it is not a CSPRNG, which the README states.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
    engine.secure_mode = True  # noise as four summed draws; sampler and noise take engine.secure_rng
    engine.secure_rng = torch.Generator(device=dev).manual_seed(int(private_seed))
    return engine


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
              sigma_override: float | None) -> PrivateTrainResult:
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
                dp_opt.step()  # clip, noise, scale; its hook records (sigma, q) in the ledger's accountant
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

