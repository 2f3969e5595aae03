"""DP-SGD step time over non-DP step time, per Opacus grad-sample mode, resolution and fine-tuning mode.

Everything runs side by side in one process on the same batch: a non-DP Adam step, then a DP step
(per-sample gradients, clipping, noise; Opacus ``make_private`` with ``wrap_model=False`` as
``common.privacy.dpsgd.train_private`` does) for each of ``functorch``, ``hooks`` and ``ghost``, for the whole
UNet and for LoRA r=8 (+ condition encoder); for LoRA also ``fused`` (the layers of
:mod:`common.privacy.fused_lora`, Opacus ``hooks`` mode with their low-rank grad sampler: what ``train_private``
runs for LoRA since the fused layers exist) and ``fused-non-dp``. Fixed batches (no Poisson sampling) so that every
timed step has the same size. Goal (issue #16): a LoRA r=8 DP step <= 1.0x the non-DP whole-model step.

    python -m simulations.benchmarks.dp_step_time --out runs/benchmarks
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from opacus import PrivacyEngine
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.core.config import GeneratorConfig
from common.diffusion.loss import make_loss_fn
from common.diffusion.schedulers import make_scheduler
from common.models.generator import build_generator
from common.models.lora import set_finetune_mode
from common.privacy.fused_lora import fused_lora
from simulations.benchmarks._common import parse_args, write_report

GOAL_RATIO = 1.0
MODES = ("functorch", "hooks", "ghost", "fused")
LORA_ONLY_MODES = ("fused", "fused-non-dp")


def _batch(size: int, batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((batch_size, 1, size, size), generator=gen) * 2 - 1,
            torch.randint(0, 6, (batch_size,), generator=gen), 14 + 26 * torch.rand(batch_size, generator=gen),
            torch.full((batch_size,), 0.3))


class _Case:
    """One (finetune, mode) training setup: its own model, optimiser and (for DP) Opacus hooks.

    ``mode`` ``"fused"`` is DP-SGD on the LoRA layers fused by :func:`common.privacy.fused_lora.fused_lora`
    (Opacus ``hooks`` mode with the low-rank grad sampler), as ``train_private`` runs LoRA; ``"fused-non-dp"`` the
    same layers without DP.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
                 batch: tuple[torch.Tensor, ...], mode: str | None) -> None:
        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.fused = contextlib.ExitStack()
        if mode in LORA_ONLY_MODES:
            self.fused.enter_context(fused_lora(model, per_sample=mode == "fused"))
            mode = "hooks" if mode == "fused" else None
        self.mode = mode
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.hooks: Any = None
        self.opt: Any = opt
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        if mode is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine = PrivacyEngine(accountant="rdp", secure_mode=False)
                made = engine.make_private(
                    module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(*batch),
                                                                        batch_size=len(batch[0])),
                    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
                    wrap_model=False,
                )
            self.hooks, self.opt = made[0], made[1]

    def step(self, *, record: bool) -> None:
        """One optimiser step (DP: per-sample grads, clip, noise), timed when ``record``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start, cpu_start = time.perf_counter(), time.process_time()
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model, self.batch)
            if self.mode == "ghost":  # norms pass + clipped pass (Li et al. 2022), as train_private does
                DPTensorFastGradientClipping(self.hooks, self.opt, loss, "mean").backward()
            else:
                loss.mean().backward()
            self.opt.step()
            if record:
                self.times.append(time.perf_counter() - start)
                self.cpu_times.append(time.process_time() - cpu_start)

    def close(self) -> None:
        """Remove the Opacus hooks."""
        if self.hooks is not None:
            self.hooks.cleanup()
        self.fused.close()


def run(out_dir: Path, *, sizes: Sequence[int], batch_size: int, rank: int, channels: tuple[int, ...],
        modes: Sequence[str], noise_multiplicity: int, warmup: int, timed: int, seed: int = 0) -> Path:
    """Time every (size, finetune, mode) case and write ``dp_step_time.json`` into ``out_dir``.

    Cases of one size are timed round-robin (one step of each case per round), so that a change of machine
    load during the run affects all of them alike; the figure is the median over rounds.
    """
    cfg = GeneratorConfig(block_out_channels=channels)
    scheduler = make_scheduler("ddpm", num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type)
    results: list[dict[str, Any]] = []
    for size in sizes:
        batch = _batch(size, batch_size, seed)
        cases: dict[tuple[str, str], _Case] = {}
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for finetune in ("full", "lora"):
            for mode in (None, *modes, *(("fused-non-dp",) if "fused" in modes else ())):
                if finetune != "lora" and mode in LORA_ONLY_MODES:
                    continue
                key = (finetune, mode or "non-dp")
                model = build_generator(cfg, image_size=size, seed=seed)
                info = set_finetune_mode(model, finetune, rank=rank)
                loss_fn = make_loss_fn(scheduler, noise_multiplicity=noise_multiplicity, cond_dropout=0.1, seed=seed)
                rows[key] = {"size": size, "finetune": finetune, "mode": key[1],
                             "trainable_params": info.trainable_params, "total_params": info.total_params}
                try:
                    cases[key] = _Case(model, loss_fn, batch, mode)
                    for _ in range(warmup):
                        cases[key].step(record=False)
                except Exception as exc:  # a mode that fails is a result, reported, not a crash
                    rows[key]["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    cases.pop(key, None)
        for _ in range(timed):
            for key, case in list(cases.items()):
                try:
                    case.step(record=True)
                except Exception as exc:
                    rows[key]["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    cases.pop(key).close()
        for key, case in cases.items():
            case.close()
            rows[key]["seconds_per_step"] = round(statistics.median(case.cpu_times), 4)
            rows[key]["wall_seconds_per_step"] = round(statistics.median(case.times), 4)
            rows[key]["all_cpu_seconds"] = [round(t, 4) for t in case.cpu_times]
        for (finetune, _), row in rows.items():
            for ref_key, name in (((finetune, "non-dp"), "ratio_vs_nondp_same_finetune"),
                                  (("full", "non-dp"), "ratio_vs_nondp_full")):
                ref = rows[ref_key].get("seconds_per_step")
                if ref and "seconds_per_step" in row:
                    row[name] = round(row["seconds_per_step"] / ref, 3)
            print(json.dumps(row), flush=True)
        results.extend(rows.values())
    lora_dp = [r for r in results if r["finetune"] == "lora" and "non-dp" not in r["mode"]
               and "ratio_vs_nondp_full" in r]
    return write_report(out_dir, "dp_step_time", {
        "setup": {"block_out_channels": list(channels), "batch_size": batch_size, "lora_rank": rank,
                  "noise_multiplicity": noise_multiplicity, "warmup_steps": warmup, "timed_steps": timed,
                  "optimizer": "adam", "poisson_sampling": False,
                  "timing": "seconds_per_step = median process CPU seconds per step (robust to other processes "
                            "on a shared machine; compare at torch_threads=1), wall_seconds_per_step = median wall "
                            "seconds; cases of one size interleaved round-robin"},
        "goal": {"lora_dp_over_nondp_full_max": GOAL_RATIO,
                 "best_lora_dp_ratio": {str(s): min((r["ratio_vs_nondp_full"] for r in lora_dp if r["size"] == s),
                                                    default=None) for s in sizes},
                 "met": {str(s): any(r["ratio_vs_nondp_full"] <= GOAL_RATIO for r in lora_dp if r["size"] == s)
                         for s in sizes}},
        "results": results,
    })


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--sizes", default="32,64", help="comma-separated image sizes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--channels", default="32,64,64", help="UNet block_out_channels (demo default)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--noise-multiplicity", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=5)
    args = parse_args(parser, argv)
    path = run(args.out, sizes=[int(s) for s in args.sizes.split(",")], batch_size=args.batch_size, rank=args.rank,
               channels=tuple(int(c) for c in args.channels.split(",")), modes=args.modes.split(","),
               noise_multiplicity=args.noise_multiplicity, warmup=args.warmup, timed=args.timed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
