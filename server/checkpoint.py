"""The run folder: config, metrics log, per-round checkpoints (atomic) and resume."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from common.core.atomic_io import write_json_atomic, write_text_atomic
from common.core.config import RunConfig
from common.core.provenance import code_version
from common.core.run_layout import RunLayout
from common.models.bundle import ModelBundle, load_federated_file, save_bundle

_ROUND = re.compile(r"^round-(\d{3,})$")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    server_round: int
    folder: Path

    def arrays(self) -> dict[str, np.ndarray]:
        """Global federated arrays after this round."""
        return load_federated_file(self.folder)

    def strategy_state(self) -> dict[str, np.ndarray]:
        """Server optimizer state (empty for stateless strategies)."""
        path = self.folder / "strategy.safetensors"
        return {k: v.numpy() for k, v in load_file(str(path)).items()} if path.is_file() else {}

    def info(self) -> dict[str, Any]:
        """The round record saved with the checkpoint (sites, ledger, metrics)."""
        return json.loads((self.folder / "round.json").read_text())


class RunFolder:
    """``config.json``, ``metrics.jsonl``, ``checkpoints/round-NNN/``, ``figures/`` of one run (:class:`RunLayout`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.layout = RunLayout(self.path)
        self.checkpoints = self.layout.checkpoints
        self.figures = self.layout.figures
        self.metrics_file = self.layout.metrics

    def start(self, cfg: RunConfig, *, resume: bool) -> Checkpoint | None:
        """Create the folder (or reopen it to resume) and return the checkpoint to continue from."""
        latest = self.latest()
        if latest is not None and not resume:
            raise FileExistsError(
                f"{self.path} already holds checkpoints up to round {latest.server_round}; "
                "pass resume=true to continue it or choose another run-dir"
            )
        if resume and latest is not None:
            saved = RunConfig.from_dict(json.loads(self.layout.config.read_text())["config"])
            if saved.to_dict() != cfg.to_dict():
                raise ValueError(f"cannot resume {self.path}: the config differs from the one it was started with")
            self._truncate_metrics(latest.server_round)
        self.path.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(exist_ok=True)
        write_json_atomic(self.layout.config, {"config": cfg.to_dict(), "code_version": code_version()})
        return latest

    def latest(self) -> Checkpoint | None:
        """Newest complete checkpoint (folders appear only once complete)."""
        if not self.checkpoints.is_dir():
            return None
        rounds = [int(m.group(1)) for p in self.checkpoints.iterdir() if (m := _ROUND.match(p.name))]
        return Checkpoint(max(rounds), self.layout.checkpoint(max(rounds))) if rounds else None

    def save_checkpoint(
        self,
        server_round: int,
        bundle: ModelBundle,
        *,
        strategy_state: Mapping[str, np.ndarray],
        record: Mapping[str, Any],
        sidecar: Mapping[str, Any],
    ) -> Checkpoint:
        """Write ``checkpoints/round-NNN`` atomically, then append the round to ``metrics.jsonl``."""
        extra = {"round.json": json.dumps(dict(record), indent=2, default=str).encode()}
        if strategy_state:
            extra["strategy.safetensors"] = save_tensors(
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in strategy_state.items()})
        folder = self.layout.checkpoint(server_round)
        save_bundle(bundle, folder, sidecar=sidecar, extra_files=extra)
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps(dict(record), default=str) + "\n")
        return Checkpoint(server_round, folder)

    def mark_finished(self, last_round: int) -> None:
        """Write ``status.json``: the run reached its last round (the launcher checks it)."""
        write_json_atomic(self.layout.status, {"state": "finished", "last_round": last_round})

    def read_metrics(self) -> list[dict[str, Any]]:
        """All round records so far."""
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def _truncate_metrics(self, last_round: int) -> None:
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        write_text_atomic(self.metrics_file, "".join(json.dumps(r, default=str) + "\n" for r in kept))

