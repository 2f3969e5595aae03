"""The GA regressor's physical output: apparent size -> head circumference -> Hadlock GA, and its public warm start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models.downstream import (
    GARegressor,
    fit_public_ga_head,
    ga_from_log_hc,
    log_hc_from_ga,
    predict_ga,
    regressor_loss,
)
from common.phantoms.biometry import ga_from_hc, hc_from_ga
from common.phantoms.simulator import make_phantoms


def test_hadlock_inverse_round_trips_in_numpy_and_torch():
    ga = np.array([9.6, 11.4, 14.0, 20.0, 27.0, 33.3, 40.0, 42.0])
    hc = hc_from_ga(ga)
    np.testing.assert_allclose(ga_from_hc(hc), ga, atol=1e-9)
    assert np.all(np.diff(hc) > 0)
    np.testing.assert_allclose(hc_from_ga(27.0), 248.66, atol=0.01)  # 24.87 cm: 8.96 + 0.54*24.87 + 0.0003*24.87^3
    z = log_hc_from_ga(torch.tensor(ga, dtype=torch.float64))
    np.testing.assert_allclose(torch.exp(z).numpy(), hc, rtol=1e-9)
    np.testing.assert_allclose(ga_from_log_hc(z).numpy(), ga, atol=1e-9)


def test_frozen_backbones_predict_log_hc_and_the_cnn_keeps_weeks():
    assert GARegressor(32, backbone="phantom_cnn").output == "log_hc"
    assert GARegressor(32, backbone="scattering").output == "log_hc"
    cnn = GARegressor(32, 8, backbone="cnn")
    assert cnn.output == "weeks"
    with pytest.raises(ValueError, match="log_hc=True needs output='log_hc'"):
        cnn(torch.zeros(2, 1, 32, 32), torch.ones(2), log_hc=True)
    with pytest.raises(ValueError, match="must be 'log_hc' or 'weeks'"):
        GARegressor(32, backbone="scattering", output="days")


def test_log_hc_output_is_the_field_of_view_times_the_apparent_size():
    reg = GARegressor(32, backbone="scattering")  # zero head: apparent size 0, i.e. HC = one field of view
    torch.nn.init.zeros_(reg.head.weight)
    torch.nn.init.zeros_(reg.head.bias)
    x = torch.zeros(3, 1, 32, 32)
    sp = torch.tensor([2.0, 4.0, float("nan")])
    z, logvar_z = reg(x, sp, log_hc=True)
    # HC = 32 px * spacing (64, 128 mm), the default field of view (150 mm) where the spacing is unknown; the soft
    # range [15, 800] mm bends these by under 2 %
    np.testing.assert_allclose(torch.exp(z).detach().numpy(), [64.0, 128.0, 150.0], rtol=0.02)
    mean, logvar = reg(x, sp)
    np.testing.assert_allclose(mean.detach().numpy(), ga_from_hc(torch.exp(z).detach().numpy()), atol=1e-4)
    # the delta method: a log-size std s becomes s * dGA/dlogHC weeks, which grows with the head
    std_w = torch.exp(0.5 * logvar).detach().numpy()
    assert std_w[0] < std_w[1]
    assert np.allclose(torch.exp(0.5 * logvar_z).detach().numpy(), 0.15, rtol=1e-5)


def test_regressor_loss_is_the_laplace_nll_of_log_hc():
    reg = GARegressor(32, backbone="scattering")
    x, sp = torch.zeros(4, 1, 32, 32), torch.full((4,), 3.0)
    with torch.no_grad():
        z, logvar_z = reg(x, sp, log_hc=True)
    log_b = 0.5 * (logvar_z.numpy() - np.log(2.0))
    ga_true = ga_from_log_hc(z)  # labels exactly at the prediction: only the log-scale term is left
    batch = (x, torch.zeros(4, dtype=torch.int64), ga_true.float(), sp)
    np.testing.assert_allclose(regressor_loss(reg, batch).detach().numpy(), log_b, atol=1e-4)
    off = (x, batch[1], torch.tensor([float("nan"), 20.0, 30.0, 35.0]), sp)
    loss = regressor_loss(reg, off).detach().numpy()
    assert loss[0] == 0.0  # unknown GA contributes nothing
    zt = log_hc_from_ga(torch.tensor([20.0, 30.0, 35.0])).numpy()
    expect = log_b[1:] + np.abs(zt - z[1:].numpy()) / np.exp(log_b[1:])
    np.testing.assert_allclose(loss[1:], expect, rtol=1e-4)


@pytest.mark.parametrize("flips", [False, True])
def test_public_ga_head_reads_ga_off_fresh_phantoms_without_private_data(flips):
    torch.manual_seed(0)
    reg = GARegressor(64, backbone="phantom_cnn", flips=flips)
    assert reg.backbone.flips is flips
    state, info = fit_public_ga_head(reg, n_per_profile=40)
    assert info["l2"] in (1e-3, 1e-2, 1e-1, 1.0) and info["images"] == 200
    recs = make_phantoms(60, size=64, seed=4242, profile="aloka", plane_probs=[1, 0, 0, 0, 0, 0])
    x = torch.from_numpy(np.stack([r.image for r in recs])).float()[:, None] / 127.5 - 1
    sp = torch.tensor([r.pixel_spacing_mm for r in recs], dtype=torch.float32)
    ga = np.array([r.ga_weeks for r in recs])
    torch.nn.init.zeros_(reg.head.weight)
    torch.nn.init.zeros_(reg.head.bias)
    zero_mae = np.abs(predict_ga(reg, x, sp)[0].numpy() - ga).mean() * 7
    reg.head.load_state_dict(state)
    mean, std = predict_ga(reg, x, sp)
    mae = np.abs(mean.numpy() - ga).mean() * 7
    assert mae < 0.4 * zero_mae, (mae, zero_mae)
    covered = np.mean(np.abs(mean.numpy() - ga) <= 1.645 * std.numpy())
    assert 0.6 <= covered <= 1.0


@pytest.mark.parametrize("backbone", ["phantom_cnn", "public_cnn", "public_size_cnn"])
def test_linear_ga_heads_on_shipped_encoders_start_at_the_public_ga_head(backbone):
    from safetensors.torch import load_file

    reg = GARegressor(64, backbone=backbone)
    from common.core.config import ENCODER_FOLDERS

    folder = ENCODER_FOLDERS[backbone]
    from common.models.assets import asset_folder

    # the regressor reads flip-averaged features, so it starts at the head fitted on those
    shipped = load_file(str(asset_folder(folder) / "public_ga_head_64_flips.safetensors"))
    assert torch.equal(reg.head.weight, shipped["weight"]) and torch.equal(reg.head.bias, shipped["bias"])
    assert reg.backbone.provenance["public_ga_head"] == "public_ga_head_64_flips.safetensors"
    assert reg.backbone.provenance["flip_averaged"] is True
    single = GARegressor(64, backbone=backbone, flips=False)
    assert single.backbone.provenance["public_ga_head"] == "public_ga_head_64.safetensors"
    assert not torch.equal(single.head.weight, reg.head.weight)
    assert float(reg.film.weight.abs().sum()) == 0.0  # FiLM still starts at the identity
    hidden = GARegressor(64, backbone=backbone, hidden=8)  # a hidden-layer head has no public fit: zero output
    assert float(hidden.head[-1].weight.abs().sum()) == 0.0
    assert float(GARegressor(64, backbone="scattering").head.weight.abs().sum()) == 0.0
    # the public head reads head size: a consortium with other planes in scope starts at zero
    for scope in (None, (0, 1, 2, 3)):
        assert float(GARegressor(64, backbone=backbone, planes=scope).head.weight.abs().sum()) == 0.0
    from common.models.downstream import DownstreamSpec

    assert torch.equal(DownstreamSpec(64, backbone, planes=(0,)).regressor().head.weight, shipped["weight"])
    assert float(DownstreamSpec(64, backbone, planes=None).regressor().head.weight.abs().sum()) == 0.0


@pytest.mark.parametrize("backbone,bound", [("public_cnn", 0.85), ("public_size_cnn", 0.7)])
def test_public_ga_head_beats_the_pixel_size_line_on_real_hc18_scans(backbone, bound):
    """No private image: the head fitted on brain phantoms, applied to the HC18 training images (public here)."""
    from pathlib import Path

    from common.data.loaders import load_source
    from common.data.tensors import records_to_dataset

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "hc18"
    if not (root / "training_set_pixel_size_and_HC.csv").is_file():
        pytest.skip(f"HC18 not at {root}")
    data = records_to_dataset(load_source("hc18", str(root), image_size=64).records, image_size=64)
    x, ga, sp = data.tensors[0], data.tensors[2].numpy().astype(np.float64), data.tensors[3]
    mean, std = predict_ga(GARegressor(64, backbone=backbone), x, sp)
    mae = np.abs(mean.numpy() - ga).mean() * 7
    a = np.stack([np.ones(len(ga)), np.log(sp.numpy().astype(np.float64))], 1)  # the line, fitted in-sample
    line = np.abs(a @ np.linalg.lstsq(a, ga, rcond=None)[0] - ga).mean() * 7
    # measured 14.3 (public_cnn) and 11.6 (public_size_cnn) vs 17.8 days; their 400-per-profile predecessors 11.2 and
    # 10.2 (the new encoders' DP heads do better: 7.0 against 8.2 days for public_size_cnn in the HC18 CV; the HC18
    # preset does not use public_cnn)
    assert mae < bound * line, (mae, line)
    covered = np.mean(np.abs(mean.numpy() - ga) <= 1.645 * std.numpy())
    assert 0.7 <= covered <= 0.97, covered


def test_hc18_preset_regressor_starts_at_the_public_ga_head(tmp_path):
    from common.core.config import RunConfig, data_preset
    from common.models.downstream import DownstreamSpec

    cfg = RunConfig.from_flat({"preset": "smoke", "data.image-size": "64", **data_preset("hc18", str(tmp_path))})
    assert cfg.train.downstream_backbone == "public_size_cnn" and cfg.train.downstream_batch_size == 64
    assert cfg.train.rate("regressor")[0] == 0.003 and cfg.privacy.budget_regressor == 0.39
    assert cfg.train.downstream_steps == 200
    assert cfg.train.batch_for("regressor") == 64 and cfg.train.batch_for("generator") == cfg.train.batch_size
    reg = DownstreamSpec.from_config(cfg).regressor()
    assert reg.public_warm_start and reg.output == "log_hc"


def test_regressor_weights_from_before_the_log_hc_output_are_refused(tmp_path):
    from safetensors.torch import save_file

    from common.analysis.evaluation import checkpoint_models
    from common.models.downstream import DownstreamSpec, federated_state, load_federated_state

    spec = DownstreamSpec(32, "phantom_cnn", planes=(0,))
    reg = spec.regressor()
    old = {k: v for k, v in federated_state(reg).items() if k != "log_hc_format"}  # what the old code sent/saved
    with pytest.raises(ValueError, match="predate the log-HC output"):
        load_federated_state(reg, old)
    clf = spec.classifier()
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp_path / "classifier.safetensors"))
    save_file({k: v.contiguous() for k, v in reg.state_dict().items() if k != "log_hc_format"},
              str(tmp_path / "regressor.safetensors"))
    with pytest.raises(ValueError, match="saved before the log-HC output"):
        checkpoint_models(tmp_path, spec)
    save_file({k: v.contiguous() for k, v in reg.state_dict().items()}, str(tmp_path / "regressor.safetensors"))
    assert checkpoint_models(tmp_path, spec).regressor.output == "log_hc"
    assert "log_hc_format" not in GARegressor(32, 8, backbone="cnn").state_dict()  # the prior's CNN loads as before


def test_flip_averaged_features_are_the_same_for_an_image_and_its_flips():
    recs = make_phantoms(4, size=64, seed=7, profile="mindray", plane_probs=[1, 0, 0, 0, 0, 0])
    x = torch.from_numpy(np.stack([r.image for r in recs])).float()[:, None] / 127.5 - 1
    averaged, single = GARegressor(64, backbone="phantom_cnn").backbone, GARegressor(
        64, backbone="phantom_cnn", flips=False).backbone
    for flipped in (x.flip(-1), x.flip(-2), x.flip(-2, -1)):
        torch.testing.assert_close(averaged(flipped), averaged(x), atol=1e-5, rtol=1e-5)
        assert (single(flipped) - single(x)).abs().max() > 1e-3  # single views do see the orientation


def test_a_regressor_saved_on_single_view_features_does_not_load_into_a_flip_averaged_one():
    old = GARegressor(64, backbone="phantom_cnn", flips=False).state_dict()
    new = GARegressor(64, backbone="phantom_cnn")
    with pytest.raises(RuntimeError, match="flip_views_format"):
        new.load_state_dict(old)
    new.load_state_dict(GARegressor(64, backbone="phantom_cnn").state_dict())  # same format: loads


def test_a_checkpoint_saved_before_flip_averaging_is_scored_with_the_features_it_was_trained_on(tmp_path):
    from safetensors.torch import save_file

    from common.analysis.evaluation import checkpoint_models
    from common.models.downstream import DownstreamSpec

    spec = DownstreamSpec(64, "phantom_cnn", planes=(0,))
    old = spec.regressor(flips=False)
    torch.nn.init.normal_(old.head.weight, std=0.1)
    save_file({k: v.contiguous() for k, v in spec.classifier().state_dict().items()},
              str(tmp_path / "classifier.safetensors"))
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "regressor.safetensors"))
    loaded = checkpoint_models(tmp_path, spec).regressor
    assert loaded.backbone.flips is False and "flip_views_format" not in loaded.state_dict()
    assert torch.equal(loaded.head.weight, old.head.weight)
    with pytest.raises(ValueError, match="single-view features"):  # where only the current format will do
        checkpoint_models(tmp_path, spec, single_view_ok=False)


def test_federated_regressor_weights_from_before_flip_averaging_are_refused_with_the_reason():
    from common.models.downstream import federated_state, load_federated_state

    old = federated_state(GARegressor(64, backbone="phantom_cnn", flips=False))
    assert "flip_views_format" not in old
    with pytest.raises(ValueError, match="single-view features"):
        load_federated_state(GARegressor(64, backbone="phantom_cnn"), old)
