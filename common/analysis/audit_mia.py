"""Membership inference for the privacy audit: ROC metrics with bootstrap intervals, the one-run canary audit
bound (Steinke, Nasr & Jagielski 2023), denoising-error scores of a diffusion generator, classifier features, and
the canary training runs. Higher score = "member" throughout.

Generator attack (in the spirit of SecMI, Duan et al. 2023, and PIA, Kong et al. 2024): a training image is
denoised better than an unseen one. Each image gets the error ``||f(x_t, t, c) - target||^2`` at fixed timesteps
with noise fixed per image index (the same for members and non-members, and across models), and the score
``-error``: lower error => member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from common.core.config import RunConfig
from common.privacy.dpsgd import LossFn, PrivateTrainResult, train_private
from common.privacy.ledger import PrivacyLedger


def _scores(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated flat float arrays (finite, non-empty)."""
    m, n = np.asarray(member, float).ravel(), np.asarray(nonmember, float).ravel()
    if len(m) == 0 or len(n) == 0 or not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError(f"need finite, non-empty member and non-member scores; got {len(m)} and {len(n)}")
    return m, n


def roc_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """Area under the ROC of "member iff score >= tau" = P(member > non-member) + P(tie) / 2 (Mann-Whitney U)."""
    m, n = _scores(member, nonmember)
    ranks = stats.rankdata(np.concatenate([m, n]))
    return float((ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2.0) / (len(m) * len(n)))


def roc_curve(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "member iff score >= tau" over every distinct score: ``(fpr, tpr, thresholds)``.

    Starts at ``(0, 0)`` (``tau = +inf``) and ends at ``(1, 1)``; thresholds decrease.
    """
    m, n = _scores(member, nonmember)
    thr = np.unique(np.concatenate([m, n]))[::-1]
    tpr = (m[None, :] >= thr[:, None]).mean(axis=1)
    fpr = (n[None, :] >= thr[:, None]).mean(axis=1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thr]


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, fpr: float) -> float:
    """Largest TPR over thresholds whose FPR is at most ``fpr`` (Carlini et al. 2022, "TPR at low FPR").

    With ``n_n`` non-members the achievable FPRs are multiples of ``1 / n_n``: below that only ``FPR = 0`` counts.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr={fpr} must be in [0, 1]")
    f, t, _ = roc_curve(member, nonmember)
    return float(t[f <= fpr + 1e-12].max())


def bootstrap_ci(member: np.ndarray, nonmember: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], float],
                 *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval, resampling members and non-members separately (stratified)."""
    m, n = _scores(member, nonmember)
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1; got {n_boot}, {level}")
    rng = np.random.default_rng(seed)
    vals = np.array([statistic(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))])
                     for _ in range(n_boot)])
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mia_summary(member: np.ndarray, nonmember: np.ndarray, *, fprs: Sequence[float] = (0.01, 0.001),
                n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC and TPR at each FPR in ``fprs``, each with a 95% stratified bootstrap interval, and the ROC."""
    m, n = _scores(member, nonmember)
    out: dict[str, Any] = {"n_members": len(m), "n_nonmembers": len(n), "auc": roc_auc(m, n),
                           "auc_ci95": bootstrap_ci(m, n, roc_auc, n_boot=n_boot, seed=seed)}
    for f in fprs:
        key = f"tpr_at_{f:g}_fpr"
        out[key] = tpr_at_fpr(m, n, f)
        out[key + "_ci95"] = bootstrap_ci(m, n, lambda a, b, f=f: tpr_at_fpr(a, b, f), n_boot=n_boot, seed=seed)
    out["fpr_resolution"] = 1.0 / len(n)
    fpr, tpr, _ = roc_curve(m, n)
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out




# -- one-run canary audit (Steinke, Nasr & Jagielski 2023) -----------------------------------------------
def steinke_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``>= v`` correct guesses out of ``r`` (of ``m`` canaries) if the training is (eps, delta)-DP.

    The main (eps, delta) theorem of Steinke, Nasr & Jagielski (2023) in the numerical form of their p-value
    routine: with ``q = e^eps / (1 + e^eps)`` (the accuracy of eps-randomised response),
    ``p = P[Binom(r, q) >= v] + 2 m delta * max_{i=1..v} P[v > Binom(r, q) >= v - i] / i``.
    """
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need 0 <= v <= r <= m, epsilon >= 0, delta in [0, 1]; got m={m} r={r} v={v} "
                         f"epsilon={epsilon} delta={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float((np.cumsum(pmf) / np.arange(1, v + 1)).max()) if v > 0 else 0.0
    return min(beta + alpha * delta * 2 * m, 1.0)


def steinke_epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95,
                                tol: float = 1e-6) -> float:
    """Largest eps whose (eps, delta)-DP is rejected at ``confidence`` by ``v`` correct of ``r`` guesses.

    Binary search on :func:`steinke_p_value` (increasing in eps); 0 when even eps = 0 is not rejected.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    level = 1.0 - confidence
    if steinke_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while steinke_p_value(m, r, v, hi, delta) < level and hi < 1e3:
        lo, hi = hi, 2 * hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if steinke_p_value(m, r, v, mid, delta) < level else (lo, mid)
    return lo


def canary_audit(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float = 0.95,
                 ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Guess inclusion of the top-k (in) and bottom-k (out) canary scores; convert to an epsilon lower bound.

    Each ``k`` of ``ks`` (default ``m/8, m/4, m/2``) gives ``r = 2k`` guesses; the bound of every ``k`` is
    computed at level ``(1 - confidence) / len(ks)`` (Bonferroni), so that reporting the best one stays valid.
    Higher score = guessed "included".
    """
    s, inc = np.asarray(scores, float).ravel(), np.asarray(included, bool).ravel()
    m = len(s)
    if m < 2 or len(inc) != m or not np.isfinite(s).all():
        raise ValueError(f"need >= 2 finite canary scores and an inclusion flag for each; got {m}, {len(inc)}")
    ks = sorted({max(1, min(int(k), m // 2)) for k in (ks or (m // 8, m // 4, m // 2))})
    order = np.argsort(-s, kind="stable")
    conf_each = 1.0 - (1.0 - confidence) / len(ks)
    rows = []
    for k in ks:
        v = int(inc[order[:k]].sum() + (~inc[order[m - k:]]).sum())
        eps = steinke_epsilon_lower_bound(m, 2 * k, v, delta=delta, confidence=conf_each)
        rows.append({"k": k, "guesses": 2 * k, "correct": v, "epsilon_lower_bound": eps})
    best = max(rows, key=lambda row: row["epsilon_lower_bound"])
    return {"m": m, "included": int(inc.sum()), "delta": delta, "confidence": confidence, "per_k": rows,
            "epsilon_lower_bound": best["epsilon_lower_bound"], "auc": roc_auc(s[inc], s[~inc]) if 0 < inc.sum() < m
            else float("nan")}


# -- generator scores ---------------------------------------------------------------------------------------
@torch.no_grad()
def denoising_errors(model: nn.Module, images: torch.Tensor, plane: torch.Tensor, ga: torch.Tensor, *,
                     timesteps: Sequence[int], seed: int = 0, n_noise: int = 1, batch_size: int = 64,
                     device: str = "cpu") -> np.ndarray:
    """Per-image denoising error at fixed timesteps and fixed noise, ``float64 [N, len(timesteps)]``.

    Parameters
    ----------
    model: a :class:`~common.models.generator.ConditionalUNet` (its config gives T and the prediction type).
    images: ``[N, 1, H, W]`` in [-1, 1], ``H = W = model.image_size``.
    plane, ga: conditions ``[N]`` (plane -1 / GA NaN = unknown, the null token); the attacker knows the labels.
    timesteps: diffusion steps in ``[0, T)``.
    seed: noise ``n`` of image ``i`` depends only on ``(seed, n, i)``.
    n_noise: noise draws averaged per image and timestep.
    batch_size, device: evaluation batching and device.

    Returns
    -------
    Mean squared error between the model output and its target (epsilon or v), averaged over the noise draws.
    """
    from common.diffusion.schedulers import make_scheduler  # lazy: keeps the metric half of this module light

    cfg = model.generator_config  # type: ignore[attr-defined]
    size = int(model.image_size)  # type: ignore[attr-defined]
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, size, size):
        raise ValueError(f"images must be [N, 1, {size}, {size}] for this model; got {tuple(images.shape)}")
    ts = [int(t) for t in timesteps]
    if not ts or min(ts) < 0 or max(ts) >= cfg.num_train_timesteps:
        raise ValueError(f"timesteps {ts} must be non-empty and within [0, {cfg.num_train_timesteps})")
    schedule = getattr(model, "scheduler_config", None)  # a loaded generator's own schedule; stand-ins lack one
    sched = (make_scheduler("ddpm", schedule=schedule) if schedule is not None else
             make_scheduler("ddpm", num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type))
    n = images.shape[0]
    noise = torch.randn((n_noise, n, 1, size, size), generator=torch.Generator().manual_seed(seed))
    out = np.zeros((n, len(ts)))
    was = model.training
    model.eval().to(device)
    try:
        for s in range(0, n, batch_size):
            x0 = images[s:s + batch_size].to(device)
            p, g = plane[s:s + batch_size].long().to(device), ga[s:s + batch_size].float().to(device)
            for j, t in enumerate(ts):
                tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
                for k in range(n_noise):
                    eps = noise[k, s:s + batch_size].to(device)
                    noisy = sched.add_noise(x0, eps, tt)  # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
                    target = eps if cfg.prediction_type == "epsilon" else sched.get_velocity(x0, eps, tt)
                    pred = model(noisy, tt, p, g)
                    out[s:s + x0.shape[0], j] += ((pred - target) ** 2).mean(dim=(1, 2, 3)).double().cpu().numpy()
    finally:
        model.train(was)
    return out / n_noise


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                        device: str = "cpu") -> np.ndarray:
    """Penultimate features ``[N, D]`` of a :class:`~common.models.downstream.PlaneClassifier` (eval mode, restored)."""
    was = classifier.training
    classifier.eval().to(device)
    try:
        feats = [classifier.features(images[i:i + batch_size].to(device)).double().cpu()  # type: ignore[operator]
                 for i in range(0, images.shape[0], batch_size)]
    finally:
        classifier.train(was)
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0))


# -- one-run canary audit ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CanaryRun:
    """Outcome of :func:`run_canary_training`."""

    scores: np.ndarray  # [m] error before training - error after (higher = guessed "included")
    included: np.ndarray  # [m] bool, the coin flips
    audit: dict[str, Any]  # canary_audit(...) plus the accounted epsilon
    train: PrivateTrainResult


def run_canary_training(model: nn.Module, loss_fn: LossFn, base: TensorDataset, canaries: TensorDataset,
                        included: np.ndarray, *, timesteps: Sequence[int], steps: int, batch_size: int, lr: float,
                        ledger: PrivacyLedger | None, planned_total_steps: int, noise_multiplier: float | None = None,
                        max_grad_norm: float = 1.0, grad_sample_mode: str = "functorch", delta: float = 1e-5,
                        confidence: float = 0.95, seed: int = 0, n_noise: int = 2,
                        device: str = "cpu") -> CanaryRun:
    """Train ``model`` once on ``base`` plus the included canaries with :func:`train_private`, then audit.

    Steinke, Nasr & Jagielski (2023), "Privacy auditing with one (1) training run": each of the ``m`` canaries
    is included independently with probability 1/2 (``included``); after training, each canary is scored by how
    much its denoising error fell (difficulty calibration against the untrained model, Watson et al. 2022), and
    the top/bottom-k guesses are turned into an epsilon lower bound (:func:`common.analysis.audit.canary_audit`).

    Parameters
    ----------
    model: the generator, trained in place (DP-SGD when ``ledger`` is given).
    loss_fn, base: training loss and the site's private examples ``(images, plane, ga, spacing)``.
    canaries: all ``m`` canaries in the same 4-tensor layout; ``included`` picks the ones trained on.
    timesteps, n_noise, seed: scoring (see :func:`denoising_errors`); seed also seeds the training.
    steps, batch_size, lr, ledger, planned_total_steps, noise_multiplier, max_grad_norm, grad_sample_mode:
        passed to :func:`train_private` (model key ``"generator"``).
    delta, confidence: of the lower bound (use the accounted delta).
    device: torch device.

    Returns
    -------
    :class:`CanaryRun`; ``audit["accounted_epsilon"]`` is the ledger's epsilon (``inf`` without DP).
    """
    inc = np.asarray(included, bool)
    if len(inc) != len(canaries) or len(base.tensors) != len(canaries.tensors):
        raise ValueError(f"need one inclusion flag per canary ({len(canaries)}, got {len(inc)}) and canaries in the "
                         f"base dataset's layout ({len(base.tensors)} tensors, got {len(canaries.tensors)})")
    c_img, c_plane, c_ga = canaries.tensors[0], canaries.tensors[1], canaries.tensors[2]
    score_kw: dict[str, Any] = {"timesteps": timesteps, "seed": seed + 7, "n_noise": n_noise, "device": device}
    before = denoising_errors(model, c_img, c_plane, c_ga, **score_kw).mean(axis=1)
    keep = torch.from_numpy(inc)
    data = TensorDataset(*[torch.cat([b, c[keep]]) for b, c in zip(base.tensors, canaries.tensors)])
    result = train_private(model, loss_fn, data, steps=steps, batch_size=batch_size, lr=lr, ledger=ledger,
                           model_key="generator", planned_total_steps=planned_total_steps,
                           max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode, seed=seed, device=device,
                           noise_multiplier=noise_multiplier)
    after = denoising_errors(model, c_img, c_plane, c_ga, **score_kw).mean(axis=1)
    scores = before - after
    audit = canary_audit(scores, inc, delta=delta, confidence=confidence)
    audit.update(accounted_epsilon=result.epsilon if ledger is not None else float("inf"),
                 noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate, steps=result.steps)
    return CanaryRun(scores=scores, included=inc, audit=audit, train=result)


def checkpoint_canary_audit(generator: nn.Module, members: TensorDataset, *, cfg: RunConfig,
                            ledger_entry: Mapping[str, Any] | None, m: int, steps: int = 0,
                            t_fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.4), seed: int = 0,
                            device: str = "cpu") -> CanaryRun:
    """Canary audit of a site's DP fine-tuning, re-run from a checkpoint's generator with the deployed settings.

    A copy of ``generator`` is put in the run's fine-tuning mode and trained on ``members`` + ``m`` canaries
    (:func:`phantom_canaries`, each included with probability 1/2) with the ledger's noise multiplier, the run's
    batch size, learning rate, clipping bound and noise multiplicity; without a ledger entry (no DP), no noise.

    Parameters
    ----------
    generator: the checkpoint's generator (not modified).
    members: the site's private examples ``(images, plane, ga, spacing)`` at the generator's size.
    cfg: the run config (training settings).
    ledger_entry: the site's generator entry of the checkpoint ledger (``noise_multiplier``, ``delta``,
        ``accountant``, ``steps``), or ``None``.
    m: number of canaries; ``steps``: DP steps (0: the ledger's step count).
    t_fractions, seed, device: scoring timesteps (fractions of T), seeds and device.

    Returns
    -------
    The :class:`CanaryRun`.
    """
    import copy

    from common.analysis.audit import canary_inclusion
    from common.diffusion.loss import make_loss_fn
    from common.diffusion.schedulers import make_scheduler
    from common.models.lora import set_finetune_mode

    gen = copy.deepcopy(generator)
    set_finetune_mode(gen, cfg.train.finetune, rank=cfg.train.lora_rank)  # type: ignore[arg-type]
    entry = dict(ledger_entry or {})
    sigma = entry.get("noise_multiplier")
    ledger = (PrivacyLedger(target_epsilon=None, target_delta=float(entry["delta"]), budget_split={"generator": 1.0},
                            accountant=str(entry.get("accountant", "rdp"))) if sigma else None)
    steps = steps or int(entry.get("steps") or cfg.train.local_steps * cfg.federation.num_rounds)
    size, big_t = int(gen.image_size), int(gen.generator_config.num_train_timesteps)  # type: ignore[attr-defined]
    canaries = phantom_canaries(m, size=size, seed=seed + 11)
    sched = make_scheduler("ddpm", num_train_timesteps=big_t,
                           prediction_type=gen.generator_config.prediction_type)  # type: ignore[attr-defined]
    loss = make_loss_fn(sched, noise_multiplicity=cfg.privacy.noise_multiplicity,
                        cond_dropout=cfg.generator.cond_dropout, seed=seed + 13)
    return run_canary_training(
        gen, loss, members, canaries, canary_inclusion(m, seed=seed + 14),
        timesteps=sorted({min(big_t - 1, int(f * big_t)) for f in t_fractions}), steps=steps,
        batch_size=cfg.train.batch_size, lr=cfg.train.lr, ledger=ledger, planned_total_steps=steps,
        noise_multiplier=sigma, max_grad_norm=cfg.privacy.max_grad_norm, grad_sample_mode=cfg.privacy.grad_sample_mode,
        delta=float(entry.get("delta") or 1e-5), seed=seed + 15, device=device)


def phantom_canaries(m: int, *, size: int, seed: int) -> TensorDataset:
    """``m`` stamped phantom canaries (:func:`common.analysis.audit.make_canaries` with a phantom base) with their own
    plane and GA conditions, as ``(images, plane, ga, spacing)``: public images, so no private data is spent."""
    from common.analysis.audit import make_canaries
    from common.phantoms.simulator import make_phantoms

    recs = make_phantoms(m, size=size, seed=seed, id_prefix="canary")
    imgs = make_canaries(m, size=size, seed=seed + 1, base=np.stack([r.image for r in recs]))
    return TensorDataset(torch.from_numpy(imgs.astype(np.float32))[:, None] / 127.5 - 1.0,
                         torch.tensor([r.plane for r in recs], dtype=torch.int64),
                         torch.tensor([float("nan") if r.ga_weeks is None else r.ga_weeks for r in recs],
                                      dtype=torch.float32), torch.full((m,), float("nan")))
