"""Loaders: the shared real subsets (skipped if absent) and tiny fixture files written to tmp_path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.core.errors import DataError
from common.core.records import PLANE_INDEX
from common.data.loaders import (
    HADLOCK_HC_FORMULA,
    LoadResult,
    fit_square,
    load_african,
    load_fetal_planes_db,
    load_hc18,
    load_source,
)
from common.phantoms.biometry import ga_from_hc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _need_shared(name: str) -> Path:
    """Folder of one shared dataset, or skip."""
    if not (SHARED / name).is_dir():
        pytest.skip(f"real data not found at {SHARED / name}")
    return SHARED / name


@pytest.fixture(scope="module")
def hc18_shared() -> LoadResult:
    """The shared HC18 subset, loaded once for this module (701 images)."""
    return load_hc18(_need_shared("hc18"), image_size=32)


# -- fixture writers --------------------------------------------------------------------------
def write_png(path: Path, h: int = 20, w: int = 30, seed: int = 0, mode: str = "L") -> np.ndarray:
    """Write a random PNG and return its pixels (grayscale view)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)
    img = Image.fromarray(pixels)
    (img.convert("RGB") if mode == "RGB" else img).save(path)
    return pixels


def write_fpdb(root: Path) -> Path:
    """FETAL_PLANES_DB-like folder: 2 good rows, a missing image, a corrupt image, an unknown plane."""
    (root / "Images").mkdir(parents=True)
    lines = ["Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train ",
             "Patient00001_Plane1_1_of_2;1;Fetal brain;Trans-thalamic;Op. 1;Voluson E6;1 ",
             "Patient00002_Plane2_1_of_1;2;Maternal cervix;Not A Brain;Op. 2;Aloka;0 ",
             "Patient00003_Plane1_1_of_1;3;Other;Not A Brain;Other;Aloka;1 ",
             "Patient00004_Plane1_1_of_1;4;Fetal abdomen;Not A Brain;Op. 1;Aloka;1 ",
             "Patient00005_Plane1_1_of_1;5;Fetal heart;Not A Brain;Op. 1;Aloka;1 "]
    (root / "FETAL_PLANES_DB_data.csv").write_text("\n".join(lines) + "\n")
    write_png(root / "Images" / "Patient00001_Plane1_1_of_2.png", 40, 60, seed=1)
    write_png(root / "Images" / "Patient00002_Plane2_1_of_1.png", 50, 30, seed=2)
    (root / "Images" / "Patient00004_Plane1_1_of_1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    write_png(root / "Images" / "Patient00005_Plane1_1_of_1.png", seed=5)
    return root


def write_hc18(root: Path) -> Path:
    """HC18-like folder: one patient scanned twice (010, 010_2), another once, one bad HC value."""
    (root / "training_set").mkdir(parents=True)
    lines = ["filename,pixel size(mm),head circumference (mm)", "010_HC.png,0.1,180.0", "010_2HC.png,0.12,182.5",
             "011_HC.png,0.2,300.0", "012_HC.png,0.1,n/a"]
    (root / "training_set_pixel_size_and_HC.csv").write_text("\n".join(lines) + "\n")
    for k, name in enumerate(("010_HC", "010_2HC", "011_HC", "012_HC")):
        write_png(root / "training_set" / f"{name}.png", 50, 80, seed=10 + k)
    write_png(root / "training_set" / "010_HC_Annotation.png", 50, 80, seed=99)
    return root


def write_african(root: Path, *, with_test: bool = True) -> Path:
    """African-like folder: patient 1 in Ghana and in Uganda, a malformed row, an optional test split."""
    (root / "train").mkdir(parents=True)
    lines = ["Patient_num,Plane,Train,Center,Image_name", "1,Fetal brain,1,Ghana,patient001_GHA_plane1",
             "1,Fetal femur,1,Uganda,patient001_UGA_plane2", "2,Fetal thorax,1,Uganda", ]
    (root / "train" / "African_train.csv").write_text("\n".join(lines) + "\n")
    write_png(root / "train" / "patient001_GHA_plane1.png", 45, 40, seed=21, mode="RGB")
    write_png(root / "train" / "patient001_UGA_plane2.png", 40, 50, seed=22)
    if with_test:
        (root / "test").mkdir()
        (root / "test" / "African_test.csv").write_text(
            "Patient_num,Plane,Train,Center,Image_name\n7,Fetal abdomen,0,Malawi,patient007_MWI_plane0\n")
        write_png(root / "test" / "patient007_MWI_plane0.png", 30, 30, seed=23)
    return root


# -- preprocessing ----------------------------------------------------------------------------
def test_fit_square_keeps_aspect_and_pads_centred() -> None:
    # Prepare: a 20x40 all-white image
    image = np.full((20, 40), 255, dtype=np.uint8)
    # Execute
    out, scale = fit_square(image, 32)
    # Assert: long side -> 32 (scale 0.8), short side 16 rows centred (8 zero rows above and below)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert scale == pytest.approx(0.8)
    rows_with_content = np.flatnonzero(out.max(axis=1) > 0)
    assert rows_with_content.tolist() == list(range(8, 24))
    assert out[8:24].min() > 240 and out[:8].max() == 0 and out[24:].max() == 0


# -- FETAL_PLANES_DB --------------------------------------------------------------------------
def test_fpdb_fixture_counts_every_skip(tmp_path: Path) -> None:
    # Prepare
    root = write_fpdb(tmp_path / "fpdb")
    # Execute
    result = load_fetal_planes_db(root, image_size=32)
    # Assert: trailing spaces in header and values handled; each bad row counted under its reason
    rep = result.report
    assert [r.image_id for r in result.records] == ["Patient00001_Plane1_1_of_2", "Patient00002_Plane2_1_of_1"]
    assert [r.plane for r in result.records] == [PLANE_INDEX["fetal_brain"], PLANE_INDEX["maternal_cervix"]]
    assert [r.site for r in result.records] == ["Voluson E6", "Aloka"]
    assert [r.extra["official_split"] for r in result.records] == ["train", "test"]
    assert all(r.ga_weeks is None and r.pixel_spacing_mm is None for r in result.records)
    assert rep.rows == 5 and rep.loaded == 2
    assert rep.skips == {"missing_image": 1, "corrupt_image": 1, "unknown_plane": 1}
    assert rep.examples["missing_image"][0][1] == 4  # line 4 of the CSV (header is line 1)
    assert "unknown_plane" in rep.summary() and "Fetal heart" in rep.summary()


def test_fpdb_fixture_split_site_column_limit_strict(tmp_path: Path) -> None:
    # Prepare
    root = write_fpdb(tmp_path / "fpdb")
    # Execute
    test_only = load_fetal_planes_db(root, image_size=32, split="test")
    by_operator = load_fetal_planes_db(root, image_size=32, site_column="Operator")
    limited = load_fetal_planes_db(root, image_size=32, limit=1)
    # Assert
    assert [r.image_id for r in test_only.records] == ["Patient00002_Plane2_1_of_1"]
    assert test_only.report.filtered == 4
    assert [r.site for r in by_operator.records] == ["Op. 1", "Op. 2"]
    assert len(limited.records) == 1 and any("limit=1" in n for n in limited.report.notes)
    with pytest.raises(DataError, match="Fetal heart"):
        load_fetal_planes_db(root, image_size=32, strict=True)


def test_fpdb_bad_header_names_file_columns_and_fix(tmp_path: Path) -> None:
    # Prepare: a header without Train, and a comma-separated copy
    root = write_fpdb(tmp_path / "fpdb")
    csv_path = root / "FETAL_PLANES_DB_data.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace(";Train ", ";Split"))
    # Execute / Assert
    with pytest.raises(DataError) as info:
        load_fetal_planes_db(root)
    assert "FETAL_PLANES_DB_data.csv" in str(info.value) and "'Train'" in str(info.value)
    assert "Fix" in str(info.value)
    csv_path.write_text(text.replace(";", ","))
    with pytest.raises(DataError, match="','-separated"):
        load_fetal_planes_db(root)


def test_missing_root_and_missing_csv_name_path_and_download(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "nowhere"
    (tmp_path / "empty").mkdir()
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="nowhere.*zenodo.org/records/3904280"):
        load_fetal_planes_db(missing)
    with pytest.raises(FileNotFoundError, match="training_set_pixel_size_and_HC.csv.*1327317"):
        load_hc18(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="African_train.csv.*7540448"):
        load_african(tmp_path / "empty")


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    # Prepare
    root = write_fpdb(tmp_path / "fpdb")
    # Execute / Assert
    with pytest.raises(ValueError, match="image_size"):
        load_fetal_planes_db(root, image_size=48)
    with pytest.raises(ValueError, match="site_column"):
        load_fetal_planes_db(root, site_column="Plane")
    with pytest.raises(ValueError, match="split"):
        load_fetal_planes_db(root, split="val")
    with pytest.raises(ValueError, match="unknown data source"):
        load_source("imagenet", root)


def test_fpdb_shared_metadata_and_images(tmp_path: Path) -> None:
    # Prepare
    root = _need_shared("fetal_planes_db")
    # Execute
    result = load_fetal_planes_db(root, image_size=32)
    # Assert: the full 12,400-row CSV is read; only the 100 shipped images load, the rest are counted
    rep = result.report
    assert rep.rows == 12_400 and rep.loaded == 100 == len(result.records)
    assert rep.skips == {"missing_image": 12_300}
    assert Counter(r.plane_name for r in result.records) == {
        "fetal_abdomen": 20, "fetal_brain": 20, "fetal_femur": 20, "fetal_thorax": 20, "other": 20}
    assert {r.site for r in result.records} <= {"Voluson E6", "Aloka", "Voluson S10", "Other"}
    train = load_fetal_planes_db(root, image_size=32, split="train")
    assert train.report.rows - train.report.filtered == 7_129
    assert all(r.extra["official_split"] == "train" for r in train.records)


# -- HC18 -------------------------------------------------------------------------------------
def test_hc18_fixture_ga_spacing_patients(tmp_path: Path) -> None:
    # Prepare
    root = write_hc18(tmp_path / "hc18")
    # Execute
    result = load_hc18(root, image_size=32)
    # Assert
    recs = {r.image_id: r for r in result.records}
    assert sorted(recs) == ["010_2HC", "010_HC", "011_HC"]
    assert recs["010_HC"].patient_id == recs["010_2HC"].patient_id == "010" != recs["011_HC"].patient_id
    assert recs["010_HC"].ga_weeks == pytest.approx(float(ga_from_hc(180.0)))
    assert recs["010_HC"].extra["ga_formula"] == HADLOCK_HC_FORMULA
    assert recs["010_HC"].pixel_spacing_mm == pytest.approx(0.1 * 80 / 32)  # long side 80 -> 32
    assert recs["011_HC"].plane == PLANE_INDEX["fetal_brain"]
    assert recs["010_HC"].extra["annotation"] == "010_HC_Annotation.png"
    assert recs["011_HC"].extra["annotation"] is None
    assert result.report.skips == {"bad_value": 1}
    with pytest.raises(DataError, match="n/a"):
        load_hc18(root, image_size=32, strict=True)


def test_hc18_shared_701_rows_plausible_ga(hc18_shared: LoadResult) -> None:
    # Prepare
    recs = hc18_shared.records
    ga = np.array([r.ga_weeks for r in recs])
    # Execute
    by_patient = Counter(r.patient_id for r in recs)
    # Assert: HC 44-346 mm -> Hadlock GA about 11.4-40.1 weeks; repeats grouped under one patient
    assert hc18_shared.report.rows == 701 and len(recs) == 701 and hc18_shared.report.skipped == 0
    assert 11.0 < ga.min() < 12.0 and 39.5 < ga.max() < 40.5
    assert by_patient["392"] == 3 and len(by_patient) < 701
    spacing = np.array([r.pixel_spacing_mm for r in recs])
    orig = np.array([r.extra["orig_pixel_spacing_mm"] for r in recs])
    long_side = np.array([max(r.extra["orig_shape"]) for r in recs])
    np.testing.assert_allclose(spacing, orig * long_side / 32)


# -- African ----------------------------------------------------------------------------------
def test_african_fixture_patient_ids_splits_and_skips(tmp_path: Path) -> None:
    # Prepare
    root = write_african(tmp_path / "african")
    # Execute
    result = load_african(root, image_size=32, split="all")
    # Assert: Patient_num 1 in two countries -> two patients; malformed row counted; both splits read
    recs = {r.image_id: r for r in result.records}
    assert sorted(recs) == ["test/patient007_MWI_plane0", "train/patient001_GHA_plane1",
                            "train/patient001_UGA_plane2"]
    assert recs["train/patient001_GHA_plane1"].patient_id == "GHA-001"
    assert recs["train/patient001_UGA_plane2"].patient_id == "UGA-001"
    assert recs["train/patient001_UGA_plane2"].site == "Uganda"
    assert recs["test/patient007_MWI_plane0"].extra["official_split"] == "test"
    assert result.report.skips == {"malformed_row": 1}
    assert recs["train/patient001_GHA_plane1"].image.shape == (32, 32)  # RGB source -> grayscale


def test_african_missing_test_split_is_noted_or_raised(tmp_path: Path) -> None:
    # Prepare
    root = write_african(tmp_path / "african", with_test=False)
    # Execute
    result = load_african(root, image_size=32, split="all")
    # Assert
    assert len(result.records) == 2
    assert any("'test' not present" in n for n in result.report.notes)
    with pytest.raises(FileNotFoundError, match="African_test.csv"):
        load_african(root, image_size=32, split="test")


def test_african_shared_counts_per_country() -> None:
    # Prepare
    root = _need_shared("african_fetal_planes")
    # Execute
    result = load_source("african", root, image_size=32, split="train")
    # Assert
    assert Counter(r.site for r in result.records) == {"Algeria": 48, "Egypt": 48, "Ghana": 36, "Malawi": 49,
                                                       "Uganda": 36}
    assert result.report.skipped == 0 and result.report.rows == 217
    patients = {r.patient_id for r in result.records}
    assert {"EGY-002", "MWI-002"} <= patients  # the same Patient_num in two countries stays two patients
    assert {r.plane_name for r in result.records} == {"fetal_abdomen", "fetal_brain", "fetal_femur",
                                                       "fetal_thorax"}
