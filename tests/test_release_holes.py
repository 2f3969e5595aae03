"""Readers never write to a release; repair and resume move what they drop to a quarantine, never delete it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from common.active_learning.release import METADATA, ReleaseDamagedError, ReleaseStore, load_release_records
from tests.conftest import FAULT_APP
from tests.test_release import _item


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Hash and mtime of every file under ``folder`` (and the folders themselves, by mtime)."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(folder.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (digest, path.stat().st_mtime_ns)
    return out


def _damaged_release(folder: Path) -> list[str]:
    """Four records; the second line corrupted, the last one without its newline, an orphan PNG and a temp PNG."""
    store = ReleaseStore(folder)
    store.add([_item(i) for i in range(4)])
    lines = (folder / METADATA).read_text().splitlines()
    lines[1] = lines[1][:40] + "\x00garbage"
    (folder / METADATA).write_text("\n".join(lines))  # no trailing newline after the (valid) last record
    (folder / "images" / "r001-site-1-0123456789ab.png").write_bytes(b"\x89PNG orphan")
    (folder / "images" / ".r001-site-0-ba9876543210.png.tmp").write_bytes(b"\x89PNG half")
    return lines


def test_reading_a_damaged_release_changes_no_file(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "r"
    _damaged_release(folder)
    before = _snapshot(folder)
    # Execute: every read-only way in
    store = ReleaseStore(folder)
    records = store.records()
    with pytest.warns(UserWarning, match="release repair"):
        loaded = load_release_records(folder)
    # Assert: nothing written, moved or deleted; the damage is counted and the good records (the unterminated
    # last one included: it is complete) are read
    assert _snapshot(folder) == before
    assert [r["plane"] for r in records] == [0, 2, 3] and [r.plane for r in loaded] == [0, 2, 3]
    report = store.open_report
    # the corrupted line's PNG has no record now: an orphan, like the planted one
    assert (report.records, report.bad_lines, report.orphan_images, report.temp_files) == (3, 1, 2, 1)
    assert report.unterminated_last_line and report.damaged
    assert "line 2" in report.describe()


def test_a_reader_of_a_missing_release_creates_nothing(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "nothing")
    assert store.records() == [] and len(store) == 0
    assert not (tmp_path / "nothing").exists()


def test_writing_to_a_damaged_release_needs_an_explicit_repair(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    _damaged_release(folder)
    before = _snapshot(folder)
    with pytest.raises(ReleaseDamagedError, match="release repair"):
        ReleaseStore(folder).add([_item(9)])
    assert _snapshot(folder) == before


def test_release_repair_command_quarantines_what_it_drops_and_prints_it(tmp_path: Path, capsys) -> None:
    # Prepare
    from simulations.cli import main

    folder = tmp_path / "r"
    lines = _damaged_release(folder)
    orphan = (folder / "images" / "r001-site-1-0123456789ab.png").read_bytes()
    # Execute
    code = main(["release", "repair", str(folder)])
    out = capsys.readouterr().out
    # Assert: the good records stay (every line terminated now), the bad line and the files moved, not deleted
    assert code == 0
    kept = (folder / METADATA).read_text()
    assert kept.endswith("\n") and [json.loads(x)["plane"] for x in kept.splitlines()] == [0, 2, 3]
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(
        Path(json.loads(x)["file_name"]).name for x in kept.splitlines())
    (quarantine,) = (folder / "quarantine").iterdir()
    assert (quarantine / "dropped.jsonl").read_text() == lines[1] + "\n"
    assert (quarantine / "images" / "r001-site-1-0123456789ab.png.quarantined").read_bytes() == orphan
    assert (quarantine / "images" / ".r001-site-0-ba9876543210.png.tmp.quarantined").is_file()
    manifest = json.loads((quarantine / "repair.json").read_text())
    assert sorted(m["reason"] for m in manifest["moved"]) == ["corrupt", "orphan", "orphan", "temp"]
    assert str(quarantine) in out and "line 2" in out and "r001-site-1-0123456789ab.png" in out
    # the repaired store takes writes; a second repair finds nothing and writes nothing
    ReleaseStore(folder).add([_item(9)])
    assert len(ReleaseStore(folder).records()) == 4
    before = _snapshot(folder)
    assert main(["release", "repair", str(folder)]) == 0
    assert _snapshot(folder) == before and "nothing to repair" in capsys.readouterr().out


def test_release_repair_dry_run_writes_nothing(tmp_path: Path, capsys) -> None:
    from simulations.cli import main

    folder = tmp_path / "r"
    _damaged_release(folder)
    before = _snapshot(folder)
    assert main(["release", "repair", "--dry-run", str(folder)]) == 0
    assert _snapshot(folder) == before and "would move" in capsys.readouterr().out


def test_repair_never_touches_a_file_outside_the_release(tmp_path: Path) -> None:
    # Prepare: a line whose file_name escapes the release folder
    folder = tmp_path / "r"
    ReleaseStore(folder).add([_item(1)])
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    rec = {**ReleaseStore(folder).records()[0], "file_name": "images/../../outside.png", "sha256": "0" * 64, "id": "x"}
    with (folder / METADATA).open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    # Execute
    report = ReleaseStore(folder).repair()
    # Assert
    assert [(m.name, m.reason) for m in report.moved] == [("line 2", "malformed")]
    assert outside.read_bytes() == b"not yours" and len(ReleaseStore(folder).records()) == 1


def test_valid_last_line_without_its_newline_is_kept_and_appended_after(tmp_path: Path) -> None:
    # Prepare: a complete last record whose newline never reached the disk
    folder = tmp_path / "r"
    ReleaseStore(folder).add([_item(1), _item(2)])
    meta = folder / METADATA
    meta.write_bytes(meta.read_bytes().rstrip(b"\n"))
    # Execute
    store = ReleaseStore(folder)
    store.add([_item(3)])
    # Assert
    assert not store.open_report.damaged
    assert [json.loads(x)["plane"] for x in meta.read_text().splitlines()] == [1, 2, 3]
    assert len(list((folder / "images").glob("*.png"))) == 3


# -- resume: the release advances with the checkpoints ----------------------------------------------------------
class _Grid:
    """Two sites that answer query messages with the real site-side code (``answer_query``), without Flower."""

    def __init__(self, cfg: Any, bundle: Any) -> None:
        self.cfg, self.bundle = cfg, bundle

    def get_node_ids(self) -> list[int]:
        return [11, 12]

    def send_and_receive(self, messages: list[Any], timeout: float) -> list[Any]:
        from client.app import receive_release
        from common.active_learning.query import answer_query
        from common.active_learning.scoring import features
        from common.core.seeding import derive_seed
        from common.federated.flwr_records import arrays_to_record, record_to_arrays

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            request = record_to_arrays(msg.content["request"])
            name = f"site-{node - 11}"
            released, held = receive_release(msg, Path(self.cfg.run_dir) / "sites" / name)
            bank = features(self.bundle, np.stack([r.image for r in released])) if released else None
            ans = answer_query(self.bundle, self.cfg, plane=request["plane"], ga=request["ga"],
                               bank=bank, local_generator=None, private=None,
                               seed=derive_seed(int(msg.content["config"]["seed"]), name))
            c = ans.candidates
            payload = {"images": c.images, "plane": c.plane, "ga": c.ga,
                       **{f"score.{k}": v for k, v in c.scores.items()}}
            site = {"name": name, "privacy": json.dumps({"epsilon": 1.5, "delta": 1e-5, "accountant": "rdp"}),
                    "scanner": "", "memorization-checked": False, **held}
            replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                                           content={"site": site, "candidates": arrays_to_record(payload)}))
        return replies


def _run(run_dir: Path, rounds: range, *, resume: bool, checkpoint_last: bool = True) -> Any:
    """The federation loop's release path: train_records, query round, checkpoint (the last one optionally lost)."""
    from common.models.bundle import build_bundle
    from server.checkpoint import RunFolder
    from server.coordinator import Coordinator
    from simulations.cli import build_config

    cfg = build_config("smoke", ["federation.al-every=1", f"federation.num-rounds={rounds.stop - 1}"],
                       run_dir=str(run_dir))
    coordinator = Coordinator(cfg, run_dir=run_dir)
    run = RunFolder(run_dir)
    run.start(cfg, resume=resume)
    bundle = build_bundle(cfg)
    grid = _Grid(cfg, bundle)
    for server_round in rounds:
        coordinator.train_records(0)
        summary = coordinator.query_round(grid, bundle, server_round)  # type: ignore[arg-type]
        if server_round < rounds.stop - 1 or checkpoint_last:
            run.save_checkpoint(server_round, bundle, strategy_state={},
                                record={"round": server_round, "active_learning": summary}, sidecar={})
    return coordinator


def _release(folder: Path) -> tuple[str, dict[str, str]]:
    images = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())}
    return (folder / METADATA).read_text(), images


@pytest.mark.usefixtures("task_identity")
def test_resume_rolls_the_release_back_to_the_last_checkpoint(tmp_path: Path) -> None:
    # Prepare: 2 query rounds uninterrupted; the same run killed after round 2 wrote its images (and tore the line
    # of a fifth) but before round 2's checkpoint
    _run(tmp_path / "full", range(1, 3), resume=False)
    _run(tmp_path / "killed", range(1, 3), resume=False, checkpoint_last=False)
    release = tmp_path / "killed" / "release"
    uncommitted = {r["id"] for r in ReleaseStore(release).records() if r["round"] == 2}
    (release / "images" / "r002-site-0-0123456789ab.png").write_bytes(b"\x89PNG killed mid-write")
    with (release / METADATA).open("a") as fh:
        fh.write('{"file_name": "images/r002-site-0-0123456789ab.png", "pla')
    assert len(uncommitted) == 4
    # Execute
    _run(tmp_path / "killed", range(2, 3), resume=True)
    # Assert: the same items with the same metadata as the uninterrupted run; what was rolled back is in quarantine
    assert _release(release) == _release(tmp_path / "full" / "release")
    (quarantine,) = (release / "quarantine").iterdir()
    manifest = json.loads((quarantine / "repair.json").read_text())
    rolled = {m["id"] for m in manifest["moved"] if m["reason"] == "rollback" and m["kind"] == "line"}
    assert rolled == uncommitted
    assert {m["reason"] for m in manifest["moved"]} == {"rollback", "torn", "orphan"}
    assert len(list((quarantine / "images").iterdir())) == len(uncommitted) + 1
    summary = json.loads((tmp_path / "killed" / "checkpoints" / "round-002" / "round.json").read_text())
    assert summary["active_learning"]["release_size"] == len(ReleaseStore(release).records()) == 8


@pytest.mark.usefixtures("task_identity")
def test_resume_refuses_to_repair_damage_that_is_not_its_own_interrupted_write(tmp_path: Path) -> None:
    # Prepare: a checkpointed round whose release then lost a middle line to corruption
    _run(tmp_path / "run", range(1, 2), resume=False)
    release = tmp_path / "run" / "release"
    lines = (release / METADATA).read_text().splitlines()
    lines[1] = "not json"
    (release / METADATA).write_text("\n".join(lines) + "\n")
    before = _snapshot(release)
    # Execute / Assert: the coordinator names the explicit repair and changes nothing
    from server.coordinator import Coordinator
    from simulations.cli import build_config

    cfg = build_config("smoke", ["federation.al-every=1"], run_dir=str(tmp_path / "run"))
    with pytest.raises(ReleaseDamagedError, match="release repair"):
        Coordinator(cfg, run_dir=tmp_path / "run").train_records(0)
    assert _snapshot(release) == before


@pytest.mark.e2e
@pytest.mark.slow
def test_a_federation_killed_between_release_and_checkpoint_resumes_without_the_extra_images(tmp_path: Path) -> None:
    # Prepare: 2 rounds with a query after each (4 images each), killed after round 2's release, before its checkpoint.
    # Two real runs do not release the same pixels (the sites' DP noise is not seeded), so the resumed release is
    # checked against what the checkpoints committed, not against a second run.
    from common.core.config import RunConfig
    from simulations.launcher import run_simulation

    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path / "run"), "federation.num-rounds": 2,
                               "federation.al-every": 1})
    release = tmp_path / "run" / "release"
    # Execute
    crash = run_simulation(cfg, num_sites=2, echo=False, timeout_s=400, extra_env={"DIFUSAL_FAULT_AFTER_RELEASE": "2"},
                           overlay=FAULT_APP)
    committed = [line for line in (release / METADATA).read_text().splitlines() if json.loads(line)["round"] == 1]
    uncommitted = {r["id"] for r in ReleaseStore(release).records() if r["round"] == 2}
    resumed = run_simulation(cfg, num_sites=2, resume=True, echo=False, timeout_s=400)
    # Assert: round 1 kept verbatim, round 2 released once (4 images, as uninterrupted), the first try quarantined
    assert crash.returncode != 0 and resumed.returncode == 0, resumed.log_file.read_text()[-3000:]
    assert len(committed) == 4 and len(uncommitted) == 4
    lines = (release / METADATA).read_text().splitlines()
    assert lines[:4] == committed and [json.loads(x)["round"] for x in lines] == [1] * 4 + [2] * 4
    assert len(list((release / "images").glob("*.png"))) == 8
    round2 = json.loads((tmp_path / "run" / "checkpoints" / "round-002" / "round.json").read_text())
    assert round2["active_learning"]["release_size"] == 8
    (quarantine,) = (release / "quarantine").iterdir()
    moved = json.loads((quarantine / "repair.json").read_text())["moved"]
    assert {m["reason"] for m in moved} == {"rollback"} and {m["id"] for m in moved} == uncommitted


class _LyingGrid(_Grid):
    """The same two sites; ``lie`` rewrites the reply of node 12 (its site record or candidates)."""

    def __init__(self, cfg: Any, bundle: Any, lie: Any) -> None:
        super().__init__(cfg, bundle)
        self.lie = lie

    def send_and_receive(self, messages: list[Any], timeout: float) -> list[Any]:
        replies = super().send_and_receive(messages, timeout)
        for r in replies:
            if r.metadata.src_node_id == 12:
                self.lie(r.content)
        return replies


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("lie", [
    pytest.param(lambda c: c["site"].update(name="site-0"), id="another-sites-name"),
    pytest.param(lambda c: c.pop("site"), id="no-site-record"),
    pytest.param(lambda c: c["site"].update(privacy="[1, 2]"), id="privacy-not-an-object"),
    pytest.param(lambda c: c["site"].update(privacy='{"epsilon": NaN}'), id="nan-epsilon"),
    pytest.param(lambda c: c.update(candidates="not arrays"), id="candidates-not-arrays"),
])
def test_a_lying_query_reply_is_rejected_naming_the_site_and_the_round_goes_on(tmp_path: Path, lie: Any) -> None:
    from common.models.bundle import build_bundle
    from server.checkpoint import RunFolder
    from server.coordinator import Coordinator
    from simulations.cli import build_config

    cfg = build_config("smoke", ["federation.al-every=1", "federation.num-rounds=1"], run_dir=str(tmp_path))
    RunFolder(tmp_path).start(cfg, resume=False)
    bundle = build_bundle(cfg)
    summary = Coordinator(cfg, run_dir=tmp_path).query_round(_LyingGrid(cfg, bundle, lie), bundle, 1,
                                                             site_names={11: "site-0", 12: "site-1"})
    status = {s["node_id"]: s for s in summary["sites"]}
    assert status[11]["status"] == "ok" and status[11]["name"] == "site-0"
    assert status[12]["status"] == "rejected" and status[12]["name"] == "site-1"
    assert "site-1" in status[12]["reason"]
    assert {r["source_site"] for r in ReleaseStore(tmp_path / "release").records()} == {"site-0"}
