"""Stop what a process started when that process dies without cleaning up (``kill -9``).

The launcher starts the SuperLink and ``flwr run`` in sessions of their own, so that each stops as one process
group; a launcher killed with SIGKILL runs no ``finally`` and they would go on writing into the run folder. Flower
1.42's ``flower-superlink`` and ``flower-supernode`` take no ``--parent-pid`` (the SuperExec and the apps it starts
do, and follow their parent down), so a helper process watches for them: ``python -m simulations.watchdog GRACE_S``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterable

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Watchdog:
    """A helper process that stops the processes adopted here if this process dies without stopping them.

    The helper reads the pids to watch from a pipe; the kernel closes the pipe when this process dies, however it
    dies, and the helper then stops every watched process, their descendants and the process groups they lead (see
    :func:`watch`). :meth:`close` dismisses it.
    """

    def __init__(self, *, grace_s: float = 5.0) -> None:
        # Its own session: a Ctrl-C or a signal to the launcher's group must not take the helper down with it.
        self.proc = subprocess.Popen([sys.executable, "-m", "simulations.watchdog", str(grace_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=PROJECT_ROOT,
                                     start_new_session=True)

    def adopt(self, pid: int) -> None:
        """Watch ``pid`` (and whatever it starts)."""
        assert self.proc.stdin is not None  # for the type checker: PIPE was requested
        try:
            self.proc.stdin.write(f"{pid}\n".encode())
            self.proc.stdin.flush()
        except OSError:  # the helper died: the run goes on, unguarded against a kill -9
            warnings.warn(f"the watchdog exited (code {self.proc.poll()}): pid {pid} is not watched", stacklevel=2)

    def close(self) -> None:
        """Dismiss the helper: everything it watched was stopped by its owner."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watch(stream: BinaryIO, *, grace_s: float, poll_s: float = 0.5) -> None:
    """The :class:`Watchdog` helper: track the pids read from ``stream`` until ``done``; on EOF stop them all.

    Descendants are recorded while they run, because a dead launcher's children are re-parented and can no longer
    be found from it. Stopping is SIGTERM to every recorded process still alive and to every member of a process
    group one of them leads (Ray's agents, detached by the SuperExec), then SIGKILL after ``grace_s``.
    """
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the launcher's to handle
    watched: dict[int, psutil.Process] = {}
    pending = b""
    while True:
        if select.select([stream], [], [], poll_s)[0]:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break  # EOF without "done": the launcher died
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.strip() == b"done":
                    return
                try:
                    watched[int(line)] = psutil.Process(int(line))
                except (ValueError, psutil.Error):
                    continue
        _record_descendants(watched)
    _stop_all(watched, grace_s=grace_s)


def _record_descendants(watched: dict[int, Any]) -> None:
    """Add every live descendant of a watched process to ``watched`` (one pass over the process table)."""
    import psutil

    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc)
    stack, seen = [pid for pid, p in watched.items() if p.is_running()], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for child in children.get(pid, []):
            known = watched.get(child.pid)
            if known is None or not known.is_running():  # new, or a reused pid
                watched[child.pid] = child
            stack.append(child.pid)


def still_running(procs: Iterable[Any]) -> list[Any]:
    """The processes of ``procs`` that still run (a zombie has exited; with no reaping init it stays listed)."""
    import psutil

    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _members(watched: dict[int, Any]) -> None:
    """Add to ``watched`` every process in a process group that a watched process leads."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid not in watched and os.getpgid(proc.pid) in watched:
                watched[proc.pid] = proc
        except (OSError, psutil.Error):
            continue


def _stop_all(watched: dict[int, Any], *, grace_s: float) -> None:
    """SIGTERM the watched processes and the members of the process groups they lead; SIGKILL them after ``grace_s``.

    Both are looked for again until none runs: a process that was being started when the launcher died (Ray's
    raylet starting its agents) appears after the first look.
    """
    import psutil

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        deadline = time.monotonic() + wait_s
        sent: set[int] = set()
        while True:
            _record_descendants(watched)
            _members(watched)
            left = [p for p in still_running(watched.values()) if p.pid != os.getpid()]
            if not left:
                return
            for proc in left:
                if proc.pid not in sent:
                    sent.add(proc.pid)
                    try:
                        proc.send_signal(sig)  # psutil checks the pid still names the same process
                    except psutil.Error:
                        continue
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m simulations.watchdog GRACE_S  (pids to watch on stdin, one a line, then 'done')")
    watch(sys.stdin.buffer, grace_s=float(sys.argv[1]))
