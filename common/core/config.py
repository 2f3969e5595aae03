"""Frozen run configuration, named presets and validation.

Read once at the edge (CLI or ``Context.run_config``) with :meth:`RunConfig.from_flat`, then passed down.
Presets are Python objects (``smoke``, ``demo``, ``paper``); overrides are flat kebab-case keys, the
same names as ``[tool.flwr.app.config]`` (which declares every field, see :func:`run_config_declaration`) and
``flwr run --run-config "k=v"``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping, get_args

from common.core.errors import ConfigError
from common.core.records import PLANE_INDEX, PLANES

DataSource = Literal["phantom", "african", "fetal_planes_db", "hc18"]
PartitionKind = Literal["natural", "iid", "dirichlet", "quantity"]
FinetuneMode = Literal["lora", "subset", "full"]
GradSampleMode = Literal["hooks", "functorch", "ghost"]
OptimizerName = Literal["adam", "adamw", "sgd"]
DownstreamBackbone = Literal["phantom_cnn", "public_cnn", "public_size_cnn", "scattering", "cnn"]
# the shipped frozen encoders: backbone name -> its folder in common/assets (common.models.assets.asset_folder)
ENCODER_FOLDERS: dict[str, str] = {"phantom_cnn": "phantom-encoder", "public_cnn": "public-encoder",
                                   "public_size_cnn": "public-size-encoder"}
# the encoders that have seen FETAL_PLANES_DB images (their encoder.json lists them): never scored on that dataset
SAW_FETAL_PLANES_DB: tuple[str, ...] = ("public_cnn", "public_size_cnn")
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "trimmedmean", "krum"]
SchedulerName = Literal["ddpm", "ddim", "dpmsolver"]
PredictionType = Literal["epsilon", "v_prediction"]
AccountantName = Literal["rdp", "prv"]
AcquisitionName = Literal["uncertainty", "kcenter", "random"]
# Strategies whose server step needs only the (weighted) sum of the updates: the ones secure aggregation allows.
SECAGG_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam")
PESource = Literal["phantom", "generator", "both"]


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ConfigError(f"{name}={value!r} is out of range; allowed: [{lo_s}, {hi_s}]")


def _not_finite(name: str, value: Any) -> ConfigError:
    """NaN or infinity passes every range check (all its comparisons are false): refused by name instead."""
    off = " or 'none' to turn DP off" if name.endswith(("target-epsilon", "target_epsilon")) else ""
    return ConfigError(f"{name}={value!r} is not a finite number (NaN and infinity are refused); give a finite "
                       f"value{off}")


def _check_finite(section: str, values: Any) -> None:
    """Every float field of the section ``values`` is finite."""
    for f in fields(values):
        value = getattr(values, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise _not_finite(f"{section}.{f.name}", value)


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_literal(section: Any, prefix: str, name: str) -> None:
    """Check a ``Literal``-typed field against the choices its annotation declares (stated once, in the type)."""
    allowed = get_args(_field_types(type(section))[name])
    if not allowed:
        raise TypeError(f"{type(section).__name__}.{name} is not Literal-typed")
    _check_choice(f"{prefix}.{name}", getattr(section, name), allowed)


@dataclass(frozen=True)
class DataConfig:
    """Where the sites' data comes from and how it is split among them."""

    source: DataSource = "phantom"
    root: str = ""  # folder of a real dataset (e.g. ../shared/data/african_fetal_planes); unused for phantoms
    image_size: int = 64
    num_sites: int = 2
    partition: PartitionKind = "natural"
    dirichlet_alpha: float = 0.5
    images_per_site: int = 64  # phantom sites only
    test_fraction: float = 0.25
    public_images: int = 2048  # phantoms for the public prior
    # The consortium's label scope: the planes its sites have (comma-separated names from
    # common.core.records.PLANES; "" = all six, which the phantom simulator draws). Public, agreed by the
    # consortium: the plane classifier puts no probability outside it, a site's record outside it is refused at
    # load time, the evaluation reports per in-scope plane and the coordinator never asks for another plane.
    planes: str = ""

    def plane_scope(self) -> tuple[int, ...]:
        """Indices of the planes in ``planes`` (all planes when it is empty), in PLANES order."""
        names = [t.strip() for t in self.planes.split(",") if t.strip()]
        if not names:
            return tuple(range(len(PLANES)))
        unknown = [n for n in names if n not in PLANE_INDEX]
        if unknown:
            raise ConfigError(f"data.planes names unknown plane(s) {unknown}; use names from {list(PLANES)}, "
                              f"comma-separated, or '' for all")
        return tuple(sorted({PLANE_INDEX[n] for n in names}))

    def validate(self) -> None:
        self.plane_scope()
        _check_literal(self, "data", "source")
        _check_choice("data.image_size", self.image_size, (32, 64, 128))
        _check_range("data.num_sites", self.num_sites, 1, 64)
        _check_literal(self, "data", "partition")
        _check_range("data.dirichlet_alpha", self.dirichlet_alpha, 1e-3, 1e3)
        _check_range("data.images_per_site", self.images_per_site, 4, 1_000_000)
        _check_range("data.test_fraction", self.test_fraction, 0.05, 0.9)
        _check_range("data.public_images", self.public_images, 16, 10_000_000)
        if self.source != "phantom" and not self.root:
            raise ConfigError(f"data.root is empty; data.source={self.source!r} needs the dataset folder")


@dataclass(frozen=True)
class GeneratorConfig:
    """Conditional ``UNet2DModel`` and its DDPM training schedule."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False  # self-attention at the lowest resolution
    num_train_timesteps: int = 1000
    prediction_type: PredictionType = "epsilon"
    cond_dropout: float = 0.1  # probability of dropping each condition (classifier-free guidance)
    use_site_condition: bool = False
    max_sites: int = 16

    def validate(self) -> None:
        if not self.block_out_channels or any(c < 4 for c in self.block_out_channels):
            raise ConfigError("generator.block_out_channels must be a non-empty tuple of ints >= 4")
        _check_range("generator.layers_per_block", self.layers_per_block, 1, 4)
        _check_range("generator.num_train_timesteps", self.num_train_timesteps, 10, 4000)
        _check_literal(self, "generator", "prediction_type")
        _check_range("generator.cond_dropout", self.cond_dropout, 0.0, 0.9)
        _check_range("generator.max_sites", self.max_sites, 1, 1024)


@dataclass(frozen=True)
class SamplingConfig:
    """How synthetic images are drawn."""

    scheduler: SchedulerName = "dpmsolver"
    num_inference_steps: int = 20
    # Classifier-free guidance 3 (was 2): on the phantom demo the release at 3 is 0.789 +- 0.077 of train-on-real
    # against 0.743 +- 0.107 over seeds 3-8 (screen, then fresh seeds), the smallest site never worse; a tie on the
    # African preset (3 seeds); the sampler benchmark's FD 0.360 against 0.438 (README "Guidance 3 instead of 2")
    guidance_scale: float = 3.0

    def validate(self) -> None:
        _check_literal(self, "sampling", "scheduler")
        _check_range("sampling.num_inference_steps", self.num_inference_steps, 1, 4000)
        _check_range("sampling.guidance_scale", self.guidance_scale, 0.0, 20.0)


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD at each site (Opacus). ``target_epsilon=None`` turns DP off (public data only)."""

    target_epsilon: float | None = 10.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: AccountantName = "rdp"
    grad_sample_mode: GradSampleMode = "functorch"
    noise_multiplicity: int = 4  # K noise/timestep draws averaged per example before clipping (DPDM)
    # Fixed DP-SGD noise multiplier; None derives it from the target (epsilon, delta) and the planned steps.
    noise_multiplier: float | None = None
    # TEST/BENCHMARK ONLY. True seeds DP-SGD's sampling and noise from the public run seed instead of the site's
    # secret, so whoever knows the seed can subtract the noise: nothing it produces is private, and the ledger,
    # checkpoints and release certificates say so ("private_noise": false).
    insecure_reproducible_noise: bool = False
    # The site budget's split across the models that read private data: model m may spend budget_m * epsilon
    # (and budget_m * delta); the fractions are positive and sum to at most 1 (basic composition across models).
    budget_generator: float = 0.6
    budget_classifier: float = 0.2
    budget_regressor: float = 0.2
    # Distributed DP (Kairouz et al. 2021; DP-FedAvg accounting, McMahan et al. 2018), only with
    # federation.secure-aggregation: each site clips its round update (in units of its update bound) to L2 norm
    # distributed_clip and adds a discrete-Gaussian share of the noise, so the SecAgg+ sum carries the calibrated
    # noise once. Site-level (epsilon, target_delta): distributed_epsilon over the whole run against the server
    # (common/privacy/distributed_dp.py states the guarantee when other sites collude). Independent of DP-SGD above.
    # The clip is in bound units: an update moving all d parameters by their whole bound has norm ~1.05 sqrt(d).
    distributed_dp: bool = False
    distributed_epsilon: float = 10.0
    distributed_clip: float = 10.0
    # Example-level distributed DP for the plane classifier, only with federation.secure-aggregation (Kairouz et al.
    # 2021 on DP-FedSGD): instead of per-site DP-SGD, each federated round runs distributed_steps SecAgg+ sub-rounds;
    # in each, every site sends the sum of its per-example classifier gradients (each clipped to max_grad_norm) plus
    # its discrete-Gaussian share of the noise, the secure sum carries the noise once, and the server takes an Adam
    # step (rate distributed_lr) on it. The classifier's share of the site budget is then its CENTRAL epsilon (against
    # the server and anyone who sees only sums); the ledger also reports the site's LOCAL epsilon (its own share,
    # when the server and every other site collude). distributed_max_examples is the public cap of a site's training
    # examples (it sets SecAgg+'s integer grid; a site with more refuses with a clear error).
    distributed_classifier: bool = False
    # 7 steps a round x 3 rounds at Adam 0.1: grouped inner CV on the whole African training split at the African
    # preset's classifier epsilon (3.9) picked (20, 0.1), (10, 0.1), (40, 0.03) for three noise seeds
    # (`python -m simulations.experiments.distributed_utility --choose 3.9`, distributed_classifier_choice_eps3.9.json)
    distributed_steps: int = 7
    distributed_lr: float = 0.1
    distributed_max_examples: int = 256
    # The fewest sites' noise shares any unmasked sum may hold, as a fraction of data.num-sites (t = ceil(f N), >= 2):
    # the classifier's SecAgg+ sub-rounds unmask only sums of >= t sites (Flower's reconstruction threshold), each
    # site declines a sub-round that sampled fewer, and the noise is calibrated so that a sum of t shares already
    # meets the enforced central epsilon (noise x sqrt(N / t) when all N are in). 1.0: no dropout is survived in a
    # sub-round (it halts and changes nothing), and no noise is added for dropouts.
    distributed_min_shares: float = 1.0
    # The share of the private-evolution votes (the site's fourth mechanism: noisy nearest-candidate histograms,
    # common/privacy/votes.py). 0 = the site casts no votes (and its ledger has no "votes" key); > 0 needs the other
    # shares lowered so that all four still sum to at most 1.
    budget_votes: float = 0.0
    # Fixed noise multiplier of the votes (noise std / sensitivity); None derives it from the votes' budget and the
    # votes planned for the whole run (federation.pe-iterations per query round).
    vote_noise_multiplier: float | None = None

    def budget_split(self) -> dict[str, float]:
        """Fraction of the site budget per model key (what the site's ledger enforces); "votes" only when > 0."""
        split = {"generator": self.budget_generator, "classifier": self.budget_classifier,
                 "regressor": self.budget_regressor}
        if self.budget_votes > 0:
            split["votes"] = self.budget_votes
        return split

    def validate(self) -> None:
        _check_range("privacy.budget_votes", self.budget_votes, 0.0, 1.0)
        for model, fraction in self.budget_split().items():
            _check_range(f"privacy.budget_{model}", fraction, 1e-6, 1.0)
        if sum(self.budget_split().values()) > 1.0 + 1e-9:
            raise ConfigError(f"privacy.budget_generator + budget_classifier + budget_regressor + budget_votes = "
                              f"{sum(self.budget_split().values()):.6g} > 1: the models' shares of the site budget "
                              "must sum to at most 1")
        if self.vote_noise_multiplier is not None:
            _check_range("privacy.vote_noise_multiplier", self.vote_noise_multiplier, 0.05, 1e4)
        if self.target_epsilon is not None:
            _check_range("privacy.target_epsilon", self.target_epsilon, 0.01, 1000.0)
        _check_range("privacy.target_delta", self.target_delta, 1e-12, 0.1)
        _check_range("privacy.max_grad_norm", self.max_grad_norm, 1e-4, 1e4)
        _check_literal(self, "privacy", "accountant")
        _check_literal(self, "privacy", "grad_sample_mode")
        _check_range("privacy.noise_multiplicity", self.noise_multiplicity, 1, 64)
        if self.grad_sample_mode == "ghost" and self.noise_multiplicity > 1:
            raise ConfigError(
                "privacy.grad_sample_mode='ghost' cannot be combined with privacy.noise_multiplicity > 1 (Opacus' ghost "
                "clipping does not support the repeated layer calls it needs); use 'functorch' or set it to 1"
            )
        if self.noise_multiplier is not None:
            _check_range("privacy.noise_multiplier", self.noise_multiplier, 0.05, 100.0)
        _check_range("privacy.distributed_epsilon", self.distributed_epsilon, 0.01, 1000.0)
        _check_range("privacy.distributed_clip", self.distributed_clip, 1e-3, 1e6)
        _check_range("privacy.distributed_steps", self.distributed_steps, 1, 10_000)
        _check_range("privacy.distributed_lr", self.distributed_lr, 1e-6, 10.0)
        _check_range("privacy.distributed_max_examples", self.distributed_max_examples, 1, 100_000)
        _check_range("privacy.distributed_min_shares", self.distributed_min_shares, 0.01, 1.0)
        if self.distributed_classifier and self.distributed_dp:
            raise ConfigError("privacy.distributed_classifier=true with privacy.distributed_dp=true: choose one unit "
                              "of distributed DP (example-level for the classifier, or site-level on the whole "
                              "round update)")
        if self.distributed_classifier and self.target_epsilon is None:
            raise ConfigError("privacy.distributed_classifier=true needs privacy.target_epsilon: the classifier's "
                              "share of it is the central epsilon its noise is calibrated for")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation at a site (per federated round) and for the public prior."""

    batch_size: int = 16
    lr: float = 1e-3
    local_steps: int = 10
    finetune: FinetuneMode = "lora"
    lora_rank: int = 8
    # The classifier's and regressor's backbone: "phantom_cnn" (the shipped encoder trained on public phantoms,
    # frozen: the default, chosen by grouped CV on the African training split, see README), "public_cnn" (the same
    # encoder trained on phantoms + public labelled real scans, FETAL_PLANES_DB images: the African preset's
    # backbone; refused on FETAL_PLANES_DB data), "public_size_cnn" (the same data, plus the phantoms' apparent
    # anatomy size as a second objective: the HC18 preset's backbone; refused on FETAL_PLANES_DB data too),
    # "scattering" (frozen wavelet scattering) or "cnn" (trained end to end). With a frozen backbone only the heads
    # train.
    downstream_backbone: DownstreamBackbone = "phantom_cnn"
    downstream_width: int = 32  # CNN backbone channels
    downstream_hidden: int = 0  # hidden units of the heads on a frozen backbone (0: linear heads)
    scattering_j: int = 2  # scattering scales (the maps are image/2^J px)
    scattering_grid: int = 4  # scattering features averaged over a grid x grid partition
    downstream_optimizer: OptimizerName = "adam"
    downstream_lr: float = 0.1  # the classifier's rate (Adam on a zero-initialised linear head)
    regressor_lr: float = 0.005  # the GA regressor's (chosen by patient-grouped CV on HC18: 0.05 diverges at eps=10)
    downstream_steps: int = 50
    # Whether the GA regressor's spacing FiLM trains (false: it stays at its zero init and only the head trains, 390
    # instead of 1,540 weights on a 192-feature encoder). Under DP noise each noise-dominated weight takes Adam steps
    # of about lr whatever the noise's size, so weights that carry little signal add error; the HC18 preset freezes it
    # (patient-grouped CV, README "Why Adam stalls").
    regressor_film: bool = True
    # expected batch of the classifier's and regressor's DP-SGD steps (Poisson rate q = batch / site size): heads on
    # frozen features are cheap, so this is a privacy/accuracy setting, not a memory one (the generator uses batch_size)
    downstream_batch_size: int = 16
    pretrain_steps: int = 2000
    pretrain_batch_size: int = 32
    # Which downstream models a site trains on the shared release besides its own images (comma-separated from
    # "classifier", "regressor"; "none"): the selection flowing back into the models. A synthetic image has no
    # pixel spacing (the generator is not conditioned on it), so for a GA read off apparent size its label is
    # weaker than a real one; the HC18 preset leaves the regressor out and the African preset the classifier (each
    # chosen by CV on the training split, simulations.experiments.release_in_heads, README).
    release_models: str = "classifier,regressor"

    def trains_on_release(self, model_key: str) -> bool:
        """Whether ``model_key`` ("classifier" or "regressor") trains on the shared release too."""
        return model_key in self.release_model_keys()

    def release_model_keys(self) -> tuple[str, ...]:
        if self.release_models.strip() == "none":
            return ()
        keys = tuple(t.strip() for t in self.release_models.split(",") if t.strip())
        unknown = [k for k in keys if k not in ("classifier", "regressor")]
        if unknown or not keys:
            raise ConfigError(f"train.release_models={self.release_models!r}; use 'classifier', 'regressor', both "
                              f"comma-separated, or 'none'")
        return keys

    def rate(self, model_key: str) -> tuple[float, OptimizerName]:
        """``(learning rate, optimizer)`` a site, the server and the pretraining use for ``model_key``."""
        if model_key == "generator":
            return self.lr, "adam"
        if model_key == "classifier":
            return self.downstream_lr, self.downstream_optimizer
        if model_key == "regressor":
            return self.regressor_lr, self.downstream_optimizer
        raise ValueError(f"model_key={model_key!r} is not generator, classifier or regressor")

    def batch_for(self, model_key: str) -> int:
        """Expected batch size of ``model_key``'s steps (generator: ``batch_size``; heads: ``downstream_batch_size``)."""
        self.rate(model_key)  # the same check of the key
        return self.batch_size if model_key == "generator" else self.downstream_batch_size

    def validate(self) -> None:
        _check_range("train.batch_size", self.batch_size, 1, 4096)
        _check_range("train.lr", self.lr, 1e-7, 1.0)
        _check_range("train.local_steps", self.local_steps, 1, 100_000)
        _check_literal(self, "train", "finetune")
        _check_range("train.lora_rank", self.lora_rank, 1, 256)
        _check_literal(self, "train", "downstream_backbone")
        _check_range("train.downstream_width", self.downstream_width, 4, 512)
        _check_range("train.downstream_hidden", self.downstream_hidden, 0, 4096)
        _check_range("train.scattering_j", self.scattering_j, 1, 5)
        _check_range("train.scattering_grid", self.scattering_grid, 1, 8)
        _check_literal(self, "train", "downstream_optimizer")
        _check_range("train.downstream_lr", self.downstream_lr, 1e-7, 100.0)
        _check_range("train.regressor_lr", self.regressor_lr, 1e-7, 100.0)
        _check_range("train.downstream_steps", self.downstream_steps, 0, 100_000)
        _check_range("train.downstream_batch_size", self.downstream_batch_size, 1, 4096)
        self.release_model_keys()
        _check_range("train.pretrain_steps", self.pretrain_steps, 0, 10_000_000)
        _check_range("train.pretrain_batch_size", self.pretrain_batch_size, 1, 4096)


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, strategy and active-learning cadence."""

    num_rounds: int = 3
    strategy: StrategyName = "fedavg"
    fraction_train: float = 1.0
    min_sites: int = 1  # sites that must be connected before a round starts (deployment)
    reply_timeout_s: float = 3600.0  # how long a round waits for replies before going on without a site
    # The server's sample grid (figures/samples-round-NNN.png, every plane in scope x 3 GA values, drawn with the run's
    # sampler): after the last round, and every k rounds before it (0: the last round only). A 64 px demo grid costs
    # about 20 s of a 130 s round on 2 cores, so by default a run draws it once; the report shows the last one.
    sample_grid_every: int = 0
    # FedProx's mu: each site's local objective gets (mu/2)·||w - w_global||² (w_global: the weights it received
    # this round). > 0 exactly when strategy is "fedprox"; its gradient bypasses DP-SGD's noise (no privacy cost).
    proximal_mu: float = 0.0
    trimmed_beta: float = 0.2
    # FedAdam's server optimizer (Reddi et al. 2021) on each round's averaged update: eta is its learning rate, in
    # weight units (a round moves each weight by about eta while the updates keep their sign); tau its adaptivity,
    # added to sqrt(v) (larger tau: closer to plain server momentum). Both > 0; used by strategy "fedadam" only.
    fedadam_eta: float = 1e-2
    fedadam_tau: float = 1e-3
    al_every: int = 0  # run a coordinator query every k rounds (0: never)
    al_candidates_per_site: int = 16
    al_select: int = 16
    al_acquisition: AcquisitionName = "kcenter"
    al_balance: bool = True  # balance the selection across plane x GA bins
    al_quality_threshold: float = 0.3  # minimum classifier confidence in the requested plane
    al_refine_steps: int = 0  # server-side generator refinement steps on the release (post-processing, no DP cost)
    al_downstream_steps: int = 0  # server-side classifier/regressor steps on the release (public data, no DP cost)
    al_memorization_check: bool = False  # sites filter near-copies of private images (NOT covered by DP)
    al_max_reply_bytes: int = 16 * 1024 * 1024
    # Secure aggregation through Flower's SecAgg+ (server/secure_aggregation.py): the server sees only the sum of
    # the sites' updates. secagg_shares: fraction of the sampled sites that hold shares of each site's secrets
    # (Flower's num_shares); secagg_threshold: fraction of those shares that reconstructs a secret (Flower's
    # reconstruction_threshold: a round survives while every site keeps that many live neighbours, fails below).
    # secagg_max_weight: the largest num-examples a site may weight its update with (integer; the quantization
    # step of a site's update grows with max_weight / its num-examples).
    secure_aggregation: bool = False
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    secagg_max_weight: float = 1000.0
    # Private evolution (common/active_learning/evolution.py): > 0 replaces the acquisition selection of a query
    # round by this many vote -> keep winners -> variations iterations; each is one noisy vote per site
    # (privacy.budget-votes). pe_population candidates per iteration, pe_keep winners kept per plane x GA bin;
    # pe_source: who proposes candidates (phantom simulator parameters, the shared DP generator, or both).
    pe_iterations: int = 0
    pe_population: int = 24
    pe_keep: int = 2
    pe_source: PESource = "phantom"
    pe_class_aware: bool = True  # a private image votes only among the candidates of its own plane
    pe_votes_per_image: int = 1  # top-k votes (sensitivity sqrt(k))
    pe_strength_start: float = 0.7  # SDEdit strength of the generator's variations, first iteration ...
    pe_strength_end: float = 0.3  # ... and last (linear in between)
    pe_threshold: float = 0.0  # noisy counts below threshold x the summed noise std count as 0 (PE's H)

    def validate(self) -> None:
        _check_range("federation.num_rounds", self.num_rounds, 1, 10_000)
        _check_literal(self, "federation", "strategy")
        _check_range("federation.fraction_train", self.fraction_train, 0.01, 1.0)
        _check_range("federation.min_sites", self.min_sites, 1, 10_000)
        _check_range("federation.reply_timeout_s", self.reply_timeout_s, 1.0, 7 * 86400.0)
        _check_range("federation.sample_grid_every", self.sample_grid_every, 0, 10_000)
        _check_range("federation.proximal_mu", self.proximal_mu, 0.0, 100.0)
        if self.strategy == "fedprox" and self.proximal_mu == 0:
            raise ConfigError("federation.strategy='fedprox' needs federation.proximal_mu > 0 (the weight mu of the "
                              "proximal term (mu/2)·||w - w_global||² at the sites; with 0 it is FedAvg): set e.g. "
                              "federation.proximal-mu=0.01")
        if self.strategy != "fedprox" and self.proximal_mu != 0:
            raise ConfigError(f"federation.proximal_mu={self.proximal_mu!r} adds FedProx's proximal term to the sites' "
                              f"local training, but federation.strategy={self.strategy!r}: use "
                              f"federation.strategy=fedprox, or set federation.proximal-mu=0")
        _check_range("federation.trimmed_beta", self.trimmed_beta, 0.0, 0.49)
        _check_range("federation.fedadam_eta", self.fedadam_eta, 1e-7, 10.0)
        _check_range("federation.fedadam_tau", self.fedadam_tau, 1e-12, 10.0)
        _check_range("federation.al_every", self.al_every, 0, 10_000)
        _check_range("federation.al_candidates_per_site", self.al_candidates_per_site, 1, 100_000)
        _check_range("federation.al_select", self.al_select, 1, 1_000_000)
        _check_literal(self, "federation", "al_acquisition")
        _check_range("federation.al_quality_threshold", self.al_quality_threshold, 0.0, 1.0)
        _check_range("federation.al_refine_steps", self.al_refine_steps, 0, 100_000)
        _check_range("federation.al_downstream_steps", self.al_downstream_steps, 0, 100_000)
        _check_range("federation.al_max_reply_bytes", self.al_max_reply_bytes, 1024, 2**31)
        _check_range("federation.secagg_shares", self.secagg_shares, 0.01, 1.0)
        _check_range("federation.secagg_threshold", self.secagg_threshold, 0.01, 1.0)
        _check_range("federation.secagg_max_weight", self.secagg_max_weight, 1.0, 2.0**20)
        if not float(self.secagg_max_weight).is_integer():
            raise ConfigError(f"federation.secagg_max_weight={self.secagg_max_weight!r} must be a whole number (a "
                              "site's weight is its integer num-examples)")
        if self.secure_aggregation and self.strategy not in SECAGG_STRATEGIES:
            raise ConfigError(
                f"federation.secure_aggregation=true with federation.strategy={self.strategy!r}: the robust "
                "aggregators (median, trimmed mean, Krum) need each site's update, and under secure aggregation the "
                f"server sees only their sum; use one of {list(SECAGG_STRATEGIES)}, or secure_aggregation=false")
        _check_range("federation.pe_iterations", self.pe_iterations, 0, 1000)
        _check_range("federation.pe_population", self.pe_population, 2, 100_000)
        _check_range("federation.pe_keep", self.pe_keep, 1, 10_000)
        _check_literal(self, "federation", "pe_source")
        _check_range("federation.pe_votes_per_image", self.pe_votes_per_image, 1, 64)
        _check_range("federation.pe_strength_start", self.pe_strength_start, 0.0, 1.0)
        _check_range("federation.pe_strength_end", self.pe_strength_end, 0.0, 1.0)
        _check_range("federation.pe_threshold", self.pe_threshold, 0.0, 100.0)

    def draws_sample_grid(self, server_round: int) -> bool:
        """Whether the server draws its sample grid after ``server_round``: the last round, and every k-th."""
        every = self.sample_grid_every
        return server_round >= self.num_rounds or (every > 0 and server_round % every == 0)

    def planned_votes(self) -> int:
        """Vote queries a site answers over the whole run: pe_iterations per query round (the votes' plan)."""
        if self.pe_iterations == 0 or self.al_every == 0:
            return 0
        return (self.num_rounds // self.al_every) * self.pe_iterations


_SECTIONS = ("data", "generator", "sampling", "privacy", "train", "federation")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; frozen, validated, JSON round-trippable."""

    preset: str = "demo"
    seed: int = 0
    run_dir: str = ""
    # Starting weights: "" = fresh init from `seed`; "shipped" = the preset's prior in common/assets/;
    # otherwise a prior or checkpoint folder written by `difusal pretrain`.
    prior: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def __post_init__(self) -> None:
        _check_range("seed", self.seed, 0, 2**32 - 1)
        for name in _SECTIONS:
            _check_finite(name, getattr(self, name))
        for name in _SECTIONS:
            getattr(self, name).validate()
        fed = self.federation
        if fed.secure_aggregation and self.data.num_sites < 2:
            raise ConfigError(f"federation.secure_aggregation=true needs data.num_sites >= 2 (SecAgg+ sums the "
                              f"updates of at least two sites), got {self.data.num_sites}")
        if self.privacy.distributed_dp and not fed.secure_aggregation:
            raise ConfigError("privacy.distributed_dp=true needs federation.secure_aggregation=true: each site adds "
                              "only its share of the noise, which protects it only inside a secure sum")
        if fed.fraction_train < 1 and (self.privacy.distributed_dp or self.privacy.distributed_classifier):
            raise ConfigError(f"federation.fraction_train={fed.fraction_train:g} with distributed DP: the sites' noise "
                              "shares are calibrated so that the sum holds every site's share; a sampled fraction "
                              "leaves it fewer shares, hence less noise than the stated central epsilon assumes; set "
                              "federation.fraction-train=1, or privacy.distributed-dp=false and "
                              "privacy.distributed-classifier=false")
        if self.privacy.distributed_classifier and not fed.secure_aggregation:
            raise ConfigError("privacy.distributed_classifier=true needs federation.secure_aggregation=true: each site "
                              "adds only its share of the noise, which protects it only inside a secure sum")
        if self.privacy.distributed_classifier and len(self.data.plane_scope()) < 2:
            raise ConfigError("privacy.distributed_classifier=true with a one-plane label scope (data.planes): the "
                              "classifier has nothing to learn; set it to false")
        if self.federation.pe_iterations > 0 and self.privacy.target_epsilon is not None \
                and self.privacy.budget_votes == 0:
            raise ConfigError("federation.pe_iterations > 0 asks the sites for private votes, but privacy.budget_votes "
                              "is 0: give the votes a share of the site budget (e.g. privacy.budget-votes=0.2 with "
                              "privacy.budget-generator=0.4)")
        mu, t = self.federation.proximal_mu, self.train
        if t.downstream_backbone in SAW_FETAL_PLANES_DB and self.data.source == "fetal_planes_db":
            raise ConfigError(f"train.downstream_backbone={t.downstream_backbone!r} was trained on FETAL_PLANES_DB "
                              f"images (common/assets/{ENCODER_FOLDERS[t.downstream_backbone]}/encoder.json lists "
                              "them): its scores on that dataset "
                              "would not be held out; use train.downstream-backbone=phantom_cnn")
        if mu > 0 and t.downstream_optimizer == "sgd":
            # FedProx's term is a plain gradient step mu*(w - w_global): with SGD at rate lr it scales the distance to
            # w_global by (1 - lr*mu) each step, which diverges once lr*mu >= 2 (and oscillates from 1 on).
            worst = max(t.downstream_lr, t.regressor_lr)
            if worst * mu >= 1:
                raise ConfigError(f"federation.proximal_mu={mu:g} with SGD at train.downstream_lr={t.downstream_lr:g} "
                                  f"/ train.regressor_lr={t.regressor_lr:g}: lr*mu = {worst * mu:g} >= 1 makes the "
                                  f"proximal step overshoot w_global; lower mu below {1 / worst:g} or the rates")

    # -- conversion ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON-safe)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_flat(self) -> dict[str, Any]:
        """Flat kebab-case dict (``"train.local-steps": 10``), the form of ``run_config``."""
        out: dict[str, Any] = {
            "preset": self.preset, "seed": self.seed, "run-dir": self.run_dir, "prior": self.prior,
        }
        for name in _SECTIONS:
            for f in fields(getattr(self, name)):
                value = getattr(getattr(self, name), f.name)
                if isinstance(value, tuple):
                    value = ",".join(str(v) for v in value)
                out[f"{name}.{f.name.replace('_', '-')}"] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict`; reads a config saved before the label scope moved to ``data.planes`` too
        (its ``federation.al_planes`` becomes ``data.planes``), and one saved before frozen downstream backbones
        (its models are end-to-end CNNs trained with Adam: ``train.downstream_backbone="cnn"``)."""
        kwargs: dict[str, Any] = {k: d[k] for k in ("preset", "seed", "run_dir", "prior") if k in d}
        legacy = dict(d.get("federation", {}))
        if "al_planes" in legacy:
            planes = legacy.pop("al_planes")
            d = {**d, "federation": legacy, "data": {"planes": planes, **dict(d.get("data", {}))}}
        train = dict(d.get("train", {}))
        if train and "downstream_backbone" not in train:  # saved before frozen backbones: end-to-end CNNs, Adam
            d = {**d, "train": {"downstream_backbone": "cnn", "downstream_optimizer": "adam",
                                "regressor_lr": train.get("downstream_lr", TrainConfig.downstream_lr), **train}}
        for name, sub_cls in _section_classes().items():
            sub = dict(d.get(name, {}))
            for f in fields(sub_cls):
                if f.name in sub and isinstance(sub[f.name], list):
                    sub[f.name] = tuple(sub[f.name])
            unknown = set(sub) - {f.name for f in fields(sub_cls)}
            if unknown:
                raise ConfigError(f"unknown {name} fields {sorted(unknown)}")
            kwargs[name] = sub_cls(**sub)
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Every field as Flower run-config values (``bool``, ``int``, ``float``, ``str``), keyed as
        ``[tool.flwr.app.config]`` declares them; :meth:`from_run_config` rebuilds this config exactly.

        ``None`` travels as ``"none"`` and a tuple as ``"1,2"`` (run-config values are scalars).
        """
        return {k: "none" if v is None else v for k, v in self.to_flat().items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config``.

        ``[tool.flwr.app.config]`` declares every field (:func:`run_config_declaration`), because
        ``flwr run --run-config`` only overrides declared keys. A declared default of ``""`` means "the preset's
        value"; ``resume`` is a launch flag, not part of the config. Unknown keys raise :class:`ConfigError`.
        """
        flat = {k: v for k, v in run_config.items() if k not in RUN_FLAGS and not (v == "" and "." in k)}
        return cls.from_flat(flat)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], preset: str | None = None) -> "RunConfig":
        """Build from a preset plus flat kebab-case overrides (``Context.run_config`` or CLI ``k=v``).

        Keys may be ``section.field`` (``train.local-steps``) or a short alias listed in
        :data:`ALIASES` (``num-server-rounds``). Unknown keys raise :class:`ConfigError`.
        """
        flat = dict(flat)
        name = str(flat.pop("preset", preset or "demo"))
        base = get_preset(name)
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for key, raw in flat.items():
            key = ALIASES.get(key, key)
            if key in ("seed", "run-dir", "prior"):
                top[key.replace("-", "_")] = _coerce(key, raw, getattr(base, key.replace("-", "_")))
                continue
            section, _, fname = key.partition(".")
            fname = fname.replace("-", "_")
            if section not in sections or fname not in {f.name for f in fields(getattr(base, section))}:
                raise ConfigError(f"unknown config key {key!r}; known keys: {sorted(base.to_flat())}")
            current = getattr(getattr(base, section), fname)
            sections[section][fname] = _coerce(key, raw, current)
        new = {s: replace(getattr(base, s), **v) for s, v in sections.items() if v}
        try:
            return replace(base, preset=name, **top, **new)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            raise ConfigError(str(exc)) from exc


# Short names used in ``[tool.flwr.app.config]`` and on the command line.
ALIASES: dict[str, str] = {
    "num-server-rounds": "federation.num-rounds",
    "num-sites": "data.num-sites",
    "strategy": "federation.strategy",
    "fraction-train": "federation.fraction-train",
    "local-steps": "train.local-steps",
    "epsilon": "privacy.target-epsilon",
    "image-size": "data.image-size",
    "data-source": "data.source",
    "data-root": "data.root",
    "al-every": "federation.al-every",
}


def parse_overrides(text: str) -> dict[str, str]:
    """Parse ``"a.b=1 c=x; d=2"`` into ``{"a.b": "1", "c": "x", "d": "2"}``."""
    out: dict[str, str] = {}
    for item in text.replace(";", " ").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


# Run-config keys that are launch flags of the ServerApp, not fields of :class:`RunConfig`.
RUN_FLAGS: tuple[str, ...] = ("resume",)


def _declared_defaults() -> dict[str, bool | int | float | str]:
    """The ``[tool.flwr.app.config]`` defaults: the top-level fields, then every section field as ``""``."""
    top: dict[str, bool | int | float | str] = {"preset": "smoke", "seed": 0, "run-dir": "", "prior": ""}
    sections = {k: "" for k in get_preset("smoke").to_flat() if k not in top}
    return {**top, **sections, "resume": False}


def run_config_declaration() -> str:
    """The TOML of ``[tool.flwr.app.config]`` (pyproject.toml holds exactly this; a test checks it)."""
    lines = ["[tool.flwr.app.config]"]
    defaults = _declared_defaults()
    lines += [f"{k} = {_toml_value(v)}" for k, v in defaults.items() if "." not in k]
    for section in _SECTIONS:
        lines += ["", f"[tool.flwr.app.config.{section}]"]
        prefix = f"{section}."
        lines += [f"{k[len(prefix):]} = {_toml_value(v)}" for k, v in defaults.items() if k.startswith(prefix)]
    return "\n".join(lines) + "\n"


def run_config_toml(cfg: "RunConfig", *, resume: bool) -> str:
    """``cfg`` as a TOML file for ``flwr run --run-config <file>.toml``: every field, quoting-safe.

    Strings are written as TOML basic strings (JSON escapes are valid TOML), so a data root with spaces,
    quotes or ``=`` survives the trip.
    """
    values = {**cfg.to_run_config(), "resume": resume}
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in values.items())


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def _section_classes() -> dict[str, type]:
    return {
        "data": DataConfig,
        "generator": GeneratorConfig,
        "sampling": SamplingConfig,
        "privacy": PrivacyConfig,
        "train": TrainConfig,
        "federation": FederationConfig,
    }


def _coerce(key: str, raw: Any, current: Any) -> Any:
    """Coerce a flat override to the type of the field's current value."""
    if raw is None and (current is None or key.endswith(("target-epsilon", "noise-multiplier"))):
        return None
    if isinstance(raw, str) and raw.lower() in ("none", "null", "off") and (
        current is None or key.endswith(("target-epsilon", "noise-multiplier"))
    ):
        return None
    try:
        if isinstance(current, bool):
            if isinstance(raw, str):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                return raw.lower() in ("true", "1")
            return bool(raw)
        if isinstance(current, tuple):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(int(x) for x in items)
        if isinstance(current, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if not (isinstance(current, float) or current is None):
            return str(raw)
        number = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key {key!r}: cannot read {raw!r} as {type(current).__name__}"
        ) from None
    if not math.isfinite(number):
        raise _not_finite(key, raw)
    return number


def _smoke() -> RunConfig:
    return RunConfig(
        preset="smoke",
        data=DataConfig(image_size=32, num_sites=2, images_per_site=24, public_images=64),
        generator=GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100),
        sampling=SamplingConfig(num_inference_steps=4),
        privacy=PrivacyConfig(noise_multiplicity=2),
        train=TrainConfig(
            batch_size=8, local_steps=2, lora_rank=4, downstream_width=8, downstream_steps=2, pretrain_steps=10,
            pretrain_batch_size=8,
        ),
        federation=FederationConfig(num_rounds=1, al_candidates_per_site=4, al_select=4, al_quality_threshold=0.0),
    )


def _demo() -> RunConfig:
    return RunConfig(
        preset="demo",
        # 32x32, the research preset of the phantom studies (README); `difusal demo` runs demo64 below.
        data=DataConfig(image_size=32, num_sites=3, images_per_site=96, partition="dirichlet"),
        generator=GeneratorConfig(block_out_channels=(32, 64, 64)),
        sampling=SamplingConfig(num_inference_steps=20),
        privacy=PrivacyConfig(target_epsilon=10.0, noise_multiplicity=4),
        train=TrainConfig(batch_size=16, local_steps=8),
        federation=FederationConfig(num_rounds=3, al_every=1, al_candidates_per_site=16, al_select=24),
    )


def _demo64() -> RunConfig:
    """What `difusal demo` runs: the demo at 64 px, about 5 minutes on 2 cores.

    The 64 px release teaches more (0.894 +- 0.082 of train-on-real over seeds 3-8 against 0.789 +- 0.077 at 32 px,
    README "The phantom demo's release at 64 px"); at the demo's 32 px settings it took 9-10 minutes. Two noise draws
    per example instead of 4 (privacy.noise-multiplicity; the accounting does not depend on it) and 12 DPM-Solver++
    steps instead of 20 bring it to 5 minutes (README "The demo at 64 px in 5 minutes": the release's share of
    train-on-real over the same six seeds with these settings).
    """
    base = _demo()
    return replace(base, preset="demo64", data=replace(base.data, image_size=64),
                   sampling=replace(base.sampling, num_inference_steps=12),
                   privacy=replace(base.privacy, noise_multiplicity=2))


def _paper() -> RunConfig:
    return RunConfig(
        preset="paper",
        data=DataConfig(image_size=128, num_sites=5, images_per_site=2000, public_images=50_000),
        generator=GeneratorConfig(block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention=True),
        sampling=SamplingConfig(num_inference_steps=50),
        privacy=PrivacyConfig(target_epsilon=10.0, noise_multiplicity=8),
        train=TrainConfig(batch_size=64, local_steps=100, lora_rank=16, downstream_steps=200,
                          pretrain_steps=100_000, pretrain_batch_size=128),
        federation=FederationConfig(num_rounds=50, al_every=5, al_candidates_per_site=256, al_select=512),
    )


PRESETS = {"smoke": _smoke, "demo": _demo, "demo64": _demo64, "paper": _paper}

# Data presets: how each source is split into sites, applied on top of a size preset (``--data african``).
# Real sources need ``data.root`` (the dataset folder in its published layout). Real scans run at REAL_IMAGE_SIZE px
# at least (a size preset above it, e.g. paper's 128, keeps its own): at 32 px a head's outline or a femur is a few
# pixels, and `--prior shipped` then loads the preset's 64 px prior (common/assets/prior-demo64).
REAL_IMAGE_SIZE = 64
DATA_PRESETS: dict[str, dict[str, str]] = {
    "phantom": {"data.source": "phantom"},  # the size preset's phantom sites (scanner profiles + its label skew)
    # one site per country (`Center`); the public African set has the four fetal planes only
    "african": {"data.source": "african", "data.partition": "natural",
                "data.planes": "fetal_brain,fetal_abdomen,fetal_femur,fetal_thorax",
                # features that have seen public real scans (another country's): see README "Which features?"
                "train.downstream-backbone": "public_cnn",
                # no African image has a gestational age: the regressor never touches the sites' data (local_update
                # trains it on the public release alone, without DP), so its share goes to the classifier (the
                # HC18 preset's mirror image)
                "privacy.budget-classifier": "0.39", "privacy.budget-regressor": "0.01",
                # the classifier trains on the sites' images only: in the product's shape (3 rounds x 50 steps, batch
                # 16, eps 3.9), pooling a run's release into every site's DP data cost 2.9-4.1 points, worse in 31 of
                # 45 fold x seed pairs over three runs' releases (case-grouped CV on the training split, README,
                # simulations.experiments.release_in_heads); the regressor still learns from the release alone
                "train.release-models": "regressor"},
    # one site per US_Machine; the dataset has all six planes (its "Other" and "Maternal cervix" included)
    "fetal_planes_db": {"data.source": "fetal_planes_db", "data.partition": "natural", "data.planes": ",".join(PLANES)},
    # one hospital's head scans, split by patient (grouped): every HC18 image is a brain plane, so the scope is
    # that one plane (the classifier is trivial there) and the release asks for brain planes across GA
    "hc18": {"data.source": "hc18", "data.partition": "iid", "data.planes": "fetal_brain",
             # the encoder that has seen public real scans (FETAL_PLANES_DB, never HC18) and was also trained to read
             # the phantoms' apparent anatomy size, with its public GA head (brain phantoms): the HC18 study's choice
             # by patient-grouped CV over the same folds and seeds (7.9 vs 9.2 days at eps 10), README "Which features?"
             "train.downstream-backbone": "public_size_cnn", "train.downstream-batch-size": "64",
             # the regressor's spacing FiLM stays at zero and Adam trains the head alone: under DP noise Adam turns
             # every weak-signal weight into a random walk of lr-sized steps whatever the epsilon, and the FiLM's
             # 1,150 weights are such. 6.82 +- 0.64 days against 7.09 +- 0.75 with the FiLM trained, paired -0.27 +-
             # 0.40, better in 10 of 15 fold x seed pairs (patient-grouped CV, eps 4, the product's shape; plain
             # DP-SGD did as well, 6.86, but the server's per-reply update bound holds for Adam only; README "Why
             # Adam stalls")
             "train.regressor-film": "false", "train.regressor-lr": "0.003",
             # local steps per round (the regressor's: the classifier does not train here): 200 had the lowest
             # inner-CV error of 50 / 100 / 200 in the product's shape (3 rounds, eps 4, public_size_cnn; README)
             "train.downstream-steps": "200",
             # one plane in scope: the classifier never trains (local_update skips it), so its share goes to GA
             "privacy.budget-classifier": "0.01", "privacy.budget-regressor": "0.39",
             # the GA regressor trains on the sites' images only: adding a run's release (no pixel spacing) to its DP
             # data cost 0.24 +- 0.59 days, worse in 12 of 15 fold x seed pairs (patient-grouped CV, README)
             "train.release-models": "classifier"},
}


def data_preset(name: str, root: str = "") -> dict[str, str]:
    """Flat overrides of the data preset ``name`` (plus ``data.root`` when given)."""
    if name not in DATA_PRESETS:
        raise ConfigError(f"data preset {name!r} is unknown; choose one of {sorted(DATA_PRESETS)}")
    out = dict(DATA_PRESETS[name])
    if name != "phantom":
        out["data.image-size"] = str(REAL_IMAGE_SIZE)
    if root:
        out["data.root"] = root
    elif name != "phantom":
        raise ConfigError(f"data preset {name!r} needs the dataset folder: pass --data-root PATH (the folder in the "
                          f"dataset's published layout)")
    return out


def get_preset(name: str) -> RunConfig:
    """Return the named preset (``smoke``, ``demo``, ``demo64`` or ``paper``)."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
