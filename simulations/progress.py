"""What the user sees while a run goes: one short line per event, and a closing summary of the run folder.

Flower's and Ray's logs go to ``<run>/logs/`` (``--verbose`` echoes them whole). Without ``--verbose`` the launcher
passes each line of ``flwr run --stream`` through :func:`event_line`, which keeps only the server's own events
(round start, the round summary, the coordinator's query, failures) and rewrites them as one plain line each.
:func:`closing_summary` reads the finished run folder (``metrics.jsonl``, ``figures/``, ``report.html``,
``audit/``) and returns the ~10 lines printed at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from common.core.run_layout import RunLayout

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONSOLE = re.compile(r"^([A-Z]+) *:\s*(.*)$")  # Flower's console format: "INFO :      message"
_ROUND_START = re.compile(r"^\[ROUND (\d+)/(\d+)\]$")
# "done in 184.0s (sites 99s, query 48s, sample grid 37s)": the whole round, then where its time went
_ROUND_DONE = re.compile(r"^Round (?P<round>\d+)/(?P<rounds>\d+) done in (?P<seconds>[\d.]+)s"
                         r"(?: \((?P<phases>[^)]*)\))? \| sites: (?P<sites>.*?) \| plane-acc (?P<acc>\S+) \| "
                         r"denoise-loss (?P<loss>\S+)$")
_SECONDS = re.compile(r"(\d)s\b")  # "48s" -> "48 s"
_QUERY = re.compile(r"^Query round (\d+): (\d+) candidates from (\d+) sites, (\d+) released \(release size (\d+)\)$")
PREFIX = "[difusal]"


def event_line(raw: str) -> str | None:
    """The plain line to show for one line of Flower's stream, or ``None`` to leave it to the log file."""
    text = _ANSI.sub("", raw.rstrip("\n"))
    console = _CONSOLE.match(text)
    if not console:
        return None
    level, message = console.group(1), console.group(2).strip()
    if m := _ROUND_START.match(message):
        return f"{PREFIX} round {m.group(1)}/{m.group(2)}: training at the sites"
    if m := _ROUND_DONE.match(message):
        sites = m["sites"].replace("=", " ").replace("(eps ", " (epsilon ")
        phases = " (" + _SECONDS.sub(r"\1 s", m["phases"]) + ")" if m["phases"] else ""
        return (f"{PREFIX} round {m['round']}/{m['rounds']} done in {float(m['seconds']):.0f} s{phases} | {sites} | "
                f"plane accuracy {m['acc']} | denoise loss {m['loss']}")
    if m := _QUERY.match(message):
        return (f"{PREFIX} query round {m.group(1)}: {m.group(2)} candidates from {m.group(3)} sites, "
                f"{m.group(4)} released, release size {m.group(5)}")
    if level in ("ERROR", "CRITICAL"):
        return f"{PREFIX} {level.lower()}: {message}"
    return None


class LiveView:
    """The terminal view when stdout is a terminal (rich): rounds as a progress bar, a live table of the sites
    (status, epsilon spent of the budget), the round's accuracy and the coordinator's last query.

    :meth:`feed` takes each raw line of Flower's stream; an error line is printed above the view.
    """

    def __init__(self, *, rounds: int, sites: list[str], budget: float | None, run_dir: Path | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.rounds, self.budget, self.run_dir = rounds, budget, run_dir
        self.detail: dict[str, tuple[str, str]] = {}  # site -> (generator steps, generator loss) of the last round
        self.done = 0
        self.current = 0
        self.sites: dict[str, tuple[str, str]] = {name: ("waiting", "-") for name in sites}
        self.last_round = "no round finished yet"
        self.query = "no query yet"
        self.training = "starting Flower's simulation"
        self.console = Console()
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self._render())
        self.live.__exit__(None, None, None)

    def feed(self, raw: str) -> None:
        text = _ANSI.sub("", raw.rstrip("\n"))
        console = _CONSOLE.match(text)
        if not console:
            return
        level, message = console.group(1), console.group(2).strip()
        if m := _ROUND_START.match(message):
            self.current = int(m.group(1))
            self.sites = {name: ("training", eps) for name, (_, eps) in self.sites.items()}
            self.training = f"round {self.current}/{self.rounds}: training at the sites"
        elif m := _ROUND_DONE.match(message):
            self.done = int(m["round"])
            self.training = f"round {self.done}/{self.rounds} done"
            for part in m["sites"].split(", "):
                site = re.match(r"^(.*)=(\S+)\(eps ([\d.]+)\)$", part)
                if site:
                    self.sites[site.group(1)] = (site.group(2), site.group(3))
            ga = self._read_round()
            self.last_round = (f"round {m['round']}: plane accuracy {m['acc']}, GA error {ga}, denoise loss "
                               f"{m['loss']}, {float(m['seconds']):.0f} s")
        elif m := _QUERY.match(message):
            self.query = (f"round {m.group(1)}: {m.group(2)} candidates from {m.group(3)} sites, "
                          f"{m.group(4)} released, release size {m.group(5)}")
        elif level in ("ERROR", "CRITICAL"):
            self.console.print(f"[red]{PREFIX} {level.lower()}: {message}[/red]")
        self.live.update(self._render())

    def _read_round(self) -> str:
        """Steps, loss and epsilon spent (summed over models) of each site, from the run's last metrics record;
        returns the round's pooled GA error as text (``n/a`` without it)."""
        if self.run_dir is None:
            return "n/a"
        try:
            lines = RunLayout(self.run_dir).metrics.read_text().splitlines()
            record = json.loads(lines[-1])
        except (OSError, IndexError, ValueError):
            return "n/a"
        from common.federated.round_metrics import round_summary

        mae = round_summary(record).get("ga_mae_days")
        for site in record.get("sites", []):
            metrics = site.get("metrics") or {}
            spent, _, _ = site_privacy(record.get("ledger", {}).get(site.get("name"), {}))
            loss = metrics.get("generator-loss")
            self.detail[site.get("name", "?")] = (f"{int(metrics.get('generator-steps', 0))}",
                                                  "-" if loss is None else f"{float(loss):.4f}")
            self.sites[site.get("name", "?")] = (site.get("status", "?"), f"{spent:.2f}")
        return "n/a" if mae is None else f"{mae:.1f} days"

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        head = Table.grid(padding=(0, 1))
        head.add_row(Text(f"rounds {self.done}/{self.rounds}"), ProgressBar(total=self.rounds, completed=self.done,
                                                                          width=40))
        table = Table(title=None, expand=False)
        for col in ("site", "status", "steps", "loss", "epsilon spent / budget"):
            table.add_column(col)
        for name, (status, eps) in sorted(self.sites.items()):
            style = {"ok": "green", "training": "yellow", "failed": "red", "rejected": "red"}.get(status, "")
            steps, loss = self.detail.get(name, ("-", "-"))
            table.add_row(name, Text(status, style=style), steps, loss,
                          f"{eps} / {self.budget:g}" if self.budget and eps != "-" else eps)
        if not self.sites:
            table.add_row("(the sites appear after their first round)", "", "", "", "")
        return Group(head, Text(self.training), table, Text(f"last round: {self.last_round}"), Text(f"coordinator: {self.query}"))


def site_privacy(models: dict[str, Any]) -> tuple[float, float, int]:
    """A site's epsilon spent (summed over its models: basic composition), its budget and its generator's steps."""
    spent = sum(float(m.get("epsilon", 0.0)) for m in models.values())
    budget = sum(float(m.get("budget_epsilon", 0.0)) for m in models.values())
    return spent, budget, int(models.get("generator", {}).get("steps", 0))


def _last(paths: list[Path]) -> Path | None:
    return sorted(paths)[-1] if paths else None


def _local(entry: object) -> str:
    """`` central (local X)`` for a model under example-level distributed DP (its epsilon is the central figure)."""
    d = entry.get("distributed") if isinstance(entry, dict) else None
    if not isinstance(d, dict) or "local_epsilon" not in d:
        return ""
    return f" central (local {float(d['local_epsilon']):.2f} if the server and the other sites collude)"


def closing_summary(run_dir: Path, *, wall_s: float) -> list[str]:
    """The lines printed when a run finished: wall time, per-site epsilon, accuracy, release size, what to open."""
    from common.federated.round_metrics import round_summary

    layout = RunLayout(Path(run_dir))
    records = [json.loads(line) for line in layout.metrics.read_text().splitlines() if line.strip()] \
        if layout.metrics.is_file() else []
    lines = [f"{PREFIX} finished in {wall_s / 60:.1f} min ({wall_s:.0f} s); run folder {layout.root}"]
    if records:
        last = records[-1]
        budget = _budget(layout)
        for site, models in sorted(last.get("ledger", {}).items()):
            spent, _, steps = site_privacy(models)
            parts = ", ".join(f"{k} {float(v.get('epsilon', 0.0)):.2f}" + _local(v) for k, v in sorted(models.items()))
            lines.append(f"{PREFIX}   {site}: epsilon {spent:.2f}" + (f" of {budget:g}" if budget else "")
                         + f" ({parts}; {steps} generator steps)")
        summary = round_summary(last)
        acc, mae = summary.get("plane_accuracy"), summary.get("ga_mae_days")
        lines.append(f"{PREFIX} round {summary['round']}: plane accuracy "
                     f"{'n/a' if acc is None else f'{acc:.3f}'}, GA error "
                     f"{'n/a' if mae is None else f'{mae:.1f} days'}; release size {summary['release_size']}")
    opened = [("report", layout.report if layout.report.is_file() else None),
              ("audit", _first(layout.root / "audit" / "audit.html", layout.root / "audit" / "audit.json")),
              ("release grid", _last(list(layout.figures.glob("release-round-*.png")))),
              ("samples", _last(list(layout.figures.glob("samples-round-*.png")))),
              ("logs", layout.logs if layout.logs.is_dir() else None)]
    for name, path in opened:
        if path is not None:
            lines.append(f"{PREFIX} open {name + ':':14s}{path}")
    return lines


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _budget(layout: RunLayout) -> float | None:
    try:
        cfg: dict[str, Any] = json.loads(layout.config.read_text())["config"]
        return float(cfg["privacy"]["target_epsilon"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
