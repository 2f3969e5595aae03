"""The user's first hour (issue 20): short output, results at the end, one command, one-line errors, the report renders."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.cli import DELEGATED, EXAMPLES, EXPERIMENTS, main, make_parser
from simulations.progress import event_line

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}


def _commands() -> list[str]:
    sub = next(a for a in make_parser()._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[union-attr]


def test_every_command_is_one_difusal_subcommand() -> None:
    assert {"demo", "simulate", "preview", "pretrain", "evaluate", "report", "audit", "deploy",
            "experiment"} <= set(_commands())


@pytest.mark.parametrize("command", [*_commands(), *(f"experiment {e}" for e in EXPERIMENTS), "release repair"])
def test_every_command_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*command.split(), "--help"]
    try:
        rc = main(argv)
    except SystemExit as done:  # argparse's own --help
        rc = done.code
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "usage:" in out
    name = command.split()[0]
    if name in EXAMPLES and command != "release repair":
        assert f"example: {EXAMPLES[name]}" in out or "example: difusal" in out


@pytest.mark.parametrize(("argv", "expected"), [
    (["simulate", "--preset", "nope"], "preset='nope' is unknown; choose one of"),
    (["simulate", "--set", "federation.num-roundz=2"], "did you mean federation.num-rounds?"),
    (["simulate", "--data", "african", "--data-root", "/nonexistent/africa"], "folder not found: /nonexistent/africa"),
    (["experiment", "bogus"], "needs one of downstream"),
])
def test_user_errors_are_one_line_with_the_fix(argv: list[str], expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err and "--debug shows the traceback" in err and "Traceback" not in err


def test_debug_shows_the_traceback() -> None:
    from common.core.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "simulate", "--preset", "nope"])
    with pytest.raises(ConfigError):
        main(["simulate", "--preset", "nope", "--debug"])


def test_the_python_m_forms_still_work() -> None:
    for module in {m for m, _ in DELEGATED.values()} - {"simulations.experiments"}:
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=PROJECT_ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, (module, out.stderr[-500:])


def test_event_lines_keep_the_servers_events_only() -> None:
    assert event_line("\x1b[92mINFO \x1b[0m:      [ROUND 2/3]") == "[difusal] round 2/3: training at the sites"
    done = event_line("INFO :      Round 1/1 done in 23.4s | sites: a=ok(eps 6.00), b=budget-exhausted(eps 9.90) | "
                      "plane-acc 0.250 | denoise-loss 1.0374")
    assert done == ("[difusal] round 1/1 done in 23 s | a ok (epsilon 6.00), b budget-exhausted (epsilon 9.90) | "
                    "plane accuracy 0.250 | denoise loss 1.0374")
    # the server's line names where the round's time went: training and evaluation at the sites, query, sample grid
    phased = event_line("INFO :      Round 2/3 done in 184.2s (sites 99s, query 48s, sample grid 37s) | sites: "
                        "a=ok(eps 6.00) | plane-acc 0.615 | denoise-loss 0.0355")
    assert phased == ("[difusal] round 2/3 done in 184 s (sites 99 s, query 48 s, sample grid 37 s) | "
                      "a ok (epsilon 6.00) | plane accuracy 0.615 | denoise loss 0.0355")
    assert event_line("INFO :      Query round 2: 12 candidates from 3 sites, 4 released (release size 8)") == \
        "[difusal] query round 2: 12 candidates from 3 sites, 4 released, release size 8"
    assert event_line("ERROR :     Run failed: no site trained") == "[difusal] error: Run failed: no site trained"
    for noise in ("12/04/2026 00:48:07:DEBUG:Initialising: RayBackend", "INFO :      configure_train: Sampled 2 nodes",
                  "Successfully started run 5919751056902890276", "WARNING :   Since flwr 1.32, default ..."):
        assert event_line(noise) is None


@pytest.mark.e2e
def test_smoke_output_is_short_names_the_sites_and_the_run_folder(smoke_cli_run) -> None:  # type: ignore[no-untyped-def]
    out, run_dir = smoke_cli_run
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) < 40, out.stdout
    assert str(run_dir) in out.stdout
    sites = sorted(p.name for p in (run_dir / "sites").iterdir())
    assert len(sites) == 2 and all(site in out.stdout for site in sites)
    assert "INFO" not in out.stdout and "DEBUG" not in out.stdout  # Flower's log stays in logs/
    flower_log = (run_dir / "logs" / "flwr-run.log").read_text()
    assert "Starting Flower Simulation" in flower_log and "[ROUND 1/1]" in flower_log


@pytest.mark.e2e
def test_the_run_folder_holds_the_report_and_the_audit_summary(smoke_cli_run) -> None:  # type: ignore[no-untyped-def]
    out, run_dir = smoke_cli_run
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (run_dir / "report.html").is_file() and (run_dir / "audit" / "audit.json").is_file()
    assert f"open report:       {run_dir / 'report.html'}" in out.stdout
    assert "epsilon" in out.stdout and "plane accuracy" in out.stdout and "finished in" in out.stdout


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.src.append(dict(attrs).get("src") or "")


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_the_report_renders_offline_with_every_image(smoke_cli_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, run_dir = smoke_cli_run
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    report = run_dir / "report.html"
    images = _Images()
    images.feed(report.read_text())
    assert images.src, "the report shows no image"
    for src in images.src:  # embedded, or a file that exists beside the report
        assert src.startswith("data:image/png;base64,") or (report.parent / src).is_file(), src[:80]
    shot = tmp_path / "first_screen.png"
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900",
                           f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]


def test_the_live_view_shows_rounds_sites_epsilon_and_the_query() -> None:
    import io

    from rich.console import Console

    from simulations.progress import LiveView

    view = LiveView(rounds=3, sites=[], budget=10.0)
    view.console = Console(file=io.StringIO(), force_terminal=True, width=120)
    for line in ("INFO :      [ROUND 1/3]",
                 "INFO :      Round 1/3 done in 23.4s | sites: a=ok(eps 6.00), b=failed(eps 0.00) | plane-acc 0.250 | "
                 "denoise-loss 1.0374",
                 "INFO :      Query round 1: 12 candidates from 2 sites, 4 released (release size 4)"):
        view.feed(line)
    out = io.StringIO()
    Console(file=out, width=120).print(view._render())
    text = out.getvalue()
    assert "rounds 1/3" in text and "6.00 / 10" in text and "failed" in text
    assert "plane accuracy 0.250" in text and "release size 4" in text


def test_the_live_view_reads_steps_epsilon_and_the_pooled_ga_error_from_the_run(tmp_path) -> None:
    import io
    import json

    from rich.console import Console

    from common.core.run_layout import RunLayout
    from simulations.progress import LiveView

    layout = RunLayout(tmp_path)
    layout.metrics.parent.mkdir(parents=True, exist_ok=True)
    site = {"name": "a", "status": "ok", "metrics": {"generator-steps": 8, "generator-loss": 0.5},
            "evaluation": {"ga-mae-days": 12.0, "num-examples": 10}}
    other = {"name": "b", "status": "ok", "metrics": {}, "evaluation": {"ga-mae-days": 24.0, "num-examples": 30}}
    layout.metrics.write_text(json.dumps({"round": 1, "sites": [site, other],
                                          "ledger": {"a": {"generator": {"epsilon": 3.0}, "classifier": {"epsilon": 1.0}},
                                                     "b": {"generator": {"epsilon": 2.0}}}}) + "\n")
    view = LiveView(rounds=2, sites=["a", "b"], budget=10.0, run_dir=tmp_path)
    view.console = Console(file=io.StringIO(), force_terminal=True, width=140)
    view.feed("INFO :      Round 1/2 done in 5.0s | sites: a=ok(eps 4.00), b=ok(eps 2.00) | plane-acc 0.500 | "
              "denoise-loss 1.0000")
    out = io.StringIO()
    Console(file=out, width=140).print(view._render())
    text = out.getvalue()
    assert "GA error 21.0 days" in text  # example-weighted: (12 * 10 + 24 * 30) / 40
    assert "4.00 / 10" in text and "0.5000" in text and " 8 " in text
