"""The shared synthetic dataset: a Hugging Face ``imagefolder`` with provenance for every image.

Layout: ``metadata.jsonl`` (one JSON object per image; ``file_name`` is relative to it, as
``datasets.load_dataset("imagefolder", data_dir=...)`` expects), ``images/<id>.png`` and ``release.json``
(the release's sidecar). Writes are atomic per image: the PNG is written to a temp name and renamed, then
its metadata line is appended and fsynced.

Readers never write: opening the store counts what a kill mid-write or a damaged disk left (a torn or corrupted
line, a record without its PNG, a PNG without its record) and reads the whole records only. Repair is explicit
(:meth:`ReleaseStore.repair`, ``difusal release repair DIR``): it moves what it drops to
``quarantine/<time>/`` (the lines verbatim in ``dropped.jsonl``, files renamed ``*.quarantined`` so that no image
loader picks them up, and a ``repair.json`` saying what moved and why) and deletes nothing. The coordinator uses
the same path, with ``up_to_round``, to roll the release back to its last checkpoint on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import numpy as np
from PIL import Image

from common.core.atomic_io import write_bytes_atomic, write_json_atomic
from common.core.records import PLANES, UltrasoundRecord

METADATA = "metadata.jsonl"
SIDECAR = "release.json"
QUARANTINE = "quarantine"
_SHARED_MODE = 0o644  # the release is shared: its files are world-readable (atomic_io's temp files are 0600)

logger = logging.getLogger(__name__)

Reason = Literal["torn", "corrupt", "malformed", "duplicate", "missing-image", "orphan", "temp", "rollback"]
# What an interrupted writer leaves behind: the only damage a writer may clear up on its own, on resume.
WRITER_LEFTOVERS: frozenset[str] = frozenset({"torn", "orphan", "temp", "rollback"})
_REQUIRED = ("file_name", "id", "sha256", "plane", "ga_weeks", "round", "source_site")
_FILE_NAME = re.compile(r"images/[^./\\\x00][^/\\\x00]*\.png")


class ReleaseDamagedError(ValueError):
    """The release holds damage that only an explicit repair (``difusal release repair DIR``) may move aside."""


@dataclass(frozen=True)
class ReleaseItem:
    """One synthetic image and everything a user or auditor needs to know about it."""

    image: np.ndarray  # uint8 (H, W)
    plane: int
    ga_weeks: float
    source_site: str
    round: int
    scores: Mapping[str, float]
    acquisition: Mapping[str, Any]  # {"function": ..., "reason": ..., "rank": ...}
    privacy: Mapping[str, Any]  # {"epsilon": ..., "delta": ..., "accountant": ..., "model": "generator"}
    scanner: str | None = None
    memorization_checked: bool = False  # True if a filter read the site's private images (not covered by DP)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OpenReport:
    """What opening the store found (it changes nothing: see :meth:`ReleaseStore.repair`)."""

    records: int = 0
    torn_lines: int = 0  # an unreadable last line without its newline: an interrupted append
    bad_lines: int = 0  # corrupted, malformed or duplicate lines
    missing_images: int = 0  # records whose PNG is gone
    orphan_images: int = 0  # PNGs no record names
    temp_files: int = 0  # temporary files of an interrupted write
    unterminated_last_line: bool = False  # a complete last record without its newline: kept, not damage
    problems: tuple[str, ...] = ()  # one line per problem

    @property
    def damaged(self) -> bool:
        """Whether anything but whole records (and their PNGs) is there."""
        return bool(self.torn_lines or self.bad_lines or self.missing_images or self.orphan_images or self.temp_files)

    def describe(self) -> str:
        """One line per problem after a count summary."""
        head = (f"{self.records} whole records, {self.torn_lines} torn and {self.bad_lines} bad lines, "
                f"{self.missing_images} records without their PNG, {self.orphan_images} PNGs without a record, "
                f"{self.temp_files} temporary files")
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


@dataclass(frozen=True)
class Moved:
    """One thing a repair moves to the quarantine (or would, in a dry run)."""

    kind: Literal["line", "file"]
    name: str  # "line N" of metadata.jsonl, or the file's path relative to the release
    reason: Reason
    detail: str
    id: str | None = None  # the record's id, when the line (or the file's record) has one

    def describe(self) -> str:
        """``name (reason): detail``."""
        return f"{self.name}{f' [{self.id}]' if self.id else ''} ({self.reason}): {self.detail}"


@dataclass(frozen=True)
class RepairReport:
    """Outcome of :meth:`ReleaseStore.repair`."""

    folder: Path
    moved: tuple[Moved, ...]
    kept: int  # whole records left in metadata.jsonl
    kept_last_id: str | None
    quarantine: Path | None  # where the moved things are; None when nothing moved or in a dry run
    dry_run: bool = False
    terminated_last_line: bool = False  # the complete last record got its missing newline

    def describe(self) -> list[str]:
        """Human-readable lines for the log or the terminal."""
        if not self.moved and not self.terminated_last_line:
            return [f"{self.folder}: nothing to repair ({self.kept} whole records)"]
        verb = "would move" if self.dry_run else "moved"
        out = [f"{self.folder}: {verb} {len(self.moved)} item(s)"
               + (f" to {self.quarantine}" if self.quarantine else "") + f"; {self.kept} whole records kept"]
        out += [f"  {verb} {m.describe()}" for m in self.moved]
        if self.terminated_last_line:
            out.append(f"  {'would add' if self.dry_run else 'added'} the missing newline after the last record")
        return out


@dataclass
class AddReport:
    """Outcome of :meth:`ReleaseStore.add`."""

    added: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


class ReleaseStore:
    """Append-only, duplicate-aware synthetic release in ``folder``; opening it writes nothing."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self._load()

    def _load(self) -> None:
        lines = _scan_lines(self.folder, up_to_round=None)
        self.open_report = _open_report(lines, _stray_files(self.folder, lines))
        self._needs_newline = self.open_report.unterminated_last_line
        self._hashes = {ln.record["sha256"] for ln in lines if ln.problem is None and ln.record is not None}

    # -- reading ---------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """Every whole metadata record whose PNG is there, in release order (the rest is counted in ``open_report``)."""
        return [ln.record for ln in _scan_lines(self.folder, up_to_round=None)
                if ln.problem is None and ln.record is not None]

    def __len__(self) -> int:
        return len(self._hashes)

    def load_image(self, record: Mapping[str, Any]) -> np.ndarray:
        """The uint8 image of a record."""
        with Image.open(self.folder / record["file_name"]) as img:
            return np.asarray(img.convert("L"))

    # -- writing ---------------------------------------------------------------------------
    def add(self, items: Iterable[ReleaseItem]) -> AddReport:
        """Append ``items``; exact duplicates (same pixels as a released image) are counted and skipped.

        Raises :class:`ReleaseDamagedError` when the release was damaged at open: appending would bury the damage
        (a torn last line would swallow the next record); :meth:`repair` first.
        """
        if self.open_report.damaged:
            raise ReleaseDamagedError(
                f"{self.folder} is damaged: {self.open_report.describe()}\n"
                f"run `difusal release repair {self.folder}` (it moves the damage to a quarantine) before writing"
            )
        report = AddReport()
        meta = self.folder / METADATA
        for item in items:
            if item.image.dtype != np.uint8 or item.image.ndim != 2:
                raise ValueError(f"release images must be uint8 (H, W), got {item.image.dtype} {item.image.shape}")
            digest = hashlib.sha256(np.ascontiguousarray(item.image).tobytes()).hexdigest()
            if digest in self._hashes:
                report.duplicates.append(digest[:16])
                continue
            image_id = f"r{item.round:03d}-{item.source_site}-{digest[:12]}"
            file_name = f"images/{image_id}.png"
            self.images.mkdir(parents=True, exist_ok=True)
            _write_png_atomic(self.folder / file_name, item.image)
            record = {
                "file_name": file_name,
                "id": image_id,
                "sha256": digest,
                "plane": item.plane,
                "plane_name": PLANES[item.plane],
                "ga_weeks": float(item.ga_weeks),
                "scanner": item.scanner,
                "source_site": item.source_site,
                "round": item.round,
                "scores": {k: float(v) for k, v in item.scores.items()},
                "acquisition": dict(item.acquisition),
                "privacy": dict(item.privacy),
                "memorization_checked": item.memorization_checked,
                "extra": dict(item.extra),
            }
            with meta.open("a") as fh:  # a complete last record whose newline was lost is kept: end it first
                fh.write("\n" * self._needs_newline + json.dumps(record, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._needs_newline = False
            self._hashes.add(digest)
            report.added.append(image_id)
        return report

    def write_sidecar(self, payload: Mapping[str, Any]) -> Path:
        """Write ``release.json`` (config, sites, privacy certificate, counts, code version) atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / SIDECAR
        return write_json_atomic(path, {**dict(payload), "num_images": len(self)}, mode=_SHARED_MODE)

    # -- repair ----------------------------------------------------------------------------
    def repair(self, *, up_to_round: int | None = None, reason: str = "release repair",
               dry_run: bool = False) -> RepairReport:
        """Move every damaged line and stray file to ``quarantine/<time>/`` and keep the whole records.

        Parameters
        ----------
        up_to_round:
            Also move every record of a later round, and its PNG (a resume rolls the release back to what its last
            checkpoint recorded); ``None`` keeps every whole record.
        reason:
            Why the repair runs; written to the quarantine's ``repair.json`` and the log.
        dry_run:
            Report what would move and write nothing.

        Returns
        -------
        What moved (or would), how many records are kept and where the quarantine is. Nothing is deleted: a moved
        line is in ``dropped.jsonl`` verbatim, a moved file is ``<path>.quarantined`` under the quarantine.
        """
        lines = _scan_lines(self.folder, up_to_round=up_to_round)
        files = _stray_files(self.folder, lines)
        kept = [ln for ln in lines if ln.problem is None]
        dropped = [ln for ln in lines if ln.problem is not None]
        moved = tuple([Moved("line", f"line {ln.number}", ln.problem, ln.detail,  # type: ignore[arg-type]
                             ln.record.get("id") if ln.record else None) for ln in dropped]
                      + [Moved("file", rel, why, detail, rid) for rel, why, detail, rid in files])
        terminate = bool(kept) and kept[-1].unterminated
        last_id = str(kept[-1].record["id"]) if kept and kept[-1].record else None
        if dry_run or (not moved and not terminate):
            return RepairReport(self.folder, moved, len(kept), last_id, None, dry_run=dry_run,
                                terminated_last_line=terminate)
        quarantine = None
        if moved:
            quarantine = _new_quarantine(self.folder)
            # the dropped lines and the manifest reach the disk before metadata.jsonl forgets them
            if dropped:
                write_bytes_atomic(quarantine / "dropped.jsonl", b"".join(ln.raw + b"\n" for ln in dropped))
            write_json_atomic(quarantine / "repair.json", {
                "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "release": str(self.folder),
                "up_to_round": up_to_round, "kept_records": len(kept),
                "moved": [{**m.__dict__, **({"to": f"{m.name}.quarantined"} if m.kind == "file" else
                                            {"to": "dropped.jsonl"})} for m in moved],
                "restore": "a moved file is its original path plus '.quarantined'; a moved line is in dropped.jsonl, "
                           "in the order of metadata.jsonl",
            }, default=None)
        if dropped or terminate:
            write_bytes_atomic(self.folder / METADATA, b"".join(ln.raw + b"\n" for ln in kept), mode=_SHARED_MODE)
        # a kill in this loop leaves PNGs without a record: the next repair moves them
        for rel, *_ in files if quarantine is not None else []:
            target = quarantine / f"{rel}.quarantined"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.folder / rel, target)
        report = RepairReport(self.folder, moved, len(kept), last_id, quarantine, terminated_last_line=terminate)
        for line in report.describe():
            logger.info("%s: %s", reason, line)
        self._load()
        return report


def load_release_records(folder: Path) -> list[UltrasoundRecord]:
    """The release as :class:`UltrasoundRecord` s (source ``"synthetic"``), for downstream augmentation.

    Read-only: a damaged release gives its whole records and a warning that counts the rest.
    """
    if not (Path(folder) / METADATA).is_file():
        return []
    store = ReleaseStore(folder)
    if store.open_report.damaged:
        warnings.warn(f"{folder}: read the whole records only: {store.open_report.describe()}\n"
                      f"`difusal release repair {folder}` moves the rest to a quarantine", stacklevel=2)
    out = []
    for rec in store.records():
        out.append(
            UltrasoundRecord(
                image=store.load_image(rec),
                plane=int(rec["plane"]),
                ga_weeks=float(rec["ga_weeks"]),
                pixel_spacing_mm=rec.get("extra", {}).get("pixel_spacing_mm"),
                site=str(rec["source_site"]),
                patient_id=rec["id"],
                image_id=rec["id"],
                source="synthetic",
                extra={"round": rec["round"]},
            )
        )
    return out


@dataclass(frozen=True)
class _Line:
    """One non-blank line of ``metadata.jsonl`` and what is wrong with it (``problem`` None: a whole record)."""

    number: int  # 1-based
    raw: bytes
    record: dict[str, Any] | None
    problem: Reason | None
    detail: str
    unterminated: bool  # the file ends right after it, without a newline


def _scan_lines(folder: Path, *, up_to_round: int | None) -> list[_Line]:
    """Classify every line of ``metadata.jsonl`` (read-only)."""
    path = folder / METADATA
    parts = path.read_bytes().split(b"\n") if path.is_file() else []
    out: list[_Line] = []
    seen: dict[str, int] = {}  # sha256 and id -> line of the record that holds it
    for number, raw in enumerate(parts, start=1):
        if not raw.strip():
            continue
        unterminated = number == len(parts)
        record, problem, detail = _parse(raw)
        if problem == "corrupt" and unterminated:
            problem, detail = "torn", "unreadable last line without its newline (an interrupted append)"
        elif record is not None:
            first = seen.get(record["sha256"], seen.get(record["id"]))
            if up_to_round is not None and record["round"] > up_to_round:  # uncommitted: whatever else is wrong
                problem, detail = "rollback", f"round {record['round']} is after the last checkpoint ({up_to_round})"
            elif first is not None:
                problem, detail = "duplicate", f"same image or id as line {first}"
            elif not (folder / record["file_name"]).is_file():
                problem, detail = "missing-image", f"{record['file_name']} is missing"
            else:
                seen[record["sha256"]] = seen[record["id"]] = number
        out.append(_Line(number, raw, record, problem, detail, unterminated))
    return out


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, Reason | None, str]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, "corrupt", f"unreadable line ({exc})"
    if not isinstance(record, dict):
        return None, "malformed", f"a JSON {type(record).__name__}, not a release record"
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        return None, "malformed", f"not a release record: {', '.join(missing)} missing"
    if not isinstance(record["file_name"], str) or not _FILE_NAME.fullmatch(record["file_name"]):
        return None, "malformed", f"file_name {record['file_name']!r} is not images/<name>.png"
    if not isinstance(record["round"], int):
        return None, "malformed", f"round {record['round']!r} is not an integer"
    return record, None, ""


def _stray_files(folder: Path, lines: list[_Line]) -> list[tuple[str, Reason, str, str | None]]:
    """``(path, reason, detail, record id)`` of every PNG no kept record names and every temporary file."""
    kept = {ln.record["file_name"] for ln in lines if ln.problem is None and ln.record is not None}
    rolled = {ln.record["file_name"]: ln for ln in lines if ln.problem == "rollback" and ln.record is not None}
    out: list[tuple[str, Reason, str, str | None]] = []
    images = folder / "images"
    for png in sorted(images.glob("*.png")) if images.is_dir() else []:
        rel = f"images/{png.name}"
        if rel in kept:
            continue
        if rel in rolled:
            ln = rolled[rel]
            rid = ln.record["id"] if ln.record else None
            out.append((rel, "rollback", f"the image of line {ln.number}: {ln.detail}", rid))
        else:
            out.append((rel, "orphan", "no whole record names it", None))
    # common.core.atomic_io names its temp files ".<name>.<random>.tmp"; ".metadata-*" and ".release-*" are the
    # temp names of earlier versions, still counted in a release they left
    temps = [*(sorted(images.glob(".*.tmp")) if images.is_dir() else []),
             *sorted(folder.glob(f".{METADATA}.*.tmp")), *sorted(folder.glob(f".{SIDECAR}.*.tmp")),
             *sorted(folder.glob(".metadata-*")), *sorted(folder.glob(".release-*"))]
    out += [(str(p.relative_to(folder)), "temp", "temporary file of an interrupted write", None) for p in temps]
    return out


def _open_report(lines: list[_Line], files: list[tuple[str, Reason, str, str | None]]) -> OpenReport:
    count = {r: 0 for r in ("torn", "corrupt", "malformed", "duplicate", "missing-image", "orphan", "temp")}
    problems = []
    for ln in lines:
        if ln.problem is not None:
            count[ln.problem] += 1
            problems.append(f"line {ln.number} ({ln.problem}): {ln.detail}")
    for rel, why, detail, _ in files:
        count[why] += 1
        problems.append(f"{rel} ({why}): {detail}")
    kept = [ln for ln in lines if ln.problem is None]
    return OpenReport(
        records=len(kept), torn_lines=count["torn"],
        bad_lines=count["corrupt"] + count["malformed"] + count["duplicate"],
        missing_images=count["missing-image"], orphan_images=count["orphan"], temp_files=count["temp"],
        unterminated_last_line=bool(kept) and kept[-1].unterminated, problems=tuple(problems),
    )


def _new_quarantine(folder: Path) -> Path:
    """A fresh ``quarantine/<time>[-n]`` folder of the release."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = folder / QUARANTINE / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder / QUARANTINE}: 1000 quarantines named {stamp}; remove old ones")


def _write_png_atomic(path: Path, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue(), mode=_SHARED_MODE)
