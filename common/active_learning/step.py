"""One active-learning step as pure functions: plan the requests, pool the validated answers, select release items.

The server's coordinator (:mod:`server.coordinator`) is the thin Flower layer around these: it sends the requests as
query messages, turns each reply into a :class:`SiteAnswer` (or a rejection), and writes the selected
:class:`~common.active_learning.release.ReleaseItem` s to the release store. Nothing here touches Flower, files or
the network, so a whole step runs in a test from arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.active_learning.acquisition import bin_summary, bin_uncertainty, condition_bins, plan_conditions, select
from common.active_learning.query import QuerySite
from common.active_learning.release import ReleaseItem
from common.active_learning.scoring import Candidates
from common.core.config import RunConfig
from common.core.seeding import derive_seed


@dataclass(frozen=True)
class QueryRequest:
    """The conditions one site is asked to generate and score (one candidate per entry)."""

    plane: np.ndarray  # int (n,)
    ga: np.ndarray  # float weeks (n,)


@dataclass(frozen=True)
class SiteAnswer:
    """A site's validated query reply: its scored candidates and the certificate they carry."""

    name: str
    candidates: Candidates
    site: QuerySite


@dataclass(frozen=True)
class Pooled:
    """One candidate of the pool, with the site it came from."""

    image: np.ndarray
    plane: int
    ga: float
    scores: dict[str, float]
    answer: SiteAnswer


@dataclass
class StepResult:
    """What a step selected, and its summary for ``metrics.jsonl``."""

    items: list[ReleaseItem] = field(default_factory=list)
    chosen: list[Pooled] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def plan_requests(cfg: RunConfig, release: Sequence[Mapping[str, Any]], server_round: int,
                  sites: Sequence[str]) -> dict[str, QueryRequest]:
    """Per site (by name), the conditions to request: the release's gaps, weighted by where the models were unsure.

    Each site's request is a function of the seed, the round and the site's name only.
    """
    fed = cfg.federation
    bins = condition_bins(np.array([r["plane"] for r in release], dtype=int),
                          np.array([r["ga_weeks"] for r in release])) if release else np.zeros(0, int)
    uncertain = bin_uncertainty(bins, np.array([r["scores"].get("uncertainty", np.nan) for r in release], dtype=float))
    out = {}
    for name in sites:
        rng = np.random.default_rng(derive_seed(cfg.seed, "al-plan", server_round, name))
        plane, ga = plan_conditions(bins, fed.al_candidates_per_site, rng=rng, bin_uncertainty=uncertain,
                                    planes=cfg.data.plane_scope())
        out[name] = QueryRequest(plane=plane, ga=ga)
    return out


def pool(answers: Sequence[SiteAnswer]) -> list[Pooled]:
    """Every candidate of every answer, in the answers' order."""
    return [
        Pooled(image=a.candidates.images[i], plane=int(a.candidates.plane[i]), ga=float(a.candidates.ga[i]),
               scores={k: float(v[i]) for k, v in a.candidates.scores.items()}, answer=a)
        for a in answers for i in range(len(a.candidates.plane))
    ]


def select_items(cfg: RunConfig, pooled: Sequence[Pooled], *, server_round: int,
                 features: Callable[[np.ndarray], np.ndarray], bank: np.ndarray | None) -> StepResult:
    """Select up to ``federation.al_select`` candidates with the configured acquisition; the release items.

    ``features`` maps images to the run's feature space; ``bank`` holds the features of what the release holds.
    Every item carries its provenance (site, round, scores, why it was chosen) and its source generator's privacy.
    """
    fed = cfg.federation
    if not pooled:
        return StepResult(summary={"selected": 0})
    rng = np.random.default_rng(derive_seed(cfg.seed, "al", server_round))
    images = np.stack([p.image for p in pooled])
    plane = np.array([p.plane for p in pooled])
    ga = np.array([p.ga for p in pooled])
    sel = select(
        k=fed.al_select, bins=condition_bins(plane, ga),
        quality=np.array([p.scores["quality"] for p in pooled]),
        uncertainty=np.array([p.scores["uncertainty"] for p in pooled]),
        features=features(images), ordering=fed.al_acquisition,
        quality_threshold=fed.al_quality_threshold, balance=fed.al_balance, existing=bank, rng=rng,
    )
    chosen = [pooled[i] for i in sel.indices]
    items = [
        ReleaseItem(
            image=p.image, plane=p.plane, ga_weeks=p.ga, source_site=p.answer.name, round=server_round,
            scores=p.scores,
            acquisition={"function": fed.al_acquisition, "reason": reason, "rank": rank,
                         "balanced": fed.al_balance, "quality_threshold": fed.al_quality_threshold},
            privacy=_certificate(p.answer.site.privacy),
            scanner=p.answer.site.scanner or None, memorization_checked=p.answer.site.memorization_checked,
        )
        for rank, (p, reason) in enumerate(zip(chosen, sel.reasons))
    ]
    summary = {
        "selected_per_plane": bin_summary(condition_bins(plane[sel.indices], ga[sel.indices]).tolist()),
        "mean_quality_selected": float(np.mean([p.scores["quality"] for p in chosen])) if chosen else None,
        "mean_quality_pool": float(np.mean([p.scores["quality"] for p in pooled])),
    }
    return StepResult(items=items, chosen=chosen, summary=summary)


def _certificate(privacy: Mapping[str, Any]) -> dict[str, Any]:
    """The per-image privacy certificate: the source generator's spend when it was sampled, and (with
    ``privacy.distributed-classifier``) the central and local figures of the classifier that scored it."""
    out = {"epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"), "accountant": privacy.get("accountant"),
           "model": "generator", "local_model": privacy.get("local", False),
           "private_noise": privacy.get("private_noise")}
    if privacy.get("scoring") is not None:
        out["scoring"] = dict(privacy["scoring"])
    return out
