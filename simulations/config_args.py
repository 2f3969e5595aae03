"""How every command turns a preset, a data preset and ``--set`` overrides into one :class:`RunConfig`.

Kept apart from :mod:`simulations.cli` so that the experiment modules the CLI dispatches to can use it without an
import cycle (``simulations.cli`` re-exports these names).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from common.core.config import DATA_PRESETS, RunConfig, data_preset, get_preset, parse_overrides
from common.core.errors import ConfigError


def build_config(preset: str, sets: Sequence[str], *, run_dir: str = "", data: str = "", data_root: str = "",
                 **top: object) -> RunConfig:
    """Preset + data preset + ``--set`` overrides + top-level fields, validated."""
    flat: dict[str, object] = {"preset": preset}
    if data_root and data in ("", "phantom"):  # phantom sites are generated: the folder would be silently unused
        real = "|".join(sorted(set(DATA_PRESETS) - {"phantom"}))
        raise ConfigError(f"--data-root {data_root} is given without a real-data preset ({data or 'phantom'} sites "
                          f"never read it): add --data {real} (e.g. --data african), or drop --data-root")
    if data:
        flat.update(data_preset(data, str(Path(data_root).resolve()) if data_root else ""))
        if "data.image-size" in flat:  # a real-data preset's minimum size; a larger size preset keeps its own
            flat["data.image-size"] = str(max(int(flat["data.image-size"]), get_preset(preset).data.image_size))
    for item in sets:
        flat.update(parse_overrides(item))
    flat.update({k.replace("_", "-"): v for k, v in top.items() if v is not None})
    if run_dir:
        flat["run-dir"] = str(Path(run_dir).resolve())
    return RunConfig.from_flat(flat)


def count_sites(cfg: RunConfig) -> int:
    """Number of sites the data config yields (real sources: the dataset's natural sites)."""
    if cfg.data.source == "phantom" or cfg.data.partition != "natural":
        return cfg.data.num_sites
    from common.data.sites import load_federated_data

    return len(load_federated_data(cfg.data, seed=cfg.seed).sites)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` (a data preset) and ``--data-root``, as every command that builds a config takes them."""
    parser.add_argument("--data", default="", choices=["", *DATA_PRESETS],
                        help="data preset: phantom | african (sites = countries) | fetal_planes_db (sites = US "
                             "machines) | hc18 (split by patient); default: the preset's phantom sites")
    parser.add_argument("--data-root", default="", help="dataset folder in its published layout (real data presets)")
