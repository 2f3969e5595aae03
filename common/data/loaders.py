"""Readers for the public fetal ultrasound datasets, in their published layouts, into UltrasoundRecord.

FETAL_PLANES_DB (Burgos-Artizzu et al. 2020, Zenodo 10.5281/zenodo.3904280), HC18 (van den Heuvel et al.
2018, Zenodo 10.5281/zenodo.1327317) and the African fetal planes set (Sendra-Balcells et al. 2023, Zenodo
10.5281/zenodo.7540448). Every row that does not become a record is counted in the :class:`LoadReport`
with its reason and an example (file, row): nothing is dropped silently. CSVs are read as strict UTF-8, image
names must stay inside the dataset folder, and images over ``PIL.Image.MAX_IMAGE_PIXELS`` are skipped, each counted.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from common.core.errors import DataError
from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS, PLANE_INDEX, UltrasoundRecord
from common.phantoms.biometry import ga_from_hc

IMAGE_SIZES = (32, 64, 128)
SOURCES = ("fetal_planes_db", "hc18", "african")
MAX_EXAMPLES = 5
HC18_SITE = "radboudumc"  # all HC18 images were acquired at Radboud University Medical Center, Nijmegen
HADLOCK_HC_FORMULA = "Hadlock 1984: MA[weeks] = 8.96 + 0.540 HC + 0.0003 HC^3 (HC in cm)"
AFRICAN_COUNTRY_CODES = {"Algeria": "DZA", "Egypt": "EGY", "Ghana": "GHA", "Malawi": "MWI", "Uganda": "UGA"}

# What to download when a folder is missing: (dataset, where, expected layout).
_DOWNLOADS = {
    "fetal_planes_db": ("FETAL_PLANES_DB", "https://zenodo.org/records/3904280",
                        "FETAL_PLANES_DB_data.csv and Images/<Image_name>.png"),
    "hc18": ("HC18", "https://zenodo.org/records/1327317",
             "training_set_pixel_size_and_HC.csv and training_set/NNN_HC.png"),
    "african": ("African fetal planes", "https://zenodo.org/records/7540448",
                "train/African_train.csv with the train PNGs beside it (and test/African_test.csv)"),
}


@dataclass
class LoadReport:
    """What a loader read, kept and skipped (by reason, with up to five (file, row, detail) examples)."""

    source: str
    root: str
    rows: int = 0
    loaded: int = 0
    filtered: int = 0  # rows outside the requested split: not a defect, not a skip
    skips: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, file: str, row: int, detail: str) -> None:
        """Count one skipped row under ``reason`` and keep it as an example if there are fewer than five."""
        self.skips[reason] = self.skips.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append((file, row, detail))

    @property
    def skipped(self) -> int:
        """Total rows skipped, all reasons together."""
        return sum(self.skips.values())

    def summary(self) -> str:
        """Human-readable account: rows read, loaded, skipped by reason with examples, notes."""
        lines = [f"{self.source} ({self.root}): {self.rows} rows read, {self.loaded} loaded, "
                 f"{self.skipped} skipped, {self.filtered} outside the requested split"]
        for reason, count in sorted(self.skips.items()):
            ex = "; ".join(f"{f} row {r}: {d}" for f, r, d in self.examples.get(reason, [])[:2])
            lines.append(f"  skipped {count} x {reason} (e.g. {ex})")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for run reports."""
        return {"source": self.source, "root": self.root, "rows": self.rows, "loaded": self.loaded,
                "filtered": self.filtered, "skips": dict(self.skips),
                "examples": {k: [list(e) for e in v] for k, v in self.examples.items()},
                "notes": list(self.notes)}


@dataclass(frozen=True)
class LoadResult:
    """Records of one dataset and the report of how they were read."""

    records: list[UltrasoundRecord]
    report: LoadReport


# -- images -----------------------------------------------------------------------------------
def fit_square(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize the long side to ``size`` (aspect kept) and zero-pad, centred, to ``size x size``.

    Parameters
    ----------
    image:
        Grayscale ``uint8`` array ``(H, W)``.
    size:
        Output side in pixels.

    Returns
    -------
    The ``uint8`` square image and the scale factor (new pixels per old pixel); a pixel spacing
    becomes ``spacing / scale``.
    """
    if image.ndim != 2 or image.size == 0:
        raise DataError(f"expected a non-empty 2D grayscale image, got shape {image.shape}")
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = image.astype(np.uint8, copy=False)
    # Antialiased LANCZOS; reducing_gap=3 first shrinks with a box filter (PIL docs: visually the same, faster).
    if (nh, nw) != (h, w):
        small = np.asarray(Image.fromarray(small).resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0))
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out, scale


def read_grayscale(path: Path) -> np.ndarray:
    """Decode an image file to a ``uint8`` grayscale array.

    Raises ``OSError``/``ValueError`` if corrupt and ``PIL.Image.DecompressionBombError`` when the image has
    more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL itself only warns up to twice that; a skip that
    depends on the caller's warning filters would make the loaded set depend on them too).
    """
    with Image.open(path) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and im.width * im.height > limit:
            raise Image.DecompressionBombError(f"image size ({im.width * im.height} pixels) exceeds limit of "
                                               f"{limit} pixels")
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit/float scans: stretch to 8 bit
            arr = np.asarray(im, dtype=np.float64)
            top = arr.max()
            return (arr * (255.0 / top) if top > 0 else arr).astype(np.uint8)
        return np.asarray(im.convert("L"), dtype=np.uint8)


def _image_path(rows: _Rows, root: Path, image_dir: Path, name: str, present: set[str], line: int) -> Path | None:
    """Resolve the image a CSV row names; count a skip when it is missing or lies outside ``root``.

    ``root`` is the resolved dataset folder. A bare file name is checked against the folder listing
    ``present`` first (no stat for the many rows of a subset whose image is absent); any name, once found,
    is resolved (``..`` and symlinks) and must stay inside ``root``: a CSV must not make a loader read
    files elsewhere on the machine. Strict mode raises on such a name.
    """
    path = image_dir / name
    plain = path.parent == image_dir  # a bare file name, as in every published layout
    if plain and path.name not in present:
        rows.report.skip("missing_image", rows.csv_name, line, f"{image_dir.name}/{path.name}: file not found")
        return None
    try:
        target = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL byte
        rows.bad("bad_value", line, f"image name {name!r} cannot be resolved: {exc}")
        return None
    if not target.is_relative_to(root):
        rows.bad("outside_dataset", line,
                 f"image name {name!r} resolves to {target}, outside the dataset folder {root}; the CSV must name "
                 f"files inside {image_dir.name}/ (copy the image into the dataset or fix the row)")
        return None
    if not plain and not target.is_file():
        rows.report.skip("missing_image", rows.csv_name, line, f"{name}: file not found")
        return None
    return target


def _decode(rows: _Rows, root: Path, image_dir: Path, name: str, present: set[str], line: int, size: int
            ) -> tuple[np.ndarray, float, dict[str, Any]] | None:
    """Read, hash and fit one image; count a skip and return ``None`` when it is unsafe, missing or unreadable."""
    path = _image_path(rows, root, image_dir, name, present, line)
    if path is None:
        return None
    shown = f"{image_dir.name}/{name}"
    try:
        raw = read_grayscale(path)
        if raw.ndim != 2 or raw.size == 0:
            raise ValueError(f"decoded to shape {raw.shape}")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning if escalated
        rows.report.skip("oversized_image", rows.csv_name, line,
                         f"{shown}: {exc} (PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}; a possible "
                         f"decompression bomb. If the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS "
                         f"before loading)")
        return None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three on broken files
        rows.report.skip("corrupt_image", rows.csv_name, line, f"{shown}: {exc}")
        return None
    image, scale = fit_square(raw, size)
    # Hash of the decoded full-resolution pixels: exact-duplicate detection uses it (common.data.dedup).
    sha1 = hashlib.sha1(str(raw.shape).encode() + raw.tobytes()).hexdigest()
    return image, scale, {"pixel_sha1": sha1, "orig_shape": tuple(int(s) for s in raw.shape)}


# -- CSV --------------------------------------------------------------------------------------
def _root(root: str | os.PathLike[str], source: str) -> Path:
    """Return ``root`` as a Path, or raise FileNotFoundError naming it and what to download."""
    path = Path(root).expanduser()
    if not path.is_dir():
        name, url, layout = _DOWNLOADS[source]
        raise FileNotFoundError(f"{name} folder not found: {path}. Download {name} from {url} and unpack it "
                                f"there unchanged (expected: {layout}).")
    return path


def _require_csv(path: Path, source: str) -> None:
    """Raise FileNotFoundError when a dataset's metadata CSV is absent."""
    if not path.is_file():
        name, url, layout = _DOWNLOADS[source]
        raise FileNotFoundError(f"{name} metadata file not found: {path}. Download {name} from {url} and "
                                f"unpack it unchanged (expected: {layout}).")


def _open_single_csv(root: str | os.PathLike[str], source: str, csv_name: str, image_dir: str, strict: bool,
                     limit: int | None) -> tuple[Path, Path, _Rows, set[str]]:
    """Open a dataset read from one CSV: ``(folder, CSV path, row bookkeeping with a new report, image listing)``.

    Raises FileNotFoundError (naming what to download) when the folder or the CSV is absent.
    """
    folder = _root(root, source)
    csv_path = folder / csv_name
    _require_csv(csv_path, source)
    rows = _Rows(LoadReport(source, str(folder)), csv_path.name, strict, limit)
    return folder, csv_path, rows, _listing(folder / image_dir)


def _not_utf8(values: list[str]) -> int | None:
    """Index of the first value holding undecodable bytes (lone surrogates from ``surrogateescape``), or None."""
    try:
        "".join(values).encode("utf-8")
        return None
    except UnicodeEncodeError:
        return next(i for i, v in enumerate(values) if any("\udc80" <= ch <= "\udcff" for ch in v))


def _rows(path: Path, *, delimiter: str, required: tuple[str, ...], source: str
          ) -> Iterator[tuple[int, dict[str, str], tuple[str, str] | None]]:
    """Yield ``(line, stripped row dict, None)`` or ``(line, {}, (reason, detail))``; check the header first.

    The file is read as strict UTF-8 (a BOM is allowed): bytes that are not UTF-8 are kept as lone surrogates
    (``surrogateescape``) so that the row holding them is reported (reason ``bad_encoding``, with the bytes)
    instead of a replacement character silently becoming part of a value (a new site, a wrong file name).
    """
    name, url, _ = _DOWNLOADS[source]
    fix = (f"use the file exactly as published by {name} ({url}), UTF-8 encoded: columns {list(required)} "
           f"separated by {delimiter!r}")
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        if (bad := _not_utf8(header)) is not None:
            raise DataError(f"{path}: header is not valid UTF-8 (bytes {_raw_bytes(header[bad])!r}). "
                            f"Fix: {fix}.")
        missing = [c for c in required if c not in header]
        if missing:
            other = "," if delimiter == ";" else ";"
            hint = (f" (it looks {other!r}-separated)" if len(header) == 1 and other in header[0] else "")
            raise DataError(f"{path}: header {header} lacks {missing}{hint}; expected columns {list(required)}. "
                            f"Fix: {fix}.")
        for raw in reader:
            if not raw or all(not v.strip() for v in raw):
                continue  # blank line: not a row
            if (bad := _not_utf8(raw)) is not None:
                column = header[bad] if bad < len(header) else f"field {bad + 1}"
                yield reader.line_num, {}, ("bad_encoding", (
                    f"column {column!r} holds bytes that are not UTF-8: {_raw_bytes(raw[bad].strip())!r}; "
                    f"re-save {path.name} as UTF-8 (the published file is)"))
            elif len(raw) != len(header):
                yield reader.line_num, {}, ("malformed_row", f"{len(raw)} fields, expected {len(header)}")
            else:
                yield reader.line_num, dict(zip(header, (v.strip() for v in raw))), None


def _raw_bytes(value: str) -> bytes:
    """The file's bytes behind a ``surrogateescape``-decoded value (for messages)."""
    return value.encode("utf-8", errors="surrogateescape")


def _listing(folder: Path) -> set[str]:
    """File names in ``folder`` (one directory scan instead of one stat per CSV row)."""
    return set(os.listdir(folder)) if folder.is_dir() else set()


def plane_index(name: str) -> int | None:
    """Map a published plane name ("Fetal brain", "Maternal cervix", "Other") to its PLANES index."""
    return PLANE_INDEX.get(re.sub(r"[\s\-]+", "_", name.strip().lower()))


def _check_args(image_size: int, split: str, splits: tuple[str, ...], limit: int | None) -> None:
    """Validate the keyword arguments shared by all loaders."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size={image_size!r} is not supported; choose one of {list(IMAGE_SIZES)}")
    if split not in splits:
        raise ValueError(f"split={split!r} is not allowed; choose one of {list(splits)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} must be a positive int or None")


class _Rows:
    """Shared per-row bookkeeping of a loader: malformed rows, bad values (strict raises), limit."""

    def __init__(self, report: LoadReport, csv_name: str, strict: bool, limit: int | None) -> None:
        self.report, self.csv_name, self.strict, self.limit = report, csv_name, strict, limit

    def bad(self, reason: str, row: int, detail: str) -> None:
        """Count a label/value problem; with ``strict`` raise DataError instead."""
        if self.strict:
            raise DataError(f"{self.csv_name} row {row}: {detail} (strict=True; pass strict=False to "
                            f"count and skip such rows)")
        self.report.skip(reason, self.csv_name, row, detail)

    def full(self, n_loaded: int) -> bool:
        """True (and noted once) when ``limit`` records have been loaded."""
        if self.limit is not None and n_loaded >= self.limit:
            self.report.notes.append(f"stopped after limit={self.limit} records; later rows not read")
            return True
        return False

    def read(self, path: Path, records: list[UltrasoundRecord], *, delimiter: str, required: tuple[str, ...],
             source: str) -> Iterator[tuple[int, dict[str, str]]]:
        """Yield ``(line, row)`` for each well-formed row of ``path`` until ``records`` holds ``limit`` records.

        Every row read is counted in the report; a malformed or not-UTF-8 row is counted as bad (strict
        raises) and not yielded.
        """
        for line, row, problem in _rows(path, delimiter=delimiter, required=required, source=source):
            if self.full(len(records)):
                return
            self.report.rows += 1
            if problem is not None:  # malformed or not UTF-8
                self.bad(problem[0], line, problem[1])
                continue
            yield line, row


# -- FETAL_PLANES_DB --------------------------------------------------------------------------
FPDB_COLUMNS = ("Image_name", "Patient_num", "Plane", "Brain_plane", "Operator", "US_Machine", "Train")


def load_fetal_planes_db(root: str | os.PathLike[str], *, image_size: int = 64, site_column: str = "US_Machine",
                         split: str = "all", strict: bool = False, limit: int | None = None) -> LoadResult:
    """Read FETAL_PLANES_DB: ``FETAL_PLANES_DB_data.csv`` (``;``-separated) + ``Images/<Image_name>.png``.

    Parameters
    ----------
    root:
        Folder holding the CSV and ``Images/`` as published.
    site_column:
        ``"US_Machine"`` (4 scanners) or ``"Operator"``: the column used as the site.
    split:
        ``"all"``, ``"train"`` (``Train`` = 1) or ``"test"`` (``Train`` = 0), the paper's official split.
    image_size, strict, limit:
        As for every loader: see :func:`load_source`.

    Returns
    -------
    :class:`LoadResult`; no GA and no pixel spacing (``None``) in this dataset.
    """
    _check_args(image_size, split, ("all", "train", "test"), limit)
    if site_column not in ("US_Machine", "Operator"):
        raise ValueError(f"site_column={site_column!r} is not allowed; choose 'US_Machine' or 'Operator'")
    folder, csv_path, rows, present = _open_single_csv(root, "fetal_planes_db", "FETAL_PLANES_DB_data.csv", "Images",
                                                       strict, limit)
    report, real = rows.report, folder.resolve()
    if not present:
        report.notes.append(f"no images found in {folder / 'Images'}")
    records: list[UltrasoundRecord] = []
    for line, row in rows.read(csv_path, records, delimiter=";", required=FPDB_COLUMNS, source="fetal_planes_db"):
        if row["Train"] not in ("0", "1"):
            rows.bad("bad_value", line, f"Train={row['Train']!r}, expected 0 or 1")
            continue
        official = "train" if row["Train"] == "1" else "test"
        if split != "all" and official != split:
            report.filtered += 1
            continue
        plane = plane_index(row["Plane"])
        if plane is None:
            rows.bad("unknown_plane", line, f"Plane={row['Plane']!r}")
            continue
        if not row["Image_name"] or not row["Patient_num"] or not row[site_column]:
            rows.bad("bad_value", line, f"empty Image_name, Patient_num or {site_column}")
            continue
        decoded = _decode(rows, real, folder / "Images", f"{row['Image_name']}.png", present, line, image_size)
        if decoded is None:
            continue
        image, _, extra = decoded
        extra.update(official_split=official, brain_plane=row["Brain_plane"], operator=row["Operator"],
                     us_machine=row["US_Machine"])
        records.append(UltrasoundRecord(image=image, plane=plane, ga_weeks=None, pixel_spacing_mm=None,
                                        site=row[site_column], patient_id=row["Patient_num"],
                                        image_id=row["Image_name"], source="fetal_planes_db", extra=extra))
    report.loaded = len(records)
    return LoadResult(records, report)


# -- HC18 -------------------------------------------------------------------------------------
HC18_COLUMNS = ("filename", "pixel size(mm)", "head circumference (mm)")
_HC18_NAME = re.compile(r"^(\d+)_(\d*)HC\.png$")


def load_hc18(root: str | os.PathLike[str], *, image_size: int = 64, strict: bool = False,
              limit: int | None = None) -> LoadResult:
    """Read the HC18 training set: ``training_set_pixel_size_and_HC.csv`` + ``training_set/NNN_HC.png``.

    Parameters
    ----------
    root:
        Folder holding the CSV and ``training_set/`` as published.
    image_size, strict, limit:
        As for every loader: see :func:`load_source`.

    Returns
    -------
    :class:`LoadResult`; plane ``fetal_brain``, GA from head circumference (Hadlock 1984, unclipped),
    pixel spacing rescaled to the fitted image, patient id ``NNN`` (``NNN_2HC.png`` repeats grouped).
    """
    _check_args(image_size, "all", ("all",), limit)
    folder, csv_path, rows, present = _open_single_csv(root, "hc18", "training_set_pixel_size_and_HC.csv",
                                                       "training_set", strict, limit)
    report, real = rows.report, folder.resolve()
    records: list[UltrasoundRecord] = []
    for line, row in rows.read(csv_path, records, delimiter=",", required=HC18_COLUMNS, source="hc18"):
        try:
            spacing, hc = float(row["pixel size(mm)"]), float(row["head circumference (mm)"])
        except ValueError:
            rows.bad("bad_value", line, f"non-numeric pixel size {row['pixel size(mm)']!r} or "
                                        f"HC {row['head circumference (mm)']!r}")
            continue
        if not (spacing > 0 and hc > 0 and np.isfinite(spacing) and np.isfinite(hc)):
            rows.bad("bad_value", line, f"pixel size {spacing} mm and HC {hc} mm must be positive")
            continue
        name = row["filename"]
        match = _HC18_NAME.match(name)
        decoded = _decode(rows, real, folder / "training_set", name, present, line, image_size)
        if decoded is None:
            continue
        image, scale, extra = decoded
        annotation = name.replace(".png", "_Annotation.png")
        extra.update(official_split=None, head_circumference_mm=hc, orig_pixel_spacing_mm=spacing,
                     ga_formula=HADLOCK_HC_FORMULA,
                     annotation=annotation if annotation in present else None)
        records.append(UltrasoundRecord(
            image=image, plane=PLANE_INDEX["fetal_brain"], ga_weeks=float(ga_from_hc(hc)),
            pixel_spacing_mm=spacing / scale, site=HC18_SITE,
            patient_id=match.group(1) if match else Path(name).stem, image_id=Path(name).stem,
            source="hc18", extra=extra))
    outside = sum(not GA_MIN_WEEKS <= (r.ga_weeks or 0.0) <= GA_MAX_WEEKS for r in records)
    if outside:
        report.notes.append(f"{outside} records have a Hadlock GA outside [{GA_MIN_WEEKS}, {GA_MAX_WEEKS}] "
                            f"weeks (kept unclipped)")
    report.loaded = len(records)
    return LoadResult(records, report)


# -- African fetal planes ---------------------------------------------------------------------
AFRICAN_COLUMNS = ("Patient_num", "Plane", "Train", "Center", "Image_name")
_AFRICAN_NAME = re.compile(r"patient\d+_([A-Z]{3})_plane\d+", re.IGNORECASE)


def _african_csv(folder: Path, split: str) -> Path | None:
    """Find ``African_<split>.csv`` in ``<root>/<split>/`` (published layout) or in ``<root>/``."""
    for path in (folder / split / f"African_{split}.csv", folder / f"African_{split}.csv"):
        if path.is_file():
            return path
    return None


def load_african(root: str | os.PathLike[str], *, image_size: int = 64, split: str = "train",
                 strict: bool = False, limit: int | None = None) -> LoadResult:
    """Read the African fetal planes set: ``train/African_train.csv`` (+ ``test/African_test.csv``) and PNGs.

    Parameters
    ----------
    root:
        Folder holding ``train/`` (and ``test/``) as published; each CSV's PNGs lie beside it.
    split:
        ``"train"``, ``"test"`` or ``"all"`` (both; a missing one is noted in the report).
    image_size, strict, limit:
        As for every loader: see :func:`load_source`.

    Returns
    -------
    :class:`LoadResult`; site = ``Center`` (country), patient id ``<ISO3>-<Patient_num>`` (numbers
    repeat across countries), image id ``<split>/<Image_name>``.
    """
    _check_args(image_size, split, ("train", "test", "all"), limit)
    folder = _root(root, "african")
    wanted = ("train", "test") if split == "all" else (split,)
    found = {s: _african_csv(folder, s) for s in wanted}
    if not any(found.values()):
        _require_csv(folder / wanted[0] / f"African_{wanted[0]}.csv", "african")
    report = LoadReport("african", str(folder))
    real = folder.resolve()
    records: list[UltrasoundRecord] = []
    for part in wanted:
        csv_path = found[part]
        if csv_path is None:
            report.notes.append(f"split {part!r} not present (no African_{part}.csv under {folder})")
            continue
        rows = _Rows(report, f"{part}/{csv_path.name}", strict, limit)
        image_dirs = [csv_path.parent, folder / part]
        listings = [_listing(d) for d in image_dirs]
        for line, row in rows.read(csv_path, records, delimiter=",", required=AFRICAN_COLUMNS, source="african"):
            plane = plane_index(row["Plane"])
            if plane is None:
                rows.bad("unknown_plane", line, f"Plane={row['Plane']!r}")
                continue
            try:
                number = int(float(row["Patient_num"]))
            except ValueError:
                rows.bad("bad_value", line, f"Patient_num={row['Patient_num']!r} is not a number")
                continue
            name_match = _AFRICAN_NAME.search(row["Image_name"])
            code = AFRICAN_COUNTRY_CODES.get(row["Center"]) or (
                name_match.group(1).upper() if name_match else row["Center"].upper())
            file_name = row["Image_name"] if row["Image_name"].lower().endswith(".png") else f"{row['Image_name']}.png"
            where = next((i for i, names in enumerate(listings) if file_name in names), 0)
            decoded = _decode(rows, real, image_dirs[where], file_name, listings[where], line, image_size)
            if decoded is None:
                continue
            image, _, extra = decoded
            extra.update(official_split=part, train_flag=row["Train"], country_code=code)
            records.append(UltrasoundRecord(
                image=image, plane=plane, ga_weeks=None, pixel_spacing_mm=None, site=row["Center"],
                patient_id=f"{code}-{number:03d}", image_id=f"{part}/{Path(file_name).stem}",
                source="african", extra=extra))
        if limit is not None and len(records) >= limit:
            break
    report.loaded = len(records)
    return LoadResult(records, report)


def load_source(name: str, root: str | os.PathLike[str], *, image_size: int = 64, **kw: Any) -> LoadResult:
    """Dispatch to the loader of ``name`` (``"fetal_planes_db"``, ``"hc18"`` or ``"african"``).

    Parameters
    ----------
    name:
        Dataset name, as in ``DataConfig.source``.
    root:
        Dataset folder.
    image_size:
        Output side (32, 64 or 128).
    **kw:
        Passed to the loader: ``split`` and ``site_column`` (see each loader), and the keywords every loader takes:
        ``strict``, raise :class:`DataError` on a row with an unknown plane or a bad value instead of counting and
        skipping it; ``limit``, stop after this many records.

    Returns
    -------
    The loader's :class:`LoadResult`.
    """
    loaders = {"fetal_planes_db": load_fetal_planes_db, "hc18": load_hc18, "african": load_african}
    if name not in loaders:
        raise ValueError(f"unknown data source {name!r}; choose one of {list(loaders)}")
    return loaders[name](root, image_size=image_size, **kw)  # type: ignore[operator]
