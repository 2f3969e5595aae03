"""Private votes: a site's noisy nearest-candidate histogram, the fourth mechanism of its ledger.

Private Evolution (Lin et al., ICLR 2024, Alg. 1-2): every private example votes for its nearest candidate in a
public embedding space; the site adds Gaussian noise to the vote histogram and releases only the noisy histogram.
Class-aware votes (PCEvolve, ICML 2025): a private example votes only among the candidates of its own plane.
Top-k votes: an example adds 1 to each of its k nearest candidates.

Sensitivity. Neighbouring datasets differ by adding or removing one private image (the adjacency Opacus' DP-SGD
accounting uses). That image changes the histogram by one vector with k entries equal to 1 (fewer when fewer
candidates are eligible), so the L2 sensitivity is ``sqrt(k)`` (1 for nearest-candidate votes) and the L1/Linf
change of any entry is at most 1. Adding ``N(0, (sigma * sqrt(k))^2)`` to every entry is the Gaussian mechanism
with noise multiplier ``sigma`` (std / sensitivity), whose Renyi DP is ``alpha / (2 sigma^2)`` (Mironov 2017,
Prop. 7): exactly Opacus' sampled Gaussian at sample rate ``q = 1``. The ledger therefore accounts a vote as one
``(sigma, q=1)`` step of its ``"votes"`` accountant, and composes it with the generator's, classifier's and
regressor's DP-SGD steps the same way (basic composition across keys, :mod:`common.privacy.ledger`). The budget
is checked before the vote runs: a vote that would pass the votes' share raises :class:`VoteBudgetExhausted`
and nothing is computed from the private data.

Noise comes from a seed only the site knows (its secret, :mod:`common.privacy.site_state`); like Opacus'
``secure_mode`` each noise value is the sum of four Gaussian draws scaled by 1/2 (Holohan & Braghin 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.core.errors import BudgetExceededError, ConfigError
from common.privacy.ledger import PrivacyLedger

VOTES = "votes"
VOTE_SAMPLE_RATE = 1.0  # every private image votes in every vote: the Gaussian mechanism, q = 1


class VoteBudgetExhausted(BudgetExceededError):
    """One more vote would take the site's ``"votes"`` spend past its share of the site budget."""


def sensitivity(votes_per_image: int) -> float:
    """L2 sensitivity of a histogram in which each private image adds 1 to ``votes_per_image`` distinct entries."""
    if votes_per_image < 1:
        raise ConfigError(f"votes_per_image={votes_per_image!r} must be >= 1")
    return math.sqrt(votes_per_image)


def vote_counts(private: np.ndarray, candidates: np.ndarray, *, private_plane: np.ndarray | None = None,
                candidate_plane: np.ndarray | None = None, votes_per_image: int = 1) -> np.ndarray:
    """Exact vote histogram (before noise): each private embedding adds 1 to each of its k nearest candidates.

    Parameters
    ----------
    private, candidates:
        ``[N, d]`` and ``[M, d]`` embeddings (the same public feature space).
    private_plane, candidate_plane:
        Planes for class-aware votes (both or neither): a private image votes only among the candidates of its plane;
        an image whose plane has no candidate casts no vote (its contribution is the zero vector, within sensitivity).
    votes_per_image:
        ``k``; with fewer eligible candidates an image votes for all of them.

    Returns
    -------
    ``float64 [M]`` counts (non-negative integers).
    """
    private, candidates = np.asarray(private, np.float64), np.asarray(candidates, np.float64)
    if private.ndim != 2 or candidates.ndim != 2 or (len(private) and private.shape[1] != candidates.shape[1]):
        raise ValueError(f"embeddings must be [N, d] and [M, d] with the same d; got {private.shape}, "
                         f"{candidates.shape}")
    if (private_plane is None) != (candidate_plane is None):
        raise ValueError("give both private_plane and candidate_plane (class-aware votes) or neither")
    m = len(candidates)
    counts = np.zeros(m, dtype=np.float64)
    if m == 0 or len(private) == 0:
        return counts
    sq = (private * private).sum(1)[:, None] + (candidates * candidates).sum(1)[None, :] - 2.0 * private @ candidates.T
    if private_plane is not None:
        eligible = np.asarray(private_plane)[:, None] == np.asarray(candidate_plane)[None, :]
        sq = np.where(eligible, sq, np.inf)
    k = int(votes_per_image)
    # stable order: ties go to the lower candidate index, so the histogram is a function of the data alone
    order = np.argsort(sq, axis=1, kind="stable")[:, :k]
    for i in range(len(private)):
        picked = [j for j in order[i] if np.isfinite(sq[i, j])]
        counts[picked] += 1.0
    return counts


def gaussian_noise(shape: int, *, std: float, seed: int | None) -> np.ndarray:
    """``N(0, std^2)`` noise of ``shape`` entries as the sum of four draws halved (``seed`` None: OS randomness)."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, std, size=(4, int(shape))).sum(axis=0) / 2.0


def plan_gaussian_release(ledger: PrivacyLedger, model_key: str, *, planned: int, noise_multiplier: float | None,
                          error: type[BudgetExceededError], what: str) -> float:
    """Sigma of one Gaussian release (q = 1) of ``model_key``, checked against its budget before any data is read.

    Sigma is fixed at the first release (derived so that ``planned`` releases spend the model's share, unless
    ``noise_multiplier`` fixes it); a release that would pass the share raises ``error``, naming ``what``.
    """
    plan = ledger.plan(model_key, sample_rate=1.0, planned_total_steps=planned, noise_multiplier=noise_multiplier)
    sigma = plan.noise_multiplier
    if ledger.would_exceed(model_key, noise_multiplier=sigma, sample_rate=1.0):
        budget, delta = ledger.budget(model_key)
        raise error(f"{what} (sigma={sigma:.4g}) would take {model_key!r} past its budget epsilon={budget:.4g} "
                    f"(spent {ledger.epsilon(model_key):.4g} over {ledger.steps(model_key)} steps, delta={delta:.3g})")
    return sigma


@dataclass(frozen=True)
class VoteResult:
    """One site's released noisy histogram and what it cost."""

    histogram: np.ndarray  # float64 [M]: counts + noise (the only thing that leaves the site)
    noise_std: float  # sigma * sensitivity
    noise_multiplier: float
    sensitivity: float
    epsilon: float  # the ledger's cumulative "votes" epsilon after this vote
    delta: float


def private_vote(ledger: PrivacyLedger | None, *, private: np.ndarray, candidates: np.ndarray,
                 private_plane: np.ndarray | None = None, candidate_plane: np.ndarray | None = None,
                 votes_per_image: int = 1, planned_votes: int, noise_multiplier: float | None = None,
                 noise_seed: int | None) -> VoteResult:
    """Check the votes' budget, count, add calibrated Gaussian noise and charge the ledger: one private vote.

    Parameters
    ----------
    ledger:
        The site's ledger; its ``"votes"`` key must be budgeted (``privacy.budget-votes`` > 0). ``None`` (no DP at
        this site) needs ``noise_multiplier`` (0 allowed) and reports epsilon = inf.
    planned_votes:
        Votes this site answers over the whole run; with ``noise_multiplier=None`` sigma is derived at the first
        vote so that ``planned_votes`` votes fit the votes' budget (:meth:`PrivacyLedger.plan`).
    noise_seed:
        Seeds the noise: from the site's secret (never from the public run seed), ``None`` for OS randomness.

    Raises
    ------
    VoteBudgetExhausted
        Before reading any private data, when one more vote would exceed the votes' share of the budget.
    """
    sens = sensitivity(votes_per_image)
    if ledger is None:
        if noise_multiplier is None:
            raise ConfigError("a site without a privacy ledger needs an explicit vote noise multiplier")
        sigma, eps, delta = float(noise_multiplier), math.inf, 0.0
    else:
        if planned_votes < 1:
            raise ConfigError(f"planned_votes={planned_votes!r}: plan at least one vote for the run")
        sigma = plan_gaussian_release(ledger, VOTES, planned=planned_votes, noise_multiplier=noise_multiplier,
                                      error=VoteBudgetExhausted, what="one more vote")
    counts = vote_counts(private, candidates, private_plane=private_plane, candidate_plane=candidate_plane,
                         votes_per_image=votes_per_image)
    std = sigma * sens
    noisy = counts + (gaussian_noise(len(counts), std=std, seed=noise_seed) if std > 0 else 0.0)
    if ledger is not None:
        ledger.accountant_for(VOTES).step(noise_multiplier=sigma, sample_rate=VOTE_SAMPLE_RATE)
        eps, delta = ledger.epsilon(VOTES), ledger.budget(VOTES)[1]
    return VoteResult(histogram=np.asarray(noisy, np.float64), noise_std=float(std), noise_multiplier=float(sigma),
                      sensitivity=sens, epsilon=float(eps), delta=float(delta))
