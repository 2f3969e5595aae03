"""Loader holes from review: paths outside the dataset, oversized images, CSV bytes that are not UTF-8.

Every test builds a tiny dataset in its published layout under tmp_path and runs all three loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from common.core.errors import DataError
from common.data.loaders import LoadResult, load_african, load_fetal_planes_db, load_hc18

# source -> (loader, image folder, CSV path, header, row template, whether CSV names carry ".png")
LAYOUTS: dict[str, tuple[Callable[..., LoadResult], str, str, str, str, bool]] = {
    "fetal_planes_db": (load_fetal_planes_db, "Images", "FETAL_PLANES_DB_data.csv",
                        "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train ",
                        "{name};{i};Fetal brain;Trans-thalamic;Op. 1;{site};1 ", False),
    "hc18": (load_hc18, "training_set", "training_set_pixel_size_and_HC.csv",
             "filename,pixel size(mm),head circumference (mm)", "{name},0.1,180.0", True),
    "african": (load_african, "train", "train/African_train.csv", "Patient_num,Plane,Train,Center,Image_name",
                "{i},Fetal brain,1,{site},{name}", False),
}
SOURCES = sorted(LAYOUTS)
GOOD = ("010_HC.png", "011_HC.png")  # valid names in every layout (HC18 is the pickiest)


def write_png(path: Path, h: int, w: int, seed: int) -> None:
    """Write a random grayscale PNG."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)).save(path)


def build(source: str, root: Path, names: list[str], *, site: str = "Aloka", shapes: dict[str, tuple[int, int]]
          | None = None) -> Path:
    """A ``source`` dataset in ``root``: PNGs for ``GOOD`` (10x10 unless ``shapes`` says), a CSV row per name."""
    _, image_dir, csv_rel, header, template, with_ext = LAYOUTS[source]
    (root / image_dir).mkdir(parents=True)
    for k, good in enumerate(GOOD):
        write_png(root / image_dir / good, *(shapes or {}).get(good, (10, 10)), seed=k)
    rows = [template.format(name=n if with_ext else n.removesuffix(".png"), i=i + 1, site=site)
            for i, n in enumerate(names)]
    (root / csv_rel).write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return root


def load(source: str, root: Path, **kw: object) -> LoadResult:
    """Run the loader of ``source`` at 32 px."""
    return LAYOUTS[source][0](root, image_size=32, **kw)


def outside_copy(tmp_path: Path, name: str) -> Path:
    """A readable PNG named like a dataset image, outside the dataset folder."""
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    write_png(tmp_path / "elsewhere" / name, 12, 12, seed=7)
    return tmp_path / "elsewhere" / name


# -- 1. paths that leave the dataset folder -----------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_csv_path_outside_dataset_is_a_counted_skip(tmp_path: Path, source: str, how: str) -> None:
    # Prepare: a row naming a file outside the dataset whose base name is a real dataset image
    outside = outside_copy(tmp_path, GOOD[1])
    bad = f"../../elsewhere/{GOOD[1]}" if how == "dotdot" else str(outside)
    root = build(source, tmp_path / "ds", [GOOD[0], bad])
    # Execute
    result = load(source, root)
    # Assert: only the in-folder image loads; the escape is counted with its row (line 3) and target
    rep = result.report
    assert rep.rows == 2 and rep.loaded == 1 == len(result.records)
    assert rep.skips == {"outside_dataset": 1}
    file, row, detail = rep.examples["outside_dataset"][0]
    assert row == 3 and file.endswith(".csv") and str(outside.resolve()) in detail
    assert "outside_dataset" in rep.summary()
    with pytest.raises(DataError, match=r"row 3.*outside"):
        load(source, root, strict=True)


@pytest.mark.parametrize("source", SOURCES)
def test_symlinked_image_leading_outside_is_a_counted_skip(tmp_path: Path, source: str) -> None:
    # Prepare: the CSV names a plain file of the image folder, but that file is a symlink out of the dataset
    root = build(source, tmp_path / "ds", [GOOD[0], "012_HC.png"])
    link = root / LAYOUTS[source][1] / "012_HC.png"
    link.symlink_to(outside_copy(tmp_path, "012_HC.png"))
    # Execute
    result = load(source, root)
    # Assert
    assert result.report.loaded == 1 and result.report.skips == {"outside_dataset": 1}
    assert result.report.examples["outside_dataset"][0][1] == 3


@pytest.mark.parametrize("source", SOURCES)
def test_names_with_folders_inside_the_dataset_still_load_or_count_missing(tmp_path: Path, source: str) -> None:
    # Prepare: a ".." that comes back into the image folder, and one to an absent file inside the dataset
    image_dir = LAYOUTS[source][1]
    root = build(source, tmp_path / "ds", [f"../{image_dir}/{GOOD[0]}", f"../{image_dir}/013_HC.png"])
    # Execute
    result = load(source, root)
    # Assert: the first loads (it is inside the dataset), the second is a missing image, not an escape
    assert result.report.loaded == 1 and result.report.skips == {"missing_image": 1}
    assert result.report.examples["missing_image"][0][1] == 3


@pytest.mark.parametrize("source", SOURCES)
def test_dataset_root_given_through_a_symlink_still_loads(tmp_path: Path, source: str) -> None:
    # Prepare: the whole dataset folder reached through a symlink (its files are inside it once resolved)
    build(source, tmp_path / "ds", list(GOOD))
    (tmp_path / "link").symlink_to(tmp_path / "ds")
    # Execute
    result = load(source, tmp_path / "link")
    # Assert
    assert result.report.loaded == 2 and result.report.skipped == 0


# -- 2. oversized images ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns at open; we count it
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("limit", [250, 400])  # 600 px > 2 x 250: PIL raises; 400 < 600 <= 800: PIL warns
def test_oversized_image_is_a_counted_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                           limit: int) -> None:
    # Prepare: one 20x30 image (600 pixels) beside a 10x10 one, and a lowered PIL bomb limit
    root = build(source, tmp_path / "ds", list(GOOD), shapes={GOOD[1]: (20, 30)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    # Execute
    result = load(source, root)
    # Assert: the small image loads, the big one is counted under its own reason with the numbers and the fix
    rep = result.report
    assert rep.loaded == 1 and rep.skips == {"oversized_image": 1}
    _, row, detail = rep.examples["oversized_image"][0]
    assert row == 3 and "600" in detail and str(limit) in detail and "MAX_IMAGE_PIXELS" in detail


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("source", SOURCES)
def test_oversized_image_skip_survives_warnings_as_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          source: str) -> None:
    # Prepare: PIL would only warn, and the warning is escalated to an error (as under -W error)
    root = build(source, tmp_path / "ds", list(GOOD), shapes={GOOD[1]: (20, 30)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    # Execute
    result = load(source, root)
    # Assert: the load finishes
    assert result.report.loaded == 1 and result.report.skips == {"oversized_image": 1}


# -- 3. CSV bytes that are not UTF-8 ------------------------------------------------------------
def _latin1_row(source: str, root: Path) -> None:
    """Re-encode the CSV of ``root`` so that its row 3 carries a Latin-1 byte (0xE9) in a value."""
    csv_path = root / LAYOUTS[source][2]
    text = csv_path.read_text(encoding="utf-8")
    head, row2, row3 = text.splitlines()[:3]
    if source == "hc18":  # no site column: the byte lands in the file name
        row3 = row3.replace("011_HC", "011_\u00e9HC")
    else:
        row3 = row3.replace("Aloka", "Alg\u00e9ria")
    csv_path.write_bytes(("\n".join([head, row2]) + "\n").encode() + (row3 + "\n").encode("latin-1"))


@pytest.mark.parametrize("source", SOURCES)
def test_non_utf8_csv_row_is_counted_with_file_and_row_not_replaced(tmp_path: Path, source: str) -> None:
    # Prepare
    root = build(source, tmp_path / "ds", list(GOOD))
    _latin1_row(source, root)
    # Execute
    result = load(source, root)
    # Assert: the bad row is skipped under its own reason, named by file and line, with the raw bytes shown
    rep = result.report
    assert rep.rows == 2 and rep.loaded == 1 and rep.skips == {"bad_encoding": 1}
    file, row, detail = rep.examples["bad_encoding"][0]
    assert row == 3 and file.endswith(".csv") and "\\xe9" in detail and "UTF-8" in detail
    assert all("\ufffd" not in r.site and "\ufffd" not in r.image_id for r in result.records)
    assert "bad_encoding" in rep.summary() and "row 3" in rep.summary()
    with pytest.raises(DataError, match=r"\.csv row 3.*UTF-8"):
        load(source, root, strict=True)


@pytest.mark.parametrize("source", SOURCES)
def test_non_utf8_header_raises_naming_the_file(tmp_path: Path, source: str) -> None:
    # Prepare: a stray Latin-1 byte appended to the header line
    root = build(source, tmp_path / "ds", list(GOOD))
    csv_path = root / LAYOUTS[source][2]
    head, rest = csv_path.read_bytes().split(b"\n", 1)
    csv_path.write_bytes(head + b"\xe9\n" + rest)
    # Execute / Assert
    with pytest.raises(DataError, match=r"\.csv.*header.*UTF-8"):
        load(source, root)


@pytest.mark.parametrize("source", SOURCES)
def test_utf8_bom_and_accents_are_read_as_published(tmp_path: Path, source: str) -> None:
    # Prepare: a UTF-8 BOM and a correctly encoded accented site name
    root = build(source, tmp_path / "ds", list(GOOD), site="Alg\u00e9rie")
    csv_path = root / LAYOUTS[source][2]
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    # Execute
    result = load(source, root)
    # Assert
    assert result.report.loaded == 2 and result.report.skipped == 0
    if source != "hc18":
        assert {r.site for r in result.records} == {"Alg\u00e9rie"}
