"""``python -m simulations.cli evaluate FOLDER --data SOURCE --data-root DIR``: scores on each dataset layout.

Models with known outputs (a constant plane classifier, a constant GA regressor) give metrics that can be
computed by hand on the tiny fixture folders of ``tests/test_loaders.py``; the shipped prior checks the real path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.analysis.score import SCORE_KEYS
from common.core.config import RunConfig
from common.core.records import PLANE_INDEX, PLANES
from common.phantoms.biometry import ga_from_hc
from simulations.cli import main
from tests.test_loaders import write_african, write_fpdb, write_hc18

ROOT = Path(__file__).resolve().parents[1]
PRIOR = ROOT / "common" / "assets" / "prior-demo"
SIZE, WIDTH = 32, 4
AFRICAN_SCOPE = "fetal_brain,fetal_abdomen,fetal_femur,fetal_thorax"
GA_KEYS = ("ga_mae_days", "ga_coverage", "ga_interval_width_days")


def write_model(folder: Path, *, plane: str, planes: str, ga_bias: tuple[float, float] = (0.0, 0.0),
                legacy: bool = False) -> Path:
    """A checkpoint-like folder: a classifier whose head always favours ``plane`` and a GA regressor whose output
    is the constant ``(27 + 13 b0 weeks, logvar(b1))``; sidecar.json holds a full run config with scope ``planes``
    (in ``federation.al_planes`` instead of ``data.planes`` when ``legacy``)."""
    from common.models.downstream import GARegressor, PlaneClassifier

    torch.manual_seed(0)
    clf, reg = PlaneClassifier(image_size=SIZE, width=WIDTH), GARegressor(SIZE, WIDTH)
    with torch.no_grad():
        clf.head.weight.zero_()
        clf.head.bias.fill_(-5.0)
        clf.head.bias[PLANE_INDEX[plane]] = 5.0
        reg.head[-1].weight.zero_()
        reg.head[-1].bias.copy_(torch.tensor(ga_bias))
    folder.mkdir(parents=True)
    for name, model in (("classifier", clf), ("regressor", reg)):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    config = RunConfig.from_flat({"preset": "smoke", "data.image-size": SIZE, "train.downstream-width": WIDTH,
                                  "train.downstream-backbone": "cnn", "data.planes": planes}).to_dict()
    if legacy:
        del config["data"]["planes"]
        config["federation"]["al_planes"] = planes
    (folder / "sidecar.json").write_text(json.dumps({"kind": "checkpoint", "config": config}))
    return folder


def evaluate(capsys: pytest.CaptureFixture[str], folder: Path, source: str, root: Path, *extra: str
             ) -> tuple[int, dict[str, Any] | None, str]:
    """Run the command in-process: ``(exit status, printed JSON object or None, stderr)``."""
    capsys.readouterr()
    rc = main(["evaluate", str(folder), "--data", source, "--data-root", str(root), *extra])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def check_shape(result: dict[str, Any], n: int) -> None:
    """The documented keys, in order, with their JSON types."""
    assert list(result) == list(SCORE_KEYS)
    assert result["n"] == n and isinstance(result["n"], int)
    for key in ("accuracy", "macro_f1"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0
    assert isinstance(result["per_plane_recall"], dict) and set(result["per_plane_recall"]) <= set(PLANES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in result["per_plane_recall"].values())


# -- each layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("split", "n", "accuracy", "macro_f1", "recall"), [
    # images: train brain (Ghana), train femur (Uganda), test abdomen (Malawi); the model always says femur
    ("all", 3, 1 / 3, (0 + 0 + 2 / 4) / 3, {"fetal_brain": 0.0, "fetal_abdomen": 0.0, "fetal_femur": 1.0}),
    ("train", 2, 1 / 2, (0 + 2 / 3) / 2, {"fetal_brain": 0.0, "fetal_abdomen": None, "fetal_femur": 1.0}),
    ("test", 1, 0.0, 0.0, {"fetal_brain": None, "fetal_abdomen": 0.0, "fetal_femur": None}),
    (None, 1, 0.0, 0.0, {"fetal_brain": None, "fetal_abdomen": 0.0, "fetal_femur": None}),  # default: test
])
def test_african_layout_scores_the_requested_split(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   split: str | None, n: int, accuracy: float, macro_f1: float,
                                                   recall: dict[str, float | None]) -> None:
    # Prepare
    data = write_african(tmp_path / "african")
    model = write_model(tmp_path / "ckpt", plane="fetal_femur", planes=AFRICAN_SCOPE)
    # Execute
    rc, result, err = evaluate(capsys, model, "african", data, *(["--split", split] if split else []))
    # Assert: the hand-computed metrics; per plane of the four-plane scope; no GA label -> null GA keys
    assert rc == 0, err
    check_shape(result, n)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["macro_f1"] == pytest.approx(macro_f1)
    assert result["per_plane_recall"] == {**recall, "fetal_thorax": None}
    assert all(result[k] is None for k in GA_KEYS)
    if split in ("all", "train"):  # the loader's account of the malformed row reaches stderr
        assert "1 x malformed_row" in err


def test_hc18_layout_scores_ga_and_the_brain_only_scope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: weights favouring "other", HC18's brain-only scope; GA mean 27 - 6.5 = 20.5 weeks, std 13/e weeks
    data = write_hc18(tmp_path / "hc18")
    model = write_model(tmp_path / "ckpt", plane="other", planes="fetal_brain", ga_bias=(-0.5, 0.0))
    out_file = tmp_path / "out" / "score.json"
    # Execute: no --split (HC18: its one labelled set), then the same with --split all / train
    rc, result, err = evaluate(capsys, model, "hc18", data, "--json", str(out_file))
    rc_all, result_all, _ = evaluate(capsys, model, "hc18", data, "--split", "all")
    rc_train, result_train, _ = evaluate(capsys, model, "hc18", data, "--split", "train")
    # Assert: 3 readable rows (the n/a HC row skipped); the scope makes every prediction a brain plane
    assert (rc, rc_all, rc_train) == (0, 0, 0), err
    check_shape(result, 3)
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
    assert result["per_plane_recall"] == {"fetal_brain": 1.0}
    ga = ga_from_hc(np.array([180.0, 182.5, 300.0]))
    std, z = 13.0 * np.exp(-1.0), NormalDist().inv_cdf(0.95)
    err_weeks = np.abs(20.5 - ga)
    assert result["ga_mae_days"] == pytest.approx(err_weeks.mean() * 7, rel=1e-4)
    assert result["ga_coverage"] == pytest.approx(float((err_weeks <= z * std).mean()))
    assert result["ga_coverage"] == pytest.approx(2 / 3)  # the 300 mm head (33 weeks) lies outside
    assert result["ga_interval_width_days"] == pytest.approx(2 * z * std * 7, rel=1e-4)
    assert result_all == result_train == result
    assert json.loads(out_file.read_text()) == result and out_file.read_text().endswith("}\n")
    assert "1 x bad_value" in err


def test_hc18_with_an_all_plane_model_reports_null_for_the_planes_it_lacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the same weights without a scope: they predict "other" for every head
    data = write_hc18(tmp_path / "hc18")
    model = write_model(tmp_path / "ckpt", plane="other", planes="")
    # Execute
    rc, result, err = evaluate(capsys, model, "hc18", data)
    # Assert
    assert rc == 0, err
    check_shape(result, 3)
    assert result["accuracy"] == 0.0 and result["macro_f1"] == 0.0
    assert result["per_plane_recall"] == {"fetal_brain": 0.0, **{p: None for p in PLANES[1:]}}
    assert all(isinstance(result[k], float) for k in GA_KEYS)


@pytest.mark.parametrize(("split", "n", "accuracy", "macro_f1", "recall"), [
    # readable rows: brain (Train=1) and maternal cervix (Train=0); the model always says brain
    ("all", 2, 0.5, (2 / 3 + 0) / 2, {"fetal_brain": 1.0, "maternal_cervix": 0.0}),
    ("train", 1, 1.0, 1.0, {"fetal_brain": 1.0, "maternal_cervix": None}),
    ("test", 1, 0.0, 0.0, {"fetal_brain": None, "maternal_cervix": 0.0}),
])
def test_fetal_planes_db_layout_scores_the_official_split(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          split: str, n: int, accuracy: float, macro_f1: float,
                                                          recall: dict[str, float | None]) -> None:
    # Prepare
    data = write_fpdb(tmp_path / "fpdb")
    model = write_model(tmp_path / "ckpt", plane="fetal_brain", planes=",".join(PLANES))
    # Execute
    rc, result, err = evaluate(capsys, model, "fetal_planes_db", data, "--split", split)
    # Assert: all six planes reported (null where the split has none); no GA in this dataset
    assert rc == 0, err
    check_shape(result, n)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["macro_f1"] == pytest.approx(macro_f1)
    assert result["per_plane_recall"] == {p: recall.get(p) for p in PLANES}
    assert all(result[k] is None for k in GA_KEYS)
    if split == "all":  # every skipped row is accounted for on stderr
        assert all(f"1 x {why}" in err for why in ("corrupt_image", "missing_image", "unknown_plane"))


def test_a_plane_outside_the_model_scope_is_scored_as_an_error(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a four-fetal-plane model (African scope) on FETAL_PLANES_DB, which has a maternal-cervix image
    data = write_fpdb(tmp_path / "fpdb")
    model = write_model(tmp_path / "ckpt", plane="maternal_cervix", planes=AFRICAN_SCOPE)
    # Execute
    rc, result, err = evaluate(capsys, model, "fetal_planes_db", data, "--split", "all")
    # Assert: the model cannot say "cervix" (its favourite), so it says brain; cervix is listed with recall 0
    assert rc == 0, err
    assert result["accuracy"] == 0.5
    assert result["per_plane_recall"] == {"fetal_brain": 1.0, "fetal_abdomen": None, "fetal_femur": None,
                                          "fetal_thorax": None, "maternal_cervix": 0.0}
    assert "1 of 2 images have a plane outside the model's label scope" in err


def test_an_old_sidecar_with_federation_al_planes_gives_the_scope(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: scope brain only, written the old way; the weights favour "other"
    data = write_african(tmp_path / "african")
    model = write_model(tmp_path / "ckpt", plane="other", planes="fetal_brain", legacy=True)
    # Execute
    rc, result, err = evaluate(capsys, model, "african", data, "--split", "all")
    # Assert: every image predicted brain; the data's planes outside the scope have recall 0
    assert rc == 0, err
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["per_plane_recall"] == {"fetal_brain": 1.0, "fetal_abdomen": 0.0, "fetal_femur": 0.0}


def test_the_shipped_prior_scores_every_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    roots = {"african": write_african(tmp_path / "african"), "hc18": write_hc18(tmp_path / "hc18"),
             "fetal_planes_db": write_fpdb(tmp_path / "fpdb")}
    # Execute
    runs = {source: evaluate(capsys, PRIOR, source, root, "--split", "all") for source, root in roots.items()}
    # Assert: the prior has all six planes in scope; GA only where the data has it (HC18)
    for source, n in (("african", 3), ("hc18", 3), ("fetal_planes_db", 2)):
        rc, result, err = runs[source]
        assert rc == 0, err
        check_shape(result, n)
        assert list(result["per_plane_recall"]) == list(PLANES)
    assert all(runs[s][1][k] is None for s in ("african", "fetal_planes_db") for k in GA_KEYS)
    hc18 = runs["hc18"][1]
    assert hc18["ga_mae_days"] > 0 and 0.0 <= hc18["ga_coverage"] <= 1.0 and hc18["ga_interval_width_days"] > 0
    assert hc18["per_plane_recall"]["fetal_brain"] == hc18["accuracy"]  # every HC18 image is a brain plane


def test_a_corrupt_image_among_good_ones_is_skipped_and_counted(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    data = write_african(tmp_path / "african")
    (data / "train" / "patient001_UGA_plane2.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    model = write_model(tmp_path / "ckpt", plane="fetal_brain", planes=AFRICAN_SCOPE)
    # Execute
    rc, result, err = evaluate(capsys, model, "african", data, "--split", "all")
    # Assert: scored on the two readable images (brain right, abdomen wrong)
    assert rc == 0, err
    assert result["n"] == 2 and result["accuracy"] == 0.5
    assert "1 x corrupt_image" in err and "patient001_UGA_plane2.png" in err


# -- user errors: exit status 2, one clear line -------------------------------------------------------
def _break(case: str, tmp_path: Path) -> tuple[Path, str, Path, list[str]]:
    """``(model folder, source, data folder, extra args)`` broken in the way ``case`` names."""
    model = write_model(tmp_path / "ckpt", plane="fetal_brain", planes=AFRICAN_SCOPE)
    data = write_african(tmp_path / "african")
    csv_path = data / "train" / "African_train.csv"
    if case == "no model folder":
        return tmp_path / "nowhere", "african", data, []
    if case == "incomplete model folder":
        (model / "regressor.safetensors").unlink()
    elif case == "truncated weights":
        raw = (model / "classifier.safetensors").read_bytes()
        (model / "classifier.safetensors").write_bytes(raw[: len(raw) // 2])
    elif case == "corrupt sidecar":
        (model / "sidecar.json").write_text("{not json")
    elif case == "no data folder":
        return model, "african", tmp_path / "missing", []
    elif case == "empty csv":
        csv_path.write_text("")
    elif case == "binary csv":
        csv_path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif case == "unterminated quote":
        csv_path.write_text('Patient_num,Plane,Train,Center,Image_name\n"1,Fetal brain,1,Ghana,' + "x" * 140_000)
    elif case == "only image corrupt":
        shutil.rmtree(data / "test")
        csv_path.write_text("Patient_num,Plane,Train,Center,Image_name\n1,Fetal brain,1,Ghana,patient001_GHA_plane1\n")
        (data / "train" / "patient001_GHA_plane1.png").write_bytes(b"not an image")
    elif case == "split not published":
        shutil.rmtree(data / "test")
        return model, "african", data, ["--split", "test"]
    elif case == "hc18 test split":
        return model, "hc18", write_hc18(tmp_path / "hc18"), ["--split", "test"]
    return model, "african", data, ["--split", "train"]


@pytest.mark.parametrize(("case", "message"), [
    ("no model folder", "model folder .*nowhere does not exist"),
    ("incomplete model folder", r"lacks \['regressor.safetensors'\]"),
    ("truncated weights", "do not load as the models its sidecar.json describes"),
    ("corrupt sidecar", "sidecar.json does not hold a readable run config.*JSONDecodeError"),
    ("no data folder", "African fetal planes folder not found: .*missing"),
    ("empty csv", r"African_train.csv: header \[\] lacks \['Patient_num'"),
    ("binary csv", "African_train.csv: header is not valid UTF-8"),
    ("unterminated quote", "metadata CSV under .* is not a readable CSV"),
    ("only image corrupt", "no 'train' image of african could be read.*1 x corrupt_image"),
    ("split not published", "metadata file not found: .*African_test.csv"),
    ("hc18 test split", "pass --split all"),
])
def test_user_errors_exit_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                                 message: str) -> None:
    # Prepare
    model, source, data, extra = _break(case, tmp_path)
    out_file = tmp_path / "score.json"
    # Execute
    rc, result, err = evaluate(capsys, model, source, data, *extra, "--json", str(out_file))
    # Assert: status 2, no JSON on stdout or on disk, no traceback, the reason on stderr
    assert rc == 2
    assert result is None and not out_file.exists()
    assert "Traceback" not in err
    assert "[difusal] evaluate: error: " in err
    assert re.search(message, err.split("evaluate: error: ", 1)[1], re.S), err


def test_the_module_command_exits_2_on_a_user_error(tmp_path: Path) -> None:
    # Execute: the real entry point, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "evaluate", str(tmp_path / "nowhere"), "--data",
                           "hc18", "--data-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Assert
    assert proc.returncode == 2 and proc.stdout == ""
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
