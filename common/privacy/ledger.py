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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, get_args

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.core.config import AccountantName, PrivacyConfig
from common.core.errors import ConfigError, DataError

# The default shares of the site budget: the config's defaults (privacy.budget-generator etc.), stated there once.
DEFAULT_BUDGET_SPLIT: Mapping[str, float] = PrivacyConfig().budget_split()
ACCOUNTANTS = get_args(AccountantName)
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
        # the same tightness hint at the other end (tiny epsilons, e.g. one full-batch step at large noise)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def _accountant_kwargs(accountant: str) -> dict[str, Any]:
    """Extra ``get_epsilon`` arguments of an accountant (the RDP orders for ``"rdp"``)."""
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


def history_epsilon(history: list, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of an accountant history of ``(noise_multiplier, sample_rate, steps)`` (0 when empty)."""
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not acc.history:
        return 0.0
    with _integer_orders_quiet():
        return float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))


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
        # Models trained with distributed DP (model -> the number of sites whose noise shares make the sum's noise):
        # their history is the CENTRAL one (what the server sees); the site's own share alone, what it keeps when
        # the server and every other site collude, has noise multiplier sigma / sqrt(num_sites) (its LOCAL epsilon).
        self._distributed: dict[str, int] = {}

    def mark_distributed(self, model: str, num_sites: int) -> None:
        """Record that ``model``'s steps are distributed-DP sums of ``num_sites`` noise shares (fixed for the run)."""
        self.budget(model)
        if num_sites < 2:
            raise ConfigError(f"distributed DP of {model!r} needs >= 2 sites' shares, got {num_sites}")
        if self._distributed.setdefault(model, int(num_sites)) != int(num_sites):
            raise ConfigError(f"{model!r} was accounted with {self._distributed[model]} sites' noise shares; this run "
                              f"says {num_sites}: one ledger cannot mix them")

    def local_epsilon(self, model: str) -> float:
        """Epsilon of ``model`` against the server and every other site colluding (its own noise share only);
        the model's :meth:`epsilon` for a model without distributed DP."""
        n = self._distributed.get(model)
        history = self.accountant_for(model).history
        if n is None:
            return self.epsilon(model)
        return history_epsilon([(s / n**0.5, q, k) for s, q, k in history], self.budget(model)[1], self.accountant)

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
        return history_epsilon(history, delta, self.accountant)

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
            if m in self._distributed:  # epsilon above is the central figure; the site keeps the local one
                out[m]["distributed"] = {"unit": "example", "num_sites": self._distributed[m],
                                         "central_epsilon": out[m]["epsilon"], "local_epsilon": self.local_epsilon(m),
                                         "statement": "central: against the server and anyone who sees only the "
                                                      "secure sums; local: against the server and every other site "
                                                      "colluding (this site's own noise share)"}
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
                "private_noise": self.private_noise, "distributed": dict(self._distributed)}

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
            ledger._distributed = {str(k): int(v) for k, v in d.get("distributed", {}).items()}
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise DataError(f"malformed privacy ledger state ({err!r}); re-save it with state_dict()") from err
        return ledger
