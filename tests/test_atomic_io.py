"""common.core.atomic_io: the destination holds the old content or the new one, and no temp file is left behind."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from common.core import atomic_io
from common.core.atomic_io import (
    atomic_dir,
    atomic_path,
    create_exclusive,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _failing_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(atomic_io.os, "replace", boom)


def test_write_replaces_the_content_and_leaves_only_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    assert write_bytes_atomic(path, b"new content") == path
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_write_creates_the_parent_folder(tmp_path: Path) -> None:
    path = write_text_atomic(tmp_path / "x" / "y" / "note.txt", "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"


def test_failed_rename_keeps_the_old_file_and_removes_the_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    _failing_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_midway_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def no_fsync(fd: int) -> None:
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(atomic_io.os, "fsync", no_fsync)
    with pytest.raises(OSError, match="simulated"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_mode_is_applied_and_the_default_is_owner_only(tmp_path: Path) -> None:
    assert _mode(write_bytes_atomic(tmp_path / "shared", b"x", mode=0o644)) == 0o644
    assert _mode(write_bytes_atomic(tmp_path / "private", b"x")) == 0o600
    shared = tmp_path / "shared"
    write_bytes_atomic(shared, b"y", mode=0o640)  # replacing a file gives the new mode, not the old one
    assert _mode(shared) == 0o640


def test_json_round_trip_and_options(tmp_path: Path) -> None:
    obj = {"b": [1, 2.5, None], "a": {"nested": "é"}}
    path = write_json_atomic(tmp_path / "o.json", obj, sort_keys=True)
    assert json.loads(path.read_text()) == obj
    assert path.read_text() == json.dumps(obj, indent=2, sort_keys=True)
    compact = write_json_atomic(tmp_path / "c.json", obj, indent=None)
    assert "\n" not in compact.read_text()


def test_json_default_is_str_and_strict_json_raises_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    write_json_atomic(path, {"where": Path("/x")})
    assert json.loads(path.read_text()) == {"where": "/x"}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"where": object()}, default=None)
    assert json.loads(path.read_text()) == {"where": "/x"}
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]


def test_atomic_path_renames_what_the_writer_wrote(tmp_path: Path) -> None:
    path = tmp_path / "w.dat"
    with atomic_path(path, mode=0o644) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.dat.") and tmp.name.endswith(".tmp")
        assert not path.exists()
        tmp.write_bytes(b"written by someone else")
    assert path.read_bytes() == b"written by someone else"
    assert _mode(path) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["w.dat"]


def test_atomic_path_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "w.dat"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer died")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.dat"]


def test_atomic_dir_builds_and_swaps_in_replacing_an_existing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    with atomic_dir(folder) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "weights.bin").write_bytes(b"new")
    assert sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp, no old folder left


def test_atomic_dir_creates_a_new_folder(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "sub" / "new") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "sub" / "new" / "f").read_text() == "x"


def test_atomic_dir_failed_build_keeps_the_old_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"old")
    with pytest.raises(ValueError), atomic_dir(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise ValueError("build failed")
    assert (folder / "weights.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_failed_build_of_a_new_folder_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_dir(tmp_path / "model"):
        raise ValueError("build failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failed_swap_moves_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"old")
    real_replace = os.replace

    def fail_the_swap(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(src).name.endswith(".tmp"):  # the new folder's rename fails; moving the old one aside works
            raise OSError("rename failed (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", fail_the_swap)
    with pytest.raises(OSError, match="simulated"), atomic_dir(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert (folder / "weights.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_create_exclusive_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    assert create_exclusive(path, b"first") is True
    assert _mode(path) == 0o600
    assert create_exclusive(path, b"second") is False
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_create_exclusive_concurrent_first_uses_keep_one_content(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: results.append(create_exclusive(path, bytes([i]) * 32)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert len(path.read_bytes()) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


@pytest.mark.parametrize("name", ["metadata.jsonl", "release.json", "images/r001-site-0-0123456789ab.png"])
def test_the_release_store_counts_a_temp_file_the_helper_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            name: str) -> None:
    from common.active_learning.release import ReleaseStore

    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.jsonl").write_text("")
    monkeypatch.setattr(atomic_io.os, "unlink", lambda *a, **k: None)  # a kill: the temp file stays
    monkeypatch.setattr(Path, "unlink", lambda *a, **k: None)
    _failing_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        write_bytes_atomic(tmp_path / name, b"half")
    monkeypatch.undo()
    report = ReleaseStore(tmp_path).open_report
    assert report.temp_files == 1, report.describe()
