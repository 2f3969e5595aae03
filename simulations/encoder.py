"""``python -m simulations.encoder --out DIR [--steps N] [--public LAYOUT:DIR ...]``: train the frozen downstream
encoder (:func:`common.models.features.train_phantom_encoder`) on phantoms and, optionally, public labelled real
scans; the folder's ``encoder.json`` lists every source and this command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.torch import save_file

from common.data.public import load_public_images
from common.models.downstream import GARegressor, fit_public_ga_head
from common.models.features import (
    EncoderConfig,
    PhantomEncoderBackbone,
    fit_public_head,
    public_ga_head_file,
    public_head_file,
    train_phantom_encoder,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description="train the frozen downstream encoder on phantoms (+ public real scans)")
    p.add_argument("--out", required=True, help="new encoder folder")
    p.add_argument("--steps", type=int, default=EncoderConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-profile", type=int, default=EncoderConfig.images_per_profile,
                   help="phantoms drawn per scanner profile (fresh, every plane) for the training pool")
    p.add_argument("--public", action="append", default=[], metavar="LAYOUT:DIR",
                   help="public labelled real scans, e.g. fetal_planes_db:../shared/data/fetal_planes_db (repeatable;"
                        " never a site's private data)")
    p.add_argument("--public-balanced", action="store_true",
                   help="draw the public images plane-balanced (for a public set dominated by one plane, e.g. HC18)")
    p.add_argument("--size-weight", type=float, default=0.0,
                   help="weight of the auxiliary apparent-size objective on fetal-plane phantoms (0: planes only)")
    p.add_argument("--heads-only", action="store_true",
                   help="keep the encoder in --out and (re)fit only its public warm-start heads on --public")
    p.add_argument("--head-sizes", default="32,64,128", help="image sizes to fit a public warm-start head for")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.heads_only != (out / "encoder.safetensors").exists():
        p.error(f"{out}: --heads-only needs an existing encoder folder" if a.heads_only else
                f"{out} already holds an encoder; choose a new --out (or --heads-only)")
    public = []
    for spec in a.public:
        layout, sep, root = spec.partition(":")
        if not sep or not root:
            p.error(f"--public {spec!r}: expected LAYOUT:DIR, e.g. fetal_planes_db:/data/FETAL_PLANES_DB")
        public.append(load_public_images(layout, root))
    command = "python -m simulations.encoder " + " ".join(shlex.quote(v) for v in (argv or sys.argv[1:]))
    if not a.heads_only:
        cfg = EncoderConfig(steps=a.steps, seed=a.seed, public_balanced=a.public_balanced, size_weight=a.size_weight,
                            images_per_profile=a.images_per_profile)
        train_phantom_encoder(out, cfg, public=public)
    meta = json.loads((out / "encoder.json").read_text())
    meta["command" if not a.heads_only else "heads_command"] = command
    sizes = [int(v) for v in a.head_sizes.split(",") if v.strip()]
    if public:
        meta["public_heads"] = fit_heads(out, a.public, sizes)
    meta["public_ga_heads"] = fit_ga_heads(out, sizes)
    (out / "encoder.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps({k: meta.get(k) for k in ("phantom_heldout_accuracy", "train_seconds", "public_sources",
                                                "public_heads")}))
    return 0


def fit_heads(folder: Path, specs: Sequence[str], sizes: Sequence[int], l2: float = 1e-4) -> dict[str, object]:
    """Fit and save the classifier's public warm-start head at every image size (the backbone's standardisation
    depends on the size); what each was fitted on is returned for ``encoder.json``."""
    out: dict[str, object] = {}
    for size in sizes:
        pubs = [load_public_images(*spec.split(":", 1), size=size) for spec in specs]
        backbone = PhantomEncoderBackbone(size, folder)
        state, acc = fit_public_head(backbone, np.concatenate([q.images for q in pubs]),
                                     np.concatenate([q.planes for q in pubs]), l2=l2)
        save_file(state, str(folder / public_head_file(size)))
        out[str(size)] = {"l2": l2, "train_accuracy": round(acc, 4), "images": int(sum(len(q.planes) for q in pubs)),
                          "sources": [q.source["pixels_sha256"] for q in pubs]}
    return out


def fit_ga_heads(folder: Path, sizes: Sequence[int]) -> dict[str, object]:
    """Fit and save the GA regressor's public warm-start head (brain phantoms, :func:`fit_public_ga_head`) at every
    image size, on single-view and on flip-averaged features (the regressor's default); what each was fitted on
    is returned for ``encoder.json``, keyed by its file name."""
    out: dict[str, object] = {}
    for size in sizes:
        for flips in (False, True):
            regressor = GARegressor(size, backbone="phantom_cnn", flips=flips)
            regressor.backbone = PhantomEncoderBackbone(size, folder, flips=flips)
            state, info = fit_public_ga_head(regressor)
            name = public_ga_head_file(size, flips=flips)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
            out[name] = info
    return out


if __name__ == "__main__":
    raise SystemExit(main())
