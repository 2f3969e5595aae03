"""The downstream protocol: does the synthetic release help a site's plane classifier and GA regressor?

Arms (each trains fresh small models with fixed settings; nothing is chosen on the test data):

1. ``local-real``: each site alone on its real train split (no DP: the model stays at the site);
2. ``federated``: the run's checkpoint classifier/regressor, trained by the federation with DP at every site
   (the last round before any synthetic image flowed back; and the final round when synthetic was used);
3. ``local-real+synthetic``: each site's real train split plus the whole shared release;
4. ``synthetic-only``: the release alone (one model for all sites), tested on real images;
5. ``dp-real`` / ``dp-real+prior``: each site's real data with DP-SGD at the generator's (epsilon, delta),
   split evenly between the two models (basic composition), from a random init or from the public phantom prior.

Test data: every site's held-out test split (the federation's sites never train on it and no selection step
reads it). A site's model predicts its own test images; ``pooled`` is computed over all sites' test images.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from common.active_learning.release import load_release_records
from common.core.config import RunConfig
from common.core.errors import ConfigError, DataError
from common.core.records import PLANES, UltrasoundRecord
from common.core.seeding import derive_seed
from common.data.sites import SiteData, load_federated_data, public_phantoms
from common.data.tensors import has_ga, records_to_dataset
from common.models.bundle import shipped_prior_folder
from common.models.downstream import (
    ENCODER_BACKBONES,
    DownstreamSpec,
    GARegressor,
    PlaneClassifier,
    classifier_loss,
    ga_metrics,
    plane_metrics,
    predict_ga,
    predict_planes,
    regressor_loss,
)
from common.privacy.dpsgd import PrivateTrainResult, train_private
from common.privacy.ledger import PrivacyLedger

DP_SPLIT = {"classifier": 0.5, "regressor": 0.5}


@dataclass(frozen=True)
class EvalSettings:
    """Fixed training settings of every arm (small CNNs, a few hundred steps: minutes on 2 CPUs)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    regressor_lr: float | None = None  # None: lr
    optimizer: str = "adam"  # a frozen backbone's heads use the run's train.downstream-optimizer/-lr (arm_settings)
    prior_steps: int = 300  # public-phantom pretraining when no prior folder fits the run
    coverage_level: float = 0.9
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "functorch"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.prior_steps < 1:
            raise ConfigError(f"EvalSettings needs steps, batch_size, prior_steps >= 1 and lr > 0; got {self}")


@dataclass(frozen=True)
class RunInputs:
    """What the protocol reads from a run folder."""

    run_dir: Path
    cfg: RunConfig
    sites: list[SiteData]
    synthetic: list[UltrasoundRecord]
    metrics: list[dict[str, Any]]
    checkpoints: list[tuple[int, Path]]


def load_run(run_dir: Path) -> RunInputs:
    """Config, sites (rebuilt from the config and seed), release, metrics and checkpoints of a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: give a run folder written by `simulate`/`demo`")
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    fed = load_federated_data(cfg.data, seed=cfg.seed)
    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()] if metrics_file.is_file() else []
    ckpts = sorted((int(p.name.split("-")[1]), p) for p in (run_dir / "checkpoints").glob("round-[0-9][0-9][0-9]*")
                   if p.is_dir()) if (run_dir / "checkpoints").is_dir() else []
    return RunInputs(run_dir, cfg, list(fed.sites), load_release_records(run_dir / "release"), metrics, ckpts)


# -- models ---------------------------------------------------------------------------------------------
@dataclass
class DownstreamModels:
    """A classifier and (when GA labels exist) a regressor, with how they were trained."""

    classifier: PlaneClassifier
    regressor: GARegressor | None
    notes: list[str] = field(default_factory=list)
    spacing_known: bool = True  # False: trained without pixel spacing, so test spacing is hidden too
    epsilon: float | None = None  # DP spend of the pair (sum of both models), None without DP


def arm_settings(settings: EvalSettings, cfg: RunConfig) -> EvalSettings:
    """The protocol's fixed settings for ``cfg``'s models: heads on a frozen backbone train with the run's own
    ``train.downstream-optimizer`` and ``train.downstream-lr`` (what the federation uses), CNNs with ``settings``."""
    if DownstreamSpec.from_config(cfg).frozen:
        (lr, optimizer), (regressor_lr, _) = cfg.train.rate("classifier"), cfg.train.rate("regressor")
        return replace(settings, optimizer=optimizer, lr=lr, regressor_lr=regressor_lr)
    return settings


def train_downstream(records: Sequence[UltrasoundRecord], *, spec: DownstreamSpec, settings: EvalSettings,
                     seed: int, dp: tuple[float, float] | None = None,
                     init: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> DownstreamModels:
    """Train a plane classifier and a GA regressor on ``records``.

    Parameters
    ----------
    spec:
        How the models are built (:meth:`DownstreamSpec.from_config`; its ``planes`` is the label scope).
    dp:
        ``(epsilon, delta)`` for the pair, split evenly (DP-SGD, RDP accountant); ``None``: no DP.
    init:
        State dicts ``{"classifier": ..., "regressor": ...}`` to start from (the public prior); else random.
    """
    data = records_to_dataset(records, image_size=spec.image_size)
    torch.manual_seed(seed)
    classifier, regressor = spec.classifier(), spec.regressor()
    if init is not None:
        classifier.load_state_dict(dict(init["classifier"]))
        regressor.load_state_dict(dict(init["regressor"]))
    ledger = None if dp is None else PrivacyLedger(target_epsilon=dp[0], target_delta=dp[1], budget_split=DP_SPLIT)
    out = DownstreamModels(classifier, regressor if has_ga(data) else None,
                           spacing_known=bool(torch.isfinite(data.tensors[3]).any()))
    for key, model in (("classifier", classifier), ("regressor", out.regressor)):
        if model is None:
            out.notes.append("no GA label in the training data: no regressor")
            continue
        res = train_model(model, key, data, settings, seed=derive_seed(seed, key), ledger=ledger)
        if res.stopped_by_budget:
            out.notes.append(f"{key}: {res.message}")
    if ledger is not None:
        out.epsilon = ledger.total_epsilon()
    return out


def train_model(model: PlaneClassifier | GARegressor, key: str, data: TensorDataset, settings: EvalSettings, *,
                seed: int, ledger: PrivacyLedger | None = None) -> PrivateTrainResult:
    """Train one downstream model in place with the fixed ``settings``: DP-SGD when a ``ledger`` is given.

    ``key`` (``"classifier"`` or ``"regressor"``) picks the loss and the ledger's budget; ``seed`` seeds the
    public randomness (batch order).
    """
    loss = {"classifier": classifier_loss, "regressor": regressor_loss}[key]
    lr = settings.regressor_lr if key == "regressor" and settings.regressor_lr is not None else settings.lr
    return train_private(model, loss, data, steps=settings.steps, batch_size=min(settings.batch_size, len(data)),
                         lr=lr, ledger=ledger, model_key=key, planned_total_steps=settings.steps,
                         max_grad_norm=settings.max_grad_norm, grad_sample_mode=settings.grad_sample_mode,
                         seed=seed, device=settings.device, optimizer=settings.optimizer)  # type: ignore[arg-type]


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def checkpoint_models(folder: Path, spec: DownstreamSpec, *, single_view_ok: bool = True) -> DownstreamModels:
    """The classifier and regressor saved in a checkpoint (or prior) folder, built as ``spec`` says (its label
    scope included); a frozen backbone's saved normalisation is the one loaded. A regressor on a shipped encoder
    saved before the flip-averaged features (no ``flip_views_format`` mark) is rebuilt on single-view features, as
    it was trained, or refused (``ValueError``) with ``single_view_ok=False``."""
    clf = spec.classifier()
    clf.load_state_dict(_load_state(Path(folder) / "classifier.safetensors"))
    state = _load_state(Path(folder) / "regressor.safetensors")
    single_view = spec.backbone in ENCODER_BACKBONES and "flip_views_format" not in state
    if single_view and not single_view_ok:
        raise ValueError(f"{folder}: its GA regressor was trained on single-view features (before flip averaging)")
    reg = spec.regressor(flips=not single_view)
    if "log_hc_format" in reg.state_dict() and "log_hc_format" not in state:
        raise ValueError(f"{folder}: its GA regressor was saved before the log-HC output (same shapes, another "
                         "meaning); score a checkpoint written by this version, or retrain")
    reg.load_state_dict(state)
    return DownstreamModels(clf, reg)


def phantom_prior(cfg: RunConfig, settings: EvalSettings) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """Downstream prior weights and where they came from: the run's prior, a shipped prior, or public phantoms.

    A prior folder is used only when its models have the run's image size and width; otherwise the models are
    trained here, without DP, on ``cfg.data.public_images`` public phantoms (no private data: no privacy cost).
    """
    spec, size = DownstreamSpec.from_config(cfg), cfg.data.image_size
    # the shipped priors of the preset and of the demo, each the one pretrained at the run's size where there is one
    shipped = dict.fromkeys(shipped_prior_folder(p, size) for p in (cfg.preset, "demo"))
    candidates = ([Path(cfg.prior).expanduser()] if cfg.prior and cfg.prior != "shipped" else []) + list(shipped)
    for folder in candidates:
        if (folder / "classifier.safetensors").is_file():
            side = json.loads((folder / "sidecar.json").read_text()) if (folder / "sidecar.json").is_file() else {}
            if side.get("data", {}).get("image_size", size) != size:
                continue  # conv weights would load, but they were trained at another scale
            try:
                # the arms build the current regressor: a prior in an older format is skipped like a misfit
                models = checkpoint_models(folder, spec, single_view_ok=False)
            except (RuntimeError, ValueError):  # another image size, width, backbone or format
                continue
            return ({"classifier": models.classifier.state_dict(), "regressor": models.regressor.state_dict()},
                    f"prior folder {folder}")
    public = public_phantoms(cfg.data, seed=cfg.seed)
    models = train_downstream(public, spec=spec, settings=replace_steps(settings, settings.prior_steps),
                              seed=derive_seed(settings.seed, "prior"))
    if models.regressor is None:
        raise DataError("public phantoms carry no GA label; the phantom generator should always set ga_weeks")
    return ({"classifier": models.classifier.state_dict(), "regressor": models.regressor.state_dict()},
            f"trained here on {len(public)} public phantoms, {settings.prior_steps} steps, no DP")


def replace_steps(settings: EvalSettings, steps: int) -> EvalSettings:
    """``settings`` with another step count."""
    return EvalSettings(**{**asdict(settings), "steps": steps})


# -- metrics from predictions ------------------------------------------------------------------------------
def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_classes: int = len(PLANES), *,
                           planes: Sequence[int] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, recall per in-scope plane (``planes``, default all): :func:`plane_metrics`."""
    return plane_metrics(pred, labels, planes, num_classes)


def regression_metrics(mean: np.ndarray, std: np.ndarray, ga: np.ndarray, *, coverage_level: float) -> dict[str, Any]:
    """MAE (days), coverage and mean width (days) of the central Gaussian interval over examples with known GA."""
    return ga_metrics(mean, std, ga, coverage_level=coverage_level)


def evaluate_models(models: Mapping[str, DownstreamModels], sites: Sequence[SiteData], *, image_size: int,
                    coverage_level: float = 0.9, device: str = "cpu") -> dict[str, Any]:
    """Metrics of ``models[site]`` on each site's test split, and pooled over all sites' test images.

    Returns
    -------
    ``{"per_site": {name: metrics}, "pooled": metrics}``; metrics hold accuracy, macro_f1, per_plane_recall (per
    plane of the classifier's scope; pooled: of the union of the sites' scopes), per_class_recall, n, mae_days,
    coverage, interval_width_days, n_ga (NaN where no regressor or no GA label).
    """
    parts: dict[str, tuple[np.ndarray, ...]] = {}
    scopes: dict[str, tuple[int, ...]] = {}
    for site in sites:
        if not site.test:
            continue
        m, test = models[site.name], records_to_dataset(site.test, image_size=image_size)
        images, labels, ga, spacing = test.tensors
        pred = predict_planes(m.classifier, images, device=device).argmax(1).numpy()
        mean = np.full(len(labels), np.nan)
        std = np.full(len(labels), np.nan)
        if m.regressor is not None:
            sp = spacing if m.spacing_known else torch.full_like(spacing, float("nan"))
            mu, sd = predict_ga(m.regressor, images, sp, device=device)
            mean, std = mu.numpy(), sd.numpy()
        parts[site.name] = (pred, labels.numpy(), mean, std, ga.numpy())
        scopes[site.name] = m.classifier.planes

    def _metrics(pred: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray, ga: np.ndarray,
                 planes: Sequence[int]) -> dict:
        reg = regression_metrics(mean, std, np.where(np.isfinite(mean), ga, np.nan), coverage_level=coverage_level)
        return {**classification_metrics(pred, labels, planes=planes), **reg}

    if not parts:
        raise DataError("no site has a test split: the protocol needs held-out real images")
    pooled = [np.concatenate([p[i] for p in parts.values()]) for i in range(5)]
    union = sorted({k for planes in scopes.values() for k in planes})
    return {"per_site": {k: _metrics(*v, scopes[k]) for k, v in parts.items()}, "pooled": _metrics(*pooled, union)}


# -- the protocol ------------------------------------------------------------------------------------------
def _federated_rounds(inputs: RunInputs) -> tuple[int | None, int | None]:
    """(last checkpoint round trained without synthetic images, final checkpoint round)."""
    if not inputs.checkpoints:
        return None, None
    synthetic_by_round = {int(r["round"]): sum(float(s.get("metrics", {}).get("synthetic-examples", 0) or 0)
                                               for s in r.get("sites", [])) for r in inputs.metrics}
    clean = None
    for rnd, _ in inputs.checkpoints:
        if synthetic_by_round.get(rnd, 0.0) > 0:
            break
        clean = rnd
    return clean, inputs.checkpoints[-1][0]


def generator_budget(inputs: RunInputs, site: str) -> tuple[float, float] | None:
    """The site's generator (epsilon budget, delta) from the run's ledger; the config's share if absent."""
    for record in reversed(inputs.metrics):
        gen = record.get("ledger", {}).get(site, {}).get("generator")
        if gen and gen.get("budget_epsilon") is not None:
            return float(gen["budget_epsilon"]), float(gen["delta"])
    p = inputs.cfg.privacy
    if p.target_epsilon is None:
        return None
    f = p.budget_split()["generator"]
    return p.target_epsilon * f, p.target_delta * f


def run_protocol(inputs: RunInputs, settings: EvalSettings, *,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train and evaluate every arm (see the module docstring).

    Returns
    -------
    ``{"arms": [{"arm", "description", "per_site", "pooled", "notes", ...}], "per_round": [...], "settings" (as
    requested), "effective_settings" (:func:`arm_settings`), "downstream" (the :class:`DownstreamSpec` every arm
    builds), "prior_source", "n_synthetic", "n_train", "n_test"}``.
    """
    cfg, sites, syn = inputs.cfg, inputs.sites, inputs.synthetic
    size, spec = cfg.data.image_size, DownstreamSpec.from_config(cfg)
    requested, settings = settings, arm_settings(settings, cfg)
    arms: list[dict[str, Any]] = []

    def add(arm: str, description: str, models: Mapping[str, DownstreamModels], **extra: Any) -> None:
        res = evaluate_models(models, sites, image_size=size, coverage_level=settings.coverage_level,
                              device=settings.device)
        notes = sorted({n for m in models.values() for n in m.notes})
        arms.append({"arm": arm, "description": description, **res, "notes": notes, **extra})
        log(f"{arm}: accuracy {res['pooled']['accuracy']:.3f}, MAE {res['pooled']['mae_days']:.1f} d")

    def per_site(tag: str, extra: Sequence[UltrasoundRecord] = (), **kw: Any) -> dict[str, DownstreamModels]:
        return {s.name: train_downstream(list(s.train) + list(extra), spec=spec, settings=settings,
                                         seed=derive_seed(settings.seed, tag, s.name), **kw)
                for s in sites}

    add("local-real", "each site alone on its real train split (no DP, model stays local)", per_site("local"))
    clean, final = _federated_rounds(inputs)
    folders = dict(inputs.checkpoints)
    for rnd, label in ((clean, "no synthetic yet"), (final, "with synthetic") if final != clean else (None, "")):
        if rnd is None:
            continue
        m = checkpoint_models(folders[rnd], spec)
        how = "DP-SGD at every site" if cfg.privacy.target_epsilon is not None else "no DP"
        add(f"federated-r{rnd}", f"the federation's checkpoint of round {rnd} ({how}; {label})",
            {s.name: m for s in sites}, checkpoint_round=rnd)
    if syn:
        add("local-real+synthetic", f"each site's real train split + the {len(syn)} released synthetic images",
            per_site("local+syn", syn))
        if len(syn) >= 2:
            m = train_downstream(syn, spec=spec, settings=settings,
                                 seed=derive_seed(settings.seed, "syn-only"))
            add("synthetic-only", f"the {len(syn)} released images alone, tested on real images", {s.name: m for s in sites})
    prior, prior_source = phantom_prior(cfg, settings)
    budgets = {s.name: generator_budget(inputs, s.name) for s in sites}
    for tag, init in (("dp-real", None), ("dp-real+prior", prior)):
        models: dict[str, DownstreamModels] = {}
        skipped: list[str] = []
        for s in sites:
            try:
                models[s.name] = train_downstream(s.train, spec=spec, settings=settings,
                                                  seed=derive_seed(settings.seed, tag, s.name), dp=budgets[s.name],
                                                  init=init)
            except ConfigError as err:  # the budget admits no noise multiplier for these steps
                skipped.append(f"{s.name}: {err}")
        if skipped:
            arms.append({"arm": tag, "skipped": skipped, "description": "DP-SGD on real data: no feasible noise"})
            continue
        eps = {k: (None if v is None else round(v[0], 4)) for k, v in budgets.items()}
        dp_text = ("DP-SGD at its generator's (epsilon, delta), split over both models"
                   if any(v is not None for v in budgets.values()) else "no DP (the run has no privacy budget)")
        add(tag, f"each site's real data with {dp_text}"
            + (f"; initialised from the phantom prior ({prior_source})" if init is not None else "; random init"),
            models, epsilon_per_site=eps, epsilon_spent={k: m.epsilon for k, m in models.items()})
    return {"arms": arms, "per_round": per_round_utility(inputs, settings), "settings": asdict(requested),
            "effective_settings": asdict(settings), "downstream": asdict(spec), "prior_source": prior_source, "n_synthetic": len(syn),
            "n_train": {s.name: len(s.train) for s in sites}, "n_test": {s.name: len(s.test) for s in sites},
            "test_data": "each site's held-out test split; no arm trains on it and no step selects with it"}


def per_round_utility(inputs: RunInputs, settings: EvalSettings) -> list[dict[str, Any]]:
    """Pooled test metrics of every checkpoint's downstream models, with the release size after that round."""
    size, spec = inputs.cfg.data.image_size, DownstreamSpec.from_config(inputs.cfg)
    release = {int(r["round"]): (r.get("active_learning") or {}).get("release_size") for r in inputs.metrics}
    synthetic = {int(r["round"]): int(sum(float(s.get("metrics", {}).get("synthetic-examples", 0) or 0)
                                          for s in r.get("sites", []))) for r in inputs.metrics}
    out = []
    for rnd, folder in inputs.checkpoints:
        m = checkpoint_models(folder, spec)
        res = evaluate_models({s.name: m for s in inputs.sites}, inputs.sites, image_size=size,
                              coverage_level=settings.coverage_level, device=settings.device)["pooled"]
        out.append({"round": rnd, "release_size": release.get(rnd), "synthetic_examples_used": synthetic.get(rnd),
                    **{k: res[k] for k in ("accuracy", "macro_f1", "mae_days", "coverage")}})
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(result: Mapping[str, Any]) -> str:
    """The protocol result as a markdown table (pooled columns, then per-site accuracy)."""
    site_names = list(result.get("n_test", {}))
    head = ["arm", "accuracy", "macro-F1", "GA MAE (d)", "coverage"] + [f"acc {n}" for n in site_names]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in result["arms"]:
        if "pooled" not in arm:
            rows.append(f"| {arm['arm']} | skipped: {'; '.join(arm.get('skipped', []))[:120]} |")
            continue
        p = arm["pooled"]
        cells = [arm["arm"], _fmt(p["accuracy"]), _fmt(p["macro_f1"]), _fmt(p["mae_days"], 1), _fmt(p["coverage"], 2)]
        cells += [_fmt(arm["per_site"].get(n, {}).get("accuracy")) for n in site_names]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
