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

from common.data.public import load_public_images
from common.models.features import EncoderConfig, train_phantom_encoder


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description="train the frozen downstream encoder on phantoms (+ public real scans)")
    p.add_argument("--out", required=True, help="new encoder folder")
    p.add_argument("--steps", type=int, default=EncoderConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--public", action="append", default=[], metavar="LAYOUT:DIR",
                   help="public labelled real scans, e.g. fetal_planes_db:../shared/data/fetal_planes_db (repeatable;"
                        " never a site's private data)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if (out / "encoder.safetensors").exists():
        p.error(f"{out} already holds an encoder; choose a new --out")
    public = []
    for spec in a.public:
        layout, sep, root = spec.partition(":")
        if not sep or not root:
            p.error(f"--public {spec!r}: expected LAYOUT:DIR, e.g. fetal_planes_db:/data/FETAL_PLANES_DB")
        public.append(load_public_images(layout, root))
    train_phantom_encoder(out, EncoderConfig(steps=a.steps, seed=a.seed), public=public)
    meta = json.loads((out / "encoder.json").read_text())
    meta["command"] = "python -m simulations.encoder " + " ".join(shlex.quote(v) for v in (argv or sys.argv[1:]))
    (out / "encoder.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps({k: meta[k] for k in ("phantom_heldout_accuracy", "train_seconds", "public_sources")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
