"""The preset benchmark's summary of finished run folders (no Flower run here: folders are written by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.config import get_preset
from simulations.benchmarks.preset_runs import main, read_run, summarise


def _run(folder: Path, seed: int, accs: list[float], *, size: int = 64, ga: bool = False) -> Path:
    cfg = get_preset("demo").to_dict()
    cfg["seed"], cfg["data"]["image_size"], cfg["data"]["source"] = seed, size, "african"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": cfg}))
    lines = [{"round": i + 1, "wall_s": 10.0 * (i + 1), "evaluate": {"plane-accuracy": a},
              "sites": [{"name": "Ghana", "privacy": {"classifier": {"epsilon": 0.5 * (i + 1)}},
                         "evaluation": {"num-examples": 9, **({"ga-mae-days": 10.0} if ga else {})}},
                        {"name": "Malawi", "privacy": {}, "evaluation": {"num-examples": 3,
                                                                          **({"ga-mae-days": 2.0} if ga else {})}}]}
             for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


def test_rounds_are_averaged_over_seeds_with_their_spread(tmp_path: Path) -> None:
    a = read_run(_run(tmp_path / "a", 0, [0.5, 0.7]))
    b = read_run(_run(tmp_path / "b", 1, [0.7, 0.9]))
    assert a["rounds"][1]["epsilon_per_site"] == {"Ghana": {"classifier": 1.0}, "Malawi": {}}
    assert a["rounds"][0]["held_out_images"] == 12 and a["image_size"] == 64
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


def test_ga_error_is_pooled_over_the_sites_held_out_images(tmp_path: Path) -> None:
    run = read_run(_run(tmp_path / "a", 0, [1.0], ga=True))
    assert run["rounds"][0]["ga-mae-days"] == pytest.approx((9 * 10.0 + 3 * 2.0) / 12)


@pytest.mark.realdata
def test_the_hc18_runs_pixel_size_line_is_fitted_on_its_own_split(shared_data: Path) -> None:
    from simulations.benchmarks.preset_runs import pixel_line_of
    from simulations.config_args import build_config

    cfg = build_config("demo", [], data="hc18", data_root=str(shared_data / "hc18"))
    line = pixel_line_of(cfg.to_dict())
    # the spacing alone carries GA to within a few weeks on HC18 (17.9 days in the patient-grouped CV study)
    assert line is not None and 10.0 < line["mae_days"] < 25.0 and 0.75 < line["coverage"] < 0.97
    assert pixel_line_of(build_config("demo", []).to_dict()) is None  # phantoms: no such yardstick here


def test_a_run_with_a_failed_site_is_left_out_of_the_means_and_named(tmp_path: Path) -> None:
    good = read_run(_run(tmp_path / "good", 0, [0.5, 0.7]))
    bad_dir = _run(tmp_path / "bad", 1, [0.1, 0.1])
    lines = [json.loads(x) for x in (bad_dir / "metrics.jsonl").read_text().splitlines()]
    lines[1]["active_learning"] = {"sites": [{"name": "Ghana", "status": "failed", "reason": "OutOfMemoryError"}]}
    (bad_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    bad = read_run(bad_dir)
    assert bad["rounds"][0]["failed_sites"] == [] and bad["rounds"][1]["failed_sites"] == [
        "query Ghana: OutOfMemoryError"]
    summary = summarise([good, bad])
    assert summary["excluded"] == {str(bad_dir): "query Ghana: OutOfMemoryError"}
    assert summary["round_2"]["plane-accuracy"] == {"mean": 0.7, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="every run had a failed site"):
        summarise([bad])


def test_an_arm_is_compared_with_a_baseline_seed_by_seed(tmp_path: Path) -> None:
    # Prepare: two arms, seeds 0 and 1 each (the baseline also has seed 2, which the arm lacks)
    arm = [_run(tmp_path / f"arm{s}", s, acc) for s, acc in ((0, [0.6, 0.8]), (1, [0.5, 0.75]))]
    base = [_run(tmp_path / f"base{s}", s, acc) for s, acc in ((0, [0.6, 0.7]), (1, [0.6, 0.72]), (2, [0.1, 0.1]))]
    out = tmp_path / "paired.json"
    # Execute
    main(["--summarise", *map(str, arm), "--baseline", *map(str, base), "--out", str(out)])
    # Assert: differences of the same seed only; the larger of the two arms' seed stds beside them
    doc = json.loads(out.read_text())
    assert doc["paired"]["seeds"] == [0, 1]
    last = doc["paired"]["round_2"]["plane-accuracy"]
    assert last["per_seed"] == [pytest.approx(0.1), pytest.approx(0.03)] and last["mean"] == pytest.approx(0.065)
    assert last["min"] == pytest.approx(0.03) and last["largest_seed_std"] == pytest.approx(0.0354, abs=1e-4)
    assert doc["paired"]["round_1"]["plane-accuracy"]["mean"] == pytest.approx(-0.05)
    assert doc["baseline"]["summary"]["round_2"]["plane-accuracy"]["n"] == 3


def test_every_run_starts_from_the_prior_asked_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare: record the commands instead of running them (the summary of the missing run folders then fails)
    import subprocess

    seen: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **_: seen.append(list(cmd)))
    # Execute
    with pytest.raises(FileNotFoundError):
        main(["--data", "african", "--data-root", str(tmp_path), "--seeds", "0,1", "--prior", str(tmp_path / "prior"),
              "--name", "p", "--out", str(tmp_path / "out.json")])
    # Assert: each seed's `difusal simulate` gets that prior, in its own named run folder
    assert len(seen) == 2
    for seed, cmd in enumerate(seen):
        assert cmd[cmd.index("--prior") + 1] == str(tmp_path / "prior")
        assert cmd[cmd.index("--run-dir") + 1].endswith(f"preset-african-p-s{seed}")
