"""What a site does in one federated round, as plain functions (the client app adapts them to Flower).

Train: DP fine-tune the generator's trainable part, then the plane classifier and the GA regressor, each
with its own accountant in the site's single ledger (under FedProx, each with the proximal term toward the
weights the site received this round). Evaluate: the downstream metrics and a held-out
denoising loss on the site's test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.core.config import RunConfig
from common.core.records import UltrasoundRecord
from common.core.seeding import derive_seed, secret_seed
from common.data.sites import SiteData
from common.data.tensors import has_ga, records_to_dataset
from common.diffusion.loss import diffusion_loss, make_loss_fn
from common.models.bundle import ModelBundle
from common.models.downstream import classifier_loss, evaluate_classifier, evaluate_regressor, regressor_loss
from common.privacy.dpsgd import PrivateTrainResult, ProximalTerm, train_private
from common.privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class LocalTrainResult:
    """Outcome of one site's round: sizes, losses and privacy spent so far, per model."""

    num_examples: int
    metrics: dict[str, float]
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def trained_any(self) -> bool:
        """Whether at least one model took a step this round."""
        return any(self.metrics.get(f"{k}-steps", 0) > 0 for k in ("generator", "classifier", "regressor"))


def planned_steps(cfg: RunConfig, model_key: str) -> int:
    """Steps one site takes for ``model_key`` over the whole run (what the noise is calibrated for)."""
    per_round = cfg.train.local_steps if model_key == "generator" else cfg.train.downstream_steps
    return max(1, per_round * cfg.federation.num_rounds)


def local_train(
    bundle: ModelBundle,
    site: SiteData,
    ledger: PrivacyLedger | None,
    cfg: RunConfig,
    *,
    server_round: int,
    synthetic: Sequence[UltrasoundRecord] = (),
    secret: bytes | None = None,
) -> LocalTrainResult:
    """Fine-tune the bundle in place on ``site.train`` (plus released ``synthetic`` for downstream models).

    Parameters
    ----------
    ledger:
        The site's ledger (DP-SGD), or ``None`` when the run has no DP (``privacy.target_epsilon=None``).
    synthetic:
        Images of the shared synthetic release; post-processing of DP models, they add no privacy cost.
        They are pooled with the real images in the DP datasets of the downstream models ``train.release_models``
        names (accounted conservatively); where no real image of the site has a GA and the regressor is named, it
        trains on them alone, without DP (public data).
    secret:
        The site's secret (:meth:`common.privacy.site_state.SiteStateStore.secret`); it keys DP-SGD's sampling and noise,
        so a replayed round draws the same noise and nobody without it can regenerate it. ``None``: fresh noise
        from the operating system. Ignored under ``privacy.insecure-reproducible-noise`` (public seed).

    The bundle must hold the weights the site received this round: with ``federation.proximal-mu`` > 0 (FedProx)
    every model's local objective gets (mu/2)·||w - w_global||², anchored at those weights as they are on entry
    (:class:`common.privacy.dpsgd.ProximalTerm`; its gradient bypasses DP-SGD's clipping and noise, no privacy cost).
    """
    size = cfg.data.image_size
    real = records_to_dataset(site.train, image_size=size)
    t = cfg.train
    pooled = (records_to_dataset(list(site.train) + list(synthetic), image_size=size)
              if synthetic and t.release_model_keys() else real)
    down = {key: pooled if t.trains_on_release(key) else real for key in ("classifier", "regressor")}
    seed = derive_seed(cfg.seed, site.name, server_round)
    scheduler = bundle.generator.noise_scheduler("ddpm")  # the schedule saved with the prior's weights
    gen_loss = make_loss_fn(
        scheduler,
        noise_multiplicity=cfg.privacy.noise_multiplicity,
        cond_dropout=cfg.generator.cond_dropout,
        seed=derive_seed(seed, "generator-noise"),
    )
    jobs: list[tuple[str, torch.nn.Module, object, TensorDataset, int]] = [
        ("generator", bundle.generator, gen_loss, real, t.local_steps)]
    skipped: list[str] = []
    if cfg.privacy.distributed_classifier:  # the classifier learns in the secure DP-FedSGD sub-rounds instead
        skipped.append("classifier trained by distributed DP-FedSGD through secure aggregation "
                       "(privacy.distributed-classifier), not by per-site DP-SGD")
    elif len(cfg.data.plane_scope()) > 1:
        jobs.append(("classifier", bundle.classifier, classifier_loss, down["classifier"], t.downstream_steps))
    else:  # one plane in scope: every prediction is that plane, so its DP steps would only spend budget
        skipped.append("classifier skipped: the label scope (data.planes) is one plane, there is nothing to learn")
    public_keys: set[str] = set()  # models trained on public data only: no DP, no privacy cost
    if has_ga(real):
        jobs.append(("regressor", bundle.regressor, regressor_loss, down["regressor"], t.downstream_steps))
    elif synthetic and t.trains_on_release("regressor") and has_ga(
            release := records_to_dataset(list(synthetic), image_size=size)):
        # no real image of this site has a GA (the African set): the regressor can learn only from the shared
        # release, which is public (post-processing of the DP generator), so it trains on the release alone,
        # without DP, and the site's private data and budget are never touched
        jobs.append(("regressor", bundle.regressor, regressor_loss, release, t.downstream_steps))
        public_keys.add("regressor")
        skipped.append("regressor trained on the synthetic release only (no image of this site has a known "
                       "gestational age): public data, no privacy cost")
    else:
        skipped.append("regressor skipped: no image of this site has a known gestational age")
    # mu comes from the site's run config, the one source of truth; the "proximal-mu" key Flower's FedProx puts into
    # the train message's config is not read (make_strategy gives FedProx the same config value).
    mu = cfg.federation.proximal_mu
    # w_global: each model's trainable weights now, before any of them is trained this round.
    anchors = {key: ProximalTerm.at(model, mu) for key, model, *_ in jobs} if mu > 0 else {}
    metrics: dict[str, float] = {"real-examples": float(len(real)), "synthetic-examples": float(len(synthetic))}
    messages: list[str] = list(skipped)
    for key, model, loss_fn, data, steps in jobs:
        if steps == 0:
            continue
        lr, optimizer = t.rate(key)
        private = ledger if key not in public_keys else None
        result: PrivateTrainResult = train_private(
            model,
            loss_fn,  # type: ignore[arg-type]
            data,
            steps=steps,
            batch_size=min(t.batch_for(key), len(data)),
            lr=lr,
            optimizer=optimizer,
            ledger=private,
            model_key=key,
            planned_total_steps=planned_steps(cfg, key),
            max_grad_norm=cfg.privacy.max_grad_norm,
            grad_sample_mode=cfg.privacy.grad_sample_mode,
            seed=derive_seed(seed, key),
            noise_multiplier=cfg.privacy.noise_multiplier if private is not None else None,
            noise_seed=dp_noise_seed(cfg, secret, site.name, server_round, key),
            proximal=anchors.get(key),
        )
        metrics[f"{key}-steps"] = float(result.steps)
        finite = [x for x in result.losses if np.isfinite(x)]  # an empty Poisson batch has no loss (NaN)
        metrics[f"{key}-loss"] = float(np.mean(finite)) if finite else float("nan")
        metrics[f"{key}-epsilon"] = float(result.epsilon)
        if result.stopped_by_budget:
            messages.append(f"{key}: {result.message}")
    privacy = ledger.summary() if ledger is not None else {}
    return LocalTrainResult(num_examples=len(real), metrics=metrics, privacy=privacy, messages=messages)


@torch.no_grad()
def local_evaluate(bundle: ModelBundle, site: SiteData, cfg: RunConfig) -> dict[str, float]:
    """Downstream metrics and a held-out denoising loss on the site's test split."""
    if not site.test:
        return {"num-examples": 0.0}
    test = records_to_dataset(site.test, image_size=cfg.data.image_size)
    out: dict[str, float] = {"num-examples": float(len(test))}
    cls = evaluate_classifier(bundle.classifier, test)
    out.update({"plane-accuracy": float(cls["accuracy"]), "plane-macro-f1": float(cls["macro_f1"])})
    if has_ga(test):
        reg = evaluate_regressor(bundle.regressor, test)
        out.update({"ga-mae-days": float(reg["mae_days"]), "ga-coverage": float(reg["coverage"])})
    out["denoise-loss"] = heldout_denoise_loss(bundle, test, cfg)
    return out


@torch.no_grad()
def heldout_denoise_loss(bundle: ModelBundle, data: TensorDataset, cfg: RunConfig, *, max_examples: int = 64) -> float:
    """Mean diffusion loss on ``data`` with fixed noise and timesteps (comparable across rounds)."""
    scheduler = bundle.generator.noise_scheduler("ddpm")  # the schedule saved with the prior's weights
    batch = tuple(t[:max_examples] for t in data.tensors)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "heldout-denoise"))
    bundle.generator.eval()
    losses = diffusion_loss(bundle.generator, batch, noise_scheduler=scheduler, noise_multiplicity=4,
                            cond_dropout=0.0, generator=gen)
    return float(losses.mean())


def dp_noise_seed(cfg: RunConfig, secret: bytes | None, site_name: str, server_round: int, key: str) -> int | None:
    """Seed of one model's DP-SGD sampling and noise in one round: keyed by the site's secret (private),
    ``None`` for fresh OS randomness, or the public run seed under ``privacy.insecure-reproducible-noise``."""
    if cfg.privacy.insecure_reproducible_noise:
        return derive_seed(cfg.seed, site_name, server_round, key, "dp-noise")
    return None if secret is None else secret_seed(secret, site_name, server_round, key)

