"""``python -m simulations.audit``: what a released synthetic dataset reveals about the scans it came from.

``--release DIR [--checkpoint DIR] [--private SPEC] [--heldout SPEC] --out DIR`` writes ``audit.json`` and a
self-contained ``audit.html``: (1) the DP certificate recomputed from the checkpoint's ledgers, (2) the
memorisation scan (Carlini et al. 2023), (3) distance to closest record, (4) membership inference on the
generator and on the release alone, (5) optionally a one-run canary audit of the site's DP training. A SPEC is
``site:N`` (site N's training split; ``site:N:test`` its test split; ``site:all``) rebuilt from the run's
config, or a folder of PNGs (with an optional ``metadata.jsonl`` giving ``plane``/``ga_weeks``). ``--reference``
(the public prior) adds a difficulty-calibrated generator attack. The release is only read (never repaired or
rewritten); a torn metadata line is counted and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from common.analysis.audit import (
    EXACT_COPY_DISTANCE,
    HIGH_CORRELATION,
    NEAR_COPY_RATIO,
    closer_to_members_share,
    distance_to_closest,
    dp_certificate,
    memorization_scan,
)
from common.core.config import RunConfig

DEFAULT_T_FRACTIONS = (0.05, 0.1, 0.2, 0.4)  # fixed before looking at data (SecMI found small t most telling)


@dataclass(frozen=True)
class ImageSet:
    """Images with their (possibly unknown) conditions."""

    images: np.ndarray  # uint8 [N, H, W]
    plane: np.ndarray  # int64 [N], -1 unknown
    ga: np.ndarray  # float32 [N], NaN unknown
    ids: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The rows ``idx``."""
        return ImageSet(self.images[idx], self.plane[idx], self.ga[idx], [self.ids[i] for i in idx], self.source,
                        self.notes)

    def resized(self, size: int) -> ImageSet:
        """Square ``size`` images (bilinear), unchanged when already that size."""
        if self.images.shape[1:] == (size, size):
            return self
        imgs = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in self.images])
        return ImageSet(imgs, self.plane, self.ga, self.ids, self.source, self.notes + [f"resized to {size}px"])

    def tensors(self) -> tuple[Any, ...]:
        """``(images [N,1,H,W] in [-1,1], plane, ga, spacing)``, the layout of ``records_to_dataset``."""
        import torch

        x = torch.from_numpy(self.images.astype(np.float32))[:, None] / 127.5 - 1.0
        n = len(self.ids)
        return x, torch.from_numpy(self.plane), torch.from_numpy(self.ga), torch.full((n,), float("nan"))


def _image_set(images: Sequence[np.ndarray], plane: Sequence[int], ga: Sequence[float | None], ids: list[str],
               source: str, notes: list[str] | None = None) -> ImageSet:
    """Stack images of one size into an :class:`ImageSet` (clear errors for none or mixed sizes)."""
    if not images:
        raise ValueError(f"{source}: no images found")
    if len({np.shape(im) for im in images}) > 1:
        raise ValueError(f"{source}: images have different sizes {sorted({np.shape(im) for im in images})}; "
                         "resize them to one square size first")
    return ImageSet(np.stack(images).astype(np.uint8), np.asarray(plane, np.int64),
                    np.asarray([np.nan if g is None else g for g in ga], np.float32), ids, source, notes or [])


def read_release(folder: Path) -> tuple[ImageSet, list[dict[str, Any]], dict[str, Any]]:
    """Release images, metadata records and sidecar, read-only; torn lines and missing PNGs are counted."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} is missing: --release must be a release folder (metadata.jsonl + images/)")
    records, notes, torn, missing = [], [], 0, 0
    for line in meta.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if (folder / rec.get("file_name", "")).is_file():
            records.append(rec)
        else:
            missing += 1
    if torn or missing:
        notes.append(f"skipped {torn} unreadable metadata lines and {missing} records without their PNG")
    images = [np.asarray(Image.open(folder / r["file_name"]).convert("L")) for r in records]
    sidecar_path = folder / "release.json"
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    return (_image_set(images, [int(r.get("plane", -1)) for r in records], [r.get("ga_weeks") for r in records],
                       [str(r.get("id", r["file_name"])) for r in records], str(folder), notes), records, sidecar)


def read_image_dir(folder: Path) -> ImageSet:
    """PNGs of ``folder`` (recursive), with planes/GA from its ``metadata.jsonl`` when it has one."""
    folder = Path(folder)
    meta = {}
    if (folder / "metadata.jsonl").is_file():
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                meta[str(Path(rec["file_name"]))] = rec
    paths = sorted(folder.rglob("*.png"))
    rel = [str(p.relative_to(folder)) for p in paths]
    plane = [int(meta.get(r, {}).get("plane", -1)) for r in rel]
    return _image_set([np.asarray(Image.open(p).convert("L")) for p in paths], plane,
                      [meta.get(r, {}).get("ga_weeks") for r in rel], rel, str(folder))


def load_spec(spec: str, cfg: RunConfig | None, *, split: str = "train") -> ImageSet:
    """Images of a SPEC: ``site:N[:train|test]``, ``site:all[:split]`` (needs the run config) or a folder."""
    if not spec.startswith("site:"):
        if not Path(spec).is_dir():
            raise FileNotFoundError(f"{spec} is neither a folder of PNGs nor a 'site:N[:train|test]' spec")
        return read_image_dir(Path(spec))
    if cfg is None:
        raise ValueError(f"{spec!r} needs the run config: pass --checkpoint (its sidecar has it) or --config")
    parts = spec.split(":")
    split = parts[2] if len(parts) > 2 else split
    if split not in ("train", "test") or len(parts) > 3:
        raise ValueError(f"{spec!r}: use site:N, site:N:train, site:N:test or site:all[:train|test]")
    from common.data.sites import load_federated_data, load_site

    sites = (load_federated_data(cfg.data, seed=cfg.seed).sites if parts[1] == "all"
             else [load_site(cfg.data, seed=cfg.seed, site_index=int(parts[1]))])
    recs = [r for s in sites for r in (s.train if split == "train" else s.test)]
    return _image_set([r.image for r in recs], [r.plane for r in recs], [r.ga_weeks for r in recs],
                      [f"{r.site}/{r.image_id}" for r in recs], spec)


def find_round(path: Path) -> Path:
    """The checkpoint folder to audit: ``path`` itself, or the newest ``round-NNN`` under it or its checkpoints/."""
    path = Path(path)
    if (path / "generator").is_dir():
        return path
    for base in (path, path / "checkpoints"):
        rounds = sorted(base.glob("round-[0-9][0-9][0-9]*"))
        if rounds:
            return rounds[-1]
    raise FileNotFoundError(f"{path} holds no checkpoint (a folder with generator/, or round-NNN/ folders)")


def round_records(ckpt: Path) -> list[dict[str, Any]]:
    """``round.json`` of every round next to ``ckpt`` (the ledger history); empty for a prior folder."""
    files = sorted(ckpt.parent.glob("round-*/round.json")) if (ckpt / "round.json").is_file() else []
    return [json.loads(f.read_text()) for f in files]


def resolve_config(ckpt: Path | None, release_sidecar: dict[str, Any], config: Path | None) -> RunConfig | None:
    """Run config from ``--config`` (a run's config.json), the checkpoint sidecar or the release sidecar."""
    for source in (config, ckpt / "sidecar.json" if ckpt else None):
        if source is not None and Path(source).is_file():
            d = json.loads(Path(source).read_text())
            return RunConfig.from_dict(d["config"] if "config" in d else d)
    return RunConfig.from_dict(release_sidecar["config"]) if "config" in release_sidecar else None


@dataclass(frozen=True)
class AuditOptions:
    """Knobs of one audit (defaults are the documented, pre-registered choices)."""

    t_fractions: tuple[float, ...] = DEFAULT_T_FRACTIONS
    n_noise: int = 2
    max_images: int = 512
    n_boot: int = 1000
    grid: int = 4
    n_neighbors: int = 50
    gallery: int = 8
    canaries: int = 0
    canary_steps: int = 0
    canary_site: str | None = None
    reference: Path | None = None  # a prior/checkpoint folder: reference model of the calibrated attack
    seed: int = 0
    device: str = "cpu"


def run_audit(release: Path, out: Path, *, checkpoint: Path | None = None, private: str | None = None,
              heldout: str | None = None, config: Path | None = None,
              options: AuditOptions = AuditOptions()) -> dict[str, Any]:
    """Run every audit part the inputs allow; write ``audit.json`` and ``audit.html`` in ``out``.

    Parameters
    ----------
    release: the release folder.
    out: output folder (created).
    checkpoint: a checkpoint (``round-NNN``), a run's checkpoints/ folder or a run folder: enables the DP
        certificate, the generator attack, feature similarity and the canary audit.
    private, heldout: SPECs of members (training images) and non-members; ``heldout`` defaults to the test split
        of a ``site:N`` private spec.
    config: a run's ``config.json`` when the checkpoint sidecar has none.
    options: :class:`AuditOptions`.

    Returns
    -------
    The report written to ``audit.json``.
    """
    t0 = time.perf_counter()
    rel, records, sidecar = read_release(release)
    ckpt = find_round(checkpoint) if checkpoint else None
    cfg = resolve_config(ckpt, sidecar, config)
    report: dict[str, Any] = {"inputs": {"release": str(release), "checkpoint": str(ckpt) if ckpt else None,
                                         "private": private, "heldout": heldout, "options": options.__dict__,
                                         "release_images": len(rel.ids), "release_notes": rel.notes},
                              "release_sidecar": sidecar}
    report["certificate"] = dp_certificate(round_records(ckpt) if ckpt else [], release_records=records)
    if not ckpt:
        report["certificate"]["not_covered"].insert(0, "no checkpoint given: the per-image claims are not verified")
    models = load_models(ckpt, cfg) if ckpt else None
    if models is not None:
        report["inputs"]["model_notes"] = models.notes
    size = rel.images.shape[1]
    figures: dict[str, bytes] = {}
    members = load_spec(private, cfg).resized(size) if private else None
    if heldout is None and private and private.startswith("site:") and private.count(":") == 1:
        heldout = private + ":test"
    nonmembers = load_spec(heldout, cfg).resized(size) if heldout else None
    report["inputs"].update(heldout=heldout, members=len(members.ids) if members else 0,
                            nonmembers=len(nonmembers.ids) if nonmembers else 0)
    if members is not None:
        report["memorization"] = memorization_part(rel, members, models, options, figures)
    if members is not None and nonmembers is not None:
        rng = np.random.default_rng(options.seed)
        mem = members.subset(np.sort(rng.permutation(len(members.ids))[: options.max_images]))
        non = nonmembers.subset(np.sort(rng.permutation(len(nonmembers.ids))[: options.max_images]))
        report["dcr"], dm, dn = dcr_part(rel, mem, non, options, figures)
        report["mia"] = mia_part(mem, non, dm, dn, models, options, figures)
    if options.canaries and models is not None and members is not None:
        report["canary"] = canary_part(members, models, cfg, report["certificate"], options, figures)
    report["headline"] = headline(report)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(json_safe(report), indent=2))
    write_report(report, figures, out / "audit.html")
    return report


def audit_summary(run_dir: Path) -> Path:
    """The short audit a finished run ends with: ``RUN/audit/audit.json`` (and ``audit.html`` when it released).

    The DP certificate recomputed from the checkpoints' ledgers and, with a release, the per-image claims checked
    against it (no member images: the full audit with ``--private`` is ``difusal audit``). Returns the JSON path.
    """
    from common.core.run_layout import RunLayout

    layout = RunLayout(Path(run_dir))
    out = layout.root / "audit"
    if (layout.release / "metadata.jsonl").is_file():
        run_audit(layout.release, out, checkpoint=layout.root)
        return out / "audit.json"
    ckpt = find_round(layout.root)
    report: dict[str, Any] = {"inputs": {"release": None, "checkpoint": str(ckpt)},
                              "certificate": dp_certificate(round_records(ckpt), release_records=[])}
    report["headline"] = headline(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(json_safe(report), indent=2))
    return out / "audit.json"


# -- the audit parts ------------------------------------------------------------------------------------------
@dataclass
class Models:
    """What the checkpoint gives the audit."""

    generator: Any
    classifier: Any | None
    notes: list[str]


def load_models(ckpt: Path, cfg: RunConfig | None) -> Models:
    """The checkpoint's generator and (when the config gives its size) its plane classifier."""
    from safetensors.torch import load_file

    from common.models.downstream import DownstreamSpec
    from common.models.generator import load_generator

    gen, _ = load_generator(ckpt / "generator")
    clf, notes = None, []
    if cfg is not None and (ckpt / "classifier.safetensors").is_file():
        clf = DownstreamSpec.from_config(cfg).classifier()
        try:
            clf.load_state_dict({k: v.float() for k, v in load_file(str(ckpt / "classifier.safetensors")).items()})
        except RuntimeError as exc:
            clf, notes = None, [f"classifier not loaded ({exc}); feature similarity skipped"]
    return Models(gen, clf, notes)


def memorization_part(rel: ImageSet, members: ImageSet, models: Models | None, o: AuditOptions,
                      figures: dict[str, bytes]) -> dict[str, Any]:
    """Nearest private image of every released image; near-copy counts; gallery of the closest pairs."""
    feats = None
    if models is not None and models.classifier is not None:
        from common.analysis.audit_mia import classifier_features

        size = models.classifier.backbone.image_size
        feats = tuple(classifier_features(models.classifier, s.resized(size).tensors()[0], device=o.device)
                      for s in (rel, members))
    scan = memorization_scan(rel.images, members.images, grid=o.grid, n_neighbors=o.n_neighbors, features=feats)
    order = np.lexsort((scan["distance"], np.nan_to_num(scan["ratio"], nan=np.inf)))  # closest pairs first
    pairs = [(rel.images[i], members.images[scan["nearest"][i]],
              f"released {rel.ids[i][-14:]}\nd={scan['distance'][i]:.3f} ratio={scan['ratio'][i]:.2f}")
             for i in order[:o.gallery]]
    figures["gallery"] = _gallery(pairs)
    rows = [{"id": rel.ids[i], "nearest_private": members.ids[scan["nearest"][i]], "tiled_l2": scan["distance"][i],
             "ratio": scan["ratio"][i], "near_copy": scan["near_copy"][i], "exact_copy": scan["exact_copy"][i],
             "correlation": scan["correlation"][i], "max_correlation": scan["max_correlation"][i],
             "feature_cosine": scan["feature_cosine"][i]} for i in order]
    return {"criterion": {"distance": f"tiled l2: max over a {o.grid}x{o.grid} tiling of per-tile RMS on [0,1] "
                                      "(Carlini et al. 2023)",
                          "ratio": "d_1 / mean(d_2..d_{n+1}) over the n nearest other private images (Carlini "
                                   f"et al. 2023, alpha=0.5: their l = ratio / 0.5), n={o.n_neighbors}",
                          "near_copy": f"ratio < {NEAR_COPY_RATIO:.4f}",
                          "exact_copy": f"tiled l2 < {EXACT_COPY_DISTANCE:.5f}",
                          "high_correlation": f"pixel Pearson correlation > {HIGH_CORRELATION}",
                          "feature_space": "cosine in the checkpoint's PlaneClassifier features" if feats else None},
            "n_released": len(rel.ids), "n_private": len(members.ids), "near_copies": int(scan["near_copy"].sum()),
            "exact_copies": int(scan["exact_copy"].sum()),
            "high_correlation": int((scan["max_correlation"] > HIGH_CORRELATION).sum()),
            "ratio_quantiles": _quantiles(scan["ratio"]), "distance_quantiles": _quantiles(scan["distance"]),
            "images": rows}


def dcr_part(rel: ImageSet, mem: ImageSet, non: ImageSet, o: AuditOptions,
             figures: dict[str, bytes]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Distance from each member / non-member to its closest released image, and the holdout share test."""
    dm, dn = (distance_to_closest(s.images, rel.images, grid=o.grid) for s in (mem, non))
    figures["dcr"] = _hist(dm, dn)
    q05 = float(np.quantile(dn, 0.05))
    return ({"members": _quantiles(dm), "nonmembers": _quantiles(dn),
             "members_below_nonmember_q05": float((dm < q05).mean()),
             "closer_to_members": closer_to_members_share(rel.images, mem.images, non.images, grid=o.grid)}, dm, dn)


def mia_part(mem: ImageSet, non: ImageSet, dm: np.ndarray, dn: np.ndarray, models: Models | None,
             o: AuditOptions, figures: dict[str, bytes]) -> dict[str, Any]:
    """Release-only attack (score = -DCR) and the generator's denoising-error attack, with bootstrap CIs."""
    from common.analysis.audit_mia import denoising_errors, mia_summary, roc_auc

    out: dict[str, Any] = {"release": mia_summary(-dm, -dn, n_boot=o.n_boot, seed=o.seed)}
    curves = {"release only (-DCR)": out["release"]["roc"]}
    if models is not None:
        gen = models.generator
        big_t = gen.generator_config.num_train_timesteps
        ts = sorted({min(big_t - 1, max(0, int(round(f * big_t)))) for f in o.t_fractions})
        err = [denoising_errors(gen, *s.resized(gen.image_size).tensors()[:3], timesteps=ts, seed=o.seed + 1,
                                n_noise=o.n_noise, device=o.device) for s in (mem, non)]
        out["generator"] = mia_summary(-err[0].mean(1), -err[1].mean(1), n_boot=o.n_boot, seed=o.seed)
        out["generator"].update(timesteps=ts, n_noise=o.n_noise, score="-(mean denoising error over timesteps)",
                                auc_per_timestep={int(t): roc_auc(-err[0][:, j], -err[1][:, j]) for j, t in
                                                  enumerate(ts)})
        curves["generator (-denoising error)"] = out["generator"]["roc"]
        if o.reference is not None:  # difficulty calibration against a model that never saw the private data
            from common.models.generator import load_generator

            ref, _ = load_generator(find_round(o.reference) / "generator")
            base = [denoising_errors(ref, *s.resized(ref.image_size).tensors()[:3], timesteps=ts, seed=o.seed + 1,
                                     n_noise=o.n_noise, device=o.device) for s in (mem, non)]
            out["generator_calibrated"] = mia_summary(base[0].mean(1) - err[0].mean(1),
                                                      base[1].mean(1) - err[1].mean(1), n_boot=o.n_boot, seed=o.seed)
            out["generator_calibrated"]["score"] = "reference error - model error (Watson et al. 2022)"
            curves["generator, calibrated"] = out["generator_calibrated"]["roc"]
    figures["roc"] = _roc(curves)
    return out


def canary_part(members: ImageSet, models: Models, cfg: RunConfig | None, cert: dict[str, Any], o: AuditOptions,
                figures: dict[str, bytes]) -> dict[str, Any]:
    """One-run canary audit of the site's training step, re-run from the checkpoint with its DP settings."""
    from torch.utils.data import TensorDataset

    from common.analysis.audit_mia import checkpoint_canary_audit

    sites = list(cert["sites"])
    site = o.canary_site or (sites[0] if len(sites) == 1 else members.ids[0].split("/")[0])
    entry = cert["sites"].get(site, {}).get("models", {}).get("generator") or None
    run = checkpoint_canary_audit(models.generator, TensorDataset(*members.resized(models.generator.image_size)
                                                                  .tensors()),
                                  cfg=cfg or RunConfig(), ledger_entry=entry, m=o.canaries, steps=o.canary_steps,
                                  t_fractions=o.t_fractions, seed=o.seed, device=o.device)
    figures["canary"] = _strip(run.scores, run.included)
    return {**run.audit, "site": site, "dp": run.train.noise_multiplier > 0, "scores": run.scores,
            "included": run.included,
            "what": "the site's fine-tuning re-run from the checkpoint on its private images + canaries, with the "
                    "ledger's noise multiplier (audits the training procedure, not the released weights)"}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    """The few numbers an auditor reads first."""
    cert = r["certificate"]
    h: dict[str, Any] = {"dp": cert["dp"], "certificate_problems": len(cert["problems"]),
                         "epsilon_by_site": {s: v["epsilon_basic"] for s, v in cert["sites"].items()},
                         "not_covered": len(cert["not_covered"])}
    if "memorization" in r:
        h.update({k: r["memorization"][k] for k in ("n_released", "near_copies", "exact_copies", "high_correlation")})
    if "dcr" in r:
        h["dcr_median_members"] = r["dcr"]["members"]["median"]
        h["dcr_median_nonmembers"] = r["dcr"]["nonmembers"]["median"]
    for k, v in r.get("mia", {}).items():
        h[f"mia_{k}_auc"], h[f"mia_{k}_auc_ci95"] = v["auc"], v["auc_ci95"]
        h[f"mia_{k}_tpr_at_1%_fpr"] = v["tpr_at_0.01_fpr"]
    if "canary" in r:
        h["canary_epsilon_lower_bound"] = r["canary"]["epsilon_lower_bound"]
        h["canary_accounted_epsilon"] = r["canary"]["accounted_epsilon"]
    return h


def _quantiles(x: np.ndarray) -> dict[str, float]:
    """Min, 5%, median, 95%, mean and count of the finite values."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if not len(x):
        return {}
    q = np.quantile(x, [0.0, 0.05, 0.5, 0.95])
    return {"min": q[0], "q05": q[1], "median": q[2], "q95": q[3], "mean": float(x.mean()), "n": len(x)}


# -- figures and the HTML report -------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib figure (closed afterwards)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gallery(pairs: list[tuple[np.ndarray, np.ndarray, str]]) -> bytes:
    """Rows of (released, nearest private, absolute difference), the released image captioned."""
    plt = _plt()
    fig, axes = plt.subplots(max(1, len(pairs)), 3, figsize=(5.4, 2.0 * max(1, len(pairs))), squeeze=False)
    for row, (a, b, cap) in zip(axes, pairs):
        for ax, im, title in zip(row, (a, b, np.abs(a.astype(int) - b.astype(int))), (cap, "nearest private",
                                                                                      "|difference|")):
            ax.imshow(im, cmap="gray", vmin=0, vmax=255)
            ax.set_title(title, fontsize=6)
            ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _hist(dm: np.ndarray, dn: np.ndarray) -> bytes:
    """Overlaid DCR histograms of members and non-members."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(0, max(dm.max(), dn.max()) * 1.05 + 1e-9, 30)
    ax.hist(dm, bins=bins, alpha=0.6, density=True, label=f"members (n={len(dm)})")
    ax.hist(dn, bins=bins, alpha=0.6, density=True, label=f"non-members (n={len(dn)})")
    ax.set_xlabel("distance to closest released image (tiled l2)")
    ax.legend(fontsize=7)
    return _png(fig)


def _roc(curves: dict[str, dict[str, list[float]]]) -> bytes:
    """ROC curves, linear and log-log (the low-FPR regime of Carlini et al. 2022)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
    for name, c in curves.items():
        a1.plot(c["fpr"], c["tpr"], label=name)
        a2.loglog(np.maximum(c["fpr"], 1e-4), np.maximum(c["tpr"], 1e-4), label=name)
    for ax, title in ((a1, "ROC"), (a2, "ROC (log-log, low FPR)")):
        ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
        ax.set(xlabel="FPR", ylabel="TPR", title=title)
    a1.legend(fontsize=7)
    return _png(fig)


def _strip(scores: np.ndarray, included: np.ndarray) -> bytes:
    """Canary scores of included and excluded canaries."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 2.6))
    rng = np.random.default_rng(0)
    for k, (mask, name) in enumerate(((included, "included"), (~included, "not included"))):
        ax.scatter(scores[mask], k + rng.uniform(-0.15, 0.15, mask.sum()), s=10, label=name)
    ax.set(yticks=[0, 1], yticklabels=["included", "not included"], xlabel="canary score (error drop)")
    return _png(fig)


def write_report(r: dict[str, Any], figures: dict[str, bytes], path: Path) -> Path:
    """A self-contained HTML page (figures embedded as base64 PNG; opens offline)."""
    import base64
    import html

    def esc(x: Any) -> str:
        """HTML-escaped text (floats to 4 significant digits)."""
        return html.escape(f"{x:.4g}" if isinstance(x, float) else str(x))

    def table(rows: list[dict[str, Any]]) -> str:
        """An HTML table of dict rows (keys of the first row)."""
        if not rows:
            return "<p>(none)</p>"
        keys = list(rows[0])
        head = "".join(f"<th>{esc(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{esc(row.get(k))}</td>" for k in keys) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def img(name: str) -> str:
        """An embedded base64 PNG, or nothing."""
        return (f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(figures[name]).decode()}">'
                if name in figures else "")

    cert = r["certificate"]
    models = [{"site": s, "model": m, **{k: e.get(k) for k in ("epsilon", "recomputed_epsilon", "delta", "accountant",
                                                                 "noise_multiplier", "sample_rate", "steps",
                                                                 "consistent")}}
              for s, v in cert["sites"].items() for m, e in v["models"].items()]
    totals = [{"site": s, "epsilon (basic composition)": v["epsilon_basic"], "delta": v["delta_basic"],
               "epsilon (joint accountant)": v["epsilon_joint"]} for s, v in cert["sites"].items()]
    # secure aggregation's distributed DP (per site of data): central (vs the server), local (vs collusion)
    distributed = [{"site": s, **{k: v["distributed"].get(k) for k in (
        "central_epsilon", "central_epsilon_floor", "local_epsilon", "recomputed_local_epsilon", "delta", "rounds",
        "noise_multiplier", "num_sites", "consistent")}} for s, v in cert["sites"].items() if "distributed" in v]
    parts = [f"<h1>Privacy audit of {esc(r['inputs']['release'])}</h1>", "<h2>Headline</h2>",
             table([{"figure": k, "value": v} for k, v in r["headline"].items()]),
             "<h2>1. DP certificate</h2>", table(totals), table(models), table(distributed) if distributed else "",
             "<h3>Covered</h3><ul>" + "".join(f"<li>{esc(c)}</li>" for c in cert["covered"]) + "</ul>",
             "<h3>Not covered</h3><ul>" + "".join(f"<li>{esc(c)}</li>" for c in cert["not_covered"]) + "</ul>",
             "<h3>Problems</h3><ul>" + "".join(f"<li>{esc(c)}</li>" for c in cert["problems"]) + "</ul>"]
    if "memorization" in r:
        mem = r["memorization"]
        parts += ["<h2>2. Memorisation scan</h2>", table([mem["criterion"]]),
                  table([{k: mem[k] for k in ("n_released", "n_private", "near_copies", "exact_copies",
                                              "high_correlation")}]), img("gallery"), table(mem["images"][:20])]
    if "dcr" in r:
        parts += ["<h2>3. Distance to closest record</h2>", table([{"set": k, **r["dcr"][k]} for k in
                                                                   ("members", "nonmembers")]),
                  table([r["dcr"]["closer_to_members"]]), img("dcr")]
    if "mia" in r:
        parts += ["<h2>4. Membership inference</h2>",
                  table([{"attack": k, **{f: v.get(f) for f in ("n_members", "n_nonmembers", "auc", "auc_ci95",
                                                                "tpr_at_0.01_fpr", "tpr_at_0.01_fpr_ci95",
                                                                "tpr_at_0.001_fpr", "fpr_resolution")}}
                         for k, v in r["mia"].items()]), img("roc")]
    if "canary" in r:
        c = r["canary"]
        parts += ["<h2>5. Canary audit (Steinke, Nasr &amp; Jagielski 2023)</h2>", f"<p>{esc(c['what'])}</p>",
                  table([{k: c[k] for k in ("site", "m", "included", "dp", "accounted_epsilon", "epsilon_lower_bound",
                                            "confidence", "auc")}]), table(c["per_k"]), img("canary")]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:6px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>privacy audit</title><style>{style}"
                    f"</style></head><body>{''.join(parts)}</body></html>")
    return path


def json_safe(x: Any) -> Any:
    """Plain JSON: numpy to Python, NaN to null, infinities to the strings "inf" / "-inf"."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else (("inf" if x > 0 else "-inf") if math.isinf(x) else float(x))
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return str(x) if isinstance(x, Path) else x


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m simulations.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--release", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--private", help="members: site:N[:train|test], site:all or a folder of PNGs")
    p.add_argument("--heldout", help="non-members (default: the test split of a site:N --private)")
    p.add_argument("--config", type=Path, help="a run's config.json (when the checkpoint has no sidecar)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timesteps", default=",".join(map(str, DEFAULT_T_FRACTIONS)), help="fractions of T")
    p.add_argument("--n-noise", type=int, default=2)
    p.add_argument("--max-images", type=int, default=512)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--canaries", type=int, default=0, help="m > 0: run a one-run canary audit with m canaries")
    p.add_argument("--canary-steps", type=int, default=0, help="DP steps of the canary run (0: the ledger's)")
    p.add_argument("--canary-site", help="ledger site whose DP settings the canary run uses (default: the only one)")
    p.add_argument("--reference", type=Path, help="public prior folder: adds the calibrated generator attack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    opts = AuditOptions(t_fractions=tuple(float(t) for t in a.timesteps.split(",")), n_noise=a.n_noise,
                        max_images=a.max_images, n_boot=a.n_boot, canaries=a.canaries, canary_steps=a.canary_steps,
                        canary_site=a.canary_site, reference=a.reference, seed=a.seed, device=a.device)
    report = run_audit(a.release, a.out, checkpoint=a.checkpoint, private=a.private, heldout=a.heldout,
                       config=a.config, options=opts)
    print(json.dumps(json_safe(report["headline"]), indent=2))
    print(f"wrote {a.out / 'audit.json'} and {a.out / 'audit.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
