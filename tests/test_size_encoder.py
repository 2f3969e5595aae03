"""The encoder's auxiliary apparent-size objective: its target, the augmentation's zoom, training and loading."""

import json

import numpy as np
import pytest
import torch

from common.models import features as fx


def test_apparent_size_grows_with_ga_and_zoom_and_falls_with_the_field_of_view():
    ga = torch.tensor([20.0, 30.0, 38.0])
    base = fx.apparent_size(ga, torch.full((3,), 2.0), 64)
    assert torch.all(base[1:] > base[:-1])  # a older fetus looks larger
    coarser = fx.apparent_size(ga, torch.full((3,), 4.0), 64)  # twice the field of view
    torch.testing.assert_close(base - coarser, torch.full((3,), float(np.log(2.0))))
    zoomed = fx.apparent_size(ga, torch.full((3,), 2.0), 64, zoom=torch.full((3,), 1.5))
    torch.testing.assert_close(zoomed - base, torch.full((3,), float(np.log(1.5))))


def test_the_zoom_augment_reports_is_the_magnification_of_the_anatomy():
    side = 64
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disk = (((yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2) < 12.0 ** 2).float()
    x = disk[None, None].repeat(96, 1, 1, 1)
    y, zoom = fx.augment(x, torch.Generator().manual_seed(0), return_zoom=True)
    area = (y > 0.3).float().mean(dim=(1, 2, 3))
    assert zoom.shape == (96,) and float(zoom.min()) >= 0.7 and float(zoom.max()) <= 1.35
    rank = lambda v: torch.argsort(torch.argsort(v)).float()  # noqa: E731
    spearman = float(np.corrcoef(rank(zoom).numpy(), rank(area).numpy())[0, 1])
    assert spearman > 0.6, spearman  # a zoom of 1.3 shows a larger disk than a zoom of 0.8
    assert torch.equal(fx.augment(x, torch.Generator().manual_seed(0)), y)  # same draws with or without the zoom


def test_an_encoder_trained_with_the_size_objective_learns_it_and_loads(tmp_path):
    cfg = fx.EncoderConfig(size=32, widths=(8, 16, 32), images_per_profile=24, steps=500, batch_size=24, lr=5e-3,
                           size_weight=1.0)
    out = fx.train_phantom_encoder(tmp_path / "enc", cfg, log_every=0)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["config"]["size_weight"] == 1.0
    # the held-out size error (log units) beats predicting one value for every phantom: the std of the target
    _, labels, ga, spacing = fx._phantom_images(40, size=32, seed=cfg.seed + 7, with_ga=True)
    truth = fx.apparent_size(torch.from_numpy(ga), torch.from_numpy(spacing), 32)
    fetal = torch.isin(torch.from_numpy(labels), torch.tensor(fx.SIZE_PLANES))
    assert meta["phantom_heldout_size_rmse_log"] < 0.85 * float(truth[fetal].std())  # measured 0.77x
    ext = fx.PhantomEncoderExtractor(out)  # loads strictly (the file has the size head), then drops the head
    assert ext.model.size_head is None and ext(np.zeros((2, 32, 32), np.uint8)).shape == (2, 64)


def test_an_encoder_without_the_objective_has_no_size_head(tmp_path):
    cfg = fx.EncoderConfig(size=32, widths=(8, 16), images_per_profile=2, steps=1, batch_size=2)
    out = fx.train_phantom_encoder(tmp_path / "enc", cfg, log_every=0)
    ext = fx.PhantomEncoderExtractor(out)
    assert ext.model.size_head is None and "phantom_heldout_size_rmse_log" not in json.loads(
        (out / "encoder.json").read_text())
    with pytest.raises(ValueError, match="no size head"):
        ext.model.forward_with_size(torch.zeros(1, 1, 32, 32))


def test_the_shipped_size_encoder_saw_the_same_public_data_and_keeps_the_checkpoint_layout():
    from common.models.assets import asset_folder
    from common.models.downstream import make_backbone

    size_meta = json.loads((asset_folder(fx.PUBLIC_SIZE_ENCODER_ASSET) / "encoder.json").read_text())
    plain_meta = json.loads((asset_folder(fx.PUBLIC_ENCODER_ASSET) / "encoder.json").read_text())
    assert size_meta["config"]["size_weight"] == 1.0 and size_meta["phantom_heldout_size_rmse_log"] < 0.15
    assert size_meta["public_sources"] == plain_meta["public_sources"]  # the same public scans, nothing more
    sized, plain = make_backbone("public_size_cnn", 64, 32), make_backbone("public_cnn", 64, 32)
    assert sized.state_dict().keys() == plain.state_dict().keys()  # the size head is not part of the backbone
    assert not any(p.requires_grad for p in sized.parameters())
    x = torch.rand(3, 1, 64, 64)
    assert sized(x).shape == plain(x).shape == (3, 192) and not torch.allclose(sized(x), plain(x))
