"""The encoder trained on phantoms + public real scans: sources on record, held-out guard, the African preset uses it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.config import RunConfig, data_preset
from common.core.errors import ConfigError
from common.data.public import PublicImages, load_public_images
from common.models import features as fx
from common.models.downstream import make_backbone


def _public(n=12, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    return PublicImages(images, np.arange(n) % 4, {"layout": "test", "folder": "x", "images": n,
                                                       "pixels_sha256": "0" * 64})


def test_public_images_join_training_and_are_listed(tmp_path):
    cfg = fx.EncoderConfig(size=32, widths=(8, 16), images_per_profile=4, steps=2, batch_size=4, public_batch=2)
    out = fx.train_phantom_encoder(tmp_path / "enc", cfg, log_every=0, public=[_public()])
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["public_sources"] == [_public().source]
    assert "public real scans: test (12 images)" in meta["data"]
    plain = json.loads((fx.train_phantom_encoder(tmp_path / "plain", cfg, log_every=0) / "encoder.json").read_text())
    assert plain["public_sources"] == [] and "public" not in plain["data"]


def test_public_images_of_another_size_are_refused(tmp_path):
    cfg = fx.EncoderConfig(size=32, widths=(8, 16), images_per_profile=2, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="64 px; the encoder trains at 32 px"):
        fx.train_phantom_encoder(tmp_path / "enc", cfg, log_every=0, public=[_public(size=64)])


def test_fetal_planes_db_data_refuses_the_encoder_that_saw_it(tmp_path):
    flat = {"preset": "smoke", **data_preset("fetal_planes_db", str(tmp_path))}
    assert RunConfig.from_flat(flat).train.downstream_backbone == "phantom_cnn"
    for backbone, folder in (("public_cnn", "public-encoder"), ("public_size_cnn", "public-size-encoder")):
        with pytest.raises(ConfigError, match=f"FETAL_PLANES_DB images \\(common/assets/{folder}/"):
            RunConfig.from_flat({**flat, "train.downstream-backbone": backbone})


def test_african_preset_stands_on_the_shipped_public_encoder(tmp_path):
    cfg = RunConfig.from_flat({"preset": "smoke", **data_preset("african", str(tmp_path))})
    assert cfg.train.downstream_backbone == "public_cnn"
    from common.models.assets import asset_folder

    meta = json.loads((asset_folder(fx.PUBLIC_ENCODER_ASSET) / "encoder.json").read_text())
    assert [s["layout"] for s in meta["public_sources"]] == ["fetal_planes_db"]
    backbone = make_backbone("public_cnn", 64, 32)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.out_dim == 192


FPDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "fetal_planes_db"


@pytest.mark.skipif(not (FPDB / "FETAL_PLANES_DB_data.csv").is_file(), reason="../shared/data/fetal_planes_db absent")
def test_public_images_of_a_dataset_folder_carry_their_source():
    pub = load_public_images("fetal_planes_db", FPDB, size=32)
    assert pub.images.shape[1:] == (32, 32) and pub.images.dtype == np.uint8 and len(pub.planes) == len(pub.images)
    assert pub.source["layout"] == "fetal_planes_db" and pub.source["images"] == len(pub.images)
    assert sum(pub.source["planes"].values()) == len(pub.images) and len(pub.source["pixels_sha256"]) == 64
    assert pub.source["rows_skipped"] >= 0


def test_a_folder_without_plane_labels_is_refused(tmp_path, monkeypatch):
    import common.data.public as public

    class _Result:
        records = []

        class report:
            skipped = 0

    monkeypatch.setattr(public, "load_source", lambda *a, **k: _Result())
    with pytest.raises(ValueError, match="no plane-labelled image"):
        load_public_images("hc18", tmp_path)


def test_classifier_on_the_public_encoder_starts_at_its_public_head():
    import torch

    from common.models.downstream import PlaneClassifier

    for size in (32, 64):
        clf = PlaneClassifier(image_size=size, backbone="public_cnn", planes=(0, 1, 2, 3))
        shipped = clf.backbone.public_head
        assert shipped is not None and shipped["weight"].abs().sum() > 0
        assert torch.equal(clf.head.weight, shipped["weight"]) and torch.equal(clf.head.bias, shipped["bias"])
        assert not any(k.startswith("backbone.public") for k in clf.state_dict())  # never sent as a weight
    assert not PlaneClassifier(image_size=32, backbone="phantom_cnn").head.weight.any()  # no public head: zero
    hidden = PlaneClassifier(image_size=32, backbone="public_cnn", hidden=8)
    assert not hidden.head[-1].weight.any()  # the warm start is a linear head: a hidden-layer head starts at zero


def test_fit_public_head_separates_public_classes_and_leaves_absent_planes_low():
    import torch

    class _Backbone(torch.nn.Module):
        def forward(self, x):
            z = x.flatten(1)[:, :4]
            return z / z.norm(dim=1, keepdim=True).clamp_min(1e-8)

    rng = np.random.default_rng(0)
    planes = np.arange(40) % 3
    images = np.full((40, 4, 4), 20, np.uint8)
    images[np.arange(40), 0, planes] = 250
    images = images + rng.integers(0, 5, images.shape).astype(np.uint8)
    state, acc = fx.fit_public_head(_Backbone(), images, planes, num_classes=6)
    assert acc == 1.0 and state["weight"].shape == (6, 4)
    logits = torch.from_numpy(images.reshape(40, -1)[:, :4].astype(np.float32)) @ state["weight"].T + state["bias"]
    assert (logits[:, 3:].max(1).values < logits[:, :3].max(1).values).all()


@pytest.mark.skipif(not (FPDB / "FETAL_PLANES_DB_data.csv").is_file(), reason="../shared/data/fetal_planes_db absent")
def test_shipped_public_head_scores_its_public_images_as_recorded():
    import torch

    from common.models.assets import asset_folder
    from common.models.downstream import PlaneClassifier

    meta = json.loads((asset_folder(fx.PUBLIC_ENCODER_ASSET) / "encoder.json").read_text())
    pub = load_public_images("fetal_planes_db", FPDB, size=64)
    clf = PlaneClassifier(image_size=64, backbone="public_cnn")
    with torch.no_grad():
        pred = clf(torch.from_numpy(pub.images).float()[:, None] / 127.5 - 1.0).argmax(1).numpy()
    assert abs(float((pred == pub.planes).mean()) - meta["public_heads"]["64"]["train_accuracy"]) < 1e-6


def test_the_backbone_says_what_public_data_it_learned_from():
    from common.models.downstream import PlaneClassifier

    public = PlaneClassifier(image_size=32, backbone="public_cnn").backbone.provenance
    assert public["encoder"] == "public-encoder" and public["public_head"] == "public_head_32.safetensors"
    assert [s["layout"] for s in public["public_sources"]] == ["fetal_planes_db"]
    phantom = PlaneClassifier(image_size=32, backbone="phantom_cnn").backbone.provenance
    assert phantom["public_sources"] == [] and phantom["public_head"] is None and "phantoms" in phantom["data"]


def test_a_checkpoint_sidecar_lists_the_downstream_public_data(tmp_path):
    from common.models.bundle import build_bundle
    from server.federation import _sidecar

    cfg = RunConfig.from_flat({"preset": "smoke", **data_preset("african", str(tmp_path))})
    side = _sidecar(cfg, build_bundle(cfg), 1, {})["downstream"]
    assert side["backbone"] == "public_cnn" and side["public_sources"][0]["layout"] == "fetal_planes_db"
    assert json.loads(json.dumps(side)) == side  # JSON-safe, as the sidecar is written


def test_balanced_public_sampling_draws_every_plane_alike_whatever_the_mix() -> None:
    # a public set of 90 brain images and 10 abdomen images (HC18 beside a small multi-plane set)
    planes = torch.tensor([0] * 90 + [1] * 10)
    gen = torch.Generator().manual_seed(0)
    balanced = fx.public_indices(planes, 4000, gen, balanced=True)
    uniform = fx.public_indices(planes, 4000, gen, balanced=False)
    share = lambda idx: float((planes[idx] == 1).float().mean())  # noqa: E731
    assert abs(share(balanced) - 0.5) < 0.03 and abs(share(uniform) - 0.1) < 0.02
    assert set(balanced[planes[balanced] == 1].tolist()) == set(range(90, 100))  # every abdomen image is used
