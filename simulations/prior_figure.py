"""A prior's samples by plane x GA beside phantoms of the same condition (the README's generator figure).

``python -m simulations.prior_figure --prior common/assets/prior-demo64 --out simulations/figures`` writes
``prior_samples_<size>px.png``: one row per plane, one column pair per GA (a public phantom of that plane and GA,
then the prior's DPM-Solver++ sample for the same condition). Public data only: a prior folder written by
``difusal pretrain`` (or a run checkpoint) and the phantom simulator; nothing private is read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.core.viz import save_grid
from common.diffusion.sampling import sample
from common.models.generator import load_generator
from common.phantoms.simulator import PLANES, SCANNER_PROFILES, render_phantom

GAS = (20.0, 26.0, 32.0, 38.0)


def prior_grid(prior: Path, out_dir: Path, *, gas: Sequence[float] = GAS, seed: int = 0, steps: int = 20,
               guidance: float = 2.0) -> Path:
    """Write ``prior_samples_<size>px.png`` for the generator in ``prior/generator`` (or ``prior`` itself)."""
    folder = prior / "generator" if (prior / "generator").is_dir() else prior
    model, _ = load_generator(folder)
    model = model.float().eval()
    size = model.image_size
    planes = torch.arange(len(PLANES)).repeat_interleave(len(gas))
    ga = torch.tensor(list(gas), dtype=torch.float32).repeat(len(PLANES))
    t0 = time.perf_counter()
    with torch.no_grad():
        drawn = sample(model, plane=planes, ga=ga, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    seconds = time.perf_counter() - t0
    drawn = drawn[:, 0].clamp(-1, 1).numpy()
    prof = SCANNER_PROFILES["voluson_e6"]
    rows = []
    for r in range(len(PLANES)):
        row = []
        for c, g in enumerate(gas):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(r, c)))
            row += [render_phantom(r, float(g), size=size, profile=prof, rng=rng).image,
                    drawn[r * len(gas) + c]]
        rows.append(row)
    cols = [f"{kind} {g:.0f} w" for g in gas for kind in ("phantom", "prior")]
    path = save_grid(rows, Path(out_dir) / f"prior_samples_{size}px.png", row_labels=PLANES, col_labels=cols,
                     scale=max(1, 128 // size), title=f"{folder} at {size} px: phantom | prior sample (DPM-Solver++ "
                     f"{steps} steps, guidance {guidance:g}, seed {seed}; {seconds:.0f} s for {len(drawn)} samples)")
    print(f"wrote {path} ({len(drawn)} samples in {seconds:.0f} s)")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prior", default="common/assets/prior-demo64", help="prior or checkpoint folder")
    p.add_argument("--out", default="simulations/figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    args = p.parse_args(argv)
    prior = Path(args.prior)
    if not ((prior / "generator").is_dir() or (prior / "unet").is_dir()):
        raise SystemExit(f"prior_figure: {prior} holds no generator (expected generator/ or unet/): pass a folder "
                         "written by `difusal pretrain` or a run checkpoint")
    prior_grid(prior, Path(args.out), seed=args.seed, steps=args.steps, guidance=args.guidance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
