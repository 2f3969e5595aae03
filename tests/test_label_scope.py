"""The consortium's label scope (``data.planes``): the classifier head, its loss, the load-time check, the presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.core.config import DataConfig, RunConfig, data_preset
from common.core.errors import ConfigError, DataError
from common.core.records import PLANE_INDEX, PLANES, UltrasoundRecord
from common.data.sites import SiteData, check_label_scope, load_federated_data, load_site
from common.models.downstream import PlaneClassifier, classifier_loss, predict_planes

SIZE, WIDTH = 16, 2
BRAIN, ABDOMEN, FEMUR, THORAX, CERVIX, OTHER = (PLANE_INDEX[p] for p in PLANES)


def _biased_head(model: PlaneClassifier, favourite: int, runner_up: int) -> PlaneClassifier:
    """Zero the head weights and give ``favourite`` a huge bias, ``runner_up`` a small one."""
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[favourite] = 100.0
        model.head.bias[runner_up] = 1.0
    return model


def _images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _record(plane: int, k: int) -> UltrasoundRecord:
    return UltrasoundRecord(image=np.zeros((SIZE, SIZE), np.uint8), plane=plane, ga_weeks=None,
                            pixel_spacing_mm=None, site="hosp-A", patient_id=f"p{k}", image_id=f"img{k}",
                            source="african")


# -- the head ------------------------------------------------------------------------------------------
def test_head_never_predicts_a_plane_outside_its_scope_even_when_its_weights_favour_it() -> None:
    # Prepare: the same weights, strongly favouring "other" (outside the scope), once unscoped and once scoped
    torch.manual_seed(0)
    free = _biased_head(PlaneClassifier(image_size=SIZE, width=WIDTH), favourite=OTHER, runner_up=FEMUR)
    scoped = PlaneClassifier(image_size=SIZE, width=WIDTH, planes=[FEMUR, BRAIN])
    scoped.load_state_dict(free.state_dict())
    images = _images()
    # Execute
    free_probs = predict_planes(free, images)
    logits = scoped(images)
    probs = predict_planes(scoped, images)
    # Assert: without a scope the weights pick "other"; with one, no probability and no argmax outside it
    assert free_probs.argmax(1).tolist() == [OTHER] * 5
    assert scoped.planes == (BRAIN, FEMUR)
    outside = [ABDOMEN, THORAX, CERVIX, OTHER]
    assert torch.isneginf(logits[:, outside]).all() and torch.isfinite(logits[:, [BRAIN, FEMUR]]).all()
    assert (probs[:, outside] == 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(5))
    assert probs.argmax(1).tolist() == [FEMUR] * 5
    # the in-scope probabilities are the softmax over the in-scope logits alone
    expected = F.softmax(free.head(free.features(images))[:, [BRAIN, FEMUR]], dim=1)
    assert torch.allclose(probs[:, [BRAIN, FEMUR]], expected, atol=1e-6)


def test_cross_entropy_gives_zero_gradient_to_out_of_scope_weights() -> None:
    # Prepare: a scoped model with random (non-zero) head weights; in-scope labels only
    torch.manual_seed(1)
    model = PlaneClassifier(image_size=SIZE, width=WIDTH, planes=[BRAIN, ABDOMEN, THORAX])
    labels = torch.tensor([BRAIN, ABDOMEN, THORAX, BRAIN])
    batch = (_images(4, seed=1), labels, torch.full((4,), float("nan")), torch.full((4,), float("nan")))
    # Execute
    loss = classifier_loss(model, batch)
    loss.mean().backward()
    # Assert: finite per-example loss = CE over the in-scope logits; zero gradient on the other rows of the head
    logits = model.head(model.features(batch[0])).detach()[:, [BRAIN, ABDOMEN, THORAX]]
    expected = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0]), reduction="none")
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    outside = [FEMUR, CERVIX, OTHER]
    grad_w, grad_b = model.head.weight.grad, model.head.bias.grad
    assert (grad_w[outside] == 0).all() and (grad_b[outside] == 0).all()
    assert grad_w[[BRAIN, ABDOMEN, THORAX]].abs().sum() > 0 and grad_b[[BRAIN, ABDOMEN, THORAX]].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_classifier_loss_refuses_an_out_of_scope_label_naming_the_plane() -> None:
    # Prepare
    model = PlaneClassifier(image_size=SIZE, width=WIDTH, planes=[BRAIN, ABDOMEN])
    labels = torch.tensor([BRAIN, THORAX, CERVIX])
    batch = (_images(3), labels, torch.zeros(3), torch.zeros(3))
    # Execute / Assert: both bad planes named, the in-scope one not; the config key named
    with pytest.raises(ValueError, match=r"\['fetal_thorax', 'maternal_cervix'\].*data\.planes") as info:
        classifier_loss(model, batch)
    assert "fetal_brain" not in str(info.value)


def test_scope_is_not_in_the_state_dict_so_federated_shapes_do_not_change() -> None:
    # Prepare
    torch.manual_seed(2)
    brain_only = PlaneClassifier(image_size=SIZE, width=WIDTH, planes=[BRAIN])
    every = PlaneClassifier(image_size=SIZE, width=WIDTH)
    # Execute
    state = brain_only.state_dict()
    # Assert: same keys and shapes as the unscoped model, six logits kept, no mask saved
    assert "scope_mask" not in state and not any("scope" in k for k in state)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in every.state_dict().items()}
    assert tuple(state["head.weight"].shape) == (len(PLANES), 4 * WIDTH)
    # weights move between scopes strictly; each model keeps its own scope
    every.load_state_dict(state, strict=True)
    assert every.planes == tuple(range(len(PLANES)))
    assert torch.isfinite(every(_images(2))).all()
    assert torch.isneginf(brain_only(_images(2))[:, 1:]).all()


@pytest.mark.parametrize("planes", [[], [6], [-1]])
def test_empty_or_unknown_scope_is_refused(planes: list[int]) -> None:
    with pytest.raises(ValueError, match="non-empty set of indices"):
        PlaneClassifier(image_size=SIZE, width=WIDTH, planes=planes)


# -- the load-time check -------------------------------------------------------------------------------
def test_check_label_scope_names_site_planes_and_the_config_key() -> None:
    # Prepare: a site with two cervix and one "other" training image outside a four-fetal-plane scope
    cfg = DataConfig(source="african", root="/x", planes="fetal_brain,fetal_abdomen,fetal_femur,fetal_thorax")
    good = SiteData(name="Ghana", train=[_record(BRAIN, 0)], test=[_record(FEMUR, 1)])
    bad = SiteData(name="Malawi", train=[_record(CERVIX, 2), _record(CERVIX, 3), _record(OTHER, 4)],
                   test=[_record(THORAX, 5)])
    # Execute / Assert: in-scope sites pass; the bad one is named with its planes and counts
    check_label_scope([good], cfg)
    with pytest.raises(DataError) as info:
        check_label_scope([good, bad], cfg)
    message = str(info.value)
    assert "'Malawi' train: 2 x maternal_cervix, 1 x other" in message
    assert "Ghana" not in message and "'Malawi' test" not in message  # their records are in scope
    assert "data.planes='fetal_brain,fetal_abdomen,fetal_femur,fetal_thorax'" in message
    assert "--set data.planes=" in message


def test_phantom_sites_outside_a_narrow_scope_are_refused_at_load_time() -> None:
    # Prepare: phantoms draw all six planes; a brain-only scope cannot hold them
    cfg = RunConfig.from_flat({"preset": "smoke", "data.images-per-site": 8, "data.image-size": 32,
                               "data.planes": "fetal_brain"})
    # Execute / Assert: both entry points refuse, naming a phantom site
    with pytest.raises(DataError, match=r"data\.planes='fetal_brain'.*site 'site0-[a-z0-9_]+' train: \d+ x "):
        load_site(cfg.data, seed=0, site_index=0)
    with pytest.raises(DataError, match="data.planes='fetal_brain'"):
        load_federated_data(cfg.data, seed=0)
    # the default scope (all planes) accepts the same sites
    site = load_site(RunConfig.from_flat({"preset": "smoke", "data.images-per-site": 8,
                                          "data.image-size": 32}).data, seed=0, site_index=0)
    assert {r.plane for r in site.train + site.test} - {BRAIN}  # there were other planes to refuse


# -- presets and old configs ---------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "names"), [
    ("african", ("fetal_brain", "fetal_abdomen", "fetal_femur", "fetal_thorax")),
    ("hc18", ("fetal_brain",)),
    ("fetal_planes_db", PLANES),
    ("phantom", PLANES),
])
def test_data_presets_give_the_scope_of_their_dataset(preset: str, names: tuple[str, ...], tmp_path: Path) -> None:
    # Execute
    cfg = RunConfig.from_flat({"preset": "demo", **data_preset(preset, "" if preset == "phantom" else str(tmp_path))})
    # Assert
    assert tuple(PLANES[k] for k in cfg.data.plane_scope()) == names
    assert cfg.data.planes == ("" if preset == "phantom" else ",".join(names))


def test_plane_scope_parses_names_and_refuses_unknown_ones() -> None:
    assert DataConfig(planes=" fetal_thorax , fetal_brain,fetal_thorax").plane_scope() == (BRAIN, THORAX)
    assert DataConfig(planes="").plane_scope() == tuple(range(6))
    with pytest.raises(ConfigError, match=r"unknown plane\(s\) \['heart'\]"):
        DataConfig(planes="fetal_brain,heart").plane_scope()


def test_old_config_with_federation_al_planes_reads_as_data_planes() -> None:
    # Prepare: a config saved before the move: the scope in federation.al_planes, none in data
    saved = RunConfig.from_flat({"preset": "smoke"}).to_dict()
    del saved["data"]["planes"]
    saved["federation"]["al_planes"] = "fetal_femur,fetal_brain"
    # Execute
    cfg = RunConfig.from_dict(saved)
    # Assert: moved to data.planes, the rest of the config unchanged
    assert cfg.data.planes == "fetal_femur,fetal_brain"
    assert cfg.data.plane_scope() == (BRAIN, FEMUR)
    assert not hasattr(cfg.federation, "al_planes")
    assert cfg.data.image_size == saved["data"]["image_size"]
    assert cfg.federation.num_rounds == saved["federation"]["num_rounds"]
    # a config that has data.planes already keeps it
    saved["data"]["planes"] = "other"
    assert RunConfig.from_dict(saved).data.plane_scope() == (OTHER,)
