"""Failed runs say so: a run in which no site trained, a killed launcher, a refused SuperNode.

The end-to-end tests start real Flower processes on free loopback ports (smoke preset: tiny models).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.federation import round_failure
from server.strategy import SiteReport
from simulations.certs import make_server_certificates, make_site_keys
from simulations.deploy import Layout, deployment_processes, register_sites, start_superlink, stop
from simulations.deploy import _cli as deploy_cli
from simulations.watchdog import still_running

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", *args]


def test_a_round_fails_only_when_no_site_trained_and_not_every_site_was_out_of_budget() -> None:
    # Prepare
    failed = SiteReport(node_id=1, name="site-0", status="failed", reason="site site-0: FileNotFoundError: no data")
    down = SiteReport(node_id=2, name="site-1", status="unavailable", reason="Node Unavailable")
    ok = SiteReport(node_id=3, name="site-2")
    spent = SiteReport(node_id=4, name="site-3", status="budget-exhausted", reason="skipped")
    # Execute / Assert
    reason = round_failure([failed, down])
    assert reason is not None and "site-0 failed: site site-0: FileNotFoundError: no data" in reason
    assert "site-1 unavailable: Node Unavailable" in reason
    assert round_failure([failed, ok]) is None  # one site trained: the round counts
    assert round_failure([spent, spent]) is None  # nobody could train, by design: the budget is spent
    assert "no site" in str(round_failure([]))


@pytest.mark.e2e
def test_a_run_in_which_every_site_fails_exits_non_zero_and_its_status_says_why(tmp_path: Path) -> None:
    # Prepare: a data folder that does not exist (the sites, not the server, read it)
    run_dir = tmp_path / "run"
    cmd = _cli("simulate", "--preset", "smoke", "--data", "hc18", "--data-root", str(tmp_path / "missing"),
               "--run-dir", str(run_dir), "--quiet")
    # Execute
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    # Assert: non-zero, a failed status naming both sites' error, and no checkpoint of an untrained model
    assert out.returncode != 0, out.stdout[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["round"] == 1
    assert "no site trained" in status["reason"]
    assert status["reason"].count("HC18 folder not found") == 2
    assert "site site-0" in status["reason"] and "site site-1" in status["reason"]
    assert sorted(s["status"] for s in status["sites"]) == ["failed", "failed"]
    assert not list((run_dir / "checkpoints").glob("round-*"))
    assert "HC18 folder not found" in out.stdout  # the terminal says why, not only the run folder


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return "?"


def _tree(root: int) -> list[psutil.Process]:
    """``root``'s descendants, and theirs (SuperExec and Ray run in sessions of their own, still as descendants)."""
    try:
        return psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _in_groups(groups: set[int]) -> list[psutil.Process]:
    """Every process in one of the process groups ``groups`` (Ray's agents stay in the SuperExec's)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


@pytest.mark.e2e
def test_a_launcher_killed_with_sigkill_leaves_no_process_behind(tmp_path: Path) -> None:
    # Prepare: a simulate run, killed once its ServerApp wrote the run folder and Ray runs the sites
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(_cli("simulate", "--preset", "smoke", "--run-dir", str(run_dir), "--quiet"),
                                cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            children = _tree(launcher.pid)
            names = " ".join(_cmd(p) for p in still_running(children))
            if "flower-superlink" in names and "flwr run" in names and "raylet" in names \
                    and (run_dir / "config.json").is_file():
                break
            assert launcher.poll() is None, "the launcher exited before its run started"
            time.sleep(0.5)
        else:
            raise AssertionError(f"the run never came up: {names}")
        children = _tree(launcher.pid)
        groups = {p.pid for p in children if p.pid == os.getpgid(p.pid)} - {os.getpgid(0)}
        assert len(children) >= 5, [_cmd(p)[:80] for p in children]
        # Execute
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        # Assert: every process it had started, and every member of their process groups, is gone within seconds
        deadline = time.monotonic() + 15
        while (left := still_running(children + _in_groups(groups))) and time.monotonic() < deadline:
            time.sleep(0.25)
        survivors = [(p.pid, _cmd(p)[:120]) for p in left]
        assert survivors == [], survivors
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for p in still_running(children + _in_groups(groups)):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.e2e
def test_deploy_supernode_returns_non_zero_when_the_superlink_refuses_the_node(tmp_path: Path, capsys) -> None:
    # Prepare: a SuperLink with node authentication; site-0 registered (the control), rogue never registered
    layout = Layout(tmp_path / "dep")
    make_server_certificates(layout.path("certs"))
    make_site_keys(layout.path("keys"), "site-0")
    try:
        start_superlink(layout)
        register_sites(layout)
        make_site_keys(layout.path("keys"), "rogue")  # a valid key pair that the admin never registered
        # Execute
        accepted = deploy_cli(["supernode", "--dir", str(layout.root), "--site", "site-0", "--index", "0"])
        accepted_out = capsys.readouterr().out
        refused = deploy_cli(["supernode", "--dir", str(layout.root), "--site", "rogue", "--index", "1"])
        refused_out = capsys.readouterr().out
    finally:
        stop(layout)
    # Assert
    assert accepted == 0 and f"node id {layout.nodes()['site-0']}" in accepted_out
    assert refused != 0
    assert "refused" in refused_out and "Failed to activate SuperNode" in refused_out
    assert deployment_processes(layout) == []


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_simulate_refuses_a_non_finite_epsilon_before_starting_anything(tmp_path: Path, value: str) -> None:
    # Prepare
    cmd = _cli("simulate", "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--quiet",
               "--set", f"privacy.target-epsilon={value}")
    # Execute
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    # Assert
    assert out.returncode != 0
    assert "privacy.target-epsilon" in out.stderr and "finite" in out.stderr
    assert not (tmp_path / "run").exists()
