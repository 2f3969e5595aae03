"""Shared fixtures: isolated output folders, offline environment, the shared real data if present."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

from simulations.launcher import OFFLINE_ENV, AppOverlay

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


# The product's apps with faults injected by environment variables (tests/fault_app.py), for run_simulation(overlay=).
FAULT_APP = AppOverlay(module=Path(__file__).with_name("fault_app.py"), serverapp="fault_app:server",
                       clientapp="fault_app:client")
