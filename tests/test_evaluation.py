"""The downstream protocol: metrics from predictions, per-site routing, arms, DP budget, no test leakage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import common.analysis.evaluation as ev
from common.analysis.evaluation import (
    DownstreamModels,
    EvalSettings,
    RunInputs,
    classification_metrics,
    evaluate_models,
    generator_budget,
    markdown_table,
    phantom_prior,
    regression_metrics,
    run_protocol,
)
from common.core.config import RunConfig
from common.data.sites import SiteData, load_federated_data, public_phantoms
from common.data.tensors import records_to_dataset
from common.models.assets import ASSETS_ENV
from common.models.downstream import (
    DownstreamSpec,
    GARegressor,
    PlaneClassifier,
    evaluate_classifier,
    evaluate_regressor,
)

SIZE, WIDTH = 32, 8



def _cfg(**flat: Any) -> RunConfig:
    return RunConfig.from_flat({"preset": "smoke", "data.images-per-site": 8, "data.public-images": 16, **flat})


def _constant_classifier(plane: int) -> PlaneClassifier:
    """A classifier that predicts ``plane`` for every image (zero head weights, one large bias)."""
    model = PlaneClassifier(image_size=SIZE, width=WIDTH)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
        model.head.bias[plane] = 10.0
    return model


def _save_models(folder: Path, seed: int, spec: DownstreamSpec | None = None) -> None:
    """Random models saved as a checkpoint does: end-to-end CNNs, or as ``spec`` builds them."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    models = ((PlaneClassifier(image_size=SIZE, width=WIDTH), GARegressor(SIZE, WIDTH)) if spec is None
              else (spec.classifier(), spec.regressor()))
    for name, model in zip(("classifier", "regressor"), models):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))


def _inputs(tmp_path: Path, cfg: RunConfig) -> RunInputs:
    """A two-site phantom run with two checkpoints (synthetic used from round 2) and 6 released images."""
    sites = load_federated_data(cfg.data, seed=cfg.seed).sites
    synthetic = [replace(r, source="synthetic", site="site0", pixel_spacing_mm=None, image_id=f"syn-{i}")
                 for i, r in enumerate(public_phantoms(cfg.data, seed=99)[:6])]
    ckpts = []
    for rnd in (1, 2):
        _save_models(tmp_path / "checkpoints" / f"round-{rnd:03d}", seed=rnd, spec=DownstreamSpec.from_config(cfg))
        ckpts.append((rnd, tmp_path / "checkpoints" / f"round-{rnd:03d}"))
    ledger = {s.name: {"generator": {"budget_epsilon": 6.0, "delta": 6e-6}} for s in sites}
    metrics = [{"round": r, "sites": [{"name": s.name, "metrics": {"synthetic-examples": 0.0 if r == 1 else 6.0}}
                                      for s in sites], "ledger": ledger,
                "active_learning": {"release_size": 3 * r}} for r in (1, 2)]
    return RunInputs(tmp_path, cfg, list(sites), synthetic, metrics, ckpts)


def test_metrics_from_predictions_match_the_model_evaluators() -> None:
    # Prepare
    cfg = _cfg()
    test = records_to_dataset(load_federated_data(cfg.data, seed=0).sites[0].train, image_size=SIZE)
    torch.manual_seed(0)
    clf, reg = PlaneClassifier(image_size=SIZE, width=WIDTH), GARegressor(SIZE, WIDTH)
    ref_c, ref_r = evaluate_classifier(clf, test), evaluate_regressor(reg, test, coverage_level=0.8)
    models = {"a": DownstreamModels(clf, reg)}
    site = SiteData("a", train=[], test=load_federated_data(cfg.data, seed=0).sites[0].train)
    # Execute
    got = evaluate_models(models, [site], image_size=SIZE, coverage_level=0.8)["pooled"]
    # Assert
    assert got["accuracy"] == pytest.approx(ref_c["accuracy"])
    assert got["macro_f1"] == pytest.approx(ref_c["macro_f1"])
    assert np.allclose(got["per_class_recall"], ref_c["per_class_recall"], equal_nan=True)
    assert got["mae_days"] == pytest.approx(ref_r["mae_days"], rel=1e-5)
    assert got["coverage"] == pytest.approx(ref_r["coverage"])


def test_classification_and_regression_metrics_on_hand_made_predictions() -> None:
    # Prepare
    pred, labels = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    # Execute
    c = classification_metrics(pred, labels, num_classes=4)
    r = regression_metrics(np.array([20.0, 30.0, 0.0]), np.array([1.0, 1.0, 1.0]), np.array([21.0, 33.0, np.nan]),
                           coverage_level=0.9)
    # Assert: F1 class0 = 2/3, class1 = 2/3, class2 = 1 (class 3 absent from both: not averaged)
    assert c["accuracy"] == 0.75 and c["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert c["per_class_recall"][:3] == [1.0, 0.5, 1.0] and np.isnan(c["per_class_recall"][3])
    assert r["mae_days"] == pytest.approx(2.0 * 7) and r["n_ga"] == 2
    assert r["coverage"] == 0.5  # |1| <= 1.645, |3| > 1.645


def test_each_site_is_judged_by_its_own_model_and_pooled_over_all_test_images() -> None:
    # Prepare: site a's test images are all plane 0, site b's all plane 1
    cfg = _cfg()
    recs = load_federated_data(cfg.data, seed=0).sites[0].train
    sites = [SiteData("a", [], [replace(r, plane=0) for r in recs[:3]]),
             SiteData("b", [], [replace(r, plane=1) for r in recs[3:8]])]
    right = {"a": DownstreamModels(_constant_classifier(0), None), "b": DownstreamModels(_constant_classifier(1), None)}
    wrong = {"a": right["b"], "b": right["a"]}
    # Execute
    good = evaluate_models(right, sites, image_size=SIZE)
    bad = evaluate_models(wrong, sites, image_size=SIZE)
    # Assert
    assert good["per_site"]["a"]["accuracy"] == good["per_site"]["b"]["accuracy"] == good["pooled"]["accuracy"] == 1
    assert good["pooled"]["n"] == 8 and np.isnan(good["pooled"]["mae_days"])
    assert bad["pooled"]["accuracy"] == 0.0


def test_generator_budget_reads_the_ledger_and_falls_back_to_the_config_share(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg()
    inputs = _inputs(tmp_path, cfg)
    # Execute
    from_ledger = generator_budget(inputs, inputs.sites[0].name)
    fallback = generator_budget(replace(inputs, metrics=[]), inputs.sites[0].name)
    no_dp = generator_budget(replace(inputs, metrics=[], cfg=_cfg(**{"privacy.target-epsilon": "none"})), "x")
    # Assert
    assert from_ledger == (6.0, 6e-6)
    assert fallback == pytest.approx((10.0 * 0.6, 1e-5 * 0.6))
    assert no_dp is None


def test_phantom_prior_uses_a_fitting_prior_folder_else_trains_on_public_phantoms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: no shipped priors (they may exist in common/assets/)
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "no-assets"))
    _save_models(tmp_path / "prior", seed=5)
    _save_models(tmp_path / "prior64", seed=6)  # same widths, but its sidecar says it was trained at 64 px
    (tmp_path / "prior64" / "sidecar.json").write_text('{"data": {"image_size": 64}}')
    settings = EvalSettings(steps=1, prior_steps=1)
    # Execute
    cnn = {"train.downstream-backbone": "cnn"}  # the saved priors are end-to-end CNNs
    from_folder, src_folder = phantom_prior(_cfg(prior=str(tmp_path / "prior"), **cnn), settings)
    trained, src_trained = phantom_prior(_cfg(prior=str(tmp_path / "prior64"), **cnn), settings)
    # Assert
    expected = PlaneClassifier(image_size=SIZE, width=WIDTH)
    expected.load_state_dict(ev._load_state(tmp_path / "prior" / "classifier.safetensors"))
    assert str(tmp_path / "prior") in src_folder
    assert torch.equal(from_folder["classifier"]["head.weight"], expected.head.weight)
    assert "public phantoms" in src_trained and "no DP" in src_trained
    assert set(trained) == {"classifier", "regressor"}


def test_phantom_prior_finds_the_shipped_prior_of_the_runs_size_in_the_assets_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an assets folder whose demo prior (generator + end-to-end CNNs) was pretrained at the run's size
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "assets"))
    folder = tmp_path / "assets" / "prior-demo"
    _save_models(folder, seed=7)
    (folder / "generator").mkdir()
    (folder / "sidecar.json").write_text(json.dumps({"data": {"image_size": SIZE}}))
    settings = EvalSettings(steps=1, prior_steps=1)
    # Execute
    found, source = phantom_prior(_cfg(**{"train.downstream-backbone": "cnn"}), settings)
    # Assert: the shipped weights, not a fresh phantom fit
    expected = PlaneClassifier(image_size=SIZE, width=WIDTH)
    expected.load_state_dict(ev._load_state(folder / "classifier.safetensors"))
    assert source == f"prior folder {folder}"
    assert torch.equal(found["classifier"]["head.weight"], expected.head.weight)


def test_protocol_runs_every_arm_trains_on_no_test_image_and_keeps_dp_within_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: spy on every training set
    inputs = _inputs(tmp_path, _cfg())
    seen: list[str] = []
    original = ev.train_downstream

    def spy(records: Any, **kw: Any) -> DownstreamModels:
        seen.extend(r.image_id for r in records)
        return original(records, **kw)

    monkeypatch.setattr(ev, "train_downstream", spy)
    settings = EvalSettings(steps=2, prior_steps=2, batch_size=8)
    # Execute
    result = run_protocol(inputs, settings)
    # Assert
    arms = {a["arm"]: a for a in result["arms"]}
    assert list(arms) == ["local-real", "federated-r1", "federated-r2", "local-real+synthetic", "synthetic-only",
                          "dp-real", "dp-real+prior"]
    test_ids = {r.image_id for s in inputs.sites for r in s.test}
    assert seen and not test_ids & set(seen)
    assert {r.image_id for r in inputs.synthetic} <= set(seen)
    for tag in ("dp-real", "dp-real+prior"):
        for site, spent in arms[tag]["epsilon_spent"].items():
            assert 0 < spent <= arms[tag]["epsilon_per_site"][site] + 1e-9
    n_test = sum(len(s.test) for s in inputs.sites)
    assert all(a["pooled"]["n"] == n_test for a in arms.values())
    assert [r["round"] for r in result["per_round"]] == [1, 2]
    assert [r["release_size"] for r in result["per_round"]] == [3, 6]
    table = markdown_table(result)
    assert all(f"| {name} |" in table for name in arms)


def test_load_run_rebuilds_the_sites_and_reads_the_release(tmp_path: Path) -> None:
    # Prepare: a run folder with a config, a metrics line and a one-image release
    import json

    from common.active_learning.release import ReleaseItem, ReleaseStore

    cfg = _cfg(**{"run-dir": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    _save_models(tmp_path / "checkpoints" / "round-001", seed=0)
    ReleaseStore(tmp_path / "release").add([ReleaseItem(
        image=np.zeros((SIZE, SIZE), np.uint8), plane=2, ga_weeks=25.0, source_site="s", round=1, scores={},
        acquisition={}, privacy={})])
    # Execute
    inputs = ev.load_run(tmp_path)
    # Assert
    expected = load_federated_data(cfg.data, seed=cfg.seed).sites
    assert [s.name for s in inputs.sites] == [s.name for s in expected]
    assert [r.image_id for r in inputs.sites[1].test] == [r.image_id for r in expected[1].test]
    assert len(inputs.synthetic) == 1 and inputs.synthetic[0].plane == 2
    assert inputs.checkpoints == [(1, tmp_path / "checkpoints" / "round-001")] and inputs.metrics == [{"round": 1}]
