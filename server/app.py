"""Flower ``ServerApp``: reads the config once and runs the federation loop of :mod:`server.federation`."""

from __future__ import annotations

import warnings
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.core.config import RunConfig
from server.federation import run_federation

# Known-noisy third-party warnings (numpy 2 copy keyword in diffusers' solvers; Opacus' CPU autocast note).
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*CPU Autocast only supports.*")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Start from the prior (or resume), run the rounds, checkpoint each one."""
    cfg = RunConfig.from_run_config(context.run_config)
    resume = bool(context.run_config.get("resume", False))
    coordinator = None
    if cfg.federation.al_every:
        from server.coordinator import Coordinator  # only runs with active learning need it

        coordinator = Coordinator(cfg, run_dir=Path(cfg.run_dir), timeout_s=cfg.federation.reply_timeout_s)
    run_federation(grid, cfg, resume=resume, coordinator=coordinator)
