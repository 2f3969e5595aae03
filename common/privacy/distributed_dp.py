"""Distributed DP for secure aggregation: each site adds a share of the noise, the secure sum carries it once.

The mechanism is the distributed discrete Gaussian (DDG) of Kairouz, Liu & Steinke (2021, "The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation") applied to DP-FedAvg's round update (McMahan et
al. 2018, "Learning Differentially Private Recurrent Language Models"):

1. a site clips its round update ``u`` (the change of its trained arrays, in units of the update bound of each model
   part, :func:`server.strategy.update_bounds`) to L2 norm ``C`` (``privacy.distributed-clip``);
2. scales it by ``s`` integers per unit and rounds it to the integer grid (nearest; ``||round(s u)||_2 <=
   s C + sqrt(d) / 2``, the sensitivity ``Delta``);
3. adds integer noise drawn from the discrete Gaussian ``N_Z(0, sigma_share^2)`` with
   ``sigma_share = z * Delta / sqrt(N)`` (``z`` the noise multiplier, ``N`` the consortium's sites);
4. reduces it modulo ``M = 2**22`` (Flower's SecAgg+ quantization range) and hands it to SecAgg+, which sums the
   sites' vectors exactly (modulo ``M``): the server learns only ``sum_i k_i mod M``, a post-processing of the
   noisy sum.

The privacy unit is a **site** (add/remove one hospital's whole data set: it bounds every patient of it too).
Guarantees, as rho-zCDP per round, composed over rounds by addition and converted to (epsilon, delta) by
``epsilon = rho + 2 sqrt(rho log(1/delta))`` (Bun & Steinke 2016, Prop. 1.3):

- **central** (the server, or anyone who sees only the sum, when ``n`` sites' shares are in it): Kairouz et al.
  Prop. 14 gives ``rho = eps^2 / 2`` with ``eps^2 = Delta^2 / (n sigma_share^2) + tau d / 2`` and
  ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma_share^2 k / (k + 1))`` (the sum of discrete Gaussians is not
  exactly one; ``tau`` is below 1e-300 at the share sizes used here). With all ``N`` sites: ``rho = 1 / (2 z^2)``.
- **local** (the server colluding with every other site, who can subtract their own shares): the site's own share
  is a discrete Gaussian mechanism, ``rho = Delta^2 / (2 sigma_share^2) = N / (2 z^2)`` (Canonne, Kamath &
  Steinke 2020, Thm. 4): the guarantee a site keeps whatever the others do.

A site that drops after masking takes its share with it: the sum then carries ``n < N`` shares, and the central
figure of that round is computed with the ``n`` that were summed (the server records it). Rounding to the grid and
the modular wrap are post-processing of what the site already noised (a sum beyond ``M / 2`` in one coordinate
wraps; ``s`` leaves 8 noise standard deviations of headroom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from common.core.config import RunConfig
from common.core.errors import ConfigError

# Flower's SecAgg+ quantization range (``quantization_range``) and the clipping range its quantizer maps onto it:
# a float ``r * 2c / M - c`` (r an integer in [0, M)) is quantized to exactly ``r``.
MODULUS = 2**22
CLIP_RANGE = 2.0
# Largest per-coordinate size of an honest update in bound units (the server's slack 1.05, plus float rounding).
MAX_COORDINATE = 1.1
# Noise standard deviations of headroom before a coordinate of the sum wraps modulo ``MODULUS``.
HEADROOM_SD = 8.0


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of the discrete Gaussian ``N_Z(0, sigma^2)`` (P(x) proportional to exp(-x^2 / (2 sigma^2))).

    Canonne, Kamath & Steinke (2020), Alg. 3: a discrete Laplace proposal of scale ``t = floor(sigma) + 1``
    (difference of two geometric draws), accepted with probability ``exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2))``;
    vectorised, in floating point (their exact rational arithmetic is not reproduced).
    """
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r} must be > 0")
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # P(geometric success) = 1 - e^{-1/t}
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        n = max(16, int(1.3 * (size - filled)))
        y = rng.geometric(p, n).astype(np.int64) - rng.geometric(p, n).astype(np.int64)
        accept = rng.random(n) < np.exp(-np.square(np.abs(y) - sigma * sigma / t) / (2 * sigma * sigma))
        take = y[accept][: size - filled]
        out[filled:filled + len(take)] = take
        filled += len(take)
    return out


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta)-DP of a rho-zCDP mechanism (Bun & Steinke 2016, Prop. 1.3)."""
    if rho <= 0:
        return 0.0
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def epsilon_to_zcdp(epsilon: float, delta: float) -> float:
    """The largest rho whose :func:`zcdp_to_epsilon` is ``epsilon``."""
    log = math.log(1.0 / delta)
    return (math.sqrt(log + epsilon) - math.sqrt(log)) ** 2


def ddg_tau(sigma_share: float, n: int) -> float:
    """Kairouz et al. (2021) Prop. 14's ``tau``: how far a sum of ``n`` discrete Gaussians is from one."""
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma_share**2 * k / (k + 1)) for k in range(1, n))


def central_rho(sensitivity: float, sigma_share: float, n: int, dim: int) -> float:
    """zCDP of one round's sum of ``n`` shares of std ``sigma_share`` (Kairouz et al. Prop. 14, L2 branch)."""
    if n < 1:
        return math.inf
    if sigma_share < 0.5:
        raise ValueError(f"sigma_share={sigma_share!r}: the bound needs sigma >= 1/2")
    eps2 = sensitivity**2 / (n * sigma_share**2) + 0.5 * ddg_tau(sigma_share, n) * dim
    return eps2 / 2


def local_rho(sensitivity: float, sigma_share: float) -> float:
    """zCDP of one site's own share (Canonne et al. 2020, Thm. 4): what it keeps when every other party colludes."""
    return sensitivity**2 / (2 * sigma_share**2)


@dataclass(frozen=True)
class DistributedPlan:
    """The fixed parameters of a run's distributed DP: the same at every site and at the server.

    ``noise_multiplier`` ``z``: the central noise std over the sensitivity when all ``num_sites`` shares are summed.
    """

    clip: float
    noise_multiplier: float
    num_sites: int
    dim: int
    rounds: int
    delta: float
    # "site": a site's vector is its round update, clipped here to ``clip``; "example": it is the sum of at most
    # ``max_examples`` per-example gradients each already clipped to ``clip`` (DP-FedSGD), so one example moves it by
    # at most ``clip`` (the add/remove-one-example unit)
    unit: str = "site"
    max_examples: int = 1

    @classmethod
    def for_run(cls, *, epsilon: float, delta: float, clip: float, num_sites: int, dim: int,
                rounds: int) -> DistributedPlan:
        """Calibrate ``z`` so that ``rounds`` rounds with every site's share reach the central ``epsilon``."""
        if num_sites < 2 or dim < 1 or rounds < 1:
            raise ConfigError(f"distributed DP needs >= 2 sites, >= 1 coordinate and >= 1 round; got {num_sites}, "
                              f"{dim}, {rounds}")
        rho_round = epsilon_to_zcdp(epsilon, delta) / rounds
        plan = cls(clip=clip, noise_multiplier=1.0 / math.sqrt(2 * rho_round), num_sites=num_sites, dim=dim,
                   rounds=rounds, delta=delta)
        if plan.scale < 1:
            raise ConfigError(f"distributed DP: epsilon={epsilon} over {rounds} rounds needs noise multiplier "
                              f"{plan.noise_multiplier:.3g}, too large for SecAgg+'s {MODULUS}-level range with "
                              f"{num_sites} sites; raise privacy.distributed-epsilon or lower federation.num-rounds")
        return plan

    @property
    def max_coordinate(self) -> float:
        """Largest size of one coordinate of a site's vector before scaling (site: its clipped update in bound units;
        example: ``max_examples`` clipped gradients)."""
        return min(self.clip, MAX_COORDINATE) if self.unit == "site" else self.max_examples * self.clip

    @property
    def rounding(self) -> float:
        """L2 norm the integer rounding adds to the sensitivity: ``sqrt(d) / 2`` when the unit's whole vector goes
        (a site), ``sqrt(d)`` when one example leaves a sum that is rounded either way."""
        return math.sqrt(self.dim) / (2 if self.unit == "site" else 1)

    @property
    def scale(self) -> int:
        """Integers per unit: the sum of ``N`` vectors plus ``HEADROOM_SD`` noise std stays below ``M / 2``."""
        per_unit = self.max_coordinate * self.num_sites + HEADROOM_SD * self.noise_multiplier * self.clip
        room = MODULUS / 2 - HEADROOM_SD * self.noise_multiplier * self.rounding
        return int(room // per_unit)

    @property
    def sensitivity(self) -> float:
        """L2 norm bound of the change of one site's integer vector before noise that one unit makes
        (``s C`` + :attr:`rounding`)."""
        return self.scale * self.clip + self.rounding

    @property
    def sigma_share(self) -> float:
        """Std (integer units) of each site's discrete-Gaussian share."""
        return self.noise_multiplier * self.sensitivity / math.sqrt(self.num_sites)

    def central_epsilon(self, contributors: list[int]) -> float:
        """Central epsilon after rounds whose sums held ``contributors[r]`` shares (the server's figure)."""
        rho = sum(central_rho(self.sensitivity, self.sigma_share, n, self.dim) for n in contributors)
        return zcdp_to_epsilon(rho, self.delta)

    def local_epsilon(self, rounds: int) -> float:
        """A site's epsilon against the server and every other site colluding, after ``rounds`` of its shares."""
        return zcdp_to_epsilon(rounds * local_rho(self.sensitivity, self.sigma_share), self.delta)

    def as_dict(self) -> dict[str, Any]:
        """The plan's parameters and derived sizes (for ledgers and certificates)."""
        return {"mechanism": "distributed-discrete-gaussian", "unit": self.unit, "clip": self.clip,
                "noise_multiplier": self.noise_multiplier, "num_sites": self.num_sites, "dim": self.dim,
                "planned_rounds": self.rounds, "delta": self.delta, "scale": self.scale,
                "sensitivity": self.sensitivity, "sigma_share": self.sigma_share, "modulus": MODULUS,
                "max_examples": self.max_examples}

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, update: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """A site's flat vector -> its noised integer vector modulo ``M`` and the clip factor applied.

        Site unit: the update (bound units) is clipped to ``clip`` here. Example unit: the vector is a sum of clipped
        per-example gradients (factor 1); one beyond ``max_examples * clip`` in a coordinate is refused.
        """
        update = np.asarray(update, dtype=np.float64)
        if update.shape != (self.dim,):
            raise ValueError(f"update has shape {update.shape}, the plan expects ({self.dim},)")
        if self.unit == "site":
            norm = float(np.linalg.norm(update))
            factor = min(1.0, self.clip / norm) if norm > 0 else 1.0
        else:
            factor = 1.0
            if not np.all(np.isfinite(update)) or np.abs(update).max(initial=0.0) > self.max_coordinate * (1 + 1e-9):
                raise ValueError(f"a sum of clipped gradients has a coordinate beyond max_examples x clip = "
                                 f"{self.max_coordinate:g} (or not finite): it would overflow the secure sum")
        ints = np.rint(update * factor * self.scale).astype(np.int64)
        ints += discrete_gaussian(self.sigma_share, self.dim, rng)
        return np.mod(ints, MODULUS), factor

    def decode(self, summed: np.ndarray, contributors: int) -> np.ndarray:
        """The sum of ``contributors`` encoded vectors (modulo ``M``) -> their noisy mean update in bound units."""
        centered = np.mod(np.rint(summed).astype(np.int64), MODULUS)
        centered = np.where(centered >= MODULUS // 2, centered - MODULUS, centered)
        return centered.astype(np.float64) / (self.scale * contributors)


def to_secagg_floats(residues: np.ndarray) -> np.ndarray:
    """Integers in [0, M) as the floats Flower's SecAgg+ quantizer maps back onto exactly those integers."""
    return residues.astype(np.float64) * (2 * CLIP_RANGE / MODULUS) - CLIP_RANGE


def from_secagg_mean(mean: np.ndarray, contributors: int) -> np.ndarray:
    """Flower's dequantized mean of ``contributors`` :func:`to_secagg_floats` vectors -> the integer sum."""
    return np.rint((np.asarray(mean, dtype=np.float64) + CLIP_RANGE) * contributors * MODULUS / (2 * CLIP_RANGE))


def plan_for(cfg: RunConfig, dim: int) -> DistributedPlan:
    """The run's plan (the same at every site and at the server): ``privacy.distributed-*`` over the run's rounds,
    calibrated for ``data.num-sites`` shares."""
    p = cfg.privacy
    return DistributedPlan.for_run(epsilon=p.distributed_epsilon, delta=p.target_delta, clip=p.distributed_clip,
                                   num_sites=cfg.data.num_sites, dim=dim, rounds=cfg.federation.num_rounds)


def site_record(plan: DistributedPlan, rounds: int) -> dict[str, Any]:
    """What a site's ledger and its replies say of its distributed-DP shares after ``rounds`` rounds."""
    return {**plan.as_dict(), "rounds": rounds, "local_epsilon": plan.local_epsilon(rounds),
            "planned_central_epsilon": plan.central_epsilon([plan.num_sites] * plan.rounds),
            "central_epsilon_if_all_sites": plan.central_epsilon([plan.num_sites] * rounds)}


def plan_from_record(d: Mapping[str, Any]) -> DistributedPlan:
    """Inverse of :meth:`DistributedPlan.as_dict` (an auditor rebuilds the figures from it)."""
    return DistributedPlan(clip=float(d["clip"]), noise_multiplier=float(d["noise_multiplier"]),
                           num_sites=int(d["num_sites"]), dim=int(d["dim"]), rounds=int(d["planned_rounds"]),
                           delta=float(d["delta"]), unit=str(d.get("unit", "site")),
                           max_examples=int(d.get("max_examples", 1)))


def central_and_local_epsilon(entry: Mapping[str, Any]) -> tuple[float, float]:
    """``(central, local)`` epsilon of a model's ledger entry (``PrivacyLedger.summary()[model]`` or its record in a
    round's ledger): the entry's epsilon is the central figure, and a model without a distributed part keeps it
    locally too. One rule for the site's certificate and the audit's check of it."""
    central = float(entry.get("epsilon") or 0.0)
    local = (entry.get("distributed") or {}).get("local_epsilon")
    return central, central if local is None else float(local)


def min_shares(cfg: RunConfig) -> int:
    """The fewest sites' noise shares an unmasked sum of the distributed classifier may hold:
    ``ceil(privacy.distributed-min-shares x data.num-sites)``, at least 2."""
    return max(2, math.ceil(cfg.privacy.distributed_min_shares * cfg.data.num_sites - 1e-9))


def classifier_plan(cfg: RunConfig, dim: int, noise_multiplier: float) -> DistributedPlan:
    """The example-level plan of ``privacy.distributed-classifier`` (the same at every site and at the server).

    ``noise_multiplier`` is the one each site's ledger derives for the classifier's budget share (an RDP Gaussian
    without subsampling over every planned step) and accounts per step: the noise a sum of :func:`min_shares` ``t``
    shares carries. The plan's ``z`` (the noise of all ``N`` shares) is therefore ``noise_multiplier x sqrt(N / t)``
    and each share has std ``noise_multiplier x sensitivity / sqrt(t)``. The discrete sum's gap to the Gaussian
    (``tau``, Kairouz et al. Prop. 14) must be negligible.
    """
    p = cfg.privacy
    n, t = cfg.data.num_sites, min_shares(cfg)
    if n < 2 or t > n:
        raise ConfigError(f"privacy.distributed-classifier needs >= 2 sites and at most data.num-sites={n} shares in "
                          f"a sum; got {t} (privacy.distributed-min-shares)")
    plan = DistributedPlan(clip=p.max_grad_norm, noise_multiplier=noise_multiplier * math.sqrt(n / t), num_sites=n,
                           dim=dim, rounds=p.distributed_steps * cfg.federation.num_rounds,
                           delta=p.target_delta * p.budget_classifier, unit="example",
                           max_examples=p.distributed_max_examples)
    if plan.scale < 1:
        raise ConfigError(f"privacy.distributed-classifier: {n} sites with noise multiplier {plan.noise_multiplier:.3g}"
                          f" do not fit SecAgg+'s {MODULUS}-level range; lower privacy.distributed-max-examples or "
                          "raise the classifier's budget")
    if ddg_tau(plan.sigma_share, n) * dim > 1e-12:
        raise ConfigError(f"privacy.distributed-classifier: noise shares of std {plan.sigma_share:.3g} are too small "
                          "for the sum to be the Gaussian the ledger accounts; raise privacy.distributed-max-examples")
    return plan


def classifier_noise_multiplier(cfg: RunConfig) -> float:
    """The noise multiplier each site's ledger accounts per DP-FedSGD step of ``privacy.distributed-classifier``:
    the classifier's budget share (epsilon and delta) reached after every planned step, an RDP Gaussian without
    subsampling. It is the noise of a sum of :func:`min_shares` shares (the fewest an unmasked sum holds)."""
    from common.privacy.ledger import noise_multiplier_for

    p = cfg.privacy
    if p.target_epsilon is None:
        raise ConfigError("privacy.distributed-classifier needs privacy.target-epsilon")
    return noise_multiplier_for(target_epsilon=p.target_epsilon * p.budget_classifier,
                                target_delta=p.target_delta * p.budget_classifier, sample_rate=1.0,
                                total_steps=p.distributed_steps * cfg.federation.num_rounds, accountant=p.accountant)
