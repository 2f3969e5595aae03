"""The vote query, both ends: the site casts its noisy votes, the coordinator validates the reply.

Request (coordinator -> site): ``ids`` int64 [M] (distinct candidate ids), ``plane`` int64 [M], ``embeddings``
float32 [M, d] in the shared public feature space (:func:`vote_embedder`); config ``round``, ``vote`` (the vote's
index in the run), ``class-aware``, ``votes-per-image``. Reply (site -> coordinator): ``votes`` arrays ``ids``
int64 [M] (the request's, in its order) and ``histogram`` float64 [M] (counts + Gaussian noise); ``site`` record
``name``, ``status`` ("ok" or "declined"), ``reason`` and ``privacy`` (JSON: the ledger's ``votes`` summary plus
``noise_std``). A declined reply (the site's votes budget is spent) carries no histogram.

The embedder is a frozen public extractor (the run's frozen downstream backbone, or the shipped phantom encoder when
the backbone is trained): no private data shaped it, so the embeddings of the private images are the only thing a
vote reads, and only its noisy histogram leaves the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from common.active_learning.query import reply_json_object
from common.core.config import RunConfig
from common.core.errors import ReplyValidationError
from common.core.records import UltrasoundRecord
from common.models.downstream import is_frozen, make_backbone
from common.privacy.ledger import PrivacyLedger
from common.privacy.votes import VOTE_SAMPLE_RATE, VOTES, VoteBudgetExhausted, VoteResult, private_vote

# An honest noisy count lies below -Z * std with probability Phi(-6) ~ 1e-9 per entry: anything lower is a lie.
NOISE_Z = 6.0
Embedder = Callable[[np.ndarray], np.ndarray]


def vote_embedder(cfg: RunConfig) -> Embedder:
    """The shared public embedding of vote candidates and private images: uint8 [N, H, W] -> float32 [N, d]."""
    kind = cfg.train.downstream_backbone
    backbone = make_backbone(kind if kind != "cnn" else "phantom_cnn", cfg.data.image_size, cfg.train.downstream_width,
                             cfg.train.scattering_j, cfg.train.scattering_grid)
    if not is_frozen(backbone):  # pragma: no cover - make_backbone's frozen kinds have no trainable weight
        raise RuntimeError("the vote embedder must be a frozen public extractor")
    backbone.eval()

    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(images, np.float32) / 127.5 - 1.0)[:, None]
        if len(x) == 0:
            return np.zeros((0, backbone.out_dim), np.float32)
        return torch.cat([backbone(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy().astype(np.float32)

    return embed


@dataclass(frozen=True)
class VoteRequest:
    """One vote: the candidates (ids, planes, public embeddings) and how to vote."""

    ids: np.ndarray  # int64 [M]
    plane: np.ndarray  # int64 [M]
    embeddings: np.ndarray  # float32 [M, d]
    class_aware: bool = True
    votes_per_image: int = 1


@dataclass(frozen=True)
class VoteAnswer:
    """A site's answer: its noisy histogram, or a decline with the reason."""

    status: str  # "ok" | "declined"
    reason: str
    result: VoteResult | None
    privacy: dict[str, Any]


def answer_vote(request: VoteRequest, *, ledger: PrivacyLedger | None, private: Sequence[UltrasoundRecord],
                embed: Embedder, cfg: RunConfig, noise_seed: int | None) -> VoteAnswer:
    """Cast this site's private votes on ``request``; decline (no data read) when the votes budget is spent."""
    try:
        if ledger is not None:  # the check before any private image is embedded (private_vote repeats it)
            plan = ledger.plan(VOTES, sample_rate=VOTE_SAMPLE_RATE, planned_total_steps=cfg.federation.planned_votes(),
                               noise_multiplier=cfg.privacy.vote_noise_multiplier)
            if ledger.would_exceed(VOTES, noise_multiplier=plan.noise_multiplier, sample_rate=VOTE_SAMPLE_RATE):
                raise VoteBudgetExhausted(f"the votes budget is spent ({ledger.steps(VOTES)} votes, epsilon "
                                          f"{ledger.epsilon(VOTES):.4g} of {ledger.budget(VOTES)[0]:.4g})")
        images = np.stack([r.image for r in private]) if private else np.zeros((0, cfg.data.image_size,
                                                                                 cfg.data.image_size), np.uint8)
        planes = np.array([r.plane for r in private], dtype=np.int64)
        result = private_vote(
            ledger, private=embed(images), candidates=request.embeddings,
            private_plane=planes if request.class_aware else None,
            candidate_plane=request.plane if request.class_aware else None,
            votes_per_image=request.votes_per_image, planned_votes=max(1, cfg.federation.planned_votes()),
            noise_multiplier=cfg.privacy.vote_noise_multiplier if ledger is not None else
            (cfg.privacy.vote_noise_multiplier or 0.0),
            noise_seed=noise_seed,
        )
    except VoteBudgetExhausted as exc:
        return VoteAnswer("declined", str(exc), None, _privacy(ledger, None))
    return VoteAnswer("ok", "", result, _privacy(ledger, result))


def _privacy(ledger: PrivacyLedger | None, result: VoteResult | None) -> dict[str, Any]:
    """The ledger's ``votes`` summary (history included, what an auditor recomputes) and the vote's noise std."""
    if ledger is None:
        return {"epsilon": math.inf, "delta": 0.0, "model": VOTES,
                "noise_std": None if result is None else result.noise_std}
    return {**ledger.summary()[VOTES], "model": VOTES, "noise_std": None if result is None else result.noise_std}


@dataclass(frozen=True)
class SiteVotes:
    """A validated vote reply."""

    name: str
    status: str
    histogram: np.ndarray | None  # float64 [M], in the request's order; None when declined
    noise_std: float | None
    privacy: dict[str, Any]
    reason: str = ""


def validate_vote_reply(arrays: Mapping[str, np.ndarray] | None, site: Mapping[str, Any], *, who: str,
                        ids: np.ndarray, max_count: float | None = None) -> SiteVotes:
    """Check a vote reply against its request: ids, length, dtype, finite counts, noise-bounded range, privacy.

    ``max_count`` bounds a count from above (the site's number of private images times the votes per image, when
    the coordinator knows it); a count above ``max_count + NOISE_Z * std`` or below ``-NOISE_Z * std`` cannot come
    from an honest vote.

    Raises
    ------
    ReplyValidationError
        Naming ``who`` and the first problem found; nothing of a rejected reply is used.
    """
    status = site.get("status")
    privacy = reply_json_object(site, "privacy", who=who)
    eps = privacy.get("epsilon")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ReplyValidationError(f"{who}: vote privacy epsilon must be a number >= 0, got {eps!r}")
    if status == "declined":
        if arrays:
            raise ReplyValidationError(f"{who}: a declined vote must carry no histogram")
        return SiteVotes(who, "declined", None, None, privacy, str(site.get("reason", "")))
    if status != "ok":
        raise ReplyValidationError(f"{who}: vote status must be 'ok' or 'declined', got {status!r}")
    if not arrays or set(arrays) != {"ids", "histogram"}:
        raise ReplyValidationError(f"{who}: a vote reply holds exactly 'ids' and 'histogram', got "
                                   f"{sorted(arrays or {})}")
    m = len(ids)
    got_ids, hist = arrays["ids"], arrays["histogram"]
    if not isinstance(got_ids, np.ndarray) or got_ids.dtype != np.int64 or got_ids.shape != (m,):
        raise ReplyValidationError(f"{who}: vote ids must be int64 of shape ({m},), got "
                                   f"{getattr(got_ids, 'dtype', None)} {np.shape(got_ids)}")
    if not np.array_equal(got_ids, ids):
        raise ReplyValidationError(f"{who}: vote ids differ from the candidate ids requested")
    if not isinstance(hist, np.ndarray) or hist.dtype != np.float64 or hist.shape != (m,):
        raise ReplyValidationError(f"{who}: histogram must be float64 of shape ({m},), got "
                                   f"{getattr(hist, 'dtype', None)} {np.shape(hist)}")
    if not np.isfinite(hist).all():
        raise ReplyValidationError(f"{who}: histogram has non-finite counts")
    std = privacy.get("noise_std")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (std >= 0 and math.isfinite(std)):
        raise ReplyValidationError(f"{who}: vote privacy must state a finite noise_std >= 0, got {std!r}")
    low = -NOISE_Z * float(std)
    if (hist < low - 1e-9).any():
        raise ReplyValidationError(f"{who}: histogram has counts below {low:.3g}: negative beyond the noise "
                                   f"(std {std:.3g})")
    if max_count is not None and (hist > max_count + NOISE_Z * float(std) + 1e-9).any():
        raise ReplyValidationError(f"{who}: histogram has counts above {max_count} votes plus the noise "
                                   f"(std {std:.3g})")
    return SiteVotes(who, "ok", hist.astype(np.float64), float(std), privacy)
