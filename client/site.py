"""Who this site is: per-site facts from ``node_config`` applied on top of the federation's config.

Deployment (``flower-supernode --node-config``): ``site-index`` (int, required), ``site-name``, ``data-source``,
``data-root``, ``state-dir`` (required: where the site's privacy ledger lives), ``epsilon`` (this site's budget).
Simulation: Flower sets ``partition-id``/``num-partitions``; state lives under ``<run-dir>/sites/``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from common.core.config import RunConfig
from common.core.errors import ConfigError
from common.core.run_layout import RunLayout


@dataclass(frozen=True)
class SiteSpec:
    """One site's identity and the config it trains with."""

    index: int
    name: str | None  # None: the data layer's name for the site (e.g. "site0-voluson_e6", "Ghana")
    state_dir: Path | None  # None: <run-dir>/sites/<name> (simulation)
    cfg: RunConfig

    def resolved(self, data_name: str, run_dir: Path) -> tuple[str, Path]:
        """Final ``(name, state_dir)`` once the site's data (and so its natural name) is known."""
        name = self.name or data_name
        return name, self.state_dir or RunLayout(run_dir).site(name)


def resolve_site(node_config: Mapping[str, object], cfg: RunConfig) -> SiteSpec:
    """Combine ``node_config`` (per-site facts) with the federation-wide ``cfg``."""
    if "site-index" in node_config:
        index = int(node_config["site-index"])  # type: ignore[call-overload]
        if "state-dir" not in node_config:
            raise ConfigError("node_config lacks 'state-dir': give each SuperNode a folder for its privacy ledger")
        state_dir: Path | None = Path(str(node_config["state-dir"]))
    elif "partition-id" in node_config:
        index = int(node_config["partition-id"])  # type: ignore[call-overload]
        state_dir = None
    else:
        raise ConfigError(
            "node_config has neither 'site-index' (deployment) nor 'partition-id' (simulation); "
            "start the SuperNode with --node-config \"site-index=0 state-dir='...'\""
        )
    data = cfg.data
    if "data-source" in node_config:
        data = replace(data, source=str(node_config["data-source"]))  # type: ignore[arg-type]
    if "data-root" in node_config:
        data = replace(data, root=str(node_config["data-root"]))
    privacy = cfg.privacy
    if "epsilon" in node_config:
        privacy = replace(privacy, target_epsilon=float(node_config["epsilon"]))  # type: ignore[arg-type]
    data.validate()
    privacy.validate()
    cfg = replace(cfg, data=data, privacy=privacy)
    name = str(node_config["site-name"]) if "site-name" in node_config else None
    return SiteSpec(index=index, name=name, state_dir=state_dir, cfg=cfg)
