"""The release store: round-trips every field, survives a kill mid-write, detects duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.active_learning.release import METADATA, ReleaseItem, ReleaseStore, load_release_records


def _item(i: int, *, round_: int = 1) -> ReleaseItem:
    rng = np.random.default_rng(i)
    return ReleaseItem(
        image=rng.integers(0, 256, size=(16, 16), dtype=np.uint8),
        plane=i % 6,
        ga_weeks=14.0 + i,
        source_site=f"site-{i % 2}",
        round=round_,
        scores={"quality": 0.5 + i / 100, "uncertainty": 1.0 / (i + 1), "novelty": float(i)},
        acquisition={"function": "kcenter", "reason": "farthest from the released set", "rank": i},
        privacy={"epsilon": 3.5, "delta": 1e-5, "accountant": "rdp", "model": "generator"},
        scanner="aloka",
        memorization_checked=bool(i % 2),
        extra={"pixel_spacing_mm": 0.3},
    )


def test_metadata_round_trips_every_field(tmp_path: Path) -> None:
    # Prepare
    store = ReleaseStore(tmp_path / "release")
    items = [_item(i) for i in range(4)]
    # Execute
    store.add(items)
    again = ReleaseStore(tmp_path / "release")
    records = again.records()
    # Assert
    assert len(records) == 4
    for item, rec in zip(items, records):
        assert np.array_equal(again.load_image(rec), item.image)
        assert rec["plane"] == item.plane and rec["ga_weeks"] == item.ga_weeks
        assert rec["source_site"] == item.source_site and rec["round"] == item.round
        assert rec["scores"] == pytest.approx(dict(item.scores))
        assert rec["acquisition"] == dict(item.acquisition)
        assert rec["privacy"] == dict(item.privacy)
        assert rec["scanner"] == "aloka" and rec["memorization_checked"] == item.memorization_checked
        assert rec["extra"] == {"pixel_spacing_mm": 0.3}
    # the file is plain JSON lines with relative file names (imagefolder layout)
    lines = (tmp_path / "release" / METADATA).read_text().splitlines()
    assert all((tmp_path / "release" / json.loads(line)["file_name"]).is_file() for line in lines)


def test_exact_duplicates_are_counted_and_skipped(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "r")
    first = store.add([_item(1), _item(2)])
    second = store.add([_item(1, round_=2), _item(3)])
    assert len(first.added) == 2 and first.duplicates == []
    assert len(second.added) == 1 and len(second.duplicates) == 1
    assert len(store) == 3


def test_torn_last_line_and_orphan_png_are_counted_and_an_explicit_repair_quarantines_them(tmp_path: Path) -> None:
    # Prepare: two good records, then simulate a kill after the PNG of a third and half of its line
    folder = tmp_path / "r"
    store = ReleaseStore(folder)
    store.add([_item(1), _item(2)])
    (folder / "images" / "r001-site-1-deadbeef0000.png").write_bytes(b"\x89PNG partial")
    with (folder / METADATA).open("a") as fh:
        fh.write('{"file_name": "images/r001-site-1-deadbeef0000.png", "plane"')
    # Execute
    reopened = ReleaseStore(folder)
    opened = reopened.open_report
    repair = reopened.repair()
    # Assert: opening counted the damage; the repair moved it aside (nothing deleted) and the store takes writes
    assert (opened.torn_lines, opened.orphan_images, opened.records) == (1, 1, 2)
    assert not reopened.open_report.damaged  # reloaded after the repair
    assert [m.reason for m in repair.moved] == ["torn", "orphan"] and repair.kept == 2
    assert repair.quarantine is not None
    moved = repair.quarantine / "images" / "r001-site-1-deadbeef0000.png.quarantined"
    assert moved.read_bytes() == b"\x89PNG partial"
    assert len(reopened.records()) == 2
    reopened.add([_item(3)])
    assert [r["plane"] for r in ReleaseStore(folder).records()] == [1, 2, 3]


def test_store_survives_a_real_kill_mid_write(tmp_path: Path) -> None:
    # Prepare: a child process appends in a loop and is killed at an arbitrary point
    folder = tmp_path / "r"
    code = (
        "import sys, numpy as np\n"
        "sys.path.insert(0, %r)\n"
        "from tests.test_release import _item\n"
        "from common.active_learning.release import ReleaseStore\n"
        "s = ReleaseStore(%r)\n"
        "print('ready', flush=True)\n"
        "for i in range(100000): s.add([_item(i)])\n"
    ) % (str(Path(__file__).resolve().parents[1]), str(folder))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    # Execute
    import time

    time.sleep(1.0)
    proc.kill()
    proc.wait()
    store = ReleaseStore(folder)
    store.repair()
    # Assert: every surviving record is whole and its image is readable and matches its hash
    records = store.records()
    assert len(records) > 0
    for rec in records:
        image = store.load_image(rec)
        import hashlib

        assert hashlib.sha256(image.tobytes()).hexdigest() == rec["sha256"]
    assert len(list((folder / "images").glob("*.png"))) == len(records)


def test_release_records_feed_downstream_training(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "r")
    store.add([_item(i) for i in range(3)])
    records = load_release_records(tmp_path / "r")
    assert [r.plane for r in records] == [0, 1, 2]
    assert all(r.source == "synthetic" and r.image.shape == (16, 16) for r in records)
    assert load_release_records(tmp_path / "missing") == []


def test_non_uint8_image_is_rejected(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "r")
    bad = ReleaseItem(**{**_item(0).__dict__, "image": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match="uint8"):
        store.add([bad])


def test_coordinator_trains_the_global_downstream_models_on_the_release_at_no_privacy_cost(tmp_path: Path) -> None:
    # Prepare: a smoke-size bundle and a release of 48 phantom images (they stand in for released samples)
    import dataclasses

    import torch

    from common.data.sites import public_phantoms
    from common.data.tensors import records_to_dataset
    from common.models.bundle import build_bundle
    from common.models.downstream import evaluate_classifier
    from server.coordinator import Coordinator
    from simulations.cli import build_config

    cfg = build_config("smoke", ["federation.al-downstream-steps=40", "train.downstream-lr=0.005"],
                       run_dir=str(tmp_path))
    phantoms = public_phantoms(dataclasses.replace(cfg.data, public_images=48), seed=3)
    coordinator = Coordinator(cfg, run_dir=tmp_path)
    coordinator.store.add([
        ReleaseItem(image=r.image, plane=r.plane, ga_weeks=r.ga_weeks, source_site="site-0", round=1,
                    scores={"quality": 0.9, "uncertainty": 0.5, "novelty": 1.0},
                    acquisition={"function": "kcenter", "reason": "test", "rank": i},
                    privacy={"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp", "model": "generator"})
        for i, r in enumerate(phantoms)
    ])
    bundle = build_bundle(cfg)
    data = records_to_dataset(load_release_records(tmp_path / "release"), image_size=cfg.data.image_size)
    before_cls = {k: v.clone() for k, v in bundle.classifier.state_dict().items()}
    before_reg = {k: v.clone() for k, v in bundle.regressor.state_dict().items()}
    acc_before = evaluate_classifier(bundle.classifier, data)["accuracy"]
    # Execute
    losses = coordinator.refine_downstream(bundle, server_round=1)
    # Assert: both models trained (finite losses, weights moved) and the classifier fits the release better
    assert set(losses) == {"classifier", "regressor"} and all(np.isfinite(v) for v in losses.values())
    assert any(not torch.equal(before_cls[k], v) for k, v in bundle.classifier.state_dict().items())
    assert any(not torch.equal(before_reg[k], v) for k, v in bundle.regressor.state_dict().items())
    assert evaluate_classifier(bundle.classifier, data)["accuracy"] > acc_before + 0.15
