"""Per-round sample grids and the loss / accuracy / epsilon plots of a run folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.core.config import RunConfig
from common.core.records import PLANES
from common.core.seeding import derive_seed
from common.core.viz import plot_series, save_grid
from common.diffusion.sampling import sample, to_uint8
from common.federated.round_metrics import round_summary
from common.models.bundle import ModelBundle

GRID_GA_WEEKS: tuple[float, ...] = (18.0, 26.0, 34.0)


def save_sample_grid(bundle: ModelBundle, cfg: RunConfig, path: Path, *, server_round: int) -> Path:
    """Sample the global generator for every plane of the run's label scope (rows) x a few GA values (columns) and
    save a PNG (a plane outside the scope, e.g. the cervix on the African preset, was never trained: no row)."""
    scope = list(cfg.data.plane_scope())
    planes = torch.tensor(scope).repeat_interleave(len(GRID_GA_WEEKS))
    ga = torch.tensor(GRID_GA_WEEKS * len(scope), dtype=torch.float32)
    bundle.generator.eval()
    images = sample(
        bundle.generator,
        plane=planes,
        ga=ga,
        scheduler_name=cfg.sampling.scheduler,
        num_inference_steps=cfg.sampling.num_inference_steps,
        guidance_scale=cfg.sampling.guidance_scale,
        seed=derive_seed(cfg.seed, "grid"),  # same noise every round: rows are comparable across rounds
    )
    pix = to_uint8(images)
    rows = [[pix[p * len(GRID_GA_WEEKS) + g] for g in range(len(GRID_GA_WEEKS))] for p in range(len(scope))]
    return save_grid(
        rows, path, row_labels=[PLANES[p] for p in scope], col_labels=[f"GA {g:.0f} w" for g in GRID_GA_WEEKS],
        title=f"Global generator after round {server_round}",
    )


def plot_rounds(records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Loss, plane accuracy and cumulative epsilon per site against rounds (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [int(r["round"]) for r in records]
    pooled = [round_summary(r) for r in records]
    nan = lambda v: math.nan if v is None else v  # noqa: E731
    panels = [
        ("generator loss (train)", [r["train"].get("generator-loss", math.nan) for r in records]),
        ("denoising loss (held-out)", [r["evaluate"].get("denoise-loss", math.nan) for r in records]),
        ("plane accuracy (held-out)", [nan(p["plane_accuracy"]) for p in pooled]),
        ("GA MAE, days (held-out)", [nan(p["ga_mae_days"]) for p in pooled]),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.2))
    for ax, (title, values) in zip(axes, panels):
        plot_series(ax, rounds, values)
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    sites = sorted({name for r in records for name in r.get("ledger", {})})
    for site in sites:
        eps = [
            max((float(m.get("epsilon", 0.0)) for m in r.get("ledger", {}).get(site, {}).values()), default=np.nan)
            for r in records
        ]
        axes[4].plot(rounds, eps, marker="o", label=site)
    axes[4].set_title("cumulative epsilon (max over models)")
    if sites:
        axes[4].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "rounds.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
