"""Conditional diffusion generator: a diffusers ``UNet2DModel`` plus a plane / GA / site condition encoder.

The condition vector is added to the UNet's time embedding (diffusers ``class_embed_type="identity"``:
``emb = time_embedding(t) + class_labels``), the same additive conditioning as the class-conditional
DDPM of Dhariwal & Nichol (2021). Every sub-module is a plain ``Conv2d`` / ``Linear`` / ``GroupNorm`` /
``Embedding`` leaf, so Opacus computes per-sample gradients for all of them and
``ModuleValidator.validate(strict=True)`` accepts the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file
from torch import nn

from common.core.atomic_io import atomic_dir
from common.core.config import GeneratorConfig
from common.core.provenance import code_version
from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS, PLANES
from common.models.lora import merged_copy
from common.models.noise_schedule import AnyScheduler, make_scheduler

NUM_PLANES = len(PLANES)
NULL_PLANE = NUM_PLANES  # embedding row of the "no plane" token (classifier-free guidance, Ho & Salimans 2022)
GA_FOURIER_FEATURES = 16
SIDECAR_JSON = "sidecar.json"
UNET_DIR = "unet"
ENCODER_DIR = "condition_encoder"  # diffusers folder: ConditionEncoder.from_pretrained(folder, subfolder=ENCODER_DIR)
SCHEDULER_DIR = "scheduler"  # DDPMScheduler.from_pretrained(folder, subfolder=SCHEDULER_DIR): the training schedule
SCHEDULER_JSON = "scheduler_config.json"
GENERATOR_JSON = "generator.json"  # GeneratorConfig and image size
# The layout before scheduler/ and condition_encoder/ (the shipped prior-demo): migrated on load.
LEGACY_ENCODER_FILE = "condition_encoder.safetensors"
LEGACY_ENCODER_JSON = "condition_encoder.json"

log = logging.getLogger(__name__)


def norm_groups(channels: tuple[int, ...]) -> int:
    """Number of GroupNorm groups dividing every channel count (diffusers' ``min(c0 // 4, 32)`` rule, reduced)."""
    groups = max(1, min(min(channels) // 4, 32))
    while any(c % groups for c in channels):
        groups -= 1
    return groups


class ContiguousAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention processor whose output is made contiguous (NCHW).

    The stock processor returns ``transpose(...).reshape(B, C, H, W)``, a channels-last view; Opacus'
    Conv2d grad sampler (``unfold2d`` via ``as_strided``) assumes contiguous NCHW activations and
    silently returns wrong per-sample gradients (hooks mode) for every conv fed from an attention block.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Stock attention, contiguous output."""
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return out.contiguous()


def set_contiguous_attention(unet: UNet2DModel) -> None:
    """Install :class:`ContiguousAttnProcessor` in every attention block (processors are not saved)."""
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(ContiguousAttnProcessor())


class ConditionEncoder(ModelMixin, ConfigMixin):
    """Maps (plane, gestational age, site) to one vector of the UNet's time-embedding size.

    Plane: ``nn.Embedding`` over the 6 planes + 1 null token (index -1 in the input). GA: normalised
    ``(ga - 14) / 26``, Fourier features ``sin/cos(2^k * pi * x)`` (Tancik et al. 2020) -> 2-layer MLP;
    NaN means unknown and selects a learned null vector. Site (optional): embedding + null (-1).
    The three vectors are summed. A diffusers model: ``save_pretrained`` / ``from_pretrained`` on a local folder.
    """

    @register_to_config
    def __init__(self, embed_dim: int, use_site: bool = False, max_sites: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.use_site = use_site
        self.max_sites = max_sites
        self.plane_embedding = nn.Embedding(NUM_PLANES + 1, embed_dim)
        self.ga_mlp = nn.Sequential(
            nn.Linear(GA_FOURIER_FEATURES, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        # A one-row Embedding rather than a bare nn.Parameter: Opacus has a per-sample grad sampler for
        # Embedding, whereas a parameter held directly by this composite module would be handed to functorch whole.
        self.ga_null = nn.Embedding(1, embed_dim)
        self.site_embedding = nn.Embedding(max_sites + 1, embed_dim) if use_site else None

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments, JSON-safe."""
        return {"embed_dim": self.embed_dim, "use_site": self.use_site, "max_sites": self.max_sites}

    def forward(self, plane: torch.Tensor, ga: torch.Tensor, site: torch.Tensor | None = None) -> torch.Tensor:
        """Condition vectors ``[B, embed_dim]``; plane/site -1 and GA NaN are the null (unconditional) tokens."""
        plane = plane.long()
        if bool(((plane < -1) | (plane >= NUM_PLANES)).any()):
            raise ValueError(
                f"plane indices must be in [-1, {NUM_PLANES - 1}] (-1 = unconditional); got {plane.tolist()}"
            )
        emb = self.plane_embedding(torch.where(plane < 0, torch.full_like(plane, NULL_PLANE), plane))
        ga = ga.to(dtype=torch.float32, device=emb.device)
        known = ~torch.isnan(ga)
        # NaN must not reach the MLP: 0 * NaN in its backward would poison the weight gradient.
        x = torch.where(known, (ga - GA_MIN_WEEKS) / (GA_MAX_WEEKS - GA_MIN_WEEKS), torch.zeros_like(ga))
        freqs = (2.0 ** torch.arange(GA_FOURIER_FEATURES // 2, device=emb.device, dtype=torch.float32)) * math.pi
        angles = x[:, None] * freqs[None, :]
        ga_vec = self.ga_mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))
        null = self.ga_null(torch.zeros_like(plane))
        emb = emb + torch.where(known[:, None], ga_vec, null)
        if self.site_embedding is not None:
            if site is None:
                site = torch.full_like(plane, -1)
            site = site.long().to(emb.device)
            if bool(((site < -1) | (site >= self.max_sites)).any()):
                raise ValueError(f"site indices must be in [-1, {self.max_sites - 1}]; raise generator.max_sites")
            emb = emb + self.site_embedding(torch.where(site < 0, torch.full_like(site, self.max_sites), site))
        return emb


class ConditionalUNet(nn.Module):
    """``UNet2DModel`` conditioned on plane, GA and (optionally) site through its class-embedding slot."""

    def __init__(
        self,
        unet: UNet2DModel,
        encoder: ConditionEncoder,
        *,
        generator_config: GeneratorConfig,
        image_size: int,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.generator_config = generator_config
        self.image_size = image_size
        # The training noise schedule (a diffusers scheduler config), saved with the weights and loaded back.
        if scheduler_config is None:
            scheduler_config = dict(make_scheduler(
                "ddpm", num_train_timesteps=generator_config.num_train_timesteps,
                prediction_type=generator_config.prediction_type,
            ).config)
        self.scheduler_config = dict(scheduler_config)

    def noise_scheduler(self, name: str = "ddpm") -> AnyScheduler:
        """A fresh diffusers scheduler (``ddpm`` / ``ddim`` / ``dpmsolver``) on this model's training schedule."""
        return make_scheduler(name, schedule=self.scheduler_config)  # type: ignore[arg-type]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        plane: torch.Tensor,
        ga: torch.Tensor,
        site: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model output (epsilon or v, per ``generator_config.prediction_type``) for noisy ``sample`` ``[B,1,H,W]``.

        Parameters
        ----------
        sample: noisy images ``[B, 1, H, W]``.
        timestep: diffusion step(s), scalar or ``[B]``.
        plane: plane indices ``[B]`` (-1 = unconditional).
        ga: gestational ages in weeks ``[B]`` (NaN = unknown / unconditional).
        site: site indices ``[B]`` or None (used only when the model has a site embedding).

        Returns
        -------
        Tensor ``[B, 1, H, W]``.
        """
        class_labels = self.encoder(plane.to(sample.device), ga.to(sample.device), site)
        return self.unet(sample, timestep, class_labels=class_labels).sample


def _unet_from_config(cfg: GeneratorConfig, image_size: int) -> UNet2DModel:
    """Build the UNet from a :class:`GeneratorConfig` (never from a hub id)."""
    channels = tuple(int(c) for c in cfg.block_out_channels)
    n = len(channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:  # self-attention only at the lowest resolution (cost grows as (H*W)^2)
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    if image_size % (2 ** (n - 1)):
        raise ValueError(f"image_size={image_size} is not divisible by 2^{n - 1}; use fewer blocks or a larger size")
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        add_attention=cfg.attention,
        attention_head_dim=None,  # one head of the block's width
        norm_num_groups=norm_groups(channels),
        class_embed_type="identity",
    )
    set_contiguous_attention(unet)
    return unet


def build_generator(cfg: GeneratorConfig, *, image_size: int, seed: int) -> ConditionalUNet:
    """Build a freshly initialised conditional UNet.

    Parameters
    ----------
    cfg: generator section of the run config.
    image_size: square image side (32, 64, 128).
    seed: seeds the weight initialisation (the global torch RNG state is restored afterwards).

    Returns
    -------
    The model, in training mode, on the CPU.
    """
    cfg.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet_from_config(cfg, image_size)
        embed_dim = cfg.block_out_channels[0] * 4  # diffusers' time_embed_dim
        encoder = ConditionEncoder(embed_dim, use_site=cfg.use_site_condition, max_sites=cfg.max_sites)
    return ConditionalUNet(unet, encoder, generator_config=cfg, image_size=image_size)


def _has_lora(model: nn.Module) -> bool:
    """Whether peft adapters are injected (module names containing ``lora_``)."""
    return any("lora_" in name for name, _ in model.named_parameters())


def save_generator(
    model: ConditionalUNet, folder: Path, *, sidecar: dict[str, Any], dtype: torch.dtype = torch.float32
) -> Path:
    """Write a diffusers-style folder atomically (:func:`common.core.atomic_io.atomic_dir`).

    Parameters
    ----------
    model: the generator; injected LoRA adapters are merged into a copy first.
    folder: destination; an existing folder is replaced.
    sidecar: JSON-safe facts (training config, seed, data, privacy figures); ``code_version`` is added.
    dtype: ``torch.float32`` or ``torch.float16`` (half the size, for the shipped prior).

    Returns
    -------
    ``folder``.
    """
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported; use torch.float32 or torch.float16")
    folder = Path(folder)
    if _has_lora(model):
        model = merged_copy(model)
    meta = dict(sidecar)
    meta.setdefault("code_version", code_version())
    meta["saved_dtype"] = str(dtype).removeprefix("torch.")
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise ValueError(f"sidecar must be JSON-serialisable: {exc}") from exc
    with atomic_dir(folder) as tmp:
        unet = copy.deepcopy(model.unet).cpu()
        if dtype == torch.float16:
            unet.half()  # not .to(dtype): diffusers warns on that path for every cast
        unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
        encoder = copy.deepcopy(model.encoder).cpu()
        if dtype == torch.float16:
            encoder.half()
        encoder.save_pretrained(tmp / ENCODER_DIR, safe_serialization=True)
        DDPMScheduler.from_config(model.scheduler_config).save_config(tmp / SCHEDULER_DIR)
        gen_meta = {"generator_config": dataclasses.asdict(model.generator_config), "image_size": model.image_size}
        (tmp / GENERATOR_JSON).write_text(json.dumps(gen_meta, indent=2))
        (tmp / SIDECAR_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from ``path``, or an error naming the file and ``fix``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is malformed, not valid JSON ({exc}); {fix}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is malformed, not a JSON object; {fix}")
    return obj


def _generator_config(meta: dict[str, Any], path: Path) -> tuple[GeneratorConfig, int]:
    """``(GeneratorConfig, image_size)`` from a generator.json (or legacy condition_encoder.json) object."""
    try:
        gcfg = dict(meta["generator_config"])
        gcfg["block_out_channels"] = tuple(gcfg["block_out_channels"])
        return GeneratorConfig(**gcfg), int(meta["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is malformed: {exc!r}") from exc


def _load_scheduler_config(folder: Path) -> dict[str, Any]:
    """The training schedule saved in ``folder/scheduler``; a clear error if missing or corrupt."""
    path = folder / SCHEDULER_DIR / SCHEDULER_JSON
    fix = (f"{folder} is a generator folder without a valid noise schedule; restore {path} from the run that "
           "trained it (re-saving with save_generator would write today's default schedule, which may not be "
           "the one these weights were trained on)")
    raw = _read_json(path, fix)
    try:
        scheduler = DDPMScheduler.from_config(raw)
        if int(scheduler.config.num_train_timesteps) < 1 or "beta_schedule" not in raw:
            raise ValueError("num_train_timesteps / beta_schedule missing or invalid")
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ValueError(f"{path} is not a diffusers scheduler config ({exc}); {fix}") from exc
    return dict(scheduler.config)


def load_generator(folder: Path, *, device: str = "cpu") -> tuple[ConditionalUNet, dict[str, Any]]:
    """Load a folder written by :func:`save_generator` (weights as float32): the one generator loader.

    Layout: ``unet/`` (``UNet2DModel``), ``condition_encoder/`` (:class:`ConditionEncoder`), ``scheduler/``
    (the training ``DDPMScheduler`` config), ``generator.json``, ``sidecar.json``. A legacy folder
    (``condition_encoder.json`` + ``.safetensors``, no ``scheduler/``, e.g. the shipped prior-demo) is
    migrated in memory: its schedule is rebuilt from the constants of :mod:`common.diffusion.schedulers`, the
    ones it was trained with; a note is logged. Save it again to write the new layout.

    Parameters
    ----------
    folder: the diffusers-style folder (local; never a hub id).
    device: where to put the model.

    Returns
    -------
    ``(model, sidecar)``.
    """
    folder = Path(folder)
    for part in (UNET_DIR + "/config.json", SIDECAR_JSON):
        if not (folder / part).exists():
            raise FileNotFoundError(
                f"{folder / part} is missing: {folder} is not a generator folder (see save_generator)"
            )
    sidecar = _read_json(folder / SIDECAR_JSON, "the folder's sidecar is damaged")
    legacy = not (folder / ENCODER_DIR).exists() and (folder / LEGACY_ENCODER_JSON).exists()
    if legacy:
        meta = _read_json(folder / LEGACY_ENCODER_JSON, "the legacy generator folder is damaged")
        cfg, image_size = _generator_config(meta, folder / LEGACY_ENCODER_JSON)
        try:
            encoder = ConditionEncoder(**meta["encoder"])
            encoder.load_state_dict(
                {k: v.float() for k, v in load_file(str(folder / LEGACY_ENCODER_FILE)).items()}, strict=True
            )
        except (KeyError, TypeError, RuntimeError, OSError) as exc:
            raise ValueError(f"{folder / LEGACY_ENCODER_FILE} does not match {LEGACY_ENCODER_JSON}: {exc}") from exc
        scheduler_config = dict(make_scheduler(
            "ddpm", num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type).config)
        log.info("%s is a legacy generator folder (no %s/): its schedule is rebuilt from the linear-beta constants "
                 "it was trained with; save_generator writes the new layout", folder, SCHEDULER_DIR)
    else:
        cfg, image_size = _generator_config(
            _read_json(folder / GENERATOR_JSON, "the generator folder is damaged"), folder / GENERATOR_JSON)
        scheduler_config = _load_scheduler_config(folder)
        if not (folder / ENCODER_DIR / "config.json").exists():
            raise FileNotFoundError(f"{folder / ENCODER_DIR / 'config.json'} is missing: {folder} is incomplete")
        encoder = ConditionEncoder.from_pretrained(
            str(folder), subfolder=ENCODER_DIR, local_files_only=True, torch_dtype=torch.float32)
    unet = UNet2DModel.from_pretrained(
        str(folder), subfolder=UNET_DIR, local_files_only=True, torch_dtype=torch.float32)
    set_contiguous_attention(unet)
    model = ConditionalUNet(unet, encoder, generator_config=cfg, image_size=image_size,
                            scheduler_config=scheduler_config).to(device)
    model.train()
    return model, sidecar
