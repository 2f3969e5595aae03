"""Power of the privacy audit: a deliberately memorising generator against a DP one, audited the same way.

``python -m simulations.audit_power [--out runs/audit_power] [--quick]``

One phantom site ("site0", 32x32), a tiny conditional UNet (channels 8/16, T = 100, v-prediction, no condition
dropout). Each model is one training run (:func:`common.analysis.audit_mia.run_canary_training`, i.e. ``train_private``)
on its members plus ``m`` canaries (fresh phantoms with a stamped 8x8 binary patch and their own plane/GA,
:func:`common.analysis.audit_mia.phantom_canaries`), each included with probability 1/2 (Steinke, Nasr & Jagielski 2023):

* ``memorising``: no DP, few members, many full passes (the audit must find it); its release is sampled at
  the members' labels (the extraction attack of Carlini et al. 2023, who prompt with training captions);
* ``dp``: DP-SGD at target epsilon 8 (delta 1e-5) with the same architecture and loss; its release is sampled at
  the labels of fresh public phantoms (sampling at private labels would leak them outside the DP guarantee).

Each model then samples a release, is written as a checkpoint folder
(generator, sidecar, ``round.json`` with its ledger) next to PNG folders of members and held-out non-members,
and :func:`simulations.audit.run_audit` audits it. ``<out>/audit_power.json`` holds both headlines, the canary
audits, timings and the command; the full audits (JSON + HTML) are in ``<out>/memorising`` and ``<out>/dp``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from common.active_learning.release import ReleaseItem, ReleaseStore
from common.analysis.audit import canary_inclusion
from common.analysis.audit_mia import phantom_canaries, run_canary_training
from common.core.config import DataConfig, GeneratorConfig, RunConfig
from common.data.tensors import records_to_dataset
from common.diffusion.loss import make_loss_fn
from common.diffusion.sampling import sample, to_uint8
from common.diffusion.schedulers import make_scheduler
from common.models.generator import build_generator, save_generator
from common.phantoms.simulator import make_phantoms
from common.privacy.ledger import PrivacyLedger
from simulations.audit import AuditOptions, json_safe, run_audit

SITE = "site0"
GENERATOR = GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100, prediction_type="v_prediction",
                            cond_dropout=0.0)


@dataclass(frozen=True)
class Setting:
    """One model of the experiment."""

    name: str
    members: int
    steps: int
    batch_size: int
    lr: float
    target_epsilon: float | None  # None: no DP
    release_labels: str = "public"  # "members": sample at the members' labels (extraction); "public": fresh labels
    canaries: int = 32
    nonmembers: int = 32
    samples_per_member: int = 2


FULL = (Setting("memorising", members=8, steps=3000, batch_size=16, lr=3e-3, target_epsilon=None,
                release_labels="members"),
        Setting("dp", members=48, nonmembers=48, steps=150, batch_size=16, lr=3e-3, target_epsilon=8.0))
QUICK = (replace(FULL[0], members=6, steps=1500, canaries=16, nonmembers=12),
         replace(FULL[1], members=16, nonmembers=16, steps=20, canaries=16))


def _write_pngs(folder: Path, images: np.ndarray, plane: Sequence[int], ga: Sequence[float]) -> Path:
    """A folder of PNGs with a ``metadata.jsonl`` of their labels (the audit's folder SPEC)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, p, g) in enumerate(zip(images, plane, ga)):
        Image.fromarray(img).save(folder / f"img-{i:04d}.png")
        lines.append(json.dumps({"file_name": f"img-{i:04d}.png", "plane": int(p), "ga_weeks": float(g)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_setting(s: Setting, out: Path, *, seed: int, n_boot: int) -> dict[str, Any]:
    """Train, sample, write and audit one model; return its figures."""
    t0, c0 = time.perf_counter(), time.process_time()
    recs = make_phantoms(s.members + s.nonmembers, size=32, seed=seed, site=SITE, id_prefix=SITE)
    members, nonmembers = recs[: s.members], recs[s.members:]
    base = records_to_dataset(members, image_size=32)
    canaries = phantom_canaries(s.canaries, size=32, seed=seed + 100)  # stamped fresh phantoms, own conditions
    included = canary_inclusion(s.canaries, seed=seed + 3)
    gen = build_generator(GENERATOR, image_size=32, seed=seed)
    sched = make_scheduler("ddpm", num_train_timesteps=GENERATOR.num_train_timesteps,
                           prediction_type=GENERATOR.prediction_type)
    loss = make_loss_fn(sched, noise_multiplicity=1, cond_dropout=GENERATOR.cond_dropout, seed=seed + 4)
    ledger = (PrivacyLedger(target_epsilon=s.target_epsilon, target_delta=1e-5, budget_split={"generator": 1.0})
              if s.target_epsilon else None)
    run = run_canary_training(gen, loss, base, canaries, included, timesteps=(5, 10, 20, 40), steps=s.steps,
                              batch_size=s.batch_size, lr=s.lr, ledger=ledger, planned_total_steps=s.steps,
                              delta=1e-5, seed=seed + 5, grad_sample_mode="functorch")
    train_s = time.perf_counter() - t0
    # The release. "members": at the members' labels, the extraction attack of Carlini et al. (2023), who prompt
    # with training captions. "public": at labels of fresh public phantoms, as a deployed DP release must be
    # (sampling at the private labels would itself reveal them, outside the DP guarantee).
    if s.release_labels == "members":
        plane, ga = base.tensors[1].repeat(s.samples_per_member), base.tensors[2].repeat(s.samples_per_member)
    else:
        pub = make_phantoms(s.members * s.samples_per_member, size=32, seed=seed + 200)
        plane = torch.tensor([r.plane for r in pub])
        ga = torch.tensor([r.ga_weeks for r in pub], dtype=torch.float32)
    released = to_uint8(sample(gen, plane=plane, ga=ga, scheduler_name="ddim", num_inference_steps=25,
                               guidance_scale=1.0, seed=seed + 6))
    eps = run.train.epsilon if ledger is not None else None
    store = ReleaseStore(out / "release")
    store.add(ReleaseItem(image=im, plane=int(p), ga_weeks=float(g), source_site=SITE, round=1, scores={},
                          acquisition={"function": "none", "reason": "audit power experiment"},
                          privacy={"epsilon": eps, "delta": 1e-5 if eps is not None else None, "accountant": "rdp",
                                   "model": "generator"})
              for im, p, g in zip(released, plane.tolist(), ga.tolist()))
    cfg = RunConfig(preset="smoke", data=DataConfig(image_size=32, num_sites=1), generator=GENERATOR)
    ckpt = out / "checkpoints" / "round-001"
    save_generator(gen, ckpt / "generator", sidecar={"kind": "audit-power", "setting": s.__dict__})
    (ckpt / "sidecar.json").write_text(json.dumps({"config": cfg.to_dict(), "seed": seed}))
    (ckpt / "round.json").write_text(json.dumps({"round": 1, "ledger": {SITE: ledger.summary()} if ledger else {}}))
    mem_dir = _write_pngs(out / "members", np.stack([r.image for r in members]), [r.plane for r in members],
                          [r.ga_weeks for r in members])
    non_dir = _write_pngs(out / "nonmembers", np.stack([r.image for r in nonmembers]), [r.plane for r in nonmembers],
                          [r.ga_weeks for r in nonmembers])
    report = run_audit(out / "release", out / "audit", checkpoint=ckpt, private=str(mem_dir), heldout=str(non_dir),
                       options=AuditOptions(n_boot=n_boot, seed=seed))
    k = max(1, len(run.train.losses) // 10)
    return {"setting": s.__dict__, "headline": report["headline"], "canary": run.audit,
            "training": {"steps": run.train.steps, "noise_multiplier": run.train.noise_multiplier,
                         "sample_rate": run.train.sample_rate, "epsilon": eps,
                         "first_loss": float(np.nanmean(run.train.losses[:k])),
                         "last_loss": float(np.nanmean(run.train.losses[-k:]))},
            "mia_generator_auc_per_timestep": report["mia"]["generator"]["auc_per_timestep"],
            "closer_to_members": report["dcr"]["closer_to_members"],
            "seconds": {"train": round(train_s, 1), "total": round(time.perf_counter() - t0, 1),
                        "cpu": round(time.process_time() - c0, 1)},
            "audit": str(out / "audit" / "audit.html")}


def run(out: Path, *, quick: bool = False, seed: int = 0, command: str = "") -> dict[str, Any]:
    """Both settings; writes ``<out>/audit_power.json`` and returns it."""
    torch.set_num_threads(1)  # a shared CPU: one thread per process is the fastest
    if any((out / s.name).exists() for s in FULL):
        raise FileExistsError(f"{out} already holds an experiment (a release would be appended to); "
                              "pass another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result: dict[str, Any] = {"command": command, "quick": quick, "seed": seed, "generator": GENERATOR.__dict__}
    for s in QUICK if quick else FULL:
        print(f"[audit_power] {s.name} ...", flush=True)
        result[s.name] = run_setting(s, out / s.name, seed=seed, n_boot=200 if quick else 1000)
        print(f"[audit_power] {s.name}: {json.dumps(json_safe(result[s.name]['headline']))}", flush=True)
    result["seconds"] = {"wall": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
    (out / "audit_power.json").write_text(json.dumps(json_safe(result), indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m simulations.audit_power", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/audit_power"))
    p.add_argument("--quick", action="store_true", help="smaller settings (the slow test)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    command = "python -m simulations.audit_power " + " ".join(sys.argv[1:] if argv is None else argv)
    run(a.out, quick=a.quick, seed=a.seed, command=command)
    print(f"wrote {a.out / 'audit_power.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
