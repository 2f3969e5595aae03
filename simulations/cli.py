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

from common.core.errors import DifusalError
from simulations.config_args import add_data_arguments, build_config, count_sites  # noqa: F401 (re-exported)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<timestamp>`` under ``$DIFUSAL_RUNS`` or the project."""
    base = Path(os.environ.get("DIFUSAL_RUNS", PROJECT_ROOT / "runs"))
    return (base / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def cmd_simulate(args: argparse.Namespace, *, name: str) -> int:
    """Run N simulated sites through a SuperLink + ``flwr run``."""
    from simulations.launcher import run_simulation

    t0 = time.perf_counter()
    run_dir = args.run_dir or str(default_run_dir(name))
    cfg = build_config(args.preset, args.set, run_dir=run_dir, data=args.data, data_root=args.data_root,
                       seed=args.seed, prior=args.prior)
    num_sites = count_sites(cfg)
    if num_sites != cfg.data.num_sites:
        cfg = replace(cfg, data=replace(cfg.data, num_sites=num_sites))
    print(f"[difusal] {name}: preset {cfg.preset}, {num_sites} sites, {cfg.federation.num_rounds} rounds, "
          f"run folder {cfg.run_dir}")
    if not args.verbose:
        print(f"[difusal] Flower's and Ray's logs: {Path(cfg.run_dir) / 'logs'}/ (--verbose shows them here)")
    live = not args.verbose and not args.quiet and sys.stdout.isatty()
    if live:  # a terminal: the live view (rounds, sites, epsilon, the query) instead of a line per event
        from contextlib import ExitStack

        from simulations.progress import LiveView

        with ExitStack() as stack:
            view = stack.enter_context(LiveView(rounds=cfg.federation.num_rounds, sites=[],
                                                budget=cfg.privacy.target_epsilon, run_dir=Path(cfg.run_dir)))
            result = run_simulation(cfg, num_sites=num_sites, resume=args.resume, echo=False, on_line=view.feed)
    else:
        result = run_simulation(cfg, num_sites=num_sites, resume=args.resume, echo=args.verbose,
                                events=not args.quiet)
    if result.returncode != 0:
        print(f"[difusal] FAILED after {result.wall_s:.0f} s: {result.reason} (logs: {result.run_dir / 'logs'}/)")
        return result.returncode
    if not args.no_report:
        write_results(Path(cfg.run_dir))
    from simulations.progress import closing_summary

    for line in closing_summary(Path(cfg.run_dir), wall_s=time.perf_counter() - t0):
        print(line)
    return result.returncode


def write_results(run_dir: Path) -> None:
    """``report.html`` and the privacy-audit summary (``audit/``) of a finished run; a failure is one line."""
    from simulations.audit import audit_summary
    from simulations.report import build_report

    for what, make in (("report", lambda: build_report(run_dir)), ("audit summary", lambda: audit_summary(run_dir))):
        try:
            make()
        except Exception as err:  # the run itself succeeded: say what is missing and go on
            print(f"[difusal] could not write the {what}: {type(err).__name__}: {err}")


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

    sets = list(args.set) + ([f"train.pretrain-steps={args.steps}"] if args.steps is not None else [])
    cfg = build_config(args.preset, sets, data=args.data, data_root=args.data_root, seed=args.seed)
    out = Path(args.out) if args.out else PROJECT_ROOT / "common" / "assets" / f"prior-{cfg.preset}"
    path = pretrain_prior(cfg, out, command=" ".join(sys.argv), public_data=args.public_data, resume=args.resume,
                          checkpoint_every=args.checkpoint_every)
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


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (one subcommand per job)."""
    p = argparse.ArgumentParser(prog="difusal", description=__doc__.splitlines()[0],
                                epilog="example: difusal demo   (then open the report.html it names)\n"
                                       "every command: difusal <command> --help",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name: str, **kw: object) -> argparse.ArgumentParser:
        kw.setdefault("epilog", f"example: {EXAMPLES[name]}" if name in EXAMPLES else None)
        sp = _add(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)  # type: ignore[arg-type]
        if kw.get("add_help", True):
            sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the traceback of an error")
        return sp

    sub.add_parser = add_parser  # type: ignore[method-assign]

    def common(sp: argparse.ArgumentParser, preset: str) -> None:
        sp.add_argument("--preset", default=preset, help="smoke | demo | demo64 | paper (default: %(default)s)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set federation.num-rounds=2 (repeatable)")
        sp.add_argument("--seed", type=int, default=None)
        add_data_arguments(sp)

    for name, preset, helptext in (
        ("demo", "demo64", "the main job: phantom sites at 64 px, from the shipped prior, DP fine-tuning + active "
                           "learning (--preset demo: the 32 px demo)"),
        ("simulate", "smoke", "N simulated sites through Flower's simulation runtime"),
    ):
        sp = sub.add_parser(name, help=helptext)
        common(sp, preset)
        sp.add_argument("--run-dir", default="", help="run folder (default: runs/<command>-<time>)")
        sp.add_argument("--prior", default="shipped" if name == "demo" else None,
                        help="'shipped', a prior/checkpoint folder, or '' for a fresh init")
        sp.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
        sp.add_argument("--verbose", action="store_true",
                        help="echo Flower's and Ray's log here (always written to RUN/logs/)")
        sp.add_argument("--quiet", action="store_true",
                        help="no line per event: only the start line and the closing summary")
        sp.add_argument("--no-report", action="store_true",
                        help="do not write report.html and the audit summary at the end")
    sp = sub.add_parser("preview", help="phantom grids and the site partition summary")
    common(sp, "demo")
    sp.add_argument("--out", default="")
    sp.add_argument("--size", type=int, default=64)
    sp = sub.add_parser("pretrain", help="train the public prior on phantoms (no privacy cost)")
    common(sp, "demo")
    sp.add_argument("--out", default="")
    sp.add_argument("--steps", type=int, default=None, help="generator steps (train.pretrain-steps)")
    sp.add_argument("--checkpoint-every", type=int, default=500, metavar="N",
                    help="write the resumable state to OUT.resume/ every N generator steps (0: never)")
    sp.add_argument("--resume", action="store_true", help="continue from OUT.resume/ (same command and seed)")
    sp.add_argument("--public-data", action="append", default=[], metavar="LAYOUT:DIR",
                    help="public real scans to train on too (fetal_planes_db, hc18, african); repeatable; "
                         "never a site's private data")
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
    for name, (module, helptext) in DELEGATED.items():
        sp = sub.add_parser(name, help=helptext, add_help=False,
                            description=f"{helptext}; the arguments are those of python -m {module} "
                                        f"(difusal {name} --help lists them)")
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    return p


# Commands whose parser lives in their own module (``python -m MODULE`` keeps working): name -> (module, help).
DELEGATED: dict[str, tuple[str, str]] = {
    "report": ("simulations.report", "write RUN/report.html (every image embedded) for a run folder"),
    "audit": ("simulations.audit", "privacy audit of a release: DP certificate, memorisation, membership inference"),
    "deploy": ("simulations.deploy", "TLS deployment: certificates, SuperLink, SuperNodes (see its subcommands)"),
    "experiment": ("simulations.experiments", "the studies: downstream | extractors | dp_gap | ga_heads | al_loop"),
}
EXPERIMENTS = ("downstream", "extractors", "dp_gap", "ga_heads", "al_loop")
EXAMPLES: dict[str, str] = {
    "demo": "difusal demo --run-dir runs/my-demo",
    "simulate": "difusal simulate --preset smoke --set federation.num-rounds=2",
    "preview": "difusal preview --out runs/preview",
    "pretrain": "difusal pretrain --preset demo --out common/assets/prior-demo",
    "release": "difusal release repair runs/my-demo/release --dry-run",
    "report": "difusal report runs/my-demo   (writes runs/my-demo/report.html)",
    "audit": "difusal audit --release runs/my-demo/release --checkpoint runs/my-demo --private site:0 "
             "--out runs/my-demo/audit-full",
    "deploy": "difusal deploy up --help",
    "experiment": "difusal experiment downstream evaluate runs/my-demo",
    "evaluate": "difusal evaluate runs/my-demo/checkpoints/round-003 --data hc18 --data-root ../shared/data/hc18",
}


def run_delegated(name: str, rest: list[str]) -> int:
    """Hand ``rest`` to the module's own ``main`` (``experiment KIND ...``: the study's module)."""
    import importlib

    module = DELEGATED[name][0]
    prog = f"difusal {name}"
    if name == "experiment":
        if not rest or rest[0] not in EXPERIMENTS:
            if rest and rest[0] in ("-h", "--help"):
                print(f"usage: difusal experiment {{{','.join(EXPERIMENTS)}}} [ARGS...]\n\n{DELEGATED[name][1]}\n\n"
                      "example: difusal experiment downstream --help")
                return 0
            raise UsageError(f"difusal experiment needs one of {', '.join(EXPERIMENTS)} "
                             f"(got {rest[0] if rest else 'nothing'}); e.g. difusal experiment downstream --help")
        module, prog, rest = f"{module}.{rest[0]}", f"{prog} {rest[0]}", rest[1:]
    mod = importlib.import_module(module)
    entry = getattr(mod, "main", None) or getattr(mod, "_cli")
    saved = sys.argv
    sys.argv = [prog, *rest]
    try:
        try:
            rc = entry(rest)
        except TypeError:  # a main() without argv reads sys.argv
            rc = entry()
    except SystemExit as done:  # argparse's --help and usage errors
        rc = done.code
    finally:
        sys.argv = saved
    if any(a in ("-h", "--help") for a in rest):
        print(f"\nexample: {EXAMPLES[name]}")
    return int(rc or 0)


class UsageError(Exception):
    """A mistake on the command line: printed as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors a user can cause are one line and the fix (``--debug``: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    if argv[debug:] and argv[debug] in DELEGATED:  # the module's own parser reads every argument after the name
        args = argparse.Namespace(command=argv[debug], rest=argv[debug + 1:], debug=debug)
    else:
        args = make_parser().parse_args(argv)
    try:
        return dispatch(args)
    except (DifusalError, UsageError, FileNotFoundError, NotADirectoryError) as err:
        if args.debug:
            raise
        print(f"difusal {args.command}: error: {short_error(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2


def short_error(err: BaseException) -> str:
    """The error's message; an unknown config key names the closest known key instead of listing them all."""
    import ast
    import difflib
    import re

    text = str(err)
    m = re.match(r"unknown config key '([^']+)'; known keys: (\[.*\])$", text)
    if m:
        keys = ast.literal_eval(m.group(2))
        close = difflib.get_close_matches(m.group(1), keys, n=1)
        hint = f"did you mean {close[0]}?" if close else "the keys are the fields of common/core/config.py"
        return f"unknown config key '{m.group(1)}': {hint} (--set SECTION.KEY=VALUE)"
    return text


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command."""
    from simulations.launcher import set_offline_env

    set_offline_env()
    if getattr(args, "seed", None) is None and args.command in ("preview", "pretrain"):
        args.seed = 0
    if args.command in DELEGATED:
        return run_delegated(args.command, list(args.rest))
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
