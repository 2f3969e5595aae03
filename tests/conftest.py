"""Shared fixtures: isolated output folders, offline environment, the shared real data if present."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from simulations.launcher import OFFLINE_ENV, AppOverlay

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a 2-core machine OpenMP spinning makes the tests' tiny convolutions many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test writes under its own tmp folder, offline, with Flower telemetry off."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DIFUSAL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


@pytest.fixture
def shared_data() -> Path:
    """Root of ``../shared/data``; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages outside a Flower runtime need a task identity (restored after the test)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """End-to-end tests first (each takes 20-140 s on 2 cores; the unit tests under 10 s), in collection order
    otherwise: the short tests then fill the end of the run at both workers instead of one worker finishing a
    Flower test alone."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: False (e2e) first


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


# The product's apps with faults injected by environment variables (tests/fault_app.py), for run_simulation(overlay=).
FAULT_APP = AppOverlay(module=Path(__file__).with_name("fault_app.py"), serverapp="fault_app:server",
                       clientapp="fault_app:client")


def _smoke_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "smoke", "--run-dir", str(run_dir)]


def once_per_session(factory: pytest.TempPathFactory, name: str,
                     produce: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], Path]:
    """``produce(folder)`` once per test session (its JSON-able result saved beside it), for tests that only read what
    it made: each Flower run costs about a minute on 2 cores.

    Under pytest-xdist every worker asks for it: the first one runs it under a lock in the folder the workers of this
    session share, the others wait for the lock and read the saved result.
    """
    base = factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # .../pytest-N for this session only
    folder = shared / name
    folder.mkdir(exist_ok=True)
    saved = folder / "result.json"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not saved.is_file():
            saved.write_text(json.dumps(produce(folder)))
    return json.loads(saved.read_text()), folder


@pytest.fixture(scope="session")
def smoke_cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``difusal simulate --preset smoke`` once per test session, with stdout a pipe (the demo's code path: report and
    audit on), shared by the tests that need a plain smoke federation (its output, its run folder, its round record,
    its DP noise)."""

    def produce(folder: Path) -> dict[str, Any]:
        env = {**os.environ, **OFFLINE_ENV, "MPLCONFIGDIR": str(folder / "mpl")}
        out = subprocess.run(_smoke_command(folder / "run"), cwd=PROJECT_ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        return {"returncode": out.returncode, "stdout": out.stdout, "stderr": out.stderr}

    result, folder = once_per_session(tmp_path_factory, "smoke-cli", produce)
    return subprocess.CompletedProcess(_smoke_command(folder / "run"), result["returncode"], result["stdout"],
                                       result["stderr"]), folder / "run"
