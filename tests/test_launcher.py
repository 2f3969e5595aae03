"""The launcher: terminal echo (each ServerApp log record once), clean stop when killed, reuse of finished runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.core.config import RunConfig
from common.core.provenance import code_version
from simulations.launcher import EchoDeduplicator, concurrent_sites, finished_as, stage_app, write_connection


def test_echo_drops_the_timestamped_copy_of_a_console_line_and_keeps_everything_else() -> None:
    # Prepare: what `flwr run --stream` printed in a demo run (console line, then its timestamped copy)
    lines = [
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/3]\n",
        "12/01/2026 08:14:19:INFO:[ROUND 1/3]\n",
        "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)\n",
        "12/01/2026 08:14:19:INFO:configure_train: Sampled 3 nodes (out of 3)\n",
        "12/01/2026 08:14:23:DEBUG:Constructed ActorPool with: 2 actors\n",  # no console twin: kept
        "\x1b[36m(ClientAppActor pid=1)\x1b[0m site-0: round 1\n",
        "12/01/2026 08:14:25:INFO:[ROUND 1/3]\n",  # same text but not right after its console line: kept
        "\x1b[93mWARNING \x1b[0m:   node 7 failed\n",
        "12/01/2026 08:14:26:WARNING:node 7 failed\n",
    ]
    dedup = EchoDeduplicator()
    # Execute
    kept = [line for line in lines if dedup.keep(line)]
    # Assert
    assert kept == [lines[0], lines[2], lines[4], lines[5], lines[6], lines[7]]


def test_a_terminated_launcher_stops_the_process_group_it_started(tmp_path) -> None:
    # Prepare: a launcher-like script that starts a child group (as the SuperLink is started) and waits
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "launch.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from simulations.launcher import process, terminate_as_exit\n"
        "with terminate_as_exit(), process(['sleep', '300'], log_file=Path(sys.argv[1]), env={'PATH': '/usr/bin:/bin'}) as p:\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(300)\n"
    )
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path / "child.log")], stdout=subprocess.PIPE,
                                text=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    child = int(launcher.stdout.readline())
    os.kill(child, 0)  # the child runs
    # Execute: kill the launcher the way `kill PID` does
    launcher.send_signal(signal.SIGTERM)
    rc = launcher.wait(timeout=30)
    # Assert: the launcher exited 143 and took its child group with it
    assert rc == 143
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} survived its launcher")


def test_a_finished_run_is_reused_only_when_its_config_is_the_one_asked_for(tmp_path: Path) -> None:
    # Prepare: a run folder as the server leaves it, first unfinished, then finished
    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path), "data.images-per-site": 8})
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "code_version": "test"}))
    (tmp_path / "status.json").write_text(json.dumps({"state": "running"}))
    # Execute / Assert
    assert finished_as(tmp_path, cfg) is False
    (tmp_path / "status.json").write_text(json.dumps({"state": "finished"}))
    assert finished_as(tmp_path, cfg) is True
    other = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path), "data.images-per-site": 12})
    with pytest.raises(FileExistsError, match="data.images-per-site"):
        finished_as(tmp_path, other)


def test_the_staged_app_reports_the_code_version_of_the_checkout_it_was_copied_from(tmp_path: Path) -> None:
    # Prepare: a staged copy outside any git checkout (as in a run folder)
    app = stage_app(tmp_path / ".app")
    probe = "from common.core.provenance import code_version; print(code_version())"
    # Execute: import the copy's own `common`, as the ServerApp does
    out = subprocess.run([sys.executable, "-c", probe], cwd=app, env={"PYTHONPATH": str(app), "PATH": ""},
                         capture_output=True, text=True, check=True)
    # Assert
    assert out.stdout.strip() == code_version() != "unknown"


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited; only its reaper is missing
    except psutil.NoSuchProcess:
        return True


def test_a_watchdog_stops_what_a_launcher_killed_with_sigkill_had_started(tmp_path: Path) -> None:
    # Prepare: a launcher-like script whose child (own session, like the SuperLink) starts a grandchild in a session
    # of its own (like the SuperExec); the script is then killed with SIGKILL, so no `finally` of its runs
    import os
    import signal
    import time

    script = tmp_path / "launch.py"
    script.write_text(
        "import subprocess, time\n"
        "from simulations.watchdog import Watchdog\n"
        "dog = Watchdog(grace_s=1.0)\n"
        "child = subprocess.Popen(['bash', '-c', 'setsid sleep 300 & echo $!; wait'], stdout=subprocess.PIPE,\n"
        "                         text=True, start_new_session=True)\n"
        "dog.adopt(child.pid)\n"
        "print(child.pid, child.stdout.readline().strip(), dog.proc.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    launcher = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
    pids = [int(p) for p in launcher.stdout.readline().split()]
    assert len(pids) == 3, "the launcher script failed before starting its child"
    try:
        time.sleep(1.5)  # the watchdog records descendants twice a second
        assert not any(_gone(p) for p in pids)
        # Execute
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        # Assert: child, grandchild and the watchdog itself are gone
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in pids if not _gone(p)] == []
    finally:
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)


def test_a_dismissed_watchdog_leaves_the_processes_it_watched_alone(tmp_path: Path) -> None:
    # Prepare
    import os
    import signal

    from simulations.watchdog import Watchdog

    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        dog = Watchdog(grace_s=1.0)
        dog.adopt(sleeper.pid)
        # Execute
        dog.close()
        # Assert: the helper exited on "done" and the owner's process still runs (its owner stops it)
        assert dog.proc.returncode == 0
        assert sleeper.poll() is None
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


def _fake_superlink(tmp_path: Path, server_s: float) -> subprocess.Popen[bytes]:
    """A stand-in SuperLink whose child runs as ``flwr-simulation`` for ``server_s`` seconds, then exits."""
    server = tmp_path / "flwr-simulation"
    server.write_text(f"import time\ntime.sleep({server_s})\n")
    code = f"import subprocess, sys, time; subprocess.run([sys.executable, {str(server)!r}]); time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_whose_server_process_died_unfinished_is_stopped_and_a_finished_one_is_not(tmp_path: Path,
                                                                                        finished: bool) -> None:
    # Prepare: a SuperLink stand-in whose server process lives 1.5 s; `flwr run` stand-in: a sleep in its own session
    import time

    from simulations.launcher import LostServerMonitor

    if finished:
        (tmp_path / "status.json").write_text(json.dumps({"state": "finished"}))
    link = _fake_superlink(tmp_path, 1.5)
    run = subprocess.Popen(["sleep", "30"], start_new_session=True)
    monitor = LostServerMonitor(link.pid, tmp_path, grace_s=0.5, poll_s=0.1)
    try:
        # Execute
        monitor.watch(run.pid)
        try:
            code = run.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(0.3)
    finally:
        monitor.close()
        for proc in (run, link):
            proc.kill()
            proc.wait()
    # Assert: the server gone while the run is unfinished stops `flwr run` (SIGTERM) well before Flower's heartbeat
    # timeout would; a finished run is left to end by itself
    if finished:
        assert code is None and not monitor.lost
    else:
        assert code == -15 and monitor.lost


@pytest.mark.parametrize(("sites", "slots", "expected"), [
    (3, 2, 3),  # two waves (2 + 1, a core idle) -> all three at once: 1.5 instead of 2 site-times
    (5, 2, 3),  # 3 + 2: 2.5 site-times, against 3 in waves of 2
    (4, 2, 2),  # two full waves already: nothing to gain
    (8, 2, 2),  # 3 + 3 + 2 ties 4 waves of 2: the smaller (less memory)
    (2, 2, 2), (1, 2, 1),  # no more sites than slots
    (20, 16, 16),  # 17 + 3 would not finish sooner
])
def test_sites_share_the_cores_only_where_waves_would_leave_a_core_idle(sites: int, slots: int,
                                                                        expected: int) -> None:
    assert concurrent_sites(sites, slots) == expected


def test_the_connection_tells_ray_of_one_more_site_only_when_it_runs_sooner(tmp_path: Path) -> None:
    assert write_connection(tmp_path / "a", port=1, num_sites=3, cores=2) == 3
    text = (tmp_path / "a" / "config.toml").read_text()
    assert "options.backend.init-args.num-cpus = 3\n" in text and "client-resources.num-cpus = 1\n" in text
    assert write_connection(tmp_path / "b", port=1, num_sites=4, cores=2) == 2
    assert "init-args" not in (tmp_path / "b" / "config.toml").read_text()
    # a site that needs both cores runs alone: 3 sites -> one at a time, Ray left at its default
    assert write_connection(tmp_path / "c", port=1, num_sites=3, cpus_per_site=2, cores=2) == 1
    assert "init-args" not in (tmp_path / "c" / "config.toml").read_text()
