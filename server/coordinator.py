"""The active-learning coordinator: ask the sites for scored samples, select, release, feed back.

Every ``federation.al_every`` rounds: plan the conditions to request from the release's gaps, send query
messages (``@app.query`` on the sites), validate each reply (the site is named when one is rejected), select
with the configured acquisition, append to the release with provenance and privacy per image, and optionally
refine the generator and train the global downstream models on the release (post-processing of DP outputs: no
privacy cost).

The release advances with the checkpoints: a round's images are written before its checkpoint, so on the first use
in a run the coordinator rolls the release back to what the last checkpoint recorded (records of later rounds, and
what a kill mid-write left, go to the release's quarantine through :meth:`ReleaseStore.repair`, logged).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.active_learning.query import validate_candidates, validate_query_site
from common.active_learning.release import WRITER_LEFTOVERS, ReleaseDamagedError, ReleaseStore, load_release_records
from common.active_learning.release_sync import Held, make_delta
from common.active_learning.scoring import features
from common.active_learning.step import Pooled, QueryRequest, SiteAnswer, plan_requests, pool, select_items
from common.core.config import RunConfig
from common.core.errors import ReplyValidationError
from common.core.provenance import code_version
from common.core.records import PLANES
from common.core.run_layout import RunLayout
from common.core.seeding import derive_seed
from common.core.viz import save_grid
from common.data.tensors import has_ga, records_to_dataset
from common.diffusion.loss import make_loss_fn
from common.federated.flwr_records import (
    ROUND_KEY,
    arrays_to_record,
    bundle_to_record,
    delta_to_records,
    held_from_config,
    record_nbytes,
    record_to_arrays,
)
from common.models.bundle import ModelBundle
from common.models.downstream import classifier_loss, regressor_loss
from common.privacy.dpsgd import train_private
from server.checkpoint import RunFolder

# The plain message that brings a site's copy of the release up to date before a SecAgg+ round (sync_sites).
RELEASE_MESSAGE = f"{MessageType.QUERY}.release"


class Coordinator:
    """Owns the release of one run (``<run-dir>/release``)."""

    def __init__(self, cfg: RunConfig, *, run_dir: Path, timeout_s: float = 3600.0,
                 on_release: Callable[[int], None] | None = None) -> None:
        """``on_release(server_round)`` is called after a round's images are written, before its checkpoint (an
        observer: the fault-injection tests kill the server there)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(self.run_dir)
        self.store = ReleaseStore(self.layout.release)
        self.timeout_s = timeout_s
        self.on_release = on_release
        self.site_privacy: dict[str, Any] = {}
        # per node id, what the site last said it holds of the release (lost on restart: then it gets everything)
        self.held: dict[int, Held] = {}
        self._in_step = False  # whether the release was checked against the last checkpoint in this run
        self._evolution: Any = None  # server.evolution.Evolution, built at the first private-evolution round

    def due(self, server_round: int) -> bool:
        """Whether a query round follows this federated round."""
        every = self.cfg.federation.al_every
        return every > 0 and server_round % every == 0

    def sync_with_checkpoint(self) -> None:
        """Roll the release back to what the run's last checkpoint recorded (once per run; a no-op when in step).

        A round writes its images before its checkpoint: a kill in between leaves records of a round that the
        resumed run will query again. They, and what a kill mid-write leaves (a torn last line, a PNG without its
        line, temp files), move to the release's quarantine. Other damage (a corrupted middle line, a record
        without its PNG) is not this writer's: it raises :class:`ReleaseDamagedError` naming the explicit repair.
        """
        if self._in_step:
            return
        committed, size, last_id = self._checkpointed_release()
        plan = self.store.repair(up_to_round=committed, dry_run=True)
        foreign = [m for m in plan.moved if m.reason not in WRITER_LEFTOVERS]
        if foreign:
            raise ReleaseDamagedError(
                f"{self.store.folder} has damage an interrupted write does not leave:\n"
                + "\n".join(f"  {m.describe()}" for m in foreign)
                + f"\nrun `difusal release repair {self.store.folder}` (it moves them to a quarantine), then resume"
            )
        if size is not None and (plan.kept != size or last_id not in (None, plan.kept_last_id)):
            raise ReleaseDamagedError(
                f"{self.store.folder} holds {plan.kept} records up to round {committed} (last {plan.kept_last_id}) "
                f"but the checkpoint of round {committed} recorded {size} (last {last_id}): the release is not the "
                "one this run wrote; restore it (its quarantine keeps what repairs moved) or start a new run-dir"
            )
        if plan.moved or plan.terminated_last_line:
            report = self.store.repair(up_to_round=committed,
                                       reason=f"resume: roll the release back to the checkpoint of round {committed}")
            for line in report.describe():
                log(WARNING, "Release: %s", line)
        self._in_step = True

    def _checkpointed_release(self) -> tuple[int, int | None, str | None]:
        """The last checkpointed round and the release size and last id its newest query round recorded."""
        run = RunFolder(self.run_dir)
        latest = run.latest()
        if latest is None:
            return 0, None, None
        for server_round in range(latest.server_round, 0, -1):
            path = run.checkpoints / f"round-{server_round:03d}" / "round.json"
            query = json.loads(path.read_text()).get("active_learning") if path.is_file() else None
            if query and "release_size" in query:
                return latest.server_round, int(query["release_size"]), query.get("release_last_id")
        return latest.server_round, None, None

    # -- the release at the sites: per-site deltas ------------------------------------------------
    def train_records(self, node: int) -> dict[str, Any]:
        """The records that bring ``node``'s copy of the release up to date (none while the release is empty)."""
        self.sync_with_checkpoint()
        records = self.store.records()
        if not records:
            return {}
        return self._delta_records(records, node)

    def _delta_records(self, records: Sequence[Mapping[str, Any]], node: int) -> dict[str, Any]:
        """The message records of the delta from what ``node`` last said it holds to ``records``."""
        return delta_to_records(make_delta(records, self.store.load_image, self.held.get(node)))

    def acknowledge(self, held: Mapping[int, Held | None]) -> None:
        """What each node said it holds after a round; a node that said nothing gets the whole release next time."""
        for node, value in held.items():
            if value is None:
                self.held.pop(node, None)
            else:
                self.held[node] = value

    def sync_sites(self, grid: Grid, server_round: int) -> dict[str, Any]:
        """Bring every site's copy of the release up to date before a secure-aggregation round.

        SecAgg+'s fit instructions carry parameters and scalars only, not the release delta a plain training message
        carries, so one plain message per node (:data:`RELEASE_MESSAGE`) brings it: the delta from what the node
        last said it holds (the whole release when unknown; an empty release clears a stale copy). The images are
        public (post-processing of DP generators), so nothing private travels in the clear. Each reply says what the
        site now holds; a failed one is logged and the node gets the whole release next time. Returns the summary
        the round's record keeps.
        """
        self.sync_with_checkpoint()
        records = self.store.records()
        messages = []
        for node in sorted(grid.get_node_ids()):  # an empty release too: it clears a stale copy
            content = RecordDict({"config": ConfigRecord({ROUND_KEY: server_round}),
                                  **self._delta_records(records, node)})
            messages.append(Message(content=content, message_type=RELEASE_MESSAGE, dst_node_id=node))
        sent = {m.metadata.dst_node_id: sum(record_nbytes(r) for r in m.content.values()) for m in messages}
        sites: list[dict[str, Any]] = []
        for reply in sorted(grid.send_and_receive(messages, timeout=self.timeout_s),
                            key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            site = None if reply.has_error() else reply.content.get("site")
            held = held_from_config(site) if isinstance(site, ConfigRecord) else None
            if held is None:
                reason = reply.error.reason if reply.has_error() else "the reply does not say what the site holds"
                self.held.pop(node, None)
                sites.append({"node_id": node, "status": "failed", "reason": reason})
                log(WARNING, "Release sync before round %s: node %s failed: %s", server_round, node, reason)
                continue
            self.acknowledge({node: held})
            sites.append({"node_id": node, "name": str(site.get("name", "")), "status": "ok", "held": held.count,
                          "bytes_down": sent.get(node, 0)})
        return {"release_size": len(records), "sites": sites}

    # -- one query round ----------------------------------------------------------------------------
    def query_round(self, grid: Grid, bundle: ModelBundle, server_round: int,
                    site_names: Mapping[int, str] | None = None) -> dict[str, Any]:
        """One query -> validate -> select -> release cycle; returns its summary for ``metrics.jsonl``.

        ``site_names`` (node id -> site name, from the round's replies) makes each site's request a function of
        the seed, the round and the site, not of the node ids the SuperLink happened to hand out. The pure step is
        :mod:`common.active_learning.step`; this method is its Flower I/O and storage.
        """
        self.sync_with_checkpoint()
        fed = self.cfg.federation
        names = dict(site_names or {})
        if fed.pe_iterations > 0:  # private evolution instead of the sites' scored samples (server/evolution.py)
            return self._evolution_round(grid, bundle, server_round, names)
        existing = self.store.records()
        bank = features(bundle, np.stack([self.store.load_image(r) for r in existing])) if existing else None
        nodes = sorted(grid.get_node_ids(), key=lambda n: (n not in names, names.get(n, ""), n))
        plans = plan_requests(self.cfg, existing, server_round, [names.get(n, str(n)) for n in nodes])
        requests = {n: plans[names.get(n, str(n))] for n in nodes}
        weights = bundle_to_record(bundle)
        messages = []
        for node in nodes:
            content = RecordDict({
                "arrays": weights,
                "request": arrays_to_record({"plane": requests[node].plane, "ga": requests[node].ga}),
                "config": ConfigRecord({ROUND_KEY: server_round, "seed": derive_seed(self.cfg.seed, "query", server_round),
                                        "memorization-check": fed.al_memorization_check}),
                **self.train_records(node),  # the site computes the release's features from its own copy
            })
            messages.append(Message(content=content, message_type=MessageType.QUERY, dst_node_id=node))
        sent = {m.metadata.dst_node_id: sum(record_nbytes(r) for r in m.content.values()) for m in messages}
        replies = grid.send_and_receive(messages, timeout=self.timeout_s)
        answers: list[SiteAnswer] = []
        sites: list[dict[str, Any]] = []
        answered: set[str] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                sites.append({"node_id": node, "status": "failed", "reason": reply.error.reason})
                log(WARNING, "Query round %s: node %s failed: %s", server_round, node, reply.error.reason)
                self.held.pop(node, None)
                continue
            try:
                answer = self._read_answer(reply, requests, names, answered)
            except (ReplyValidationError, KeyError, TypeError, ValueError, AttributeError) as exc:
                name = names.get(node) or f"node-{node}"
                sites.append({"node_id": node, "name": name, "status": "rejected", "reason": str(exc)})
                log(WARNING, "Query round %s: rejected reply of %s: %s", server_round, name, exc)
                continue
            self.site_privacy[answer.name] = answer.site.privacy
            sites.append({"node_id": node, "name": answer.name, "status": "ok",
                          "candidates": len(answer.candidates.plane), "bytes_down": sent.get(node, 0)})
            answers.append(answer)
        answers.sort(key=lambda a: a.name)  # replies arrive in a race; the pool's order must not
        pooled = pool(answers)
        summary: dict[str, Any] = {"round": server_round, "sites": sites, "candidates": len(pooled)}
        step = select_items(self.cfg, pooled, server_round=server_round, features=lambda x: features(bundle, x),
                            bank=bank)
        if not step.items:
            summary.update(selected=0, **self._release_state())
            return summary
        added = self.store.add(step.items)
        self._write_sidecar()
        if self.on_release is not None:
            self.on_release(server_round)
        self._grid(server_round, step.chosen)
        summary.update({"selected": len(added.added), "duplicates": len(added.duplicates), **self._release_state(),
                        **step.summary})
        if fed.al_refine_steps > 0 and len(self.store) > 0:
            summary["refine_loss"] = self.refine(bundle, server_round)
        if fed.al_downstream_steps > 0 and len(self.store) > 0:
            summary["downstream_refine_loss"] = self.refine_downstream(bundle, server_round)
        log(INFO, "Query round %s: %s candidates from %s sites, %s released (release size %s)", server_round,
            len(pooled), len(answers), len(added.added), len(self.store))
        return summary

    def _evolution_round(self, grid: Grid, bundle: ModelBundle, server_round: int,
                         names: Mapping[int, str]) -> dict[str, Any]:
        """A query round by private evolution: the sites' noisy votes select the release."""
        from server.evolution import Evolution

        if self._evolution is None:
            self._evolution = Evolution(self.cfg, timeout_s=self.timeout_s)
        items, chosen, extra = self._evolution.evolve(grid, bundle, server_round, names)
        summary: dict[str, Any] = {"round": server_round, "candidates": self.cfg.federation.pe_population, **extra}
        if not items:
            summary.update(selected=0, **self._release_state())
            return summary
        added = self.store.add(items)
        self._write_sidecar()
        if self.on_release is not None:
            self.on_release(server_round)
        summary.update({"selected": len(added.added), "duplicates": len(added.duplicates), **self._release_state()})
        fed = self.cfg.federation
        if fed.al_refine_steps > 0 and len(self.store) > 0:
            summary["refine_loss"] = self.refine(bundle, server_round)
        if fed.al_downstream_steps > 0 and len(self.store) > 0:
            summary["downstream_refine_loss"] = self.refine_downstream(bundle, server_round)
        log(INFO, "Private evolution round %s: %s released (release size %s)", server_round, len(added.added),
            len(self.store))
        return summary

    def _read_answer(self, reply: Message, requests: Mapping[int, QueryRequest], names: Mapping[int, str],
                     answered: set[str]) -> SiteAnswer:
        """A query reply as a :class:`SiteAnswer`, or :class:`ReplyValidationError` naming the site.

        The site is who its node id is (bound by the training round), never what the reply calls itself; a node the
        training round did not name may use a name no other node holds.
        """
        node = reply.metadata.src_node_id
        content = reply.content
        site_rec = content.get("site")
        claimed = str(site_rec.get("name", "")) if isinstance(site_rec, Mapping) else ""
        name = names.get(node) or claimed or f"node-{node}"
        if node not in requests or not isinstance(content.get("candidates"), Mapping) \
                or not isinstance(site_rec, Mapping):
            raise ReplyValidationError(f"{name}: reply lacks a 'candidates' array record or a 'site' config "
                                       "record, or answers no request")
        if claimed != name:
            raise ReplyValidationError(f"{name}: node {node} answers as {claimed!r}")
        if name in answered or (node not in names and name in names.values()):
            raise ReplyValidationError(f"{name}: node {node} claims a name another node holds")
        answered.add(name)
        request = requests[node]
        cand = validate_candidates(
            record_to_arrays(content["candidates"]), who=name, plane=request.plane, ga=request.ga,
            image_size=self.cfg.data.image_size, max_bytes=self.cfg.federation.al_max_reply_bytes,
        )
        site = validate_query_site(site_rec, who=name, candidates=cand)
        self.acknowledge({node: held_from_config(site_rec)})  # type: ignore[arg-type]
        return SiteAnswer(name=name, candidates=cand, site=site)

    def _release_state(self) -> dict[str, Any]:
        """What the round's checkpoint records of the release, so that a resume can roll it back to it."""
        records = self.store.records()
        return {"release_size": len(records), "release_last_id": records[-1]["id"] if records else None}

    def refine(self, bundle: ModelBundle, server_round: int) -> float:
        """Fine-tune the generator's trainable part on the release (non-DP: released images are public)."""
        data = records_to_dataset(load_release_records(self.store.folder), image_size=self.cfg.data.image_size)
        scheduler = bundle.generator.noise_scheduler("ddpm")  # the schedule saved with the prior's weights
        loss_fn = make_loss_fn(scheduler, noise_multiplicity=1, cond_dropout=self.cfg.generator.cond_dropout,
                               seed=derive_seed(self.cfg.seed, "refine", server_round))
        return self._train_public(bundle.generator, loss_fn, data, steps=self.cfg.federation.al_refine_steps,
                                  key="generator", server_round=server_round)

    def refine_downstream(self, bundle: ModelBundle, server_round: int) -> dict[str, float]:
        """Train the global plane classifier and GA regressor on the release (non-DP: released images are public).

        The sites start their next round from these weights: the selected data improves the downstream models
        without spending any site's budget. Returns the mean training loss per model.
        """
        data = records_to_dataset(load_release_records(self.store.folder), image_size=self.cfg.data.image_size)
        steps = self.cfg.federation.al_downstream_steps
        out = {"classifier": self._train_public(bundle.classifier, classifier_loss, data, steps=steps,
                                                key="classifier", server_round=server_round)}
        if has_ga(data):
            out["regressor"] = self._train_public(bundle.regressor, regressor_loss, data, steps=steps,
                                                  key="regressor", server_round=server_round)
        return out

    def _train_public(self, model: torch.nn.Module, loss_fn: Any, data: Any, *, steps: int, key: str,
                      server_round: int) -> float:
        """Non-private steps on public data (``ledger=None``) at the run's rate for ``key``; the mean finite loss."""
        lr, optimizer = self.cfg.train.rate(key)
        result = train_private(
            model, loss_fn, data, steps=steps, batch_size=min(self.cfg.train.batch_for(key), len(data)), lr=lr,
            ledger=None, model_key=key, planned_total_steps=steps, optimizer=optimizer,
            seed=derive_seed(self.cfg.seed, f"refine-{key}", server_round),
        )
        finite = [x for x in result.losses if np.isfinite(x)]
        return float(np.mean(finite)) if finite else float("nan")

    def _write_sidecar(self) -> None:
        self.store.write_sidecar({
            "kind": "synthetic-release",
            "config": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "sites": self.site_privacy,
            "privacy_statement": (
                "Each image is post-processing of the DP-SGD-trained generator of its source site; its (epsilon, delta) "
                "is that generator's cumulative spend when it was sampled (per image in metadata.jsonl). Images with "
                "memorization_checked=true passed a filter that read the site's private images: that filter is NOT "
                "covered by the DP guarantee. Images of model 'private-evolution' were selected by the sites' noisy "
                "votes: their certificate lists, per site, the votes' epsilon (and the generator's, for generator "
                "samples) and its basic-composition sum. With privacy.distributed-classifier the candidates were "
                "scored by the classifier trained by distributed DP-FedSGD: each image's privacy.scoring gives its "
                "central epsilon (against anyone who sees only the secure sums and what follows from them, this "
                "release included) and the local one its source site keeps if the server and the other sites collude."
            ),
            "code_version": code_version(),
        })

    def _grid(self, server_round: int, chosen: Sequence[Pooled]) -> None:
        rows, captions, labels = [], [], []
        for p, name in enumerate(PLANES):
            mine = [c for c in chosen if c.plane == p][:6]
            if not mine:
                continue
            rows.append([c.image for c in mine])
            captions.append([f"q {c.scores['quality']:.2f}\nu {c.scores['uncertainty']:.2f}\n"
                             f"n {c.scores.get('novelty', float('nan')):.2f}\n{c.answer.name[:10]}" for c in mine])
            labels.append(name)
        if rows:  # ragged rows: a plane with fewer images leaves its cells blank
            save_grid(rows, self.layout.figures / f"release-round-{server_round:03d}.png", row_labels=labels, scale=3,
                      cell_captions=captions,
                      title=f"Released after round {server_round} (q=quality, u=uncertainty, n=novelty)")
