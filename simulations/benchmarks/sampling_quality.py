"""Sampling time and Fréchet distance of DDPM (all T steps) against DDIM / DPM-Solver++ at few steps.

A generator is trained briefly on phantoms here (or loaded with ``--prior``), then each (scheduler, steps)
case samples the same N conditions (plane, GA of a held-out phantom set) from the same seed. Quality is
the Fréchet distance (Heusel et al. 2017) to the held-out phantoms in the feature space of the
penultimate layer of a ``PlaneClassifier`` trained on phantoms in this script (not Inception: 1-channel
32-64 px ultrasound), plus the plane accuracy of that classifier on the samples (conditional fidelity).
Goal (issue): 20 solver steps within 10% of the 1000-step DDPM Fréchet distance.

    python -m simulations.benchmarks.sampling_quality --out runs/benchmarks
    python -m simulations.benchmarks.sampling_quality --n-samples 32 --train-steps 200 --configs ddpm:1000,dpmsolver:20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.analysis.metrics import frechet_distance
from common.core.config import GeneratorConfig
from common.data.tensors import records_to_dataset
from common.diffusion.loss import make_loss_fn
from common.diffusion.sampling import sample
from common.diffusion.schedulers import make_scheduler
from common.models.downstream import PlaneClassifier, classifier_loss
from common.models.features import PhantomEncoderBackbone
from common.models.generator import ConditionalUNet, build_generator, load_generator
from common.phantoms.simulator import make_phantoms
from common.privacy.dpsgd import train_private
from simulations.benchmarks._common import parse_args, write_report

DEFAULT_CONFIGS = "ddpm:1000,ddim:10,ddim:20,ddim:50,dpmsolver:10,dpmsolver:20,dpmsolver:50"
GOAL_STEPS, GOAL_REL = 20, 0.10
FEATURE_SPACE = ("penultimate layer (PlaneClassifier.features) of a PlaneClassifier trained in this script on "
                 "phantoms; reference = held-out phantoms")


@torch.no_grad()
def features(classifier: PlaneClassifier, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features ``[N, D]``, predicted planes ``[N]``) in eval mode."""
    classifier.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.features(images[i:i + batch_size])
        feats.append(f.numpy())
        preds.append(classifier.head(f).argmax(dim=1).numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(preds)


def _train_generator(data: TensorDataset, *, size: int, channels: tuple[int, ...], steps: int, batch_size: int,
                     lr: float, seed: int) -> tuple[ConditionalUNet, dict[str, Any]]:
    cfg = GeneratorConfig(block_out_channels=channels)
    model = build_generator(cfg, image_size=size, seed=seed)
    scheduler = make_scheduler("ddpm", num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type)
    start = time.perf_counter()
    result = train_private(model, make_loss_fn(scheduler, noise_multiplicity=1, cond_dropout=cfg.cond_dropout,
                                               seed=seed), data, steps=steps, batch_size=batch_size, lr=lr,
                           ledger=None, model_key="generator", planned_total_steps=steps, seed=seed)
    tail = [x for x in result.losses[-20:] if np.isfinite(x)]
    return model, {"source": "trained here (non-DP, phantoms)", "steps": steps, "batch_size": batch_size, "lr": lr,
                   "block_out_channels": list(channels), "final_loss": float(np.mean(tail)) if tail else None,
                   "seconds": round(time.perf_counter() - start, 1)}


def run(out_dir: Path, *, prior: Path | None, size: int, train_images: int, train_steps: int, batch_size: int,
        lr: float, channels: tuple[int, ...], classifier_steps: int, classifier_width: int, n_samples: int,
        configs: Sequence[tuple[str, int]], guidance: float, seed: int) -> Path:
    """Train (or load), sample every config, and write ``sampling_quality.json`` into ``out_dir``."""
    train = records_to_dataset(make_phantoms(train_images, size=size, seed=seed), image_size=size)
    ref = records_to_dataset(make_phantoms(n_samples, size=size, seed=seed + 1000), image_size=size)
    if prior is not None:
        model, sidecar = load_generator(prior)
        if model.image_size != size:
            raise ValueError(f"--prior generator is {model.image_size}px; pass --image-size {model.image_size}")
        gen_info: dict[str, Any] = {"source": str(prior), "sidecar": sidecar}
    else:
        model, gen_info = _train_generator(train, size=size, channels=channels, steps=train_steps,
                                           batch_size=batch_size, lr=lr, seed=seed)
    classifier = PlaneClassifier(image_size=size, width=classifier_width)
    train_private(classifier, classifier_loss, train, steps=classifier_steps, batch_size=64, lr=2e-3, ledger=None,
                  model_key="classifier", planned_total_steps=classifier_steps, seed=seed)
    ref_feats, ref_pred = features(classifier, ref.tensors[0])
    real_feats, _ = features(classifier, train.tensors[0][:n_samples])
    plane, ga = ref.tensors[1], ref.tensors[2]
    results: list[dict[str, Any]] = []
    frozen = PhantomEncoderBackbone(size)  # the private-downstream issue's feature space: the shipped encoder
    with torch.no_grad():
        ref_frozen = frozen(ref.tensors[0]).double().numpy()
        real_frozen = frozen(train.tensors[0][:n_samples]).double().numpy()
    for name, steps, label, options, g in configs:
        g = guidance if g is None else g
        start, cpu_start = time.perf_counter(), time.process_time()
        images = sample(model, plane=plane, ga=ga, scheduler_name=name,  # type: ignore[arg-type]
                        num_inference_steps=steps, guidance_scale=g, seed=seed, batch_size=64,
                        sampler_options=options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        feats, pred = features(classifier, images)
        with torch.no_grad():
            fd_frozen = frechet_distance(frozen(images).double().numpy(), ref_frozen)
        row = {"scheduler": name, "steps": steps, "options": label, "sampler_options": options, "guidance": g,
               "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
               "seconds_per_image": round(seconds / n_samples, 4),
               "frechet_distance_phantom_encoder": round(fd_frozen, 5),
               "frechet_distance": round(frechet_distance(feats, ref_feats), 4),
               "plane_accuracy": round(float((pred == plane.numpy()).mean()), 4)}
        results.append(row)
        print(json.dumps(row), flush=True)
    reference = next((r for r in results if r["scheduler"] == "ddpm"), None)
    goal: dict[str, Any] = {"steps": GOAL_STEPS, "max_relative_fd_gap": GOAL_REL, "reference": None, "met": {},
                            "met_phantom_encoder": {}}
    if reference is not None:
        goal["reference"] = f"ddpm:{reference['steps']}"
        for r in results:
            key = f"{r['scheduler']}:{r['options']}" if r["options"] else r["scheduler"]
            r["fd_relative_to_ddpm"] = round(r["frechet_distance"] / max(reference["frechet_distance"], 1e-12), 4)
            r["fd_phantom_encoder_relative_to_ddpm"] = round(
                r["frechet_distance_phantom_encoder"] / max(reference["frechet_distance_phantom_encoder"], 1e-12), 4)
            if r["steps"] == GOAL_STEPS:
                goal["met"][key] = bool(r["fd_relative_to_ddpm"] <= 1 + GOAL_REL)
                goal["met_phantom_encoder"][key] = bool(r["fd_phantom_encoder_relative_to_ddpm"] <= 1 + GOAL_REL)
    return write_report(out_dir, "sampling_quality", {
        "feature_space": FEATURE_SPACE,
        "setup": {"image_size": size, "n_samples": n_samples, "guidance_scale": guidance, "seed": seed,
                  "train_images": train_images, "classifier_steps": classifier_steps,
                  "classifier_width": classifier_width, "generator": gen_info},
        "feature_space_phantom_encoder": "the shipped phantom encoder (train.downstream-backbone=phantom_cnn), frozen,"
                                         " unit-norm features; reference = held-out phantoms",
        "floors": {"fd_real_vs_real_same_n": round(frechet_distance(real_feats, ref_feats), 4),
                   "fd_phantom_encoder_real_vs_real_same_n": round(frechet_distance(real_frozen, ref_frozen), 5),
                   "classifier_accuracy_on_reference": round(float((ref_pred == plane.numpy()).mean()), 4)},
        "goal": goal,
        "results": results,
    })


_TOKENS: dict[str, dict[str, Any]] = {
    "karras": {"use_karras_sigmas": True}, "trailing": {"timestep_spacing": "trailing"},
    "leading": {"timestep_spacing": "leading"}, "linspace": {"timestep_spacing": "linspace"},
    "zero": {"final_sigmas_type": "zero"}, "sigma_min": {"final_sigmas_type": "sigma_min"},
    "o1": {"solver_order": 1}, "o2": {"solver_order": 2}, "o3": {"solver_order": 3},
}


def _configs(text: str) -> list[tuple[str, int, str, dict[str, Any], float | None]]:
    """``scheduler:steps[:token+token...]``; tokens: the sampler options of :data:`_TOKENS` and ``g<scale>`` (this
    config's guidance scale)."""
    out = []
    for item in text.split(","):
        name, _, rest = item.partition(":")
        steps, _, label = rest.partition(":")
        if name not in ("ddpm", "ddim", "dpmsolver") or not steps.isdigit():
            raise SystemExit(f"--configs item {item!r} must be <ddpm|ddim|dpmsolver>:<steps>[:tokens]")
        options: dict[str, Any] = {}
        g: float | None = None
        for tok in [t for t in label.split("+") if t]:
            if tok.startswith("g") and tok[1:].replace(".", "", 1).isdigit():
                g = float(tok[1:])
            elif tok in _TOKENS:
                options.update(_TOKENS[tok])
            else:
                raise SystemExit(f"--configs item {item!r}: token {tok!r} is not one of {sorted(_TOKENS)} or g<scale>")
        out.append((name, int(steps), label, options, g))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--prior", type=Path, default=None, help="generator folder (save_generator) to evaluate")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--channels", default="32,64,64")
    parser.add_argument("--classifier-steps", type=int, default=300)
    parser.add_argument("--classifier-width", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=256)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated scheduler:steps")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, argv)
    path = run(args.out, prior=args.prior, size=args.image_size, train_images=args.train_images,
               train_steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
               channels=tuple(int(c) for c in args.channels.split(",")), classifier_steps=args.classifier_steps,
               classifier_width=args.classifier_width, n_samples=args.n_samples, configs=_configs(args.configs),
               guidance=args.guidance, seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
