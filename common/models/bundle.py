"""The three models a site trains (generator, plane classifier, GA regressor), built from a prior.

Only the trained part travels: the generator's fine-tuned parameters (LoRA adapters or a subset, see
:mod:`common.models.lora`) and the downstream models whole (they are small). Names are prefixed with the model
key (``generator.``, ``classifier.``, ``regressor.``) so that one ``ArrayRecord`` carries all three.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.core.atomic_io import atomic_dir
from common.core.config import RunConfig
from common.core.errors import ConfigError
from common.models.assets import asset_folder
from common.models.downstream import DownstreamSpec, GARegressor, PlaneClassifier, federated_state, load_federated_state
from common.models.generator import ConditionalUNet, build_generator, load_generator, save_generator
from common.models.lora import load_trainable_state_dict, set_finetune_mode, trainable_state_dict

MODEL_KEYS: tuple[str, ...] = ("generator", "classifier", "regressor")


@dataclass
class ModelBundle:
    """Generator + downstream models of one run, with where they started from."""

    generator: ConditionalUNet
    classifier: PlaneClassifier
    regressor: GARegressor
    prior_id: str  # content hash of the prior folder, or "init:<seed>" for a fresh init


def _prior_image_size(folder: Path) -> int | None:
    """The image size a prior folder's sidecar records (``None`` when it has none)."""
    side = folder / "sidecar.json"
    if not side.is_file():
        return None
    size = json.loads(side.read_text()).get("data", {}).get("image_size")
    return int(size) if size is not None else None


def shipped_prior_folder(preset: str, image_size: int | None = None) -> Path:
    """Where the shipped prior of ``preset`` lives (``$DIFUSAL_ASSETS`` or ``common/assets``; may not exist).

    A preset may ship one prior per image size: ``prior-<preset>`` at the preset's own size and
    ``prior-<preset><size>`` at another (``prior-demo64``: the real-data presets run the demo at 64 px). With
    ``image_size`` the folder pretrained at that size is returned; when none is, ``prior-<preset>`` (whose size
    mismatch :func:`build_bundle` then refuses with the fix).
    """
    default = asset_folder(f"prior-{preset}")
    if image_size is None:
        return default
    for folder in (default, asset_folder(f"prior-{preset}{image_size}")):
        if (folder / "generator").is_dir() and _prior_image_size(folder) == image_size:
            return folder
    return default


def resolve_prior(cfg: RunConfig) -> Path | None:
    """Folder of the configured prior, ``None`` for a fresh init; clear error when it is missing."""
    if not cfg.prior:
        return None
    folder = (shipped_prior_folder(cfg.preset, cfg.data.image_size) if cfg.prior == "shipped"
              else Path(cfg.prior).expanduser())
    if not (folder / "generator").is_dir():
        hint = (
            f"run `bash simulations/run.sh pretrain --preset {cfg.preset}` to (re)create it"
            if cfg.prior == "shipped"
            else "pass a folder written by `difusal pretrain` or a run checkpoint"
        )
        raise FileNotFoundError(f"prior folder {folder} has no generator/ subfolder; {hint}")
    return folder


def build_bundle(cfg: RunConfig, *, finetune: bool = True) -> ModelBundle:
    """Build the models from the configured prior (or a seeded fresh init) and mark the trainable part.

    Parameters
    ----------
    cfg:
        Run configuration (model sizes, prior, fine-tuning mode).
    finetune:
        ``True``: freeze all but the part the sites fine-tune (``cfg.train.finetune``).
        ``False``: everything trainable (public pretraining).
    """
    size = cfg.data.image_size
    prior = resolve_prior(cfg)
    torch.manual_seed(cfg.seed)
    # the consortium's label scope: no probability on a plane outside it (the head's shape stays the same)
    spec = DownstreamSpec.from_config(cfg)
    classifier, regressor = spec.classifier(), spec.regressor()
    if prior is None:
        generator = build_generator(cfg.generator, image_size=size, seed=cfg.seed)
        prior_id = f"init:{cfg.seed}"
    else:
        generator, _ = load_generator(prior / "generator")
        if generator.image_size != size:
            raise ConfigError(f"prior {prior} was pretrained at {generator.image_size} px but data.image-size={size}; "
                              f"set data.image-size={generator.image_size} or pick a prior of that size")
        generator = generator.float()
        if not spec.frozen:  # the prior's end-to-end CNNs; heads on frozen features start at zero (data-free)
            classifier.load_state_dict(_load_tensors(prior / "classifier.safetensors"))
            regressor.load_state_dict(_load_tensors(prior / "regressor.safetensors"))
        prior_id = folder_digest(prior)
    if finetune:
        set_finetune_mode(generator, cfg.train.finetune, rank=cfg.train.lora_rank)
    return ModelBundle(generator=generator, classifier=classifier, regressor=regressor, prior_id=prior_id)


def federated_arrays(bundle: ModelBundle) -> dict[str, np.ndarray]:
    """The part of the bundle that sites train and the server aggregates, as named float32 arrays."""
    out: dict[str, np.ndarray] = {}
    parts: dict[str, Mapping[str, torch.Tensor]] = {
        "generator": trainable_state_dict(bundle.generator),
        "classifier": federated_state(bundle.classifier),
        "regressor": federated_state(bundle.regressor),
    }
    for key, state in parts.items():
        for name, tensor in state.items():
            out[f"{key}.{name}"] = tensor.detach().cpu().float().numpy().copy()
    return out


def load_federated_arrays(bundle: ModelBundle, arrays: Mapping[str, np.ndarray]) -> None:
    """Load arrays produced by :func:`federated_arrays` (or their aggregate) into the bundle, strictly."""
    split: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MODEL_KEYS}
    for name, value in arrays.items():
        key, _, rest = name.partition(".")
        if key not in split:
            raise ValueError(f"array {name!r} does not start with one of {MODEL_KEYS}")
        split[key][rest] = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
    load_trainable_state_dict(bundle.generator, split["generator"], strict=True)
    load_federated_state(bundle.classifier, split["classifier"])
    load_federated_state(bundle.regressor, split["regressor"])


def expected_shapes(bundle: ModelBundle) -> dict[str, tuple[int, ...]]:
    """Shapes a valid reply must have, by array name."""
    return {k: tuple(v.shape) for k, v in federated_arrays(bundle).items()}


def save_bundle(
    bundle: ModelBundle, folder: Path, *, sidecar: Mapping[str, Any], extra_files: Mapping[str, bytes] | None = None
) -> Path:
    """Write the bundle as a prior/checkpoint folder, atomically (:func:`common.core.atomic_io.atomic_dir`).

    Layout: ``generator/`` (diffusers-style folder with its own sidecar), ``federated.safetensors``
    (the trained part, what :func:`load_federated_arrays` takes), ``classifier.safetensors``,
    ``regressor.safetensors`` and ``sidecar.json``.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_generator(bundle.generator, tmp / "generator", sidecar=dict(sidecar))
        save_file({k: torch.from_numpy(v) for k, v in federated_arrays(bundle).items()},
                  str(tmp / "federated.safetensors"))
        save_file(_contiguous(bundle.classifier.state_dict()), str(tmp / "classifier.safetensors"))
        save_file(_contiguous(bundle.regressor.state_dict()), str(tmp / "regressor.safetensors"))
        (tmp / "sidecar.json").write_text(json.dumps(dict(sidecar), indent=2, default=str))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return folder


def load_federated_file(folder: Path) -> dict[str, np.ndarray]:
    """Read ``federated.safetensors`` of a checkpoint folder."""
    return {k: v.numpy() for k, v in _load_tensors(Path(folder) / "federated.safetensors").items()}


def folder_digest(folder: Path) -> str:
    """Short SHA-256 over the weight files of a prior folder (identifies the public prior)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the folder is not a complete prior/checkpoint")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
