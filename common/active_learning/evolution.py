"""Private Evolution's coordinator side as pure functions: propose, keep the winners per bin, vary, select.

Lin et al. (ICLR 2024), Alg. 1: a population drawn from public proposers is voted on by the private data (noisy
histograms, :mod:`common.privacy.votes`), the winners are kept and varied, and the loop repeats. Here, per plane x
GA bin (PCEvolve's class-aware variant, and the release's own balance): each bin's ``keep`` best noisy counts above
the threshold survive, and the bin's share of the next population is drawn among them in proportion to their counts
(the winners themselves stay: elitism); a bin with no winner gets fresh proposals. Proposers: the phantom simulator
(its parameters mutate: GA, gain, depth, dynamic range, scanner, the scene's random draws; Sim-PE, 2025) and the
shared DP generator (its variations are SDEdit image-to-image from the winner, :mod:`common.diffusion.sdedit`, with a
strength that falls over the iterations). Both read no private data: everything here is post-processing of the
votes and of the DP generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from common.active_learning.acquisition import GA_BIN_EDGES, condition_bins
from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS, PLANES
from common.phantoms.profiles import SCANNER_PROFILES, get_profile
from common.phantoms.simulator import render_phantom

# Mutation scales of one step at scale 1 (the strength of the iteration): weeks, dB, log-depth, dB, P(other scanner).
GA_STEP, GAIN_STEP, LOG_DEPTH_STEP, RANGE_STEP, SWITCH_PROFILE = 1.0, 2.0, 0.05, 3.0, 0.15
Sampler = Callable[[np.ndarray, np.ndarray, int], np.ndarray]  # (plane, ga, seed) -> uint8 [N, H, W]
Varier = Callable[[np.ndarray, np.ndarray, np.ndarray, float, int], np.ndarray]  # (images, plane, ga, strength, seed)


@dataclass(frozen=True)
class Candidate:
    """One member of the population: its image, conditions, where it came from and its lineage."""

    id: int
    image: np.ndarray  # uint8 [H, W]
    plane: int
    ga: float
    source: str  # "phantom" | "generator"
    params: Mapping[str, Any] = field(default_factory=dict)  # phantom parameters, or the generator's seed/strength
    parent: int | None = None
    generation: int = 0


def strength_at(iteration: int, iterations: int, start: float, end: float) -> float:
    """The variation strength of ``iteration`` (0-based): linear from ``start`` to ``end`` over the iterations."""
    if iterations <= 1:
        return float(start)
    return float(start + (end - start) * iteration / (iterations - 1))


def plan_conditions(n: int, *, planes: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` conditions spread evenly over the plane x GA bins of ``planes`` (GA uniform inside each bin)."""
    n_ga = len(GA_BIN_EDGES) - 1
    bins = [p * n_ga + g for p in planes for g in range(n_ga)]
    chosen = np.array([bins[i % len(bins)] for i in range(n)], dtype=int)
    rng.shuffle(chosen)
    lo, hi = np.asarray(GA_BIN_EDGES)[chosen % n_ga], np.asarray(GA_BIN_EDGES)[chosen % n_ga + 1]
    return (chosen // n_ga).astype(np.int64), rng.uniform(lo, hi).astype(np.float32)


# -- the phantom simulator as a proposer -------------------------------------------------------------------------
def phantom_params(rng: np.random.Generator) -> dict[str, Any]:
    """Random simulator parameters: a scanner profile with perturbed display and depth, and a scene seed."""
    profile = SCANNER_PROFILES[sorted(SCANNER_PROFILES)[int(rng.integers(len(SCANNER_PROFILES)))]]
    return {"profile": profile.name, "gain_db": float(profile.gain_db + rng.normal(0, GAIN_STEP)),
            "depth_mm": float(np.clip(profile.depth_mm * math.exp(rng.normal(0, 2 * LOG_DEPTH_STEP)), 40, 300)),
            "dynamic_range_db": float(np.clip(profile.dynamic_range_db + rng.normal(0, RANGE_STEP), 20, 90)),
            "seed": int(rng.integers(2**31))}


def render(params: Mapping[str, Any], plane: int, ga: float, size: int) -> np.ndarray:
    """The phantom of ``params`` at (plane, GA): uint8 [size, size]."""
    profile = replace(get_profile(str(params["profile"])), gain_db=float(params["gain_db"]),
                      depth_mm=float(params["depth_mm"]), dynamic_range_db=float(params["dynamic_range_db"]))
    return render_phantom(int(plane), float(ga), size=size, profile=profile,
                          rng=np.random.default_rng(int(params["seed"]))).image


def mutate(params: Mapping[str, Any], ga: float, *, scale: float, rng: np.random.Generator
           ) -> tuple[dict[str, Any], float]:
    """A mutated copy of phantom ``params`` and GA (steps times ``scale``), with a new scene seed."""
    out = dict(params)
    if rng.random() < SWITCH_PROFILE * scale:
        out["profile"] = sorted(SCANNER_PROFILES)[int(rng.integers(len(SCANNER_PROFILES)))]
    out["gain_db"] = float(out["gain_db"] + rng.normal(0, GAIN_STEP * scale))
    out["depth_mm"] = float(np.clip(out["depth_mm"] * math.exp(rng.normal(0, LOG_DEPTH_STEP * scale)), 40, 300))
    out["dynamic_range_db"] = float(np.clip(out["dynamic_range_db"] + rng.normal(0, RANGE_STEP * scale), 20, 90))
    out["seed"] = int(rng.integers(2**31))
    return out, float(np.clip(ga + rng.normal(0, GA_STEP * scale), GA_MIN_WEEKS, GA_MAX_WEEKS))


# -- populations -------------------------------------------------------------------------------------------------
class Population:
    """Hands out candidate ids (unique within one evolution) and builds candidates from the proposers."""

    def __init__(self, *, size: int, source: str, rng: np.random.Generator, sampler: Sampler | None = None,
                 varier: Varier | None = None) -> None:
        if source in ("generator", "both") and (sampler is None or varier is None):
            raise ValueError(f"pe_source={source!r} needs the DP generator's sampler and varier")
        self.size, self.source, self.rng = size, source, rng
        self.sampler, self.varier = sampler, varier
        self.next_id = 0

    def _ids(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids

    def fresh(self, plane: np.ndarray, ga: np.ndarray, *, generation: int) -> list[Candidate]:
        """New proposals at the conditions: phantoms, generator samples, or alternately both."""
        use_gen = np.zeros(len(plane), bool) if self.source == "phantom" else (
            np.ones(len(plane), bool) if self.source == "generator" else np.arange(len(plane)) % 2 == 1)
        ids = self._ids(len(plane))
        out: list[Candidate | None] = [None] * len(plane)
        for i in np.flatnonzero(~use_gen):
            params = phantom_params(self.rng)
            out[i] = Candidate(ids[i], render(params, int(plane[i]), float(ga[i]), self.size), int(plane[i]),
                               float(ga[i]), "phantom", params, None, generation)
        gi = np.flatnonzero(use_gen)
        if len(gi):
            seed = int(self.rng.integers(2**31))
            images = self.sampler(plane[gi], ga[gi], seed)  # type: ignore[misc]
            for j, i in enumerate(gi):
                out[i] = Candidate(ids[i], images[j], int(plane[i]), float(ga[i]), "generator",
                                   {"seed": seed, "row": j, "strength": 1.0}, None, generation)
        return [c for c in out if c is not None]

    def initial(self, n: int, *, planes: Sequence[int]) -> list[Candidate]:
        """The first population: ``n`` fresh proposals spread over the bins of ``planes``."""
        plane, ga = plan_conditions(n, planes=planes, rng=self.rng)
        return self.fresh(plane, ga, generation=0)

    def variations(self, parents: Sequence[Candidate], *, strength: float, generation: int) -> list[Candidate]:
        """One variation of each parent: a mutation of a phantom's parameters, SDEdit of a generator sample."""
        ids = self._ids(len(parents))
        out: list[Candidate | None] = [None] * len(parents)
        gen_rows = [i for i, p in enumerate(parents) if p.source == "generator"]
        for i, p in enumerate(parents):
            if p.source == "phantom":
                params, ga = mutate(p.params, p.ga, scale=max(strength, 0.05), rng=self.rng)
                ga = _within_bin(ga, p.ga)  # a child stays in its parent's plane x GA bin (the bins' slots hold)
                out[i] = Candidate(ids[i], render(params, p.plane, ga, self.size), p.plane, ga, "phantom", params,
                                   p.id, generation)
        if gen_rows:
            seed = int(self.rng.integers(2**31))
            sel = [parents[i] for i in gen_rows]
            images = self.varier(np.stack([p.image for p in sel]), np.array([p.plane for p in sel]),  # type: ignore[misc]
                                 np.array([p.ga for p in sel], np.float32), strength, seed)
            for j, i in enumerate(gen_rows):
                p = parents[i]
                out[i] = Candidate(ids[i], images[j], p.plane, p.ga, "generator",
                                   {"seed": seed, "row": j, "strength": strength}, p.id, generation)
        return [c for c in out if c is not None]


def _within_bin(ga: float, parent_ga: float) -> float:
    """``ga`` clipped into the GA bin of ``parent_ga``."""
    edges = np.asarray(GA_BIN_EDGES)
    b = int(np.clip(np.searchsorted(edges[1:-1], parent_ga, side="right"), 0, len(edges) - 2))
    return float(np.clip(ga, edges[b], np.nextafter(edges[b + 1], -np.inf) if b + 1 < len(edges) - 1 else edges[b + 1]))


def bins_of(candidates: Sequence[Candidate]) -> np.ndarray:
    """The plane x GA bin of each candidate."""
    return condition_bins(np.array([c.plane for c in candidates], int), np.array([c.ga for c in candidates]))


def winners(candidates: Sequence[Candidate], histogram: np.ndarray, *, keep: int, threshold: float
            ) -> dict[int, list[tuple[Candidate, float]]]:
    """Per bin, its ``keep`` highest noisy counts above ``threshold`` (and above 0), best first."""
    out: dict[int, list[tuple[Candidate, float]]] = {}
    floor = max(float(threshold), 0.0)
    for b, c, h in sorted(zip(bins_of(candidates), candidates, histogram), key=lambda t: (-t[2], t[1].id)):
        if h > floor and len(out.setdefault(int(b), [])) < keep:
            out[int(b)].append((c, float(h)))
    return {b: w for b, w in out.items() if w}


def next_generation(pop: Population, candidates: Sequence[Candidate], histogram: np.ndarray, *, keep: int,
                    threshold: float, strength: float, generation: int) -> list[Candidate]:
    """The next population: per bin (as many slots as the bin had), the winners plus variations drawn in
    proportion to their counts; bins without a winner get fresh proposals."""
    slots = dict(zip(*np.unique(bins_of(candidates), return_counts=True)))
    won = winners(candidates, histogram, keep=keep, threshold=threshold)
    kept: list[Candidate] = []
    parents: list[Candidate] = []
    empty_bins: list[int] = []
    for b, n in sorted(slots.items()):
        w = won.get(int(b))
        if not w:
            empty_bins += [int(b)] * int(n)
            continue
        elite = [c for c, _ in w][:n]
        kept += elite
        counts = np.array([h for _, h in w])
        picks = pop.rng.choice(len(w), size=int(n) - len(elite), p=counts / counts.sum())
        parents += [w[int(i)][0] for i in picks]
    out = kept + pop.variations(parents, strength=strength, generation=generation)
    if empty_bins:
        n_ga = len(GA_BIN_EDGES) - 1
        eb = np.array(empty_bins)
        lo, hi = np.asarray(GA_BIN_EDGES)[eb % n_ga], np.asarray(GA_BIN_EDGES)[eb % n_ga + 1]
        out += pop.fresh((eb // n_ga).astype(np.int64), pop.rng.uniform(lo, hi).astype(np.float32),
                         generation=generation)
    return out


Vote = Callable[[list[Candidate], int], tuple["np.ndarray | None", float]]  # (population, iteration) -> (sum, std)


def run_votes(pop: Population, candidates: list[Candidate], vote: Vote, *, iterations: int, keep: int,
              threshold: float, strength_start: float, strength_end: float
              ) -> tuple[list[Candidate], np.ndarray | None, float]:
    """``iterations`` votes on an evolving population: ``vote(candidates, it)`` gives the summed noisy histogram
    (``None`` when no site voted: the evolution stops) and its noise std; between votes the winners are kept and
    varied (:func:`next_generation`, threshold ``threshold x std``, strength falling from start to end).

    Returns the last population that was voted on, its histogram (``None``: no vote at all) and its noise std.
    """
    voted: list[Candidate] = []
    histogram: np.ndarray | None = None
    std_voted = 0.0
    for it in range(iterations):
        total, std = vote(candidates, it)
        if total is None:
            break
        voted, histogram, std_voted = candidates, total, std
        if it < iterations - 1:
            candidates = next_generation(pop, candidates, total, keep=keep, threshold=threshold * std,
                                         strength=strength_at(it, iterations - 1, strength_start, strength_end),
                                         generation=it + 1)
    return voted, histogram, std_voted


def select_release(candidates: Sequence[Candidate], histogram: np.ndarray, *, k: int, threshold: float
                   ) -> list[tuple[Candidate, float, str]]:
    """Up to ``k`` candidates with counts above the threshold, round-robin over bins (best count first in each)."""
    won = winners(candidates, histogram, keep=len(candidates), threshold=threshold)
    out: list[tuple[Candidate, float, str]] = []
    depth = 0
    while len(out) < k and any(depth < len(w) for w in won.values()):
        for b in sorted(won):
            if depth < len(won[b]) and len(out) < k:
                c, h = won[b][depth]
                n_ga = len(GA_BIN_EDGES) - 1
                out.append((c, h, f"private-evolution: #{depth + 1} noisy votes in bin {PLANES[b // n_ga]}/GA{b % n_ga}"))
        depth += 1
    return out


def certificate(candidate: Candidate, *, votes: Mapping[str, Mapping[str, Any]],
                generator: Mapping[str, Mapping[str, Any]], accountant: str) -> dict[str, Any]:
    """The privacy certificate of one evolved image: every mechanism that shaped it, per site.

    ``votes``: each voting site's ``votes`` ledger summary after its last vote of this evolution (the selection read
    all of them); ``generator``: each site's generator summary, counted when the image came from the DP generator
    (the global generator mixes every site's update). Per site the image is ``(eps_gen + eps_votes, delta_gen +
    delta_votes)``-DP by basic composition; ``epsilon`` is the largest of those over the sites.
    """
    uses_gen = candidate.source == "generator"
    per_site: dict[str, dict[str, float]] = {}
    for site in sorted(set(votes) | (set(generator) if uses_gen else set())):
        v, g = votes.get(site, {}), (generator.get(site, {}) if uses_gen else {})
        per_site[site] = {"epsilon": float(v.get("epsilon") or 0.0) + float(g.get("epsilon") or 0.0),
                          "delta": float(v.get("delta") or 0.0) + float(g.get("delta") or 0.0)}
    private_noise = all(e.get("private_noise", True) is not False for e in [*votes.values(), *generator.values()])
    return {
        "epsilon": max((s["epsilon"] for s in per_site.values()), default=0.0),
        "delta": max((s["delta"] for s in per_site.values()), default=0.0),
        "accountant": accountant, "model": "private-evolution", "local_model": False, "private_noise": private_noise,
        "per_site": per_site,
        "mechanisms": {
            "votes": {s: {k: e.get(k) for k in ("epsilon", "delta", "steps", "noise_multiplier", "sample_rate",
                                                 "history", "accountant")} for s, e in sorted(votes.items())},
            "generator": {s: {k: e.get(k) for k in ("epsilon", "delta", "steps", "accountant")}
                          for s, e in sorted(generator.items())} if uses_gen else {},
        },
        "source": candidate.source,
    }
