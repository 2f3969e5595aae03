"""Start Flower's real machinery for a run: a SuperLink (simulation runtime) and ``flwr run``.

The SuperLink runs with ``--disable-runtime-dependency-installation`` so that the project's own venv is
used (no ``uv sync`` into a fresh environment), on a free loopback port, with ``FLWR_HOME`` inside the run
folder; everything started here is stopped here, by process group, and by a
:class:`~simulations.watchdog.Watchdog` when the launcher dies without running its ``finally`` blocks (``kill -9``).
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from common.core.config import RunConfig, run_config_toml
from common.core.provenance import code_version
from common.core.run_layout import RunLayout
from common.federated.update_bound import update_bounds
from simulations.progress import event_line
from simulations.watchdog import Watchdog

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "difusal"


@dataclass(frozen=True)
class LaunchResult:
    """How a ``flwr run`` ended."""

    returncode: int
    run_dir: Path
    wall_s: float
    log_file: Path
    reason: str = ""  # why the run did not finish (empty when it did)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The offline environment, stated once: no hub downloads, no Flower telemetry or update check.
OFFLINE_ENV: Mapping[str, str] = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}


def set_offline_env() -> None:
    """Default this process to :data:`OFFLINE_ENV` and caches inside the project (values already set are kept)."""
    for key, value in {**OFFLINE_ENV, "TORCH_HOME": str(PROJECT_ROOT / ".cache" / "torch"),
                       "MPLCONFIGDIR": str(PROJECT_ROOT / ".cache" / "mpl")}.items():
        os.environ.setdefault(key, value)


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: offline, no telemetry, caches in the project."""
    env = dict(os.environ)
    env.update(
        {
            **OFFLINE_ENV,
            "FLWR_HOME": str(flwr_home),
            "TORCH_HOME": env.get("TORCH_HOME", str(PROJECT_ROOT / ".cache" / "torch")),
            "RAY_TMPDIR": env.get("RAY_TMPDIR", "/tmp/ray-difusal"),
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "DIFUSAL_ASSETS": env.get("DIFUSAL_ASSETS", str(PROJECT_ROOT / "common" / "assets")),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")])),
            # The SuperLink starts `flower-superexec` (and Ray its workers) by name: the venv's bin must come first.
            "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH", "")])),
        }
    )
    env.update(extra or {})
    return env


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


@contextmanager
def process(cmd: list[str], *, log_file: Path, env: Mapping[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group, logging to ``log_file``; stop the whole group on exit."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True)
        try:
            yield proc
        finally:
            stop_process_group(proc)


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` (main thread only).

    A killed launcher then leaves through its ``finally`` blocks and stops the SuperLink and ``flwr run`` it started,
    instead of orphaning them (an orphaned simulation goes on writing into the run folder).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process_group(proc: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


def wait_http(
    url: str, *, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, ca_file: Path | None = None
) -> None:
    """Poll ``url`` until it answers 2xx (over TLS verified against ``ca_file`` when given); fail early if ``proc`` died."""
    import ssl

    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310 - our own SuperLink
                if 200 <= resp.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


APP_PACKAGES = ("common", "client", "server")
# Left out of the bundle the sites and the server run: offline analysis (evaluation, audit, pretraining).
APP_EXCLUDED = ("common/analysis",)


@dataclass(frozen=True)
class AppOverlay:
    """A module added to a staged app and the components that replace the product's (tests stage fault apps so)."""

    module: Path
    serverapp: str
    clientapp: str


def stage_app(dst: Path, overlay: AppOverlay | None = None) -> Path:
    """Copy the Flower app (pyproject + the runtime packages, without :data:`APP_EXCLUDED`) to ``dst``.

    ``flwr run`` builds its FAB by walking the project folder, ``.venv`` included (seconds per run);
    a staged copy holds only what the app needs. ``overlay`` adds one module at the top of the copy and points
    ``[tool.flwr.app.components]`` at its apps.
    """
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", dst / "pyproject.toml")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for pkg in APP_PACKAGES:
        shutil.copytree(PROJECT_ROOT / pkg, dst / pkg, ignore=ignore)
    for excluded in APP_EXCLUDED:
        shutil.rmtree(dst / excluded)
    # The copy is no git checkout: record the version of the code it was taken from (see common.core.provenance).
    (dst / "common" / "_staged_version.py").write_text(f"CODE_VERSION = {code_version()!r}\n")
    if overlay is not None:
        shutil.copy2(overlay.module, dst / overlay.module.name)
        pyproject = (dst / "pyproject.toml").read_text()
        components = f'serverapp = "{PRODUCT_COMPONENTS[0]}"\nclientapp = "{PRODUCT_COMPONENTS[1]}"\n'
        if components not in pyproject:
            raise RuntimeError(f"pyproject.toml no longer declares the components {PRODUCT_COMPONENTS}: update stage_app")
        (dst / "pyproject.toml").write_text(pyproject.replace(
            components, f'serverapp = "{overlay.serverapp}"\nclientapp = "{overlay.clientapp}"\n'))
    return dst


# What ``[tool.flwr.app.components]`` names: the product's ServerApp and ClientApp.
PRODUCT_COMPONENTS = ("server.app:app", "client.app:app")


def write_run_config(cfg: RunConfig, folder: Path, *, resume: bool) -> Path:
    """Write ``cfg`` as ``<folder>/run-config.toml`` for ``flwr run --run-config``; the app rebuilds ``cfg`` exactly.

    A TOML file, not a ``k=v`` string: every value is quoted by a TOML writer, so paths with spaces or quotes
    survive (see :func:`common.core.config.run_config_toml`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run-config.toml"
    path.write_text(run_config_toml(cfg, resume=resume), encoding="utf-8")
    return path


def concurrent_sites(num_sites: int, slots: int) -> int:
    """How many simulated sites to run at once on ``slots`` CPU slots (cores / CPUs per site).

    Ray runs as many sites at once as it has slots, so 3 sites on 2 cores train in two waves and one core idles
    through the second (a 64 px demo round: 92 s of training instead of 63 s with the three at once). This returns
    the number k in [slots, slots + 1] (never above ``num_sites``) whose waves finish first when each site needs the
    same CPU time: a wave of w sites takes max(w, slots) / slots of one site's time. Ties go to the smaller k (less
    memory: each running site holds its own models). One more site than slots at most, so memory grows by one site.
    """
    if num_sites <= slots:
        return max(1, num_sites)

    def makespan(k: int) -> float:
        full, rest = divmod(num_sites, k)
        return full * max(k, slots) / slots + (max(rest, slots) / slots if rest else 0.0)

    return min(range(slots, min(num_sites, slots + 1) + 1), key=lambda k: (makespan(k), k))


def write_connection(flwr_home: Path, *, port: int, num_sites: int, cpus_per_site: float = 1.0,
                     cores: int | None = None) -> int:
    """``FLWR_HOME/config.toml`` with one SuperLink connection for ``flwr run``; returns the sites run at once.

    When more sites than CPU slots would leave a core idle in the last wave (:func:`concurrent_sites`), Ray is told
    it has CPUs for one site more (``init-args.num-cpus``): the sites then share the cores instead of waiting.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    cores = cores or os.cpu_count() or 1
    slots = max(1, int(cores // cpus_per_site))
    running = concurrent_sites(num_sites, slots)
    ray_cpus = f"options.backend.init-args.num-cpus = {math.ceil(running * cpus_per_site)}\n" if running > slots else ""
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"
        f"options.num-supernodes = {num_sites}\n"
        f"options.backend.client-resources.num-cpus = {int(cpus_per_site) if float(cpus_per_site).is_integer() else cpus_per_site}\n"
        "options.backend.client-resources.num-gpus = 0.0\n"
        + ray_cpus
    )
    return running


SIMULATION_PROCESS = "flwr-simulation"  # Flower's process that runs the ServerApp and the simulated ClientApps
LOST_SERVER_GRACE_S = 10.0


class LostServerMonitor:
    """Stops ``flwr run --stream`` soon after the process that runs the ServerApp dies without finishing the run.

    Flower's SuperLink learns that this process is gone only when two 30 s heartbeats are missed, and the stream waits
    for it: a run whose server was killed (``kill -9``, out of memory) used to hang about a minute before it reported
    failure. This thread watches the SuperLink's descendants for :data:`SIMULATION_PROCESS`; once the one it saw has
    been gone for ``grace_s`` and the run folder's status does not say finished, it sends SIGTERM to the process group
    of ``flwr run`` (:meth:`watch`) and sets :attr:`lost`. A run that finished is never touched.
    """

    def __init__(self, superlink_pid: int, run_dir: Path, *, grace_s: float = LOST_SERVER_GRACE_S,
                 poll_s: float = 1.0) -> None:
        self.superlink_pid, self.run_dir, self.grace_s, self.poll_s = superlink_pid, Path(run_dir), grace_s, poll_s
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, run_pid: int) -> None:
        """Start watching; ``run_pid`` leads the process group to stop (``flwr run``, started in its own session)."""
        self._thread = threading.Thread(target=self._watch, args=(run_pid,), daemon=True, name="lost-server-monitor")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s)

    def _simulation_running(self) -> bool:
        import psutil

        try:
            children = psutil.Process(self.superlink_pid).children(recursive=True)
        except psutil.Error:
            return False
        for child in children:
            try:
                if any(SIMULATION_PROCESS in part for part in child.cmdline()[:2]) and \
                        child.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                continue
        return False

    def _watch(self, run_pid: int) -> None:
        seen, gone_at = False, None
        while not self._stop.wait(self.poll_s):
            if self._simulation_running():
                seen, gone_at = True, None
                continue
            if not seen:
                continue
            gone_at = time.monotonic() if gone_at is None else gone_at
            if time.monotonic() - gone_at >= self.grace_s and not finished(self.run_dir):
                self.lost = True
                try:
                    os.killpg(run_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                return


def run_simulation(
    cfg: RunConfig,
    *,
    num_sites: int,
    resume: bool = False,
    extra_env: Mapping[str, str] | None = None,
    echo: bool = True,
    events: bool = False,
    on_line: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
    cpus_per_site: float = 1.0,
    overlay: AppOverlay | None = None,
) -> LaunchResult:
    """Run ``cfg`` with ``num_sites`` simulated SuperNodes through a SuperLink and ``flwr run``.

    Parameters
    ----------
    cfg:
        Must have an absolute ``run_dir``; the run folder receives ``logs/`` and ``.flwr/``.
    echo:
        Stream the run's log to this process' stdout as well as to ``logs/flwr-run.log``.
    events:
        When not ``echo``: print only the server's events, one plain line each (:func:`simulations.progress.event_line`).
    on_line:
        When not ``echo``: receives each line of the stream instead (the live view, :class:`simulations.progress.LiveView`).
    cpus_per_site:
        Ray CPUs reserved per simulated site: ``os.cpu_count()`` runs one site at a time.
    overlay:
        Replace the product's apps in the staged bundle (:func:`stage_app`; the fault-injection tests use it).
    """
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_absolute():
        raise ValueError(f"run_dir must be absolute, got {run_dir}")
    # a config the server would refuse (e.g. SGD heads, whose updates the server cannot bound) fails here, with its
    # reason, before a SuperLink starts (it used to surface as Flower's exit code 700 with the reason in the logs)
    update_bounds(cfg)
    layout = RunLayout(run_dir)
    flwr_home = layout.flower_home
    port = free_port()
    write_connection(flwr_home, port=port, num_sites=num_sites, cpus_per_site=cpus_per_site)
    env = flower_env(flwr_home, extra_env)
    logs = layout.logs
    superlink_cmd = [
        _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
        "--database", ":flwr-in-memory:",
    ]
    t0 = time.perf_counter()
    with (terminate_as_exit(), Watchdog() as dog,
          process(superlink_cmd, log_file=logs / "superlink.log", env=env) as link):
        dog.adopt(link.pid)
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=link)
        app_dir = stage_app(layout.app, overlay)
        cmd = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream",
               "--run-config", str(write_run_config(cfg, flwr_home, resume=resume))]
        monitor = LostServerMonitor(link.pid, run_dir)

        def started(pid: int) -> None:
            dog.adopt(pid)
            monitor.watch(pid)

        try:
            rc = run_and_tee(cmd, env=env, log_file=logs / "flwr-run.log", echo=echo, timeout_s=timeout_s,
                             on_start=started, events=events, on_line=on_line)
        finally:
            monitor.close()
    rc, reason = outcome(run_dir, rc)
    if monitor.lost and run_status(run_dir).get("state") != "failed":  # a server that failed cleanly said why
        reason = (f"the process running the server ({SIMULATION_PROCESS}) exited without finishing the run (killed, "
                  f"or out of memory); stopped waiting {monitor.grace_s:.0f} s later. {reason}")
    return LaunchResult(returncode=rc, run_dir=run_dir, wall_s=time.perf_counter() - t0, log_file=logs / "flwr-run.log",
                        reason=reason)


def run_status(run_dir: Path) -> dict[str, Any]:
    """``status.json`` of ``run_dir`` (``{}`` when the server never wrote one)."""
    import json

    status = RunLayout(Path(run_dir)).status
    return dict(json.loads(status.read_text())) if status.is_file() else {}


def finished(run_dir: Path) -> bool:
    """Whether the server marked ``run_dir`` as finished."""
    return run_status(run_dir).get("state") == "finished"


def outcome(run_dir: Path, returncode: int) -> tuple[int, str]:
    """The exit code and failure reason of a run whose ``flwr run`` exited with ``returncode``.

    ``flwr run --stream`` exits 0 even when the ServerApp raised: the run folder's status is the truth.
    """
    status = run_status(run_dir)
    if status.get("state") == "finished":
        return returncode, "" if returncode == 0 else f"flwr run exited with code {returncode}"
    if status.get("reason"):
        reason = str(status["reason"])
    elif status:
        reason = f"the server stopped without finishing (status {status.get('state')!r}); see {run_dir}/logs/"
    else:
        reason = "the server wrote no status (it failed to start or was killed); see the run's logs/"
    return returncode or 1, reason


def finished_as(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` is a finished run of exactly ``cfg`` (an experiment can reuse it instead of re-running).

    Raises ``FileExistsError`` when it finished with another config: reusing it would mix settings in one table.
    """
    import json

    if not finished(run_dir):
        return False
    saved = RunConfig.from_dict(json.loads(RunLayout(Path(run_dir)).config.read_text())["config"])
    want, have = cfg.to_flat(), saved.to_flat()
    if want != have:
        diff = sorted(k for k in {*want, *have} if want.get(k) != have.get(k))
        raise FileExistsError(f"{run_dir} holds a finished run with another config (differs in {diff}); "
                              "choose another output folder or remove it")
    return True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONSOLE_LINE = re.compile(r"^([A-Z]+) *:(.*)$")  # Flower's console format: "INFO :      message"
_STAMPED_LINE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:([A-Z]+):(.*)$")  # "12/01/2026 08:14:19:INFO:message"


class EchoDeduplicator:
    """``flwr run --stream`` prints each ServerApp log record twice: console format, then timestamped format.

    :meth:`keep` drops the timestamped copy of the console line just before it (the terminal shows each record
    once); every other line is kept. The log file is written raw.
    """

    def __init__(self) -> None:
        self._last: tuple[str, str] | None = None

    def keep(self, line: str) -> bool:
        text = _ANSI.sub("", line.rstrip("\n"))
        stamped = _STAMPED_LINE.match(text)
        if stamped:
            duplicate = self._last == (stamped.group(1), stamped.group(2).strip())
            self._last = None
            return not duplicate
        console = _CONSOLE_LINE.match(text)
        self._last = (console.group(1), console.group(2).strip()) if console else None
        return True


def run_and_tee(cmd: list[str], *, env: Mapping[str, str], log_file: Path, echo: bool, timeout_s: float | None,
                on_start: Callable[[int], None] | None = None, events: bool = False,
                on_line: Callable[[str], None] | None = None) -> int:
    """Run ``cmd`` in its own process group, its output to ``log_file`` (and stdout when ``echo``); its exit code.

    ``events`` (when not ``echo``): print the server's events only, one plain line each.

    ``on_start`` receives the pid once started (a :class:`~simulations.watchdog.Watchdog` adopts it).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with log_file.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True, cwd=PROJECT_ROOT)
        if on_start is not None:
            on_start(proc.pid)
        dedup = EchoDeduplicator()
        try:
            assert proc.stdout is not None  # for the type checker: PIPE was requested
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.decode(errors="replace")
                if echo and dedup.keep(text):
                    sys.stdout.write(text)
                    sys.stdout.flush()
                elif on_line is not None and not echo:
                    on_line(text)
                elif events and not echo and (event := event_line(text)) is not None:
                    print(event, flush=True)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"flwr run exceeded {timeout_s:.0f}s")
            return proc.wait()
        finally:
            stop_process_group(proc)

