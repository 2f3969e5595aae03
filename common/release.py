"""The shared synthetic dataset: a Hugging Face ``imagefolder`` with provenance for every image.

Layout: ``metadata.jsonl`` (one JSON object per image; ``file_name`` is relative to it, as
``datasets.load_dataset("imagefolder", data_dir=...)`` expects), ``images/<id>.png`` and ``release.json``
(the release's sidecar). Writes are atomic per image: the PNG is written to a temp name and renamed, then
its metadata line is appended and fsynced. On open, a torn last line (a kill mid-append) and PNGs without
a metadata line are detected, counted and removed, so the store resumes with whole records only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from common.records import PLANES, UltrasoundRecord

METADATA = "metadata.jsonl"
SIDECAR = "release.json"


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


@dataclass
class OpenReport:
    """What opening the store found and repaired."""

    records: int = 0
    torn_lines: int = 0
    orphan_images: int = 0
    missing_images: int = 0


@dataclass
class AddReport:
    """Outcome of :meth:`ReleaseStore.add`."""

    added: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


class ReleaseStore:
    """Append-only, resumable, duplicate-aware synthetic release in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.open_report = self._repair()
        self._hashes = {r["sha256"] for r in self.records()}

    # -- reading ---------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """Every complete metadata record, in release order."""
        path = self.folder / METADATA
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self._hashes)

    def load_image(self, record: Mapping[str, Any]) -> np.ndarray:
        """The uint8 image of a record."""
        with Image.open(self.folder / record["file_name"]) as img:
            return np.asarray(img.convert("L"))

    # -- writing ---------------------------------------------------------------------------
    def add(self, items: Iterable[ReleaseItem]) -> AddReport:
        """Append ``items``; exact duplicates (same pixels as a released image) are counted and skipped."""
        report = AddReport()
        for item in items:
            if item.image.dtype != np.uint8 or item.image.ndim != 2:
                raise ValueError(f"release images must be uint8 (H, W), got {item.image.dtype} {item.image.shape}")
            digest = hashlib.sha256(np.ascontiguousarray(item.image).tobytes()).hexdigest()
            if digest in self._hashes:
                report.duplicates.append(digest[:16])
                continue
            image_id = f"r{item.round:03d}-{item.source_site}-{digest[:12]}"
            file_name = f"images/{image_id}.png"
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
            with (self.folder / METADATA).open("a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._hashes.add(digest)
            report.added.append(image_id)
        return report

    def write_sidecar(self, payload: Mapping[str, Any]) -> Path:
        """Write ``release.json`` (config, sites, privacy certificate, counts, code version) atomically."""
        path = self.folder / SIDECAR
        fd, tmp = tempfile.mkstemp(prefix=".release-", dir=self.folder)
        with os.fdopen(fd, "w") as fh:
            json.dump({**dict(payload), "num_images": len(self)}, fh, indent=2, default=str)
        os.replace(tmp, path)
        return path

    # -- repair ----------------------------------------------------------------------------
    def _repair(self) -> OpenReport:
        report = OpenReport()
        path = self.folder / METADATA
        good: list[str] = []
        if path.is_file():
            raw = path.read_bytes().decode(errors="replace")
            lines = raw.split("\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    complete = i < len(lines) - 1  # a line is complete only if its newline was written
                except json.JSONDecodeError:
                    rec, complete = None, False
                if rec is None or not complete:
                    report.torn_lines += 1
                    continue
                if not (self.folder / rec["file_name"]).is_file():
                    report.missing_images += 1
                    continue
                good.append(json.dumps(rec, sort_keys=True))
            if report.torn_lines or report.missing_images:
                fd, tmp = tempfile.mkstemp(prefix=".metadata-", dir=self.folder)
                with os.fdopen(fd, "w") as fh:
                    fh.write("".join(g + "\n" for g in good))
                os.replace(tmp, path)
        listed = {json.loads(g)["file_name"] for g in good}
        for png in self.images.glob("*.png"):
            if f"images/{png.name}" not in listed:
                png.unlink()
                report.orphan_images += 1
        for tmp_png in self.images.glob(".*.tmp"):
            tmp_png.unlink()
        report.records = len(good)
        return report


def load_release_records(folder: Path) -> list[UltrasoundRecord]:
    """The release as :class:`UltrasoundRecord` s (source ``"synthetic"``), for downstream augmentation."""
    if not (Path(folder) / METADATA).is_file():
        return []
    store = ReleaseStore(folder)
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


def _write_png_atomic(path: Path, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)

