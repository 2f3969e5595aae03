"""The public prior: generator and downstream models trained on public data without DP (no privacy cost).

The recipe of Ghalebikesabi et al. 2023: pretrain on public data, then DP fine-tune at the sites. The prior
folder is what :func:`common.models.bundle.build_bundle` loads when ``prior="shipped"`` or a path is given.
Public data: the phantoms of ``cfg.data.public_images`` plus, optionally, public real scans in a supported
layout (:func:`common.data.loaders.load_source`). The generator's training resumes after an interruption:
every ``checkpoint_every`` steps its weights, optimiser state, RNG states and step counter are written
atomically to ``<out>.resume/state.pt``; batch ``k`` and its noise are drawn from generators seeded by
``(seed, k)``, so a resumed run equals an uninterrupted one of the same seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.core.atomic_io import write_bytes_atomic
from common.core.config import RunConfig
from common.core.provenance import code_version
from common.core.records import UltrasoundRecord
from common.core.seeding import derive_seed
from common.data.loaders import load_source
from common.data.sites import public_phantoms
from common.data.tensors import records_to_dataset
from common.diffusion.loss import make_loss_fn
from common.models.bundle import build_bundle, save_bundle
from common.models.downstream import classifier_loss, regressor_loss
from common.models.generator import ConditionalUNet
from common.privacy.dpsgd import _OPTIMIZER_CLASSES, train_private

PROGRESS_EVERY = 100  # steps between progress lines


CHECKPOINT_FILE = "state.pt"


def checkpoint_dir(out: Path) -> Path:
    """Where the resumable state of the prior ``out`` lives: ``<out>.resume/`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def parse_public_data(spec: str) -> tuple[str, Path]:
    """``"LAYOUT:DIR"`` (e.g. ``hc18:/data/HC18``) as ``(layout, folder)``."""
    layout, sep, folder = spec.partition(":")
    if not sep or not layout or not folder:
        raise ValueError(f"--public-data {spec!r} must be LAYOUT:DIR, e.g. hc18:/data/HC18 "
                         "(layouts: fetal_planes_db, hc18, african)")
    return layout, Path(folder)


def records_digest(records: Sequence[UltrasoundRecord]) -> str:
    """SHA-256 over the records' pixels and labels, in order (the content a prior was trained on)."""
    h = hashlib.sha256()
    for r in records:
        image = np.ascontiguousarray(np.asarray(r.image))
        h.update(f"{image.shape}|{r.plane}|{r.ga_weeks}|".encode())
        h.update(image.tobytes())
    return h.hexdigest()


def load_public_sources(specs: Sequence[str], *, image_size: int) -> tuple[list[UltrasoundRecord], list[dict]]:
    """Records of every ``LAYOUT:DIR`` and, per source, its sidecar entry (layout, folder, count, digest)."""
    records: list[UltrasoundRecord] = []
    sources: list[dict] = []
    for spec in specs:
        layout, folder = parse_public_data(spec)
        result = load_source(layout, folder, image_size=image_size)
        if not result.records:
            raise ValueError(f"--public-data {spec}: no image was read from {folder} as {layout}")
        records += result.records
        sources.append({"source": layout, "folder": str(folder), "images": len(result.records),
                        "digest": records_digest(result.records)})
    return records, sources


def _rng_states() -> dict[str, Any]:
    """The global RNG states (torch, numpy, python), saved for completeness: the stream itself is seeded by step."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def train_generator_resumable(
    model: ConditionalUNet, data: TensorDataset, cfg: RunConfig, *, steps: int, ckpt: Path,
    checkpoint_every: int = 0, resume: bool = False, stop_after: int | None = None, fingerprint: str = "",
) -> tuple[list[float], bool]:
    """Train the generator ``steps`` steps (no DP); checkpoint to ``ckpt`` and resume from it.

    Parameters
    ----------
    model: trained in place.
    data: ``(images, plane, ga, spacing)``; plane -1 / GA NaN are the null tokens of classifier-free guidance.
    cfg: seed, rate (``cfg.train.rate("generator")``), batch size and condition dropout.
    steps: total generator steps of the run.
    ckpt: checkpoint folder (``state.pt`` inside).
    checkpoint_every: write a checkpoint every N steps (0: only at ``stop_after``).
    resume: continue from ``ckpt`` if it holds a checkpoint of the same run (``fingerprint``).
    stop_after: stop after this step, checkpointed, as an interrupted sitting would (tests; budgeted sittings).
    fingerprint: identifies the run (config and data digest); a checkpoint of another run is refused.

    Returns
    -------
    ``(losses of the steps of the whole run, finished)``.
    """
    lr, opt_name = cfg.train.rate("generator")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _OPTIMIZER_CLASSES[opt_name](params, lr=lr)
    scheduler = model.noise_scheduler("ddpm")
    batch = min(cfg.train.pretrain_batch_size, len(data))
    start, losses = 0, []
    path = Path(ckpt) / CHECKPOINT_FILE
    if resume and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
            raise ValueError(f"{path} is unreadable ({exc!r}); delete it to start over without --resume") from exc
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{path} is a checkpoint of another run (config or public data differ); delete "
                             f"{Path(ckpt)} or drop --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_states(state["rng"])
        start, losses = int(state["step"]), list(state["losses"])
        print(f"[pretrain] generator: resumed at step {start}/{steps} from {path}", flush=True)
    elif resume:
        print(f"[pretrain] generator: no checkpoint at {path}; starting at step 0", flush=True)

    def save(step: int) -> None:
        buf = io.BytesIO()
        torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "losses": losses,
                    "rng": _rng_states(), "fingerprint": fingerprint}, buf)
        Path(ckpt).mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buf.getvalue())

    model.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        # batch and noise of step k depend on (seed, k) only: the stream restarts exactly after a resume
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "pretrain-batch", step))
        idx = torch.randint(len(data), (batch,), generator=gen)
        loss_fn = make_loss_fn(scheduler, noise_multiplicity=1, cond_dropout=cfg.generator.cond_dropout,
                               seed=derive_seed(cfg.seed, "pretrain-noise", step))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, tuple(t[idx] for t in data.tensors)).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if done % PROGRESS_EVERY == 0 or done == steps:
            recent = losses[-PROGRESS_EVERY:]
            print(f"[pretrain] generator: step {done}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if stop_after is not None and done >= stop_after and done < steps:
            save(done)
            return losses, False
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            save(done)
    opt.zero_grad(set_to_none=True)
    return losses, True


def _summary(losses: list[float], n_steps: int, seconds: float) -> dict[str, float]:
    k = max(1, len(losses) // 10)
    return {"steps": n_steps, "first_loss": float(sum(losses[:k]) / k), "last_loss": float(sum(losses[-k:]) / k),
            "seconds": round(seconds, 1)}


def pretrain_prior(
    cfg: RunConfig, out: Path, *, command: str = "", public_data: Sequence[str] = (), resume: bool = False,
    checkpoint_every: int = 0, stop_after: int | None = None,
) -> Path | None:
    """Train all three models on public data (phantoms + ``public_data``) and write the prior folder ``out``.

    Parameters
    ----------
    cfg:
        Sizes and steps come from ``cfg.generator`` / ``cfg.train`` (``pretrain_steps``, ``pretrain_batch_size``).
    out:
        The prior folder; the resumable state lives in :func:`checkpoint_dir` ``(out)`` until it is written.
    command:
        The command line that produced the prior, recorded in its sidecar for reproduction.
    public_data:
        ``LAYOUT:DIR`` items (:func:`parse_public_data`): public real scans added to the phantoms. Their labels
        are used; GA unknown trains the null GA token. Never a site's private data.
    resume, checkpoint_every, stop_after:
        See :func:`train_generator_resumable`.

    Returns
    -------
    ``out``, or None when ``stop_after`` stopped the run before its end (checkpointed; rerun with ``resume``).
    """
    t0 = time.perf_counter()
    out = Path(out)
    cfg_init = cfg.__class__.from_dict({**cfg.to_dict(), "prior": ""})
    bundle = build_bundle(cfg_init, finetune=False)
    records = public_phantoms(cfg.data, seed=cfg.seed)
    sources: list[dict] = [{"source": "phantom", "generator": "common.data.phantom", "images": len(records),
                            "seed": cfg.seed, "digest": records_digest(records)}]
    extra, extra_sources = load_public_sources(public_data, image_size=cfg.data.image_size)
    sources += extra_sources
    data = records_to_dataset(list(records) + extra, image_size=cfg.data.image_size)
    steps = cfg.train.pretrain_steps
    batch = cfg.train.pretrain_batch_size
    fingerprint = hashlib.sha256(json.dumps({"config": cfg_init.to_dict(), "sources": sources},
                                            sort_keys=True, default=str).encode()).hexdigest()
    ckpt = checkpoint_dir(out)
    t = time.perf_counter()
    gen_losses, finished = train_generator_resumable(
        bundle.generator, data, cfg, steps=steps, ckpt=ckpt, checkpoint_every=checkpoint_every, resume=resume,
        stop_after=stop_after, fingerprint=fingerprint)
    if not finished:
        print(f"[pretrain] stopped at step {len(gen_losses)}/{steps}; resume with --resume ({ckpt})", flush=True)
        return None
    log: dict[str, dict[str, float]] = {"generator": _summary(gen_losses, steps, time.perf_counter() - t)}
    # The downstream models are short (steps // 4) and deterministic from the seed: after a resume they are
    # retrained from their start, which gives the same weights as an uninterrupted run.
    jobs = (
        ("classifier", bundle.classifier, classifier_loss, max(1, steps // 4)),
        ("regressor", bundle.regressor, regressor_loss, max(1, steps // 4)),
    )
    for key, model, loss_fn, n_steps in jobs:
        lr, optimizer = cfg.train.rate(key)
        t = time.perf_counter()
        losses: list[float] = []
        for chunk, start in enumerate(range(0, n_steps, PROGRESS_EVERY)):
            # Chunks restart the optimizer state: a short warm restart, harmless for public pretraining.
            result = train_private(
                model, loss_fn, data, steps=min(PROGRESS_EVERY, n_steps - start), batch_size=batch, lr=lr,
                ledger=None, model_key=key, planned_total_steps=n_steps,
                optimizer=optimizer,
                seed=derive_seed(cfg.seed, "pretrain", key, chunk),
            )
            losses += result.losses
            print(f"[pretrain] {key}: step {start + len(result.losses)}/{n_steps} "
                  f"loss {sum(result.losses) / len(result.losses):.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
        log[key] = _summary(losses, n_steps, time.perf_counter() - t)
    sidecar = {
        "kind": "public-prior",
        "data": {"source": "+".join(s["source"] for s in sources), "images": len(data),
                 "image_size": cfg.data.image_size, "seed": cfg.seed, "sources": sources},
        "config": cfg_init.to_dict(),
        "seed": cfg.seed,
        "training": log,
        "privacy": {"epsilon": 0.0, "note": "public data only (phantoms and the listed public sources); "
                                            "no private data was used"},
        "command": command,
        "resumed": resume,
        "wall_s": round(time.perf_counter() - t0, 1),
        "code_version": code_version(),
    }
    path = save_bundle(bundle, out, sidecar=sidecar)
    (ckpt / CHECKPOINT_FILE).unlink(missing_ok=True)  # the prior is written: its resumable state is spent
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()
    return path
