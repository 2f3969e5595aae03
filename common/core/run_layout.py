"""The layout of a run folder, stated once: every reader and writer of a run takes its paths from here.

::

    <run-dir>/
      config.json            the run's config and code version
      status.json            running | finished | failed (and why)
      metrics.jsonl          one record per round
      checkpoints/round-NNN/ the bundle after round NNN (generator folder, weights, round.json, sidecar.json)
      figures/               sample grids, release grids, round plots
      release/               the shared synthetic dataset (imagefolder + metadata.jsonl + release.json)
      sites/<name>/          a simulated site's own state (ledger snapshots, local model, secret, release cache)
      logs/                  the launcher's process logs
      evaluation/            the downstream evaluation protocol's results
      report.html            the run's report
      .flwr/                 Flower's home for the run (connection, run-config.toml)
      .app/                  the staged Flower app bundle
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder (nothing is created by naming it)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, server_round: int) -> Path:
        """The folder of round ``server_round``'s checkpoint."""
        return self.checkpoints / f"round-{server_round:03d}"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def release(self) -> Path:
        return self.root / "release"

    def site(self, name: str) -> Path:
        """A simulated site's state folder."""
        return self.root / "sites" / name

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def flower_home(self) -> Path:
        return self.root / ".flwr"

    @property
    def app(self) -> Path:
        return self.root / ".app"
