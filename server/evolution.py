"""Private evolution, the coordinator's Flower layer: vote messages out, validated noisy histograms in, summed.

One query round with ``federation.pe-iterations`` = T: an initial population (:mod:`common.active_learning.evolution`)
is embedded with the shared public extractor; T times, every site gets a ``query.vote`` message (ids, planes,
embeddings) and answers with its noisy histogram or declines (its votes budget is spent); the valid histograms are
summed; between votes the winners per plane x GA bin are kept and varied. The last vote's winners are the release,
each image with the certificate of every mechanism that shaped it. A reply that fails validation is rejected with
the site named and the vote goes on with the other sites; a vote nobody answered ends the evolution early.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.active_learning.evolution import Candidate, Population, certificate, run_votes, select_release
from common.active_learning.query import reply_json_object
from common.active_learning.release import ReleaseItem
from common.active_learning.scoring import generate
from common.active_learning.vote_query import SiteVotes, validate_vote_reply, vote_embedder
from common.core.config import RunConfig
from common.core.errors import ReplyValidationError
from common.core.seeding import derive_seed
from common.diffusion.sampling import to_uint8
from common.diffusion.sdedit import sdedit
from common.federated.flwr_records import ROUND_KEY, arrays_to_record, record_to_arrays
from common.models.bundle import ModelBundle

VOTE_MESSAGE = f"{MessageType.QUERY}.vote"


class Evolution:
    """One run's private evolution (the embedder is built once per coordinator)."""

    def __init__(self, cfg: RunConfig, *, timeout_s: float) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.embed = vote_embedder(cfg)

    def evolve(self, grid: Grid, bundle: ModelBundle, server_round: int, names: Mapping[int, str]
               ) -> tuple[list[ReleaseItem], list[Candidate], dict[str, Any]]:
        """Run the T vote iterations of ``server_round``; the release items, the chosen candidates and a summary."""
        fed = self.cfg.federation
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "private-evolution", server_round))
        pop = Population(size=self.cfg.data.image_size, source=fed.pe_source, rng=rng,
                         sampler=lambda p, g, s: generate(bundle, self.cfg, p, g, seed=s),
                         varier=lambda x, p, g, st, s: to_uint8(sdedit(
                             bundle.generator, torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)[:, None],
                             plane=torch.as_tensor(p), ga=torch.as_tensor(g), strength=st,
                             num_inference_steps=self.cfg.sampling.num_inference_steps,
                             guidance_scale=self.cfg.sampling.guidance_scale, seed=s)))
        candidates = pop.initial(fed.pe_population, planes=self.cfg.data.plane_scope())
        votes_privacy: dict[str, dict[str, Any]] = {}
        generator_privacy: dict[str, dict[str, Any]] = {}
        iterations: list[dict[str, Any]] = []

        def vote(population: list[Candidate], it: int) -> tuple[np.ndarray | None, float]:
            total, std, sites = self._vote(grid, population, server_round, it, names, votes_privacy, generator_privacy)
            iterations.append({"iteration": it, "candidates": len(population), "sites": sites,
                               "noise_std": std, "votes": None if total is None else float(total.sum()),
                               "sources": {s: sum(c.source == s for c in population) for s in ("phantom", "generator")}})
            if total is None:
                log(WARNING, "Private evolution round %s, vote %s: no site voted; the evolution stops", server_round, it)
            else:
                iterations[-1]["top_counts"] = sorted((float(h) for h in total), reverse=True)[:5]
            return total, std

        voted, histogram, std = run_votes(pop, candidates, vote, iterations=fed.pe_iterations, keep=fed.pe_keep,
                                          threshold=fed.pe_threshold, strength_start=fed.pe_strength_start,
                                          strength_end=fed.pe_strength_end)
        summary: dict[str, Any] = {"private_evolution": {"iterations": iterations, "votes_privacy": votes_privacy}}
        if histogram is None:
            return [], [], summary
        chosen = select_release(voted, histogram, k=fed.al_select, threshold=fed.pe_threshold * std)
        accountant = self.cfg.privacy.accountant
        items = [
            ReleaseItem(
                image=c.image, plane=c.plane, ga_weeks=c.ga, source_site=f"evolution-{c.source}", round=server_round,
                scores={"votes": h}, acquisition={"function": "private-evolution", "reason": why, "rank": rank,
                                                  "iterations": fed.pe_iterations, "class_aware": fed.pe_class_aware,
                                                  "votes_per_image": fed.pe_votes_per_image},
                privacy=certificate(c, votes=votes_privacy, generator=generator_privacy, accountant=accountant),
                scanner=str(c.params.get("profile")) if c.source == "phantom" else None,
                extra={"evolution": {"id": c.id, "parent": c.parent, "generation": c.generation,
                                     "source": c.source, "params": dict(c.params)}},
            )
            for rank, (c, h, why) in enumerate(chosen)
        ]
        summary["private_evolution"]["selected_by_source"] = {s: sum(c.source == s for c, _, _ in chosen)
                                                             for s in ("phantom", "generator")}
        return items, [c for c, _, _ in chosen], summary

    def _vote(self, grid: Grid, candidates: list[Candidate], server_round: int, index: int,
              names: Mapping[int, str], votes_privacy: dict[str, Any], generator_privacy: dict[str, Any]
              ) -> tuple[np.ndarray | None, float, list[dict[str, Any]]]:
        """One vote of every site; the summed valid histograms (None if none), their summed noise std, per site."""
        fed = self.cfg.federation
        ids = np.array([c.id for c in candidates], dtype=np.int64)
        request = {"ids": ids, "plane": np.array([c.plane for c in candidates], dtype=np.int64),
                   "embeddings": self.embed(np.stack([c.image for c in candidates])).astype(np.float32)}
        config = {ROUND_KEY: server_round, "vote": index, "class-aware": fed.pe_class_aware,
                  "votes-per-image": fed.pe_votes_per_image}
        nodes = sorted(grid.get_node_ids())
        messages = [Message(content=RecordDict({"request": arrays_to_record(request), "config": ConfigRecord(config)}),
                            message_type=VOTE_MESSAGE, dst_node_id=n) for n in nodes]
        replies = grid.send_and_receive(messages, timeout=self.timeout_s)
        total: np.ndarray | None = None
        var = 0.0
        sites: list[dict[str, Any]] = []
        seen: set[str] = set()
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            name = names.get(node) or f"node-{node}"
            if reply.has_error():
                sites.append({"node_id": node, "name": name, "status": "failed", "reason": reply.error.reason})
                log(WARNING, "Vote %s of round %s: %s failed: %s", index, server_round, name, reply.error.reason)
                continue
            try:
                got = self._read(reply, name, ids, seen)
            except (ReplyValidationError, KeyError, TypeError, ValueError, AttributeError) as exc:
                sites.append({"node_id": node, "name": name, "status": "rejected", "reason": str(exc)})
                log(WARNING, "Vote %s of round %s: rejected reply of %s: %s", index, server_round, name, exc)
                continue
            votes_privacy[name] = got.privacy
            if got.generator:
                generator_privacy[name] = got.generator
            sites.append({"node_id": node, "name": name, "status": got.votes.status,
                          "epsilon_votes": got.votes.privacy.get("epsilon"), "reason": got.votes.reason})
            if got.votes.histogram is not None:
                total = got.votes.histogram if total is None else total + got.votes.histogram
                var += float(got.votes.noise_std or 0.0) ** 2
        return total, math.sqrt(var), sites

    def _read(self, reply: Message, name: str, ids: np.ndarray, seen: set[str]) -> "_Read":
        content = reply.content
        site = content.get("site")
        if not isinstance(site, Mapping):
            raise ReplyValidationError(f"{name}: vote reply lacks its 'site' config record")
        if str(site.get("name", "")) != name and not name.startswith("node-"):
            raise ReplyValidationError(f"{name}: node answers as {site.get('name')!r}")
        if name in seen:
            raise ReplyValidationError(f"{name}: a second vote reply for the same site")
        seen.add(name)
        arrays = record_to_arrays(content["votes"]) if "votes" in content else None
        votes = validate_vote_reply(arrays, site, who=name, ids=ids)
        generator = reply_json_object(site, "generator-privacy", who=name)
        return _Read(votes, votes.privacy, generator)


class _Read:
    """A validated vote reply with the site's generator spend (for the certificates)."""

    def __init__(self, votes: SiteVotes, privacy: dict[str, Any], generator: dict[str, Any]) -> None:
        self.votes, self.privacy, self.generator = votes, privacy, generator
