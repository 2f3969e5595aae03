"""The public prior: generator and downstream models trained on phantoms without DP (no privacy cost).

The recipe of Ghalebikesabi et al. 2023: pretrain on public data, then DP fine-tune at the sites. The prior
folder is what :func:`common.models.bundle.build_bundle` loads when ``prior="shipped"`` or a path is given.
"""

from __future__ import annotations

import time
from pathlib import Path

from common.core.config import RunConfig
from common.core.provenance import code_version
from common.core.seeding import derive_seed
from common.data.sites import public_phantoms
from common.data.tensors import records_to_dataset
from common.diffusion.loss import make_loss_fn
from common.diffusion.schedulers import make_scheduler
from common.models.bundle import build_bundle, save_bundle
from common.models.downstream import classifier_loss, regressor_loss
from common.privacy.dpsgd import train_private

PROGRESS_EVERY = 100  # steps between progress lines


def pretrain_prior(cfg: RunConfig, out: Path, *, command: str = "") -> Path:
    """Train all three models on ``cfg.data.public_images`` phantoms and write the prior folder ``out``.

    Parameters
    ----------
    cfg:
        Sizes and steps come from ``cfg.generator`` / ``cfg.train`` (``pretrain_steps``, ``pretrain_batch_size``).
    command:
        The command line that produced the prior, recorded in its sidecar for reproduction.
    """
    t0 = time.perf_counter()
    cfg_init = cfg.__class__.from_dict({**cfg.to_dict(), "prior": ""})
    bundle = build_bundle(cfg_init, finetune=False)
    records = public_phantoms(cfg.data, seed=cfg.seed)
    data = records_to_dataset(records, image_size=cfg.data.image_size)
    scheduler = make_scheduler(
        "ddpm", num_train_timesteps=cfg.generator.num_train_timesteps, prediction_type=cfg.generator.prediction_type
    )
    steps = cfg.train.pretrain_steps
    batch = cfg.train.pretrain_batch_size
    log: dict[str, dict[str, float]] = {}
    jobs = (
        ("generator", bundle.generator,
         make_loss_fn(scheduler, noise_multiplicity=1, cond_dropout=cfg.generator.cond_dropout,
                      seed=derive_seed(cfg.seed, "pretrain-noise")), steps),
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
        k = max(1, len(losses) // 10)
        log[key] = {
            "steps": n_steps,
            "first_loss": float(sum(losses[:k]) / k),
            "last_loss": float(sum(losses[-k:]) / k),
            "seconds": round(time.perf_counter() - t, 1),
        }
    sidecar = {
        "kind": "public-prior",
        "data": {"source": "phantom", "images": len(records), "image_size": cfg.data.image_size, "seed": cfg.seed},
        "config": cfg_init.to_dict(),
        "seed": cfg.seed,
        "training": log,
        "privacy": {"epsilon": 0.0, "note": "public phantom data only; no private data was used"},
        "command": command,
        "wall_s": round(time.perf_counter() - t0, 1),
        "code_version": code_version(),
    }
    return save_bundle(bundle, out, sidecar=sidecar)
