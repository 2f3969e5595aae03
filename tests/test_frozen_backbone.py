"""Frozen public features + DP heads (common.models.features.ScatteringBackbone, common.models.downstream).

What a site trains is only the head; the features cannot move with private data; only trainable weights cross the
network; the checkpoint rebuilds the same model; a DP head learns on a small phantom set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.analysis.evaluation import checkpoint_models
from common.analysis.score import model_spec
from common.core.config import RunConfig
from common.data.sites import load_site
from common.data.tensors import records_to_dataset
from common.federated.local_update import local_train
from common.models.bundle import build_bundle, federated_arrays, load_federated_arrays, save_bundle
from common.models.downstream import (
    DownstreamSpec,
    classifier_loss,
    federated_state,
    load_federated_state,
    predict_planes,
    regressor_loss,
)
from common.models.features import ScatteringBackbone, phantom_statistics
from common.privacy.dpsgd import train_private
from common.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

SIZE = 32


def _cfg(tmp_path: Path, **flat: object) -> RunConfig:
    return RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path / "run"), "prior": "", **flat})


def test_the_default_backbone_is_the_shipped_phantom_encoder_frozen(tmp_path: Path) -> None:
    from common.models.features import PhantomEncoderBackbone

    cfg = _cfg(tmp_path)
    assert cfg.train.downstream_backbone == "phantom_cnn"
    clf = DownstreamSpec.from_config(cfg).classifier()
    assert isinstance(clf.backbone, PhantomEncoderBackbone)
    assert not any(p.requires_grad for p in clf.backbone.parameters()) and clf.backbone.out_dim == 192
    f = clf.backbone(torch.rand(3, 1, SIZE, SIZE) * 2 - 1)
    assert f.shape == (3, 192) and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="phantom encoder weights missing"):
        PhantomEncoderBackbone(SIZE, folder=tmp_path / "nowhere")


def test_the_scattering_backbone_has_no_parameters_and_unit_norm_features_from_public_statistics() -> None:
    backbone = ScatteringBackbone(SIZE, J=2, grid=2)
    x = torch.rand(5, 1, SIZE, SIZE) * 2 - 1
    f = backbone(x)
    assert list(backbone.parameters()) == []
    assert set(backbone.state_dict()) == {"mean", "std"}  # the phantom normalisation, nothing of kymatio
    assert f.shape == (5, (1 + 2 * 8 + 64) * 4) and not f.requires_grad
    assert torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-5)
    # the normalisation is the phantom statistics, recomputed identically from the fixed public stream
    again = phantom_statistics(backbone.scattering, size=SIZE)
    assert np.allclose(backbone.mean.numpy(), again.mean) and np.allclose(backbone.std.numpy(), again.std)


@pytest.mark.parametrize("backbone", ["phantom_cnn", "scattering"])
def test_a_dp_round_leaves_the_frozen_features_identical_and_sends_only_the_heads(tmp_path: Path,
                                                                                   backbone: str) -> None:
    # Prepare: a smoke site (phantoms), a frozen backbone, DP at the run's budget
    cfg = _cfg(tmp_path, **{"train.downstream-steps": 3, "train.downstream-backbone": backbone})
    bundle = build_bundle(cfg)
    site = load_site(cfg.data, seed=cfg.seed, site_index=0)
    probe = records_to_dataset(site.train, image_size=cfg.data.image_size).tensors[0][:8]
    before = {k: m.backbone(probe).clone() for k, m in (("c", bundle.classifier), ("r", bundle.regressor))}
    buffers = {k: v.clone() for k, v in bundle.classifier.backbone.state_dict().items()}
    sent = federated_arrays(bundle)
    ledger = PrivacyLedger(target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
                           budget_split=cfg.privacy.budget_split())
    # Execute
    result = local_train(bundle, site, ledger, cfg, server_round=1)
    got = federated_arrays(bundle)
    # Assert: the heads trained under DP, the features did not move by a single bit
    assert result.metrics["classifier-steps"] == 3 and ledger.steps("classifier") == 3
    assert any(not np.array_equal(sent[k], got[k]) for k in sent if k.startswith("classifier.head"))
    assert torch.equal(bundle.classifier.backbone(probe), before["c"])
    assert torch.equal(bundle.regressor.backbone(probe), before["r"])
    assert all(torch.equal(buffers[k], v) for k, v in bundle.classifier.backbone.state_dict().items())
    # only trainable weights cross the network: no backbone key for the downstream models
    downstream = [k for k in got if k.startswith(("classifier.", "regressor."))]
    assert downstream and not any(".backbone." in k or k.split(".", 1)[1].startswith("backbone.") for k in downstream)
    trainable = {f"classifier.{n}" for n, p in bundle.classifier.named_parameters() if p.requires_grad}
    assert trainable and not any(".backbone." in k for k in trainable)
    assert {k for k in got if k.startswith("classifier.")} == trainable


def test_frozen_heads_start_at_zero_and_load_back_strictly(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    bundle = build_bundle(cfg)
    probs = predict_planes(bundle.classifier, torch.rand(3, 1, SIZE, SIZE) * 2 - 1)
    assert torch.allclose(probs, torch.full_like(probs, 1 / probs.shape[1]))  # zero head: uniform over the scope
    arrays = federated_arrays(bundle)
    arrays["classifier.head.bias"] = arrays["classifier.head.bias"] + 1.0
    load_federated_arrays(bundle, arrays)
    assert torch.allclose(bundle.classifier.head.bias, torch.ones(6))
    with pytest.raises(ValueError, match="downstream weights do not fit"):
        load_federated_state(bundle.classifier, {**federated_state(bundle.classifier),
                                                 "backbone.mean": torch.zeros(1)})


def test_dp_heads_on_frozen_features_lower_the_loss_on_phantoms(tmp_path: Path) -> None:
    # Prepare: 64 phantoms of one smoke site; zero heads
    cfg = _cfg(tmp_path, **{"data.images-per-site": 64})
    site = load_site(cfg.data, seed=cfg.seed, site_index=0)
    data = records_to_dataset(site.train, image_size=SIZE)
    spec = DownstreamSpec.from_config(cfg)
    torch.manual_seed(0)
    models = {"classifier": (spec.classifier(), classifier_loss, cfg.train.downstream_lr),
              "regressor": (spec.regressor(), regressor_loss, cfg.train.regressor_lr)}
    for key, (model, loss_fn, lr) in models.items():
        with torch.no_grad():
            start = float(loss_fn(model, data.tensors).mean())
        ledger = PrivacyLedger(target_epsilon=10.0, target_delta=1e-5, budget_split={key: 1.0})
        # Execute: DP-SGD with the run's head optimizer and rate
        res = train_private(model, loss_fn, data, steps=120, batch_size=16, lr=lr,
                            optimizer=cfg.train.downstream_optimizer, ledger=ledger, model_key=key,
                            planned_total_steps=120, seed=1, noise_seed=2)
        with torch.no_grad():
            end = float(loss_fn(model, data.tensors).mean())
        # Assert: under DP (epsilon spent, within budget) the full-data loss went down clearly
        assert 0 < res.epsilon <= 10.0
        assert end < start - 0.05, (key, start, end)


def test_a_checkpoint_rebuilds_the_same_frozen_models_and_scores_from_its_sidecar(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"train.scattering-grid": 1, "train.downstream-hidden": 8})
    bundle = build_bundle(cfg)
    with torch.no_grad():
        bundle.classifier.head[-1].bias.copy_(torch.arange(6.0))
    folder = save_bundle(bundle, tmp_path / "ckpt", sidecar={"config": cfg.to_dict()})
    spec = model_spec(folder)
    assert spec == DownstreamSpec.from_config(cfg) and spec.frozen and spec.hidden == 8
    loaded = checkpoint_models(folder, spec)
    x = torch.rand(4, 1, SIZE, SIZE) * 2 - 1
    assert torch.equal(predict_planes(loaded.classifier, x), predict_planes(bundle.classifier, x))


def test_configs_saved_before_frozen_backbones_read_as_end_to_end_cnns(tmp_path: Path) -> None:
    old = _cfg(tmp_path).to_dict()
    for key in ("downstream_backbone", "downstream_optimizer", "downstream_hidden", "scattering_j",
                "scattering_grid"):
        old["train"].pop(key)
    old["train"]["downstream_lr"] = 2e-3
    cfg = RunConfig.from_dict(json.loads(json.dumps(old)))
    assert (cfg.train.downstream_backbone, cfg.train.downstream_optimizer) == ("cnn", "adam")
    assert not DownstreamSpec.from_config(cfg).frozen


def test_a_bad_backbone_or_grid_is_a_clear_error(tmp_path: Path) -> None:
    from common.core.errors import ConfigError

    with pytest.raises(ConfigError, match="downstream_backbone"):
        _cfg(tmp_path, **{"train.downstream-backbone": "resnet"})
    with pytest.raises(ValueError, match="too small"):
        ScatteringBackbone(16, J=3, grid=4)


def test_frozen_dataset_batches_match_the_model_input_contract() -> None:
    # the backbone takes the [-1, 1] tensors of common.data.tensors, not [0, 1] images
    backbone = ScatteringBackbone(SIZE, J=2, grid=1)
    x = torch.zeros(2, 1, SIZE, SIZE)
    x[1] = 1.0
    f = backbone(x)
    assert not torch.allclose(f[0], f[1])
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        backbone(torch.zeros(2, SIZE, SIZE))


def test_the_protocol_trains_frozen_heads_with_the_runs_optimizer_and_cnns_with_its_own(tmp_path: Path) -> None:
    from common.analysis.evaluation import EvalSettings, arm_settings

    settings = EvalSettings(lr=2e-3, optimizer="adam")
    frozen = arm_settings(settings, _cfg(tmp_path, **{"train.downstream-lr": 0.3, "train.regressor-lr": 0.04}))
    assert (frozen.optimizer, frozen.lr, frozen.regressor_lr) == ("adam", 0.3, 0.04)
    assert arm_settings(settings, _cfg(tmp_path, **{"train.downstream-backbone": "cnn"})) == settings


def test_the_servers_update_bound_is_refused_for_sgd_heads(tmp_path: Path) -> None:
    from common.core.errors import ConfigError
    from server.strategy import update_bounds

    bounds = update_bounds(_cfg(tmp_path, **{"train.downstream-lr": 0.2, "train.regressor-lr": 0.05}))
    assert (bounds["classifier"].lr, bounds["regressor"].lr) == (0.2, 0.05)
    with pytest.raises(ConfigError, match="Adam only"):
        update_bounds(_cfg(tmp_path, **{"train.downstream-optimizer": "sgd", "train.downstream-lr": 1.0}))
    # a federated run with SGD heads fails before anything starts, with that reason (not Flower's exit code 700)
    from simulations.deploy import Layout, run_federation
    from simulations.launcher import run_simulation

    sgd = _cfg(tmp_path, **{"train.downstream-optimizer": "sgd"})
    with pytest.raises(ConfigError, match="Adam only"):
        run_simulation(sgd, num_sites=2)
    with pytest.raises(ConfigError, match="Adam only"):
        run_federation(Layout(tmp_path / "deploy"), sgd)
    assert not (tmp_path / "run").exists() and not (tmp_path / "deploy").exists()


def test_a_one_plane_scope_spends_nothing_on_the_classifier(tmp_path: Path):
    # a site of brain planes only (the HC18 situation): the classifier has nothing to learn
    cfg = _cfg(tmp_path, **{"train.downstream-steps": 2, "data.planes": "fetal_brain"})
    bundle = build_bundle(cfg)
    every_plane = _cfg(tmp_path, **{"train.downstream-steps": 2})
    site = load_site(every_plane.data, seed=cfg.seed, site_index=0)
    site = type(site)(**{**site.__dict__, "train": [r for r in site.train if r.plane == 0],
                         "test": [r for r in site.test if r.plane == 0]})
    assert site.train
    sent = federated_arrays(bundle)
    ledger = PrivacyLedger(target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
                           budget_split=cfg.privacy.budget_split())
    result = local_train(bundle, site, ledger, cfg, server_round=1)
    assert ledger.steps("classifier") == 0 and ledger.steps("regressor") == 2
    assert result.metrics.get("classifier-steps", 0) == 0
    assert any("classifier skipped" in m for m in result.messages)
    got = federated_arrays(bundle)
    assert all(np.array_equal(sent[k], got[k]) for k in sent if k.startswith("classifier."))


def test_a_frozen_film_stays_at_zero_through_a_dp_round_while_the_ga_head_trains(tmp_path: Path):
    # train.regressor-film=false (the HC18 preset): DP-SGD trains the GA head alone; the FiLM keeps its zero init
    cfg = _cfg(tmp_path, **{"train.downstream-steps": 3, "data.planes": "fetal_brain", "train.regressor-film": False})
    bundle = build_bundle(cfg)
    assert not any(p.requires_grad for p in bundle.regressor.film.parameters())
    assert all(p.requires_grad for p in bundle.regressor.head.parameters())
    site = load_site(_cfg(tmp_path).data, seed=cfg.seed, site_index=0)
    site = type(site)(**{**site.__dict__, "train": [r for r in site.train if r.plane == 0],
                         "test": [r for r in site.test if r.plane == 0]})
    sent = federated_arrays(bundle)
    ledger = PrivacyLedger(target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
                           budget_split=cfg.privacy.budget_split())
    local_train(bundle, site, ledger, cfg, server_round=1)
    got = federated_arrays(bundle)
    assert ledger.steps("regressor") == 3
    film = [k for k in sent if k.startswith("regressor.film.")]
    assert len(film) == 2 and all(np.array_equal(sent[k], got[k]) and not got[k].any() for k in film)
    assert any(not np.array_equal(sent[k], got[k]) for k in sent if k.startswith("regressor.head."))
    # the default trains both, and either kind of weights loads into either model (same keys)
    default = build_bundle(_cfg(tmp_path))
    assert all(p.requires_grad for p in default.regressor.film.parameters())
    load_federated_state(default.regressor, federated_state(bundle.regressor))


def test_a_site_without_ga_labels_trains_the_regressor_on_the_release_alone_at_no_privacy_cost(tmp_path: Path):
    # the African situation: no real image carries a GA; the shared (public) release does
    from dataclasses import replace as dc_replace

    cfg = _cfg(tmp_path, **{"train.downstream-steps": 3})
    bundle = build_bundle(cfg)
    site = load_site(cfg.data, seed=cfg.seed, site_index=0)
    no_ga = [dc_replace(r, ga_weeks=None) for r in site.train]
    site = type(site)(**{**site.__dict__, "train": no_ga})
    release = [dc_replace(r, site="release") for r in load_site(cfg.data, seed=cfg.seed, site_index=1).train]
    assert all(r.ga_weeks is not None for r in release)
    sent = federated_arrays(bundle)
    ledger = PrivacyLedger(target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
                           budget_split=cfg.privacy.budget_split())
    # Execute
    result = local_train(bundle, site, ledger, cfg, server_round=1, synthetic=release)
    # Assert: the regressor moved, the ledger charged it nothing; the classifier still trained under DP
    assert result.metrics["regressor-steps"] == 3 and result.metrics["regressor-epsilon"] == 0.0
    assert ledger.steps("regressor") == 0 and ledger.epsilon("regressor") == 0.0
    assert ledger.steps("classifier") == 3
    assert any("release only" in m and "no privacy cost" in m for m in result.messages)
    got = federated_arrays(bundle)
    assert any(not np.array_equal(sent[k], got[k]) for k in sent if k.startswith("regressor."))
    # without a release there is nothing to learn GA from: skipped, as before
    ledger2 = PrivacyLedger(target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
                            budget_split=cfg.privacy.budget_split())
    result2 = local_train(build_bundle(cfg), site, ledger2, cfg, server_round=1)
    assert "regressor-steps" not in result2.metrics and any("regressor skipped" in m for m in result2.messages)


@pytest.mark.parametrize("release_models", ["classifier,regressor", "classifier", "none"])
def test_the_release_joins_only_the_downstream_models_the_config_names(tmp_path: Path, monkeypatch, release_models):
    # Prepare: a site with GA labels and a release of 8 images; record the dataset each model's training gets
    from dataclasses import replace as dc_replace

    import common.federated.local_update as lu

    cfg = _cfg(tmp_path, **{"train.downstream-steps": 1, "train.release-models": release_models})
    site = load_site(cfg.data, seed=cfg.seed, site_index=0)
    release = [dc_replace(r, site="release") for r in load_site(cfg.data, seed=cfg.seed, site_index=1).train[:8]]
    sizes: dict[str, int] = {}
    real_train = lu.train_private

    def recording(model, loss_fn, data, **kw):  # type: ignore[no-untyped-def]
        sizes[kw["model_key"]] = len(data)
        return real_train(model, loss_fn, data, **kw)

    monkeypatch.setattr(lu, "train_private", recording)
    ledger = PrivacyLedger(target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
                           budget_split=cfg.privacy.budget_split())
    # Execute
    local_train(build_bundle(cfg), site, ledger, cfg, server_round=1, synthetic=release)
    # Assert: the generator never sees the release; each downstream model sees it only where named
    n = len(site.train)
    assert sizes["generator"] == n
    assert sizes["classifier"] == n + 8 * ("classifier" in release_models)
    assert sizes["regressor"] == n + 8 * ("regressor" in release_models)


def test_release_models_rejects_an_unknown_model_and_the_real_presets_keep_their_dp_heads_on_real_images(tmp_path):
    from common.core.config import ConfigError, RunConfig, data_preset

    with pytest.raises(ConfigError, match="train.release_models"):
        RunConfig.from_flat({"preset": "smoke", "train.release-models": "classifier,generator"})
    hc18 = RunConfig.from_flat({"preset": "smoke", "data.image-size": "64", **data_preset("hc18", str(tmp_path))})
    assert not hc18.train.trains_on_release("regressor") and hc18.train.trains_on_release("classifier")
    african = RunConfig.from_flat({"preset": "smoke", "data.image-size": "64", **data_preset("african", str(tmp_path))})
    assert african.train.trains_on_release("regressor") and not african.train.trains_on_release("classifier")
    assert RunConfig.from_flat({"preset": "smoke"}).train.release_model_keys() == ("classifier", "regressor")
