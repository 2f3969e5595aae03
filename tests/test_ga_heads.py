"""The GA head study's pieces: patient-grouped folds, and the feature-head wrapper being the product's regressor."""

from __future__ import annotations

import numpy as np
import torch

from common.models.downstream import GARegressor, federated_state, regressor_loss
from simulations.experiments.ga_heads import FeatureHead, feature_dataset, grouped_kfold


def test_grouped_kfold_never_splits_a_patient_and_covers_every_record():
    rng = np.random.default_rng(3)
    sizes = rng.choice([1, 1, 1, 2, 3, 4], size=120)
    groups, start = [], 0
    for n in sizes:
        groups.append(list(range(start, start + n)))
        start += n
    folds = grouped_kfold(groups, 5, seed=1)
    assert len(folds) == 5
    allidx = np.concatenate(folds)
    assert sorted(allidx.tolist()) == list(range(start))  # disjoint and complete
    fold_of = {int(i): f for f, idx in enumerate(folds) for i in idx}
    assert all(len({fold_of[i] for i in g}) == 1 for g in groups)
    lens = [len(f) for f in folds]
    assert max(lens) - min(lens) <= max(sizes)  # balanced up to one group


def test_feature_head_is_exactly_the_regressor():
    torch.manual_seed(0)  # the CNN backbone: forward_features does not depend on which, and it needs no phantom stats
    reg = GARegressor(16, 2, backbone="cnn")
    for p in reg.parameters():  # off the zero init, so the comparison is not trivial
        torch.nn.init.normal_(p, std=0.3)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    spacing = torch.tensor([0.1, 0.2, float("nan"), 0.15, 0.3, 0.12])
    h = reg.backbone(x)
    head = FeatureHead(reg)
    for a, b in zip(reg(x, spacing), head(h, spacing)):
        assert torch.equal(a, b)
    # the loss the study trains with is the product's, and the trained weights are the regressor's own
    ga = torch.tensor([20.0, 25.0, 30.0, float("nan"), 35.0, 22.0])
    batch_img = (x, torch.zeros(6, dtype=torch.int64), ga, spacing)
    assert torch.equal(regressor_loss(reg, batch_img), regressor_loss(head, feature_dataset(h, ga, spacing).tensors))
    assert {f"reg.{k}" for k in federated_state(reg)} == set(head.state_dict())


def test_settings_name_every_shipped_encoder_and_refuse_a_typo():
    import pytest

    from simulations.experiments.ga_heads import parse_setting

    assert parse_setting("public_size_cnn:10/4") == ("public_size_cnn", 2, 4, [10.0, 4.0])
    assert parse_setting("scattering:2:4:1") == ("scattering", 2, 4, [1.0])
    with pytest.raises(ValueError, match="public_size_cnn:EPS/EPS"):
        parse_setting("public_sized_cnn:10")


def test_federated_dp_can_keep_the_film_at_its_init_and_train_with_sgd():
    from simulations.experiments.ga_heads import federated_dp, make_regressor

    d = make_regressor("public_cnn", 2, 4, 0).backbone.out_dim
    gen = torch.Generator().manual_seed(0)
    sites = []
    for _ in range(3):
        h = torch.nn.functional.normalize(torch.randn(40, d, generator=gen), dim=1)
        sites.append(feature_dataset(h, 20 + 15 * torch.rand(40, generator=gen), torch.full((40,), 0.6)))
    for train_film, optimizer in ((False, "sgd"), (True, "adam")):
        models = [make_regressor("public_cnn", 2, 4, 0, film=train_film) for _ in range(4)]
        init = {k: v.clone() for k, v in models[0].init_state.items()}
        head, info = federated_dp(models, sites, epsilon=10.0, lr=0.01, local_steps=4, rounds=2, batch_size=16,
                                  clip=1.0, seed=1, optimizer=optimizer)
        state = head.reg.state_dict()
        film_moved = not (torch.equal(state["film.weight"], init["film.weight"])
                          and torch.equal(state["film.bias"], init["film.bias"]))
        assert film_moved == train_film
        assert not torch.equal(state["head.weight"], init["head.weight"])  # the head trains either way
        assert all(info[f"site{s}"]["steps"] == 8 for s in range(3))
