"""Privacy ledger and DP-SGD training (common.privacy): accounting, budget checks, Opacus hygiene, noise scale."""

from __future__ import annotations

import json
import math
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import TensorDataset

from common.core.errors import BudgetExceededError, ConfigError, DataError
from common.privacy.dpsgd import train_private, validate_for_dp
from common.privacy.ledger import RDP_ORDERS, PrivacyLedger, noise_multiplier_for

# Opacus notes that a larger RDP order might tighten tiny budgets; the bound it returns is still valid.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")



class TinyNet(nn.Module):
    """Flatten -> Linear -> tanh -> Linear: a tiny DP-compatible classifier for 8x8 images."""

    def __init__(self, n_out: int = 2) -> None:
        super().__init__()
        self.body = nn.Linear(64, 8)
        self.head = nn.Linear(8, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x.flatten(1))))


class LoRALinear(nn.Module):
    """Frozen base layer plus a trainable low-rank update ``B A`` (LoRA, Hu et al. 2021)."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_a = nn.Linear(d_in, rank, bias=False)
        self.lora_b = nn.Linear(rank, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def ce_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Per-example cross-entropy on (images, plane, ...)."""
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def bright_dark(n: int, seed: int = 0) -> TensorDataset:
    """8x8 images: label 1 bright, label 0 dark, plus noise (4-tuple batches like common.data.tensors)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (torch.where(y == 1, 0.5, -0.5)[:, None, None, None] + 0.3 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1)
    nan = torch.full((n,), float("nan"))
    return TensorDataset(x, y, nan, nan.clone())


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def budget_examples(n: int, *, eps: tuple[float, float], q: tuple[float, float],
                    steps: tuple[int, int]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run a test on ``n`` drawn budgets: ``eps``, sample rate ``q`` and ``steps`` in the given closed ranges."""
    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        drawn = given(eps=st.floats(*eps), q=st.floats(*q), steps=st.integers(*steps))(test)
        return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])(drawn)

    return wrap


# -- noise multiplier ------------------------------------------------------------------------------------------
@budget_examples(5, eps=(0.5, 10.0), q=(0.002, 0.05), steps=(1, 200))
def test_noise_multiplier_never_overshoots_target(eps: float, q: float, steps: int) -> None:
    # Prepare
    acc = create_accountant(mechanism="rdp")
    # Execute
    sigma = noise_multiplier_for(target_epsilon=eps, target_delta=1e-5, sample_rate=q, total_steps=steps)
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    spent = acc.get_epsilon(delta=1e-5, alphas=list(RDP_ORDERS))  # the orders every ledger uses
    # Assert: never above the target, and not wastefully below it (Opacus' search tolerance is 0.01)
    assert sigma > 0
    assert spent <= eps + 1e-9
    assert spent >= eps - 0.011


def test_noise_multiplier_rejects_bad_and_impossible_budgets() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=-1.0, target_delta=1e-5, sample_rate=0.1, total_steps=10)
    with pytest.raises(ConfigError, match="sample_rate"):
        noise_multiplier_for(target_epsilon=1.0, target_delta=1e-5, sample_rate=1.5, total_steps=10)
    with pytest.raises(ConfigError, match="raise the budget or plan fewer steps"):
        noise_multiplier_for(target_epsilon=1e-3, target_delta=1e-5, sample_rate=1.0, total_steps=1000)


# -- ledger ----------------------------------------------------------------------------------------------------
def test_budget_split_enforces_site_total() -> None:
    # Prepare
    ledger = PrivacyLedger(target_epsilon=9.0, target_delta=1e-5, budget_split={"generator": 2 / 3, "classifier": 1 / 3})
    # Execute
    gen_eps, gen_delta = ledger.budget("generator")
    cls_eps, cls_delta = ledger.budget("classifier")
    # Assert
    assert gen_eps == pytest.approx(6.0) and cls_eps == pytest.approx(3.0)
    assert gen_delta + cls_delta == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="unknown model key 'regressor'"):
        ledger.budget("regressor")
    with pytest.raises(ConfigError, match="summing to at most 1"):
        PrivacyLedger(target_epsilon=1.0, target_delta=1e-5, budget_split={"generator": 0.8, "classifier": 0.4})


def test_ledger_state_round_trips_through_json() -> None:
    # Prepare
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=1e-5)
    ledger.plan("classifier", sample_rate=0.05, planned_total_steps=50, noise_multiplier=3.0)
    for sigma in (3.0, 3.0, 4.0):
        ledger.accountant_for("classifier").step(noise_multiplier=sigma, sample_rate=0.05)
    ledger.accountant_for("regressor").step(noise_multiplier=3.0, sample_rate=0.1)
    # Execute
    restored = PrivacyLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    # Assert
    assert restored.state_dict() == ledger.state_dict()
    assert restored.summary() == ledger.summary()
    assert restored.epsilon("classifier") == ledger.epsilon("classifier") > 0
    assert restored.steps("classifier") == 3
    assert restored.total_epsilon() == pytest.approx(ledger.epsilon("classifier") + ledger.epsilon("regressor"))
    assert 0 < restored.joint_epsilon() <= restored.total_epsilon() + 1e-9
    with pytest.raises(DataError, match="not a privacy ledger state"):
        PrivacyLedger.from_state_dict({"format": "something-else"})


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_composes_exactly_across_save_and_restore(accountant: str) -> None:
    # Prepare
    data = bright_dark(64)  # q = 1/8
    common = dict(batch_size=8, lr=0.05, model_key="classifier", planned_total_steps=6, grad_sample_mode="hooks",
                  noise_multiplier=3.0)
    split = {"classifier": 1.0}
    interrupted = PrivacyLedger(target_epsilon=50.0, target_delta=1e-5, accountant=accountant, budget_split=split)
    uninterrupted = PrivacyLedger(target_epsilon=50.0, target_delta=1e-5, accountant=accountant, budget_split=split)
    # Execute
    train_private(TinyNet(), ce_loss, data, steps=3, ledger=interrupted, seed=1, **common)
    restored = PrivacyLedger.from_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    second = train_private(TinyNet(), ce_loss, data, steps=3, ledger=restored, seed=2, **common)
    whole = train_private(TinyNet(), ce_loss, data, steps=6, ledger=uninterrupted, seed=1, **common)
    # Assert
    assert restored.steps("classifier") == uninterrupted.steps("classifier") == 6
    assert second.epsilon == pytest.approx(whole.epsilon, abs=1e-9)
    assert restored.epsilon("classifier") == pytest.approx(uninterrupted.epsilon("classifier"), abs=1e-9)
    # a fresh accountant for the second half (the per-round-engine bug) would report less
    assert second.epsilon > PrivacyLedger(target_epsilon=50.0, target_delta=1e-5, accountant=accountant,
                                          budget_split=split)._eps([(3.0, 0.125, 3)], 1e-5)


@budget_examples(4, eps=(1.0, 5.0), q=(0.01, 0.05), steps=(2, 15))
def test_budget_check_refuses_the_overshooting_step(eps: float, q: float, steps: int) -> None:
    # Prepare: a budget planned for ``steps`` steps
    ledger = PrivacyLedger(target_epsilon=eps, target_delta=1e-5, budget_split={"generator": 1.0})
    plan = ledger.plan("generator", sample_rate=q, planned_total_steps=steps)
    acc = ledger.accountant_for("generator")
    # Execute: take steps as long as the ledger allows them
    while not ledger.would_exceed("generator", noise_multiplier=plan.noise_multiplier, sample_rate=q):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=q)
        assert ledger.steps("generator") <= 10 * steps  # the loop must end
    # Assert: every planned step was allowed, the spend is within budget and the next step would overshoot
    assert ledger.steps("generator") >= steps
    assert ledger.epsilon("generator") <= eps
    assert ledger.exhausted("generator")
    acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=q)
    assert ledger.epsilon("generator") > eps


def test_train_private_stops_at_budget_and_strict_raises() -> None:
    # Prepare
    data = bright_dark(64)  # q = 1/8
    ledger = PrivacyLedger(target_epsilon=1.0, target_delta=1e-5, budget_split={"classifier": 1.0})
    kwargs = dict(batch_size=8, lr=0.05, ledger=ledger, model_key="classifier", planned_total_steps=4,
                  grad_sample_mode="hooks")
    # Execute
    result = train_private(TinyNet(), ce_loss, data, steps=50, **kwargs)
    model = TinyNet()
    before = _params(model)
    # Assert
    assert result.stopped_by_budget
    assert 4 <= result.steps < 50 and len(result.losses) == result.steps
    assert result.epsilon <= 1.0 and "budget" in result.message
    assert ledger.exhausted("classifier")
    with pytest.raises(BudgetExceededError, match="past its budget"):
        train_private(model, ce_loss, data, steps=1, strict=True, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any update


# -- training --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_dp_training_learns_and_leaves_a_clean_model(mode: str) -> None:
    # Prepare
    data = bright_dark(64)
    model = TinyNet()
    ledger = PrivacyLedger(target_epsilon=10.0, target_delta=1e-5, budget_split={"classifier": 1.0})
    with torch.no_grad():
        loss_before = ce_loss(model, data.tensors).mean().item()
    # Execute
    result = train_private(model, ce_loss, data, steps=30, batch_size=16, lr=0.05, ledger=ledger,
                           model_key="classifier", planned_total_steps=30, grad_sample_mode=mode, noise_multiplier=1.2)
    with torch.no_grad():
        loss_after = ce_loss(model, data.tensors).mean().item()
    # Assert
    assert result.steps == 30 and not result.stopped_by_budget
    assert result.epsilon == pytest.approx(ledger.epsilon("classifier")) and result.epsilon > 0
    assert result.sample_rate == 0.25 and result.noise_multiplier == 1.2
    assert loss_after < 0.6 * loss_before
    assert all("_module." not in k for k in model.state_dict())
    assert not any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "summed_grad", "_forward_counter"))
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(m, "autograd_grad_sample_hooks") for m in model.modules())


def test_non_private_path_trains_with_zero_epsilon() -> None:
    # Prepare
    data = bright_dark(64)
    model = TinyNet()
    model.eval()
    # Execute
    result = train_private(model, ce_loss, data, steps=40, batch_size=16, lr=0.05, ledger=None,
                           model_key="classifier", planned_total_steps=40)
    # Assert
    assert result.epsilon == 0.0 and not result.stopped_by_budget and result.steps == 40
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert not model.training  # mode restored


def test_only_trainable_parameters_change() -> None:
    # Prepare: a LoRA-like model (frozen base, trainable low-rank adapters)
    model = nn.Sequential(nn.Flatten(), LoRALinear(64, 2))
    before = _params(model)
    ledger = PrivacyLedger(target_epsilon=10.0, target_delta=1e-5, budget_split={"generator": 1.0})
    # Execute
    result = train_private(model, ce_loss, bright_dark(32), steps=5, batch_size=8, lr=0.05, ledger=ledger,
                           model_key="generator", planned_total_steps=5, grad_sample_mode="functorch",
                           noise_multiplier=1.0)
    after = model.state_dict()
    # Assert
    assert result.steps == 5
    assert torch.equal(before["1.base.weight"], after["1.base.weight"])
    assert torch.equal(before["1.base.bias"], after["1.base.bias"])
    assert not torch.equal(before["1.lora_b.weight"], after["1.lora_b.weight"])
    assert not torch.equal(before["1.lora_a.weight"], after["1.lora_a.weight"])


def test_measured_noise_matches_theory() -> None:
    # Prepare: a zero-gradient loss, so one SGD step moves the weights by noise only
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    sigma, clip, lr, batch = 2.0, 1.5, 0.1, 16

    def zero_loss(m: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        return (m(b[0]) * 0.0).sum(dim=1)

    ledger = PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"classifier": 1.0})
    # Execute
    train_private(model, zero_loss, bright_dark(64), steps=1, batch_size=batch, lr=lr, ledger=ledger,
                  model_key="classifier", planned_total_steps=1, max_grad_norm=clip, optimizer="sgd",
                  grad_sample_mode="hooks", noise_multiplier=sigma)
    delta = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    # Assert: update = -lr * N(0, (sigma C)^2) / B  (expected batch size B = N q = 16)
    expected = lr * sigma * clip / batch
    assert delta.mean().abs() < 4 * expected / math.sqrt(delta.numel())
    assert delta.std().item() == pytest.approx(expected, rel=0.06)


def test_empty_poisson_batches_still_take_noisy_accounted_steps() -> None:
    # Prepare: 4 examples, q = 1/4: a batch is empty with probability (3/4)^4 ~ 0.32
    data = bright_dark(4)
    ledger = PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"classifier": 1.0})
    model = TinyNet()
    # Execute
    result = train_private(model, ce_loss, data, steps=20, batch_size=1, lr=0.01, ledger=ledger,
                           model_key="classifier", planned_total_steps=20, grad_sample_mode="hooks",
                           noise_multiplier=1.0)
    # Assert
    n_empty = sum(math.isnan(x) for x in result.losses)
    assert result.steps == 20 and ledger.steps("classifier") == 20
    assert 1 <= n_empty < 20
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dp_training_is_seeded_by_its_private_noise_seed() -> None:
    # Prepare
    data = bright_dark(32)

    def run(noise_seed: int) -> dict[str, Tensor]:
        torch.manual_seed(123)  # same initial weights
        model = TinyNet()
        ledger = PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"classifier": 1.0})
        train_private(model, ce_loss, data, steps=3, batch_size=8, lr=0.05, ledger=ledger, model_key="classifier",
                      planned_total_steps=3, grad_sample_mode="hooks", noise_multiplier=1.0, seed=0,
                      noise_seed=noise_seed)
        return _params(model)

    # Execute
    a, b, c = run(0), run(0), run(1)
    # Assert
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batchnorm_model_is_rejected_with_a_clear_message() -> None:
    # Prepare
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    frozen_bn = nn.Sequential(nn.BatchNorm2d(1).requires_grad_(False), nn.Flatten(), nn.Linear(64, 2))
    ledger = PrivacyLedger(target_epsilon=10.0, target_delta=1e-5)
    # Execute / Assert
    with pytest.raises(ConfigError, match="BatchNorm.*GroupNorm"):
        train_private(model, ce_loss, bright_dark(8), steps=1, batch_size=4, lr=0.1, ledger=ledger,
                      model_key="classifier", planned_total_steps=1)
    with pytest.raises(ConfigError, match="frozen BatchNorm2d"):
        validate_for_dp(frozen_bn)
    validate_for_dp(TinyNet())  # a clean model passes


def test_loss_fn_must_return_per_example_losses() -> None:
    # Prepare
    def mean_loss(m: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        return ce_loss(m, b).mean()

    # Execute / Assert
    with pytest.raises(ValueError, match="per-example losses of shape"):
        train_private(TinyNet(), mean_loss, bright_dark(8), steps=1, batch_size=8, lr=0.1, ledger=None,
                      model_key="classifier", planned_total_steps=1)


def test_a_given_noise_multiplier_is_checked_against_the_budget_every_step() -> None:
    # Prepare: sigma 1.5 at q = 1/3 spends epsilon 1.93, 2.47, 2.87, 3.21 after 1..4 steps (delta 6e-6)
    ledger = PrivacyLedger(target_epsilon=5.0, target_delta=1e-5)  # generator share: epsilon 3.0
    ledger.plan("generator", sample_rate=1 / 3, planned_total_steps=8, noise_multiplier=1.5)
    acc = ledger.accountant_for("generator")
    # Execute
    allowed = 0
    while not ledger.would_exceed("generator", noise_multiplier=1.5, sample_rate=1 / 3):
        acc.step(noise_multiplier=1.5, sample_rate=1 / 3)
        allowed += 1
    # Assert: the planned 8 steps do not fit; the check stops at 3, even after a save/restore
    assert allowed == 3 and ledger.epsilon("generator") <= 3.0
    assert PrivacyLedger.from_state_dict(ledger.state_dict()).exhausted("generator")


# -- tail averaging ---------------------------------------------------------------------------------------------
def _dp_iterates(tail_average: float, steps: int = 10, epsilon: float = 10.0,
                 planned: int | None = None) -> tuple[TinyNet, list, object]:
    """A seeded DP run of TinyNet; returns the model, the iterate after every step (recorded by a test hook on the
    optimizer, i.e. what the optimizer produced, before any averaging) and the result."""
    torch.manual_seed(0)
    model = TinyNet()
    iterates: list[list[Tensor]] = []

    def record(opt: torch.optim.Optimizer, *_: object) -> None:  # a global post-step hook: once per update
        iterates.append([p.detach().clone() for g in opt.param_groups for p in g["params"]])

    ledger = PrivacyLedger(target_epsilon=epsilon, target_delta=1e-5, budget_split={"classifier": 1.0})
    handle = register_optimizer_step_post_hook(record)
    try:
        result = train_private(model, ce_loss, bright_dark(64), steps=steps, batch_size=16, lr=0.05, ledger=ledger,
                               model_key="classifier", planned_total_steps=planned or steps, noise_seed=7,
                               tail_average=tail_average)
    finally:
        handle.remove()
    return model, iterates, result


def test_tail_average_is_the_mean_of_the_last_iterates_and_costs_no_privacy() -> None:
    # Execute: the same private noise seed, last iterate vs the mean of the last half
    last, iterates, res_last = _dp_iterates(0.0)
    averaged, iterates_avg, res_avg = _dp_iterates(0.5)
    # Assert: averaging does not change the trajectory, only what is left in the model at the end
    assert len(iterates) == len(iterates_avg) == 10
    assert all(torch.equal(a, b) for it, it2 in zip(iterates, iterates_avg) for a, b in zip(it, it2))
    assert all(torch.equal(p, it) for p, it in zip(last.parameters(), iterates[-1]))
    mean = [torch.stack([it[i] for it in iterates[5:]]).mean(0) for i in range(len(iterates[0]))]
    assert all(torch.allclose(p, m, atol=1e-6) for p, m in zip(averaged.parameters(), mean))
    assert not all(torch.allclose(p, it, atol=1e-6) for p, it in zip(averaged.parameters(), iterates[-1]))
    assert res_avg.epsilon == res_last.epsilon and res_avg.steps == res_last.steps == 10


def test_tail_average_of_a_run_stopped_by_budget_and_bad_fraction() -> None:
    # Noise planned for 10 steps, 40 asked: the budget stops the run before the window (the last 20 % of 40) opens
    model, iterates, res = _dp_iterates(0.2, steps=40, epsilon=0.5, planned=10)
    assert res.stopped_by_budget and 0 < res.steps < 32 and len(iterates) == res.steps
    assert all(torch.equal(p, it) for p, it in zip(model.parameters(), iterates[-1]))  # the last iterate stays
    with pytest.raises(ValueError, match="tail_average"):
        train_private(TinyNet(), ce_loss, bright_dark(8), steps=2, batch_size=4, lr=0.1, ledger=None,
                      model_key="classifier", planned_total_steps=2, tail_average=1.5)
