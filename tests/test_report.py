"""The run report (self-contained HTML) and the experiment script that feeds it, on a hand-built run folder."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import simulations.launcher as launcher
from common.active_learning.release import ReleaseItem, ReleaseStore
from common.analysis.evaluation import EvalSettings
from common.core.config import RunConfig
from common.core.viz import save_grid
from common.data.sites import public_phantoms
from common.models.downstream import DownstreamSpec
from simulations.experiments import downstream as exp
from simulations.report import build_report, image_metrics_section

SETTINGS = EvalSettings(steps=2, prior_steps=2, batch_size=8)



def make_run(run_dir: Path, *, epsilon: float | None = 10.0) -> Path:
    """A finished two-site, two-round phantom run folder as the server writes it (no Flower needed)."""
    eps = "none" if epsilon is None else str(epsilon)
    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(run_dir), "data.images-per-site": 8,
                               "data.public-images": 16, "privacy.target-epsilon": eps})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "code_version": "test"}))
    names = ["site0-voluson_e6", "site1-aloka"]
    for rnd in (1, 2):
        folder = run_dir / "checkpoints" / f"round-{rnd:03d}"
        folder.mkdir(parents=True)
        torch.manual_seed(rnd)
        spec = DownstreamSpec.from_config(cfg)  # the run's own models: frozen scattering + heads by default
        for name, model in (("classifier", spec.classifier()), ("regressor", spec.regressor())):
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    gen = {"budget_epsilon": 6.0, "delta": 6e-6, "steps": 2, "noise_multiplier": 1.0,
           "sample_rate": 0.3, "accountant": "rdp", "exhausted": False}
    with (run_dir / "metrics.jsonl").open("w") as fh:
        for rnd in (1, 2):
            fh.write(json.dumps({
                "round": rnd, "train": {}, "evaluate": {"plane-accuracy": 0.2 * rnd},
                "sites": [{"name": n, "metrics": {"synthetic-examples": 0.0 if rnd == 1 else 4.0}} for n in names],
                "ledger": {} if epsilon is None else {n: {"generator": dict(gen, epsilon=2.0 * rnd)} for n in names},
                "active_learning": {"release_size": 4 * rnd}}) + "\n")
    store = ReleaseStore(run_dir / "release")
    phantoms = public_phantoms(cfg.data, seed=7)[:8]
    store.add([ReleaseItem(image=r.image, plane=r.plane, ga_weeks=float(r.ga_weeks or 25.0), source_site=names[i % 2],
                           round=1 + i // 4, scores={"quality": 0.5}, acquisition={}, privacy={"epsilon": 2.0})
               for i, r in enumerate(phantoms)])
    save_grid([[phantoms[0].image]], run_dir / "figures" / "rounds.png")
    save_grid([[phantoms[1].image]], run_dir / "figures" / "samples-round-002.png")
    (run_dir / "status.json").write_text(json.dumps({"state": "finished", "last_round": 2}))
    return run_dir


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-built run after ``evaluate_run`` (shared by the tests of this module: training is the slow part)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = make_run(tmp_path_factory.mktemp("report") / "run")
        exp.evaluate_run(run, SETTINGS, lpips=False, log=lambda s: None)
    finally:
        torch.set_num_threads(before)
    return run


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_evaluation_writes_the_protocol_table_and_image_metrics(evaluated_run: Path) -> None:
    # Prepare
    out = evaluated_run / "evaluation"
    # Execute
    down = json.loads((out / "downstream.json").read_text())
    img = json.loads((out / "image_metrics.json").read_text())
    md = (out / "downstream.md").read_text()
    # Assert
    assert [a["arm"] for a in down["arms"]][:3] == ["local-real", "federated-r1", "federated-r2"]
    assert all(f"| {a['arm']} |" in md for a in down["arms"])
    assert img["synthetic_vs_real_train"]["feature_space"].startswith("plane-classifier penultimate layer")
    assert img["n_synthetic"] == 8 and len(img["nearest_real_pairs"]) == 8
    assert img["lpips"] is None and img["lpips_unavailable"]


def test_image_metrics_of_a_one_plane_dataset_use_a_ga_regressor_embedding(tmp_path: Path) -> None:
    # Prepare: HC18-like data, every image labelled with one plane and a GA: a plane classifier would learn nothing
    from common.analysis.evaluation import RunInputs
    from common.data.sites import SiteData

    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path), "data.public-images": 28})
    recs = [replace(r, plane=0, ga_weeks=float(r.ga_weeks or 25.0)) for r in public_phantoms(cfg.data, seed=3)]
    inputs = RunInputs(run_dir=tmp_path, cfg=cfg, sites=[SiteData("a", train=recs[:12], test=recs[12:20])],
                       synthetic=recs[20:28], metrics=[], checkpoints=[])
    # Execute
    out = exp.image_quality(inputs, SETTINGS, lpips_model=None)
    # Assert
    assert out["feature_space"].startswith("GA-regressor image embedding")
    assert out["synthetic_vs_real_train"]["feature_space"] == out["feature_space"]
    assert out["real_test_ga_mae_days"] > 0 and "real_test_plane_accuracy" not in out
    assert "synthetic_plane_agreement" not in out  # one plane: agreement would be 1.0 by construction
    page = image_metrics_section(out)
    assert "real test GA MAE, days (the feature regressor)" in page and "plane agreement" not in page


def test_report_embeds_every_image_and_has_the_tables(evaluated_run: Path) -> None:
    # Prepare / Execute
    path = build_report(evaluated_run)
    page = path.read_text()
    # Assert: every image is an embedded PNG (or a relative file inside the run folder that exists)
    srcs = _images(page)
    assert len(srcs) >= 7
    for src in srcs:
        if src.startswith("data:image/png;base64,"):
            assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert not re.match(r"^[a-z]+:", src) and (evaluated_run / src).is_file(), src
    assert "http://" not in page and "https://" not in page.replace("https://download.pytorch.org", "")
    for heading in ("Downstream protocol", "Image metrics", "Privacy ledger per site", "Utility per round",
                    "Nearest real neighbours"):
        assert heading in page
    assert page.count("<table>") >= 6
    assert "<td class=t>local-real+synthetic</td>" in page and "<td class=t>site1-aloka</td>" in page
    assert "6.00e-06" in page  # delta is shown, not rounded to zero
    assert "feature space (plane-classifier penultimate layer" in page  # pairs from the evaluation


def test_report_without_evaluation_uses_pixel_space_pairs_and_says_how_to_evaluate(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path / "bare")
    # Execute
    page = build_report(run).read_text()
    # Assert
    assert "nearest in pixel space" in page
    assert "simulations.experiments.downstream" in page
    assert all(s.startswith("data:image/png;base64,") for s in _images(page))


def test_report_of_an_al_loop_arm_plots_and_tabulates_every_arm_per_round(tmp_path: Path) -> None:
    # Prepare: two arm folders and the al_loop.json the comparison writes next to them
    from simulations.experiments import al_loop

    def row(rnd: int, acc: float, mae: float | None, released: int) -> dict[str, Any]:
        return {"round": rnd, "plane_accuracy": acc, "plane_macro_f1": acc / 2, "ga_mae_days": mae,
                "ga_coverage": 0.9, "release_size": released}

    table = {"none": [row(1, 0.5, 30.0, 0), row(2, 0.55, 29.0, 0)],
             "acquisition": [row(1, 0.5, 30.0, 4), row(2, 0.625, None, 9)]}
    make_run(tmp_path / "cmp" / "acquisition")
    (tmp_path / "cmp" / "al_loop.json").write_text(json.dumps({"arms": al_loop.ARMS, "table": table}))
    # Execute
    page = build_report(tmp_path / "cmp" / "acquisition").read_text()
    bare = build_report(make_run(tmp_path / "alone")).read_text()
    # Assert
    assert "Active learning: acquisition vs random vs none" in page
    assert "the same federation with each selection arm" in page
    assert "<td class=t>none</td><td>2</td><td>0.550</td><td>0.275</td><td>29.000</td><td>0</td>" in page
    assert "<td class=t>acquisition</td><td>2</td><td>0.625</td><td>0.312</td><td>–</td><td>9</td>" in page
    assert all(s.startswith("data:image/png;base64,") for s in _images(page))
    assert "No active-learning comparison found" in bare and "No active-learning comparison found" not in page


def test_curve_runs_one_federation_per_epsilon_and_the_report_plots_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the Flower launch is replaced by writing a finished run folder with the requested config
    launched: list[Any] = []

    def fake_run_simulation(cfg: RunConfig, **kw: Any) -> launcher.LaunchResult:
        launched.append((cfg.privacy.target_epsilon, kw["cpus_per_site"], kw["extra_env"]["PATH"]))
        make_run(Path(cfg.run_dir), epsilon=cfg.privacy.target_epsilon)
        return launcher.LaunchResult(0, Path(cfg.run_dir), 0.0, Path(cfg.run_dir) / "log")

    monkeypatch.setattr(launcher, "run_simulation", fake_run_simulation)
    # Execute
    res = exp.privacy_utility_curve(tmp_path / "curve", preset="smoke", epsilons=[1.0, None],
                                    sets=["data.images-per-site=8", "data.public-images=16"], settings=SETTINGS,
                                    log=lambda s: None)
    page = build_report(tmp_path / "curve" / "eps-1").read_text()
    # Assert
    assert [e for e, _, _ in launched] == [1.0, None]
    assert all(isinstance(c, int) for _, c, _ in launched)  # Flower stores num-cpus as an integer
    assert {r["epsilon"] for r in res["rows"]} == {"1", "none"}
    assert (tmp_path / "curve" / "privacy_utility.png").is_file()
    md = (tmp_path / "curve" / "privacy_utility.md").read_text()
    assert "| none | local-real |" in md and "| 1 | dp-real |" in md
    assert "privacy-utility curve from" in page and "No privacy-utility curve found" not in page
    none_arms = {r["arm"] for r in res["rows"] if r["epsilon"] == "none"}
    assert {"dp-real", "dp-real+prior"} <= none_arms  # eps=none: the "DP" arms train without DP
    down = json.loads((tmp_path / "curve" / "eps-none" / "evaluation" / "downstream.json").read_text())
    dp_arm = next(a for a in down["arms"] if a["arm"] == "dp-real")
    assert set(dp_arm["epsilon_per_site"].values()) == {None} and set(dp_arm["epsilon_spent"].values()) == {None}


def test_rerun_curve_reuses_finished_federations_and_evaluations_with_the_same_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: one finished curve point
    def fake_run_simulation(cfg: RunConfig, **kw: Any) -> launcher.LaunchResult:
        make_run(Path(cfg.run_dir), epsilon=cfg.privacy.target_epsilon)
        return launcher.LaunchResult(0, Path(cfg.run_dir), 0.0, Path(cfg.run_dir) / "log")

    monkeypatch.setattr(launcher, "run_simulation", fake_run_simulation)
    kw: dict[str, Any] = {"preset": "smoke", "epsilons": [1.0],
                          "sets": ["data.images-per-site=8", "data.public-images=16"], "log": lambda s: None}
    first = exp.privacy_utility_curve(tmp_path / "curve", settings=SETTINGS, **kw)
    evaluated: list[Path] = []
    real_evaluate = exp.evaluate_run

    def counting_evaluate(run_dir: Path, settings: Any, **k: Any) -> dict[str, Any]:
        evaluated.append(run_dir)
        return real_evaluate(run_dir, settings, **k)

    def no_launch(cfg: RunConfig, **k: Any) -> launcher.LaunchResult:
        raise AssertionError("a finished federation was launched again")

    monkeypatch.setattr(launcher, "run_simulation", no_launch)
    monkeypatch.setattr(exp, "evaluate_run", counting_evaluate)
    # Execute: same settings, then changed settings
    again = exp.privacy_utility_curve(tmp_path / "curve", settings=SETTINGS, **kw)
    reused = list(evaluated)
    changed = exp.privacy_utility_curve(tmp_path / "curve", settings=replace(SETTINGS, seed=SETTINGS.seed + 1), **kw)
    # Assert
    assert reused == [] and again["rows"] == first["rows"]
    assert evaluated == [tmp_path / "curve" / "eps-1"]
    assert changed["settings"]["seed"] == SETTINGS.seed + 1


def test_eps_parsing_accepts_none() -> None:
    # Prepare / Execute
    eps = exp._parse_eps("1, 4,10,none")
    # Assert
    assert eps == [1.0, 4.0, 10.0, None]


def test_real_images_without_ga_get_their_own_columns_in_the_real_vs_synthetic_grid() -> None:
    # Prepare: real brain/femur images without GA (as in the African set), synthetic images with GA
    import numpy as np

    from common.core.records import UltrasoundRecord
    from simulations.report import real_vs_synthetic_cells, real_vs_synthetic_grid

    def rec(value: int, plane: int, ga: float | None) -> UltrasoundRecord:
        return UltrasoundRecord(image=np.full((8, 8), value, np.uint8), plane=plane, ga_weeks=ga, pixel_spacing_mm=None,
                                site="s", patient_id=f"p{value}", image_id=f"i{value}", source="african")

    real = [rec(10, 0, None), rec(20, 0, None), rec(30, 2, None)]
    synthetic = [rec(100, 0, 20.0), rec(110, 2, 35.0)]
    # Execute
    rows, row_labels, cols = real_vs_synthetic_cells(real, synthetic, unknown_ga_columns=2)
    # Assert: the first two columns hold the real images (white where a plane has fewer), synthetic ones by GA bin
    assert row_labels == ["fetal_brain", "fetal_femur"] and cols[:2] == ["real, GA n/a"] * 2
    assert [int(c[0, 0]) for c in rows[0][:2]] == [10, 20] and [int(c[0, 0]) for c in rows[1][:2]] == [30, 255]
    n_bins = sum(c.startswith("syn ") for c in cols)
    assert len(cols) == 2 + 2 * n_bins and all(len(r) == len(cols) for r in rows)
    assert sorted(int(c[0, 0]) for c in rows[0][2 + n_bins:]) == [100] + [255] * (n_bins - 1)
    # real images with GA get no extra columns
    assert real_vs_synthetic_cells([rec(10, 0, 22.0)], synthetic)[2][0].startswith("real 1")
    assert real_vs_synthetic_grid(real, synthetic)[:8] == b"\x89PNG\r\n\x1a\n"
