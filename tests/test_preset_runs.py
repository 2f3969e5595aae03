"""The preset benchmark's summary of finished run folders (no Flower run here: folders are written by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.config import get_preset
from simulations.benchmarks.preset_runs import main, read_run, summarise


def _run(folder: Path, seed: int, accs: list[float], *, size: int = 64) -> Path:
    cfg = get_preset("demo").to_dict()
    cfg["seed"], cfg["data"]["image_size"], cfg["data"]["source"] = seed, size, "african"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": cfg}))
    lines = [{"round": i + 1, "wall_s": 10.0 * (i + 1), "evaluate": {"plane-accuracy": a},
              "sites": [{"name": "Ghana", "privacy": {"classifier": {"epsilon": 0.5 * (i + 1)}},
                         "evaluation": {"num-examples": 9}}]} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


def test_rounds_are_averaged_over_seeds_with_their_spread(tmp_path: Path) -> None:
    a = read_run(_run(tmp_path / "a", 0, [0.5, 0.7]))
    b = read_run(_run(tmp_path / "b", 1, [0.7, 0.9]))
    assert a["rounds"][1]["epsilon_per_site"] == {"Ghana": {"classifier": 1.0}}
    assert a["rounds"][0]["held_out_images"] == 9 and a["image_size"] == 64
    summary = summarise([a, b])
    assert summary["round_2"]["plane-accuracy"] == {"mean": 0.8, "std": pytest.approx(0.1414, abs=1e-4), "n": 2}
    assert summary["round_1"]["wall_s"]["mean"] == 10.0
    assert "ga-mae-days" not in summary["round_1"]  # no GA label in the data: not reported


def test_unlike_runs_and_unfinished_folders_are_refused(tmp_path: Path) -> None:
    a = read_run(_run(tmp_path / "a", 0, [0.5]))
    b = read_run(_run(tmp_path / "b", 0, [0.5], size=32))
    with pytest.raises(ValueError, match="mix presets, data or image sizes"):
        summarise([a, b])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        main(["--summarise", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")])
