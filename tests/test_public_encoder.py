"""The encoder trained on phantoms + public real scans: sources on record, held-out guard, the African preset uses it."""

import json
from pathlib import Path

import numpy as np
import pytest

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
    with pytest.raises(ConfigError, match="FETAL_PLANES_DB"):
        RunConfig.from_flat({**flat, "train.downstream-backbone": "public_cnn"})


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
