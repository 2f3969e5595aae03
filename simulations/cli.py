"""Command line: ``python -m simulations.cli <command>`` (``difusal`` when installed).

Commands: ``demo`` (the main job), ``simulate``, ``preview``, ``pretrain``. Each reads a preset plus
``--set key=value`` overrides into one frozen :class:`RunConfig` and passes it down.
``release repair RELEASE_DIR`` moves a damaged release's bad lines and stray files to its quarantine.
``evaluate FOLDER --data SOURCE --data-root DIR`` scores a checkpoint's or prior's downstream models on a dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from common.core.config import DATA_PRESETS, RunConfig, data_preset, parse_overrides
from common.core.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]




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
    for item in sets:
        flat.update(parse_overrides(item))
    flat.update({k.replace("_", "-"): v for k, v in top.items() if v is not None})
    if run_dir:
        flat["run-dir"] = str(Path(run_dir).resolve())
    return RunConfig.from_flat(flat)


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<timestamp>`` under ``$DIFUSAL_RUNS`` or the project."""
    base = Path(os.environ.get("DIFUSAL_RUNS", PROJECT_ROOT / "runs"))
    return (base / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def count_sites(cfg: RunConfig) -> int:
    """Number of sites the data config yields (real sources: the dataset's natural sites)."""
    if cfg.data.source == "phantom" or cfg.data.partition != "natural":
        return cfg.data.num_sites
    from common.data.sites import load_federated_data

    return len(load_federated_data(cfg.data, seed=cfg.seed).sites)


def cmd_simulate(args: argparse.Namespace, *, name: str) -> int:
    """Run N simulated sites through a SuperLink + ``flwr run``."""
    from simulations.launcher import run_simulation

    run_dir = args.run_dir or str(default_run_dir(name))
    cfg = build_config(args.preset, args.set, run_dir=run_dir, data=args.data, data_root=args.data_root,
                       seed=args.seed, prior=args.prior)
    num_sites = count_sites(cfg)
    if num_sites != cfg.data.num_sites:
        cfg = replace(cfg, data=replace(cfg.data, num_sites=num_sites))
    print(f"[difusal] preset={cfg.preset} sites={num_sites} rounds={cfg.federation.num_rounds} run-dir={cfg.run_dir}")
    result = run_simulation(cfg, num_sites=num_sites, resume=args.resume, echo=not args.quiet)
    summary = {"returncode": result.returncode, "wall_s": round(result.wall_s, 1), "run_dir": str(result.run_dir)}
    if result.returncode != 0:
        print(f"[difusal] FAILED: {json.dumps({**summary, 'reason': result.reason})}")
        return result.returncode
    print(f"[difusal] finished: {json.dumps(summary)}")
    for fig in sorted((Path(cfg.run_dir) / "figures").glob("*.png")):
        print(f"[difusal] figure: {fig}")
    return result.returncode


def cmd_preview(args: argparse.Namespace) -> int:
    """Write phantom grids (by plane x GA, by scanner) and print a per-site summary."""
    from common.data.partition import format_summary, site_summary
    from common.data.sites import load_federated_data
    from common.phantoms.simulator import write_phantom_grids

    out = Path(args.out or default_run_dir("preview"))
    for path in write_phantom_grids(out, size=args.size, seed=args.seed):
        print(f"[difusal] grid: {path}")
    cfg = build_config(args.preset, args.set, data=args.data, data_root=args.data_root, seed=args.seed)
    fed = load_federated_data(cfg.data, seed=cfg.seed)
    records = [r for s in fed.sites for r in s.train]
    assignment, start = [], 0
    for s in fed.sites:
        assignment.append(list(range(start, start + len(s.train))))
        start += len(s.train)
    print(format_summary(site_summary(records, assignment, [s.name for s in fed.sites])))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Train the public phantom prior (no DP) and write it as a prior folder."""
    from common.analysis.pretrain import pretrain_prior

    cfg = build_config(args.preset, args.set, data=args.data, data_root=args.data_root, seed=args.seed)
    out = Path(args.out) if args.out else PROJECT_ROOT / "common" / "assets" / f"prior-{cfg.preset}"
    path = pretrain_prior(cfg, out, command=" ".join(sys.argv))
    print(f"[difusal] prior written to {path}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """``release repair DIR``: move a release's damaged lines and stray files to its quarantine (logged)."""
    from common.active_learning.release import ReleaseStore

    folder = Path(args.release_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass a release folder (metadata.jsonl + images/)")
    report = ReleaseStore(folder).repair(reason="difusal release repair", dry_run=args.dry_run)
    for line in report.describe():
        print(f"[difusal] {line}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a checkpoint's (or prior's) classifier and regressor on a dataset folder; print (and write) the JSON.

    A user error (missing folder, corrupt CSV, unknown split) is one line on stderr and exit status 2.
    """
    from common.analysis.score import score_folder
    from common.core.errors import DifusalError

    try:
        split = args.split or ("all" if args.data == "hc18" else "test")  # HC18 publishes one labelled set
        result = score_folder(Path(args.folder), args.data, args.data_root, split=split,
                              log=lambda line: print(f"[difusal] {line}", file=sys.stderr))
    except (DifusalError, FileNotFoundError) as err:
        print(f"[difusal] evaluate: error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, allow_nan=False)
    print(text)
    if args.json:
        from common.core.atomic_io import write_text_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), text + "\n")
    return 0


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` (a data preset) and ``--data-root``, as every command that builds a config takes them."""
    parser.add_argument("--data", default="", choices=["", *DATA_PRESETS],
                        help="data preset: phantom | african (sites = countries) | fetal_planes_db (sites = US "
                             "machines) | hc18 (split by patient); default: the preset's phantom sites")
    parser.add_argument("--data-root", default="", help="dataset folder in its published layout (real data presets)")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (one subcommand per job)."""
    p = argparse.ArgumentParser(prog="difusal", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, preset: str) -> None:
        sp.add_argument("--preset", default=preset, help="smoke | demo | paper (default: %(default)s)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set federation.num-rounds=2 (repeatable)")
        sp.add_argument("--seed", type=int, default=None)
        add_data_arguments(sp)

    for name, preset, helptext in (
        ("demo", "demo", "the main job: phantom sites, from the shipped prior, DP fine-tuning + active learning"),
        ("simulate", "smoke", "N simulated sites through Flower's simulation runtime"),
    ):
        sp = sub.add_parser(name, help=helptext)
        common(sp, preset)
        sp.add_argument("--run-dir", default="", help="run folder (default: runs/<command>-<time>)")
        sp.add_argument("--prior", default="shipped" if name == "demo" else None,
                        help="'shipped', a prior/checkpoint folder, or '' for a fresh init")
        sp.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
        sp.add_argument("--quiet", action="store_true", help="do not echo Flower's log")
    sp = sub.add_parser("preview", help="phantom grids and the site partition summary")
    common(sp, "demo")
    sp.add_argument("--out", default="")
    sp.add_argument("--size", type=int, default=64)
    sp = sub.add_parser("pretrain", help="train the public prior on phantoms (no privacy cost)")
    common(sp, "demo")
    sp.add_argument("--out", default="")
    release = sub.add_parser("release", help="maintain a release folder").add_subparsers(dest="action", required=True)
    sp = release.add_parser("repair", help="move damaged lines and stray files to RELEASE_DIR/quarantine/<time>/")
    sp.add_argument("release_dir", metavar="RELEASE_DIR")
    sp.add_argument("--dry-run", action="store_true", help="print what would move and write nothing")
    sp = sub.add_parser("evaluate", help="score a checkpoint's (or prior's) classifier and GA regressor on a dataset "
                                         "folder (e.g. a hospital's own held-out scans); prints one JSON object")
    sp.add_argument("folder", metavar="FOLDER", help="checkpoint folder (runs/<run>/checkpoints/round-NNN/) or prior "
                                                     "folder (common/assets/prior-demo)")
    from common.data.loaders import SOURCES

    sp.add_argument("--data", required=True, choices=list(SOURCES),
                    help="layout of the dataset folder")
    sp.add_argument("--data-root", required=True, help="dataset folder in its published layout")
    sp.add_argument("--split", default=None, choices=["train", "test", "all"],
                    help="which published split to score (default: test; HC18, one labelled set: all)")
    sp.add_argument("--json", default="", metavar="OUT", help="also write the JSON object to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    from simulations.launcher import set_offline_env

    set_offline_env()
    args = make_parser().parse_args(argv)
    if getattr(args, "seed", None) is None and args.command in ("preview", "pretrain"):
        args.seed = 0
    if args.command in ("demo", "simulate"):
        return cmd_simulate(args, name=args.command)
    if args.command == "preview":
        return cmd_preview(args)
    if args.command == "pretrain":
        return cmd_pretrain(args)
    if args.command == "release":
        return cmd_release(args)
    if args.command == "evaluate":
        return cmd_evaluate(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse restricts the choices


if __name__ == "__main__":
    sys.exit(main())
