"""Flower ``ServerApp``: reads the config once and runs the federation loop of :mod:`server.federation`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.core.config import RunConfig
from server.federation import FederationResult, run_federation
from server.grid import PromptGrid

app = ServerApp()


def serve(grid: Grid, context: Context, *, on_checkpoint: Callable[[int], None] | None = None,
          on_release: Callable[[int], None] | None = None) -> FederationResult:
    """Start from the prior (or resume), run the rounds, checkpoint each one.

    ``on_checkpoint`` and ``on_release`` observe the run (after a round's checkpoint; after a query round's images
    are written, before its checkpoint); the product app passes none, the fault-injection tests' app kills the
    process there. Replies are collected by a :class:`~server.grid.PromptGrid` around ``grid``.
    """
    grid = PromptGrid(grid)  # type: ignore[assignment]  # duck-typed: delegates all but send_and_receive
    cfg = RunConfig.from_run_config(context.run_config)
    resume = bool(context.run_config.get("resume", False))
    coordinator = None
    if cfg.federation.al_every:
        from server.coordinator import Coordinator  # only runs with active learning need it

        coordinator = Coordinator(cfg, run_dir=Path(cfg.run_dir), timeout_s=cfg.federation.reply_timeout_s,
                                  on_release=on_release)
    return run_federation(grid, cfg, resume=resume, coordinator=coordinator, on_checkpoint=on_checkpoint)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The consortium's server: :func:`serve` with no observers."""
    serve(grid, context)
