"""A real deployment: a TLS SuperLink with SuperNode authentication, one SuperNode per site, ``flwr run``.

``python -m simulations.deploy <certs|keys|superlink|supernode|run|stop|up> --dir D``. Everything listens on
127.0.0.1 and runs in the project's venv (``--disable-runtime-dependency-installation``). One folder ``D``:

- ``certs/``: ``ca.crt`` (every site gets it), ``ca.key`` (admin only), ``server.crt``/``server.key`` (SuperLink);
- ``keys/<site>/node.key`` (stays at the site), ``keys/<site>/node.pub`` (registered at the SuperLink);
- ``nodes.json``: site -> node id given at registration; ``superlink.json``: the address SuperNodes dial;
- ``.flwr/config.toml``: the connection ``flwr run`` / ``flwr supernode register`` use (address + CA);
- ``sites/<site>/``: ``node-config.toml``, ``state/`` (privacy ledger), ``.flwr/`` (the SuperNode's FLWR_HOME);
- ``logs/<name>.log``, ``pids/<name>.pid``; ``run/``: the federation's run folder (default).

Flower 1.42 specifics (read from its source): the SuperLink serves Fleet, Control and Runtime APIs over HTTPS on one
``--port``; ``--enable-supernode-auth`` refuses every SuperNode whose public key was not registered with
``flwr supernode register``; a SuperNode that dies is declared unavailable after 2 missed 30 s heartbeats, and
the server then receives an error reply for it (so a round with a dead site still ends).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from common.core.config import RunConfig
from common.federated.update_bound import update_bounds
from simulations.certs import (
    ServerCertificates,
    SiteKeys,
    certificate_hosts,
    check_site_name,
    make_server_certificates,
    make_site_keys,
)
from simulations.launcher import (
    CONNECTION,
    LaunchResult,
    flower_env,
    free_port,
    outcome,
    run_and_tee,
    stage_app,
    stop_process_group,
    wait_http,
    write_run_config,
)
from simulations.watchdog import Watchdog

LOOPBACK = "127.0.0.1"
MARKER_ENV = "DIFUSAL_DEPLOYMENT"  # every process started here carries it: `stop` finds orphans by it
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Layout:
    """Where one deployment keeps its files (see the module docstring)."""

    root: Path

    def path(self, *parts: str) -> Path:
        """A path inside the deployment folder."""
        return self.root.joinpath(*parts)

    def certificates(self) -> ServerCertificates:
        """The CA and SuperLink certificate paths (``certs/``)."""
        c = self.path("certs")
        return ServerCertificates(c / "ca.crt", c / "ca.key", c / "server.crt", c / "server.key")

    def keys(self, site: str) -> SiteKeys:
        """One site's key pair paths (``keys/<site>/``)."""
        return SiteKeys(site, self.path("keys", site, "node.key"), self.path("keys", site, "node.pub"))

    def sites(self) -> list[str]:
        """Sites that have a key pair."""
        folder = self.path("keys")
        return sorted(p.parent.name for p in folder.glob("*/node.pub")) if folder.is_dir() else []

    def nodes(self) -> dict[str, int]:
        """Site -> node id from the last registration."""
        f = self.path("nodes.json")
        return {k: int(v) for k, v in json.loads(f.read_text()).items()} if f.is_file() else {}

    def superlink_address(self) -> str:
        """``host:port`` of the running SuperLink, from ``superlink.json``."""
        f = self.path("superlink.json")
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: pass the SuperLink's host:port (--superlink) or start the "
                                    f"SuperLink first (deploy superlink --dir {self.root})")
        return str(json.loads(f.read_text())["address"])


@dataclass(frozen=True)
class SiteNode:
    """One hospital's SuperNode and its ``node_config`` (keys as read by :func:`client.site.resolve_site`)."""

    index: int
    name: str
    data_source: str | None = None
    data_root: str | None = None
    epsilon: float | None = None
    state_dir: Path | None = None

    def node_config(self, layout: Layout) -> dict[str, object]:
        """The ``--node-config`` entries of this site."""
        cfg: dict[str, object] = {"site-index": self.index, "site-name": check_site_name(self.name),
                                  "state-dir": str(self.state_dir or layout.path("sites", self.name, "state"))}
        for key, value in (("data-source", self.data_source), ("data-root", self.data_root), ("epsilon", self.epsilon)):
            if value is not None:
                cfg[key] = float(value) if key == "epsilon" else str(value)
        return cfg


def default_sites(num_sites: int) -> list[SiteNode]:
    """``site-0`` ... ``site-<n-1>`` with indices 0..n-1."""
    if num_sites < 1:
        raise ValueError(f"num_sites={num_sites}: a federation needs at least one site")
    return [SiteNode(index=i, name=f"site-{i}") for i in range(num_sites)]


def _toml(values: Mapping[str, object]) -> str:
    """Flat TOML (JSON string escapes are valid TOML basic strings)."""
    return "".join(f"{k} = {json.dumps(v) if isinstance(v, str) else repr(v)}\n" for k, v in values.items())


def _env(layout: Layout, flwr_home: Path) -> dict[str, str]:
    """Flower's offline env plus the venv's ``bin`` (the SuperLink spawns ``flower-superexec`` by name)."""
    return flower_env(flwr_home, {"PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
                                  MARKER_ENV: str(layout.root.resolve())})


def _spawn(layout: Layout, name: str, cmd: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` detached in its own process group; log to ``logs/<name>.log``, pid to ``pids/<name>.pid``."""
    log_file, pid_file = layout.path("logs", f"{name}.log"), layout.path("pids", f"{name}.pid")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env),
                                cwd=layout.root, start_new_session=True)
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def start_superlink(
    layout: Layout, *, port: int | None = None, host: str = LOOPBACK, advertise: str | None = None,
    database: str = ":flwr-in-memory:", timeout_s: float = 60.0,
) -> subprocess.Popen[bytes]:
    """Start the SuperLink with TLS and SuperNode authentication; write the CLI connection; wait for health.

    Parameters
    ----------
    port:
        The one HTTPS port (Fleet, Control, Runtime APIs); a free port when ``None``.
    host:
        The interface to bind: the loopback (default) or ``0.0.0.0`` / a LAN address for a multi-machine consortium.
    advertise:
        The name SuperNodes and ``flwr`` dial (it must be in the server certificate, ``certs --host``); default
        ``host``, required when ``host`` is a wildcard.
    database:
        ``:flwr-in-memory:`` (registrations are lost on restart: :func:`register_sites` again) or a file path.
    """
    certs = layout.certificates()
    if not (certs.server_cert.is_file() and certs.server_key.is_file() and certs.ca_cert.is_file()):
        raise FileNotFoundError(f"no certificates in {certs.ca_cert.parent}: run `deploy certs --dir {layout.root}`")
    if advertise is None:
        if host in ("0.0.0.0", "::", ""):
            raise ValueError(f"host={host!r} binds every interface: give the name the hospitals dial (--advertise), "
                             f"one of the names in {certs.server_cert}")
        advertise = host
    names = certificate_hosts(certs.server_cert)
    if advertise not in names:
        raise ValueError(f"{advertise!r} is not a name in the server certificate {certs.server_cert} ({names}): "
                         f"TLS would fail; remake it with `deploy certs --host {advertise} --overwrite`")
    port = port or free_port()
    cmd = [
        str(VENV_BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile",
        str(certs.server_cert), "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--isolation", "subprocess", "--host", host,
        "--port", str(port), "--database", database,
    ]
    proc = _spawn(layout, "superlink", cmd, _env(layout, layout.path("superlink", ".flwr")))
    address = f"{advertise}:{port}"
    layout.path("superlink.json").write_text(json.dumps({"address": address, "pid": proc.pid}))
    layout.path(".flwr").mkdir(parents=True, exist_ok=True)
    layout.path(".flwr", "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        + _toml({"address": address, "root-certificates": str(certs.ca_cert.resolve())})
    )
    wait_http(f"https://{address}/health", ca_file=certs.ca_cert, timeout_s=timeout_s, proc=proc)
    return proc


def _flwr(layout: Layout, args: Sequence[str]) -> subprocess.Popen[str]:
    """Start ``flwr <args> --format json`` with the deployment's connection (``.flwr/config.toml``)."""
    return subprocess.Popen([str(VENV_BIN / "flwr"), *args, "--format", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(layout, layout.path(".flwr")), cwd=layout.root)


def _json_answer(proc: subprocess.Popen[str], *, timeout_s: float = 120.0) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` process printed."""
    stdout, stderr = proc.communicate(timeout=timeout_s)
    start = stdout.find("{")
    if start < 0:
        raise RuntimeError(f"{' '.join(map(str, proc.args))} gave no JSON (exit {proc.returncode}): {stderr[-2000:]}")
    return dict(json.loads(stdout[start:]))


def register_sites(layout: Layout, sites: Sequence[str] | None = None) -> dict[str, int]:
    """Register each site's public key at the running SuperLink (``flwr supernode register``); return node ids."""
    known = layout.nodes()
    sites = list(sites if sites is not None else layout.sites())
    for site in sites:
        if not layout.keys(site).public_key.is_file():
            raise FileNotFoundError(f"{layout.keys(site).public_key} is missing: run `deploy keys --dir "
                                    f"{layout.root} --site {site}` (or copy the site's node.pub there)")
    procs = {s: _flwr(layout, ["supernode", "register", str(layout.keys(s).public_key), CONNECTION, "--name", s])
             for s in sites}  # concurrently: each `flwr` call is seconds of interpreter start-up
    for site, proc in procs.items():
        answer = _json_answer(proc)
        if answer.get("success"):
            known[site] = int(answer["node-id"])
        elif not ("already in use" in str(answer.get("error-message", "")) and site in known):
            raise RuntimeError(f"registering {site} failed: {answer.get('error-message', answer)}")
        # else: a persistent SuperLink database still holds this key under the recorded id
    layout.path("nodes.json").write_text(json.dumps(known, indent=2))
    return known


def node_status(layout: Layout) -> dict[int, str]:
    """Node id -> status (``registered``, ``online``, ``offline``) as the SuperLink sees it."""
    answer = _json_answer(_flwr(layout, ["supernode", "ls", CONNECTION]))
    return {int(n["node-id"]): str(n["status"]) for n in answer.get("nodes", [])}


def wait_online(layout: Layout, nodes: Mapping[str, int], *, timeout_s: float = 120.0,
                procs: Mapping[str, subprocess.Popen[bytes]] | None = None) -> None:
    """Wait until every site in ``nodes`` (site -> node id) is online, so that round 1 samples all of them.

    ``procs`` (site -> its SuperNode process) makes a SuperNode that exits fail the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    logs = {site: layout.path("logs", f"supernode-{site}.log") for site in nodes}
    while time.monotonic() < deadline:  # cheap first: each SuperNode logs its id once activated
        dead = [s for s, p in (procs or {}).items() if s in nodes and p.poll() is not None]
        if dead:
            raise RuntimeError(f"SuperNode(s) {dead} exited before coming online; see {logs[dead[0]]}")
        if all(f.is_file() and f"SuperNode ID: {nodes[s]}" in f.read_text(errors="replace") for s, f in logs.items()):
            break
        time.sleep(0.5)
    while time.monotonic() < deadline:
        status = node_status(layout)
        if all(status.get(n) == "online" for n in nodes.values()):
            return
        time.sleep(1.0)
    raise TimeoutError(f"sites {dict(nodes)} not all online after {timeout_s:.0f}s: {node_status(layout)}; "
                       f"see {layout.path('logs')}/supernode-*.log")


def start_supernode(
    layout: Layout, site: SiteNode, *, superlink: str | None = None, port: int | None = None,
    insecure: bool = False, authenticate: bool = True, max_wait_time: float | None = None,
) -> subprocess.Popen[bytes]:
    """Start one site's SuperNode (TLS against ``ca.crt``, authenticated with the site's private key).

    Parameters
    ----------
    superlink:
        ``host:port`` to dial; default: the address in ``superlink.json``.
    port:
        The SuperNode's local Runtime API port (127.0.0.1 only); a free port when ``None``.
    insecure, authenticate:
        For tests of refusals only: plain HTTP, or no private key.
    max_wait_time:
        Give up reconnecting after this many seconds (``None``: keep trying, as a hospital node should).
    """
    home = layout.path("sites", site.name)
    home.mkdir(parents=True, exist_ok=True)
    (home / "node-config.toml").write_text(_toml(site.node_config(layout)))
    cmd = [str(VENV_BIN / "flower-supernode"), "--superlink", superlink or layout.superlink_address(),
           "--host", LOOPBACK, "--port", str(port or free_port()), "--node-config", str(home / "node-config.toml")]
    ca = layout.certificates().ca_cert
    if not insecure and not ca.is_file():
        raise FileNotFoundError(f"{ca} is missing: copy the consortium's ca.crt there (from the admin's certs/)")
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(ca)]
    if authenticate:
        key = layout.keys(site.name).private_key
        if not key.is_file():
            raise FileNotFoundError(f"{key} is missing: run `deploy keys --dir {layout.root} --site {site.name}`")
        cmd += ["--auth-supernode-private-key", str(key)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return _spawn(layout, f"supernode-{site.name}", cmd, _env(layout, home / ".flwr"))


_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _why_it_exited(text: str) -> str:
    """The error block of a SuperNode's log (Flower's ``ERROR: Exit Code: N`` and its explanation), else its end."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.strip().splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("ERROR")), None)
    if start is None:
        return "\n".join(lines[-8:])
    block = lines[start:start + 8]
    return "\n".join(block[:block.index("")] if "" in block else block)


def wait_activated(layout: Layout, site: str, proc: subprocess.Popen[bytes], *, log_offset: int = 0,
                   timeout_s: float = 120.0) -> int:
    """Wait until the SuperLink activated the SuperNode ``proc`` of ``site``; return its node id.

    Parameters
    ----------
    log_offset:
        Where this start's output begins in ``logs/supernode-<site>.log`` (the log is appended to across starts).

    Raises
    ------
    RuntimeError
        The SuperNode exited first: the SuperLink refused it (an unregistered key, no key) or TLS failed; the
        message quotes the error from its log.
    TimeoutError
        Neither within ``timeout_s``: it is still retrying (an unreachable SuperLink), and keeps running.
    """
    log_file = layout.path("logs", f"supernode-{site}.log")
    deadline = time.monotonic() + timeout_s
    while True:
        with log_file.open("rb") as fh:
            fh.seek(log_offset)
            text = fh.read().decode(errors="replace")
        if found := _NODE_ID.search(text):
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"SuperNode {site} was refused or could not connect: it exited with code "
                               f"{proc.returncode} before the SuperLink activated it. From {log_file}:\n"
                               f"{_why_it_exited(text)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"SuperNode {site} (pid {proc.pid}) was not activated within {timeout_s:.0f}s; it keeps "
                               f"retrying (is the SuperLink up?). See {log_file}; `deploy stop --dir {layout.root}` "
                               f"stops it")
        time.sleep(0.25)


def run_federation(layout: Layout, cfg: RunConfig, *, resume: bool = False, echo: bool = True,
                   timeout_s: float | None = None, on_start: Callable[[int], None] | None = None) -> LaunchResult:
    """``flwr run`` the staged app against the deployment's SuperLink; the run folder's status decides success.

    ``on_start`` receives the pid of ``flwr run`` (a :class:`~simulations.watchdog.Watchdog` adopts it).
    """
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_absolute():
        raise ValueError(f"run_dir must be absolute, got {run_dir!r}")
    update_bounds(cfg)  # a config the server would refuse fails here, before anything runs
    app = stage_app(layout.path(".app"))
    cmd = [str(VENV_BIN / "flwr"), "run", str(app), CONNECTION, "--stream",
           "--run-config", str(write_run_config(cfg, layout.path(".flwr"), resume=resume))]
    if timeout_s is not None and shutil.which("timeout"):
        cmd = ["timeout", str(int(timeout_s)), *cmd]  # a quiet stream never reaches run_and_tee's own check
    t0 = time.perf_counter()
    log_file = layout.path("logs", "flwr-run.log")
    rc = run_and_tee(cmd, env=_env(layout, layout.path(".flwr")), log_file=log_file, echo=echo, timeout_s=timeout_s,
                     on_start=on_start)
    rc, reason = outcome(run_dir, rc)  # `flwr run --stream` exits 0 even when the ServerApp raised
    return LaunchResult(returncode=rc, run_dir=run_dir, wall_s=time.perf_counter() - t0, log_file=log_file,
                        reason=reason)


def deployment_processes(layout: Layout) -> list[int]:
    """Live processes (not zombies) started by this deployment, found by :data:`MARKER_ENV` in their environment."""
    marker = f"{MARKER_ENV}={layout.root.resolve()}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                found.append(int(entry.name))
        except OSError:
            continue  # gone, or not ours to read
    return found


def _signal(pid: int, sig: int, *, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(layout: Layout, *, grace_s: float = 10.0) -> list[int]:
    """Stop everything this deployment started: SIGTERM each pid file's process group, then SIGKILL what is left."""
    pids = [int(f.read_text()) for f in sorted(layout.path("pids").glob("*.pid"))] if layout.path("pids").is_dir() else []
    alive = set(deployment_processes(layout))
    link = layout.path("pids", "superlink.pid")
    link_pid = int(link.read_text()) if link.is_file() else None
    for pid in sorted(pids, key=lambda p: p == link_pid):  # SuperNodes first: they say goodbye to a live SuperLink
        if pid in alive:
            _signal(pid, signal.SIGTERM, group=True)
    deadline = time.monotonic() + grace_s
    while (left := deployment_processes(layout)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # orphans in their own sessions (SuperExec) included
        _signal(pid, signal.SIGKILL, group=False)
    for f in layout.path("pids").glob("*.pid") if layout.path("pids").is_dir() else []:
        f.unlink()
    return sorted(set(pids) & alive | set(left))


class Deployment:
    """A whole deployment on 127.0.0.1 in one object (for ``up`` and the tests); stops everything on exit.

    A :class:`~simulations.watchdog.Watchdog` stops it too if this process is killed without unwinding (``kill -9``).
    """

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.layout = Layout(Path(root).resolve())
        self.port = port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.watchdog: Watchdog | None = None

    def _adopt(self, pid: int) -> None:
        if self.watchdog is None:
            self.watchdog = Watchdog()
        self.watchdog.adopt(pid)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, sites: Sequence[SiteNode], *, timeout_s: float = 120.0) -> dict[str, int]:
        """Certificates and keys (if missing), SuperLink, registration, SuperNodes; wait until all are online."""
        if not self.layout.certificates().server_cert.is_file():
            make_server_certificates(self.layout.path("certs"))
        for site in sites:
            make_site_keys(self.layout.path("keys"), site.name)
        self.procs["superlink"] = start_superlink(self.layout, port=self.port)
        self._adopt(self.procs["superlink"].pid)
        nodes = register_sites(self.layout, [s.name for s in sites])
        for site in sites:
            self.procs[site.name] = start_supernode(self.layout, site)
            self._adopt(self.procs[site.name].pid)
        wait_online(self.layout, {s.name: nodes[s.name] for s in sites}, timeout_s=timeout_s, procs=self.procs)
        return nodes

    def run(self, cfg: RunConfig, **kwargs: Any) -> LaunchResult:
        """:func:`run_federation` against this deployment."""
        return run_federation(self.layout, cfg, on_start=self._adopt, **kwargs)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a started process group (a site's name or ``superlink``); reap it."""
        proc = self.procs.pop(name)
        _signal(proc.pid, sig, group=True)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop SuperNodes, then the SuperLink (reaping them), then any orphan."""
        order = sorted(self.procs, key=lambda n: n == "superlink")
        for name in order:  # all at once: each shutdown takes seconds
            _signal(self.procs[name].pid, signal.SIGTERM, group=True)
        for name in order:
            stop_process_group(self.procs.pop(name))
        stop(self.layout)
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None


def round_sites(run_dir: Path, nodes: Mapping[str, int]) -> list[dict[str, str]]:
    """Per round, each registered site's outcome: its reply status, ``missing`` (sent, never answered) or ``absent``.

    A site that died after receiving its task has no reply of its own: the SuperLink answered for it
    ("Node Unavailable"), so its entry has no uploaded bytes and no error of its own.
    """
    out = []
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        entries = {int(s["node_id"]): s for s in json.loads(line)["sites"]}
        outcome = {}
        for site, node in nodes.items():
            s = entries.get(node)
            if s is None:
                outcome[site] = "absent"
            elif int(s.get("bytes_up", 0)) > 0 or (s["status"] == "failed" and "Unavailable" not in s["reason"]):
                outcome[site] = str(s["status"])
            else:
                outcome[site] = "missing"
        out.append(outcome)
    return out


def _cli(argv: Sequence[str] | None = None) -> int:
    """Parse and dispatch the subcommands."""
    p = argparse.ArgumentParser(prog="python -m simulations.deploy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    cmds = {n: sub.add_parser(n, help=h) for n, h in (
        ("certs", "CA + SuperLink certificate"), ("keys", "a key pair per site"),
        ("superlink", "start the SuperLink (TLS + node auth) and register the sites' public keys"),
        ("supernode", "start one site's SuperNode"), ("run", "flwr run the federation"),
        ("stop", "stop everything started in --dir"), ("up", "all of it for N sites on 127.0.0.1, then stop"))}
    for sp in cmds.values():
        sp.add_argument("--dir", required=True, type=Path, help="the deployment folder")
    cmds["certs"].add_argument("--host", action="append", default=None,
                               help="a name of the SuperLink in its certificate (repeatable; default 127.0.0.1, localhost)")
    cmds["certs"].add_argument("--days", type=int, default=365)
    cmds["certs"].add_argument("--overwrite", action="store_true")
    cmds["keys"].add_argument("--site", action="append", required=True, help="site name (repeatable)")
    for name in ("superlink", "up"):
        cmds[name].add_argument("--port", type=int, default=None, help="HTTPS port (default: a free one)")
    cmds["superlink"].add_argument("--database", default=":flwr-in-memory:")
    cmds["superlink"].add_argument("--host", default=LOOPBACK,
                                   help="interface to bind (default %(default)s; 0.0.0.0 for hospitals on the network)")
    cmds["superlink"].add_argument("--advertise", default=None,
                                   help="the name hospitals dial, as in the certificate (default: --host)")
    sn = cmds["supernode"]
    sn.add_argument("--site", required=True)
    sn.add_argument("--index", type=int, required=True, help="site-index in node_config")
    sn.add_argument("--data-source", default=None)
    sn.add_argument("--data-root", default=None)
    sn.add_argument("--epsilon", type=float, default=None)
    sn.add_argument("--state-dir", type=Path, default=None)
    sn.add_argument("--superlink", default=None, help="host:port (default: from superlink.json)")
    sn.add_argument("--wait", type=float, default=120.0,
                    help="seconds to wait for the SuperLink to accept the node (non-zero exit if it refuses it or "
                         "does not answer in time); 0: start it and return at once")
    cmds["up"].add_argument("--sites", type=int, default=2)
    for name in ("run", "up"):
        cmds[name].add_argument("--preset", default="smoke")
        cmds[name].add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        cmds[name].add_argument("--run-dir", default="", help="default: <dir>/run")
        cmds[name].add_argument("--resume", action="store_true")
        cmds[name].add_argument("--timeout", type=float, default=None)
    args = p.parse_args(argv)
    layout = Layout(args.dir.resolve())
    if args.command == "certs":
        out = make_server_certificates(layout.path("certs"), hosts=args.host or ("127.0.0.1", "localhost"),
                                       valid_days=args.days, overwrite=args.overwrite)
        print(f"CA: {out.ca_cert} (give to every site; keep {out.ca_key} private)")
    elif args.command == "keys":
        for site in args.site:
            keys = make_site_keys(layout.path("keys"), site)
            print(f"{site}: private {keys.private_key} (stays at the site), public {keys.public_key} (to the admin)")
    elif args.command == "superlink":
        proc = start_superlink(layout, port=args.port, host=args.host, advertise=args.advertise,
                               database=args.database)
        nodes = register_sites(layout)
        print(f"SuperLink pid {proc.pid} on https://{layout.superlink_address()}; registered: {nodes}")
    elif args.command == "supernode":
        site = SiteNode(args.index, args.site, args.data_source, args.data_root, args.epsilon, args.state_dir)
        log_file = layout.path("logs", f"supernode-{args.site}.log")
        offset = log_file.stat().st_size if log_file.is_file() else 0
        proc = start_supernode(layout, site, superlink=args.superlink)
        print(f"SuperNode {args.site} pid {proc.pid}; log {log_file}")
        if args.wait > 0:
            try:
                node = wait_activated(layout, args.site, proc, log_offset=offset, timeout_s=args.wait)
            except (RuntimeError, TimeoutError) as exc:
                print(f"error: {exc}")
                return proc.returncode or 1
            print(f"SuperNode {args.site} accepted by the SuperLink: node id {node}")
    elif args.command == "stop":
        print(f"stopped: {stop(layout)}")
    else:
        from simulations.config_args import build_config  # the same preset + --set handling as the other commands

        cfg = build_config(args.preset, args.set, run_dir=args.run_dir or str(layout.path("run")))
        if args.command == "run":
            result = run_federation(layout, cfg, resume=args.resume, timeout_s=args.timeout)
            if result.returncode != 0:
                print(f"error: the run failed: {result.reason}")
            return result.returncode
        cfg = replace(cfg, data=replace(cfg.data, num_sites=args.sites))
        with Deployment(layout.root, port=args.port) as dep:
            dep.start(default_sites(args.sites))
            result = dep.run(cfg, resume=args.resume, timeout_s=args.timeout)
        print(json.dumps({"returncode": result.returncode, "wall_s": round(result.wall_s, 1),
                          "sites": round_sites(result.run_dir, layout.nodes()) if result.returncode == 0 else None,
                          "reason": result.reason or None}))
        return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
