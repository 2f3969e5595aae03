"""The federation through Flower's real machinery: SuperLink (simulation runtime) + ``flwr run``.

Tiny models (smoke preset, 32x32). Each test starts and stops its own SuperLink on a free loopback port.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.core.config import RunConfig
from common.models.bundle import load_federated_file
from common.privacy.site_state import copy_site_secrets
from simulations.launcher import run_simulation
from tests.conftest import FAULT_APP, once_per_session


def _cfg(run_dir: Path, **overrides: object) -> RunConfig:
    flat: dict[str, object] = {"preset": "smoke", "run-dir": str(run_dir)}
    flat.update(overrides)
    return RunConfig.from_flat(flat)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# 2 rounds with a query after each (shared by the active-learning test and the resume test)
AL_RUN = {"federation.num-rounds": 2, "federation.al-every": 1, "federation.al-refine-steps": 1,
          "federation.al-downstream-steps": 2}


@pytest.fixture(scope="session")
def al_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The :data:`AL_RUN` federation of 2 sites, once per session (the tests only read it): its outcome and folder."""

    def produce(folder: Path) -> dict:
        out = run_simulation(_cfg(folder / "run", **AL_RUN), num_sites=2, echo=False, timeout_s=400)
        return {"returncode": out.returncode, "log_tail": out.log_file.read_text()[-3000:]}

    result, folder = once_per_session(tmp_path_factory, "al-run", produce)
    return result, folder / "run"


@pytest.mark.e2e
def test_two_sites_one_round_through_flower(smoke_cli_run) -> None:  # type: ignore[no-untyped-def]
    # Prepare / Execute: the session's smoke federation (2 sites, 1 round; tests/conftest.py)
    out, run = smoke_cli_run
    # Assert
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (record,) = _records(run)
    assert record["round"] == 1
    assert sorted(s["status"] for s in record["sites"]) == ["ok", "ok"]
    assert all(s["bytes_up"] > 0 and s["bytes_down"] > 0 for s in record["sites"])
    # every site reports a cumulative epsilon per model, within its budget
    assert len(record["ledger"]) == 2
    for models in record["ledger"].values():
        assert 0 < models["generator"]["epsilon"] <= models["generator"]["budget_epsilon"] + 1e-9
    ckpt = run / "checkpoints" / "round-001"
    arrays = load_federated_file(ckpt)
    assert any(k.startswith("generator.") and "lora" in k for k in arrays)
    assert (ckpt / "generator").is_dir() and (ckpt / "sidecar.json").is_file()
    assert json.loads((ckpt / "sidecar.json").read_text())["privacy"]["sites"].keys() == record["ledger"].keys()
    assert (run / "figures" / "samples-round-001.png").is_file() and (run / "figures" / "rounds.png").is_file()


@pytest.mark.e2e
def test_resume_after_kill_reaches_the_uninterrupted_result(al_run: tuple[dict, Path], tmp_path: Path) -> None:
    # Prepare: the session's 2-round run with a query after each round, uninterrupted; the same run killed right
    # after round 1's checkpoint (its release written), then resumed
    result, full = al_run
    assert result["returncode"] == 0, result["log_tail"]
    killed = _cfg(tmp_path / "killed", **AL_RUN)
    # The same sites: each keeps its secret (it keys the DP noise), so the killed run's sites get the full run's
    assert len(copy_site_secrets(full, tmp_path / "killed")) == 2
    # Execute
    crash = run_simulation(killed, num_sites=2, echo=False, timeout_s=400,
                           extra_env={"DIFUSAL_FAULT_AFTER_ROUND": "1"}, overlay=FAULT_APP)
    after_crash = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    resumed = run_simulation(killed, num_sites=2, resume=True, echo=False, timeout_s=400)
    # Assert: the models, the ledgers and the release equal the uninterrupted run's
    assert resumed.returncode == 0, resumed.log_file.read_text()[-3000:]
    assert crash.returncode != 0 and after_crash == ["round-001"]
    # the launcher saw the server's process die and stopped waiting for Flower's heartbeat timeout
    assert "flwr-simulation) exited without finishing the run" in crash.reason, crash.reason
    a = load_federated_file(full / "checkpoints" / "round-002")
    b = load_federated_file(tmp_path / "killed" / "checkpoints" / "round-002")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    assert _records(full)[-1]["ledger"] == _records(tmp_path / "killed")[-1]["ledger"]
    assert [r["round"] for r in _records(tmp_path / "killed")] == [1, 2]
    meta = {run: (run / "release" / "metadata.jsonl").read_text().splitlines() for run in (full, tmp_path / "killed")}
    assert len(meta[full]) >= 8 and meta[full] == meta[tmp_path / "killed"]
    for line in meta[full]:
        name = json.loads(line)["file_name"]
        assert (full / "release" / name).read_bytes() == (tmp_path / "killed" / "release" / name).read_bytes()


@pytest.mark.e2e
def test_a_failing_site_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run")
    result = run_simulation(cfg, num_sites=2, echo=False, timeout_s=300,
                            extra_env={"DIFUSAL_FAULT_SITE": "site-1"}, overlay=FAULT_APP)
    assert result.returncode == 0
    (record,) = _records(tmp_path / "run")
    status = sorted((s["status"], s["reason"]) for s in record["sites"])
    assert status[0][0] == "failed" and "fault injected" in status[0][1] and "site site-1" in status[0][1]
    assert status[1][0] == "ok"


@pytest.mark.e2e
def test_a_site_past_its_budget_stops_contributing_and_the_ledger_says_why(tmp_path: Path) -> None:
    # Prepare: a fixed noise multiplier that spends the generator's share (0.6 x 5) after 3 of 4 steps
    # (q = 8/24: epsilon 1.93, 2.47, 2.87, 3.21 after 1..4 steps) and leaves the downstream shares no step
    cfg = _cfg(tmp_path / "run", **{"federation.num-rounds": 2, "privacy.noise-multiplier": 1.5,
                                   "privacy.target-epsilon": 5.0, "train.local-steps": 4})
    # Execute
    result = run_simulation(cfg, num_sites=2, echo=False, timeout_s=300)
    # Assert
    assert result.returncode == 0
    first, second = _records(tmp_path / "run")
    assert all(s["status"] == "ok" for s in first["sites"])
    assert all("budget" in s["reason"] for s in first["sites"])  # stopped early within round 1
    assert all(s["metrics"]["generator-steps"] == 3 for s in first["sites"])
    assert [s["status"] for s in second["sites"]] == ["budget-exhausted", "budget-exhausted"]
    for models in second["ledger"].values():
        assert all(m["exhausted"] for m in models.values())
        assert all(m["epsilon"] <= m["budget_epsilon"] + 1e-9 for m in models.values())
    # the global model did not change in the round nobody could train
    r1 = load_federated_file(tmp_path / "run" / "checkpoints" / "round-001")
    r2 = load_federated_file(tmp_path / "run" / "checkpoints" / "round-002")
    assert all(np.array_equal(r1[k], r2[k]) for k in r1)


@pytest.mark.e2e
def test_active_learning_round_releases_scored_images_that_flow_back(al_run: tuple[dict, Path]) -> None:
    # Prepare / Execute: the session's 2-round run, a query after each; smoke selects 4 of 2 x 4 candidates per query
    result, run = al_run
    # Assert
    assert result["returncode"] == 0, result["log_tail"]
    first, second = _records(run)
    assert first["active_learning"]["candidates"] == 8 and first["active_learning"]["selected"] == 4
    # where each round's time went: the sites' training and evaluation (wall_s), the query, the sample grid
    # (the sample grid after the last round only, by default)
    for record, phases in ((first, ["sites", "query"]), (second, ["sites", "query", "sample_grid"])):
        assert list(record["phases_s"]) == phases and record["phases_s"]["sites"] == record["wall_s"]
        # each figure is rounded to 1 ms: their sum may pass the rounded whole by that much
        assert all(v > 0 for v in record["phases_s"].values())
        assert sum(record["phases_s"].values()) <= record["round_s"] + 0.001 * len(record["phases_s"])
    assert sorted(p.name for p in (run / "figures").glob("samples-round-*.png")) == ["samples-round-002.png"]
    assert [s["status"] for s in first["active_learning"]["sites"]] == ["ok", "ok"]
    # the server refined the generator and trained the downstream models on the release (finite losses)
    assert np.isfinite(first["active_learning"]["refine_loss"])
    assert set(first["active_learning"]["downstream_refine_loss"]) == {"classifier", "regressor"}
    # the release of round 1 reached both sites' downstream training in round 2
    assert all(s["metrics"]["synthetic-examples"] == 4 for s in second["sites"])
    meta = [json.loads(line) for line in (run / "release" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == second["active_learning"]["release_size"] >= 4
    for rec in meta:
        assert (run / "release" / rec["file_name"]).is_file()
        assert rec["source_site"] in second["ledger"] and 0 < rec["privacy"]["epsilon"] < float("inf")
        assert set(rec["scores"]) >= {"quality", "uncertainty", "novelty"} and rec["acquisition"]["reason"]
    assert (run / "figures" / "release-round-001.png").is_file()
