"""Downstream models (common.models.downstream): DP compatibility, losses, training on synthetic tasks, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from common.models.downstream import (
    GARegressor,
    PlaneClassifier,
    classifier_loss,
    evaluate_classifier,
    evaluate_regressor,
    predict_ga,
    predict_planes,
    regressor_loss,
)
from common.phantoms.biometry import hc_mm
from common.privacy.dpsgd import train_private
from common.privacy.ledger import PrivacyLedger

# Opacus notes that a larger RDP order might tighten tiny budgets; the bound it returns is still valid.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")



def shapes(n: int, size: int = 16, seed: int = 0) -> TensorDataset:
    """Class 0: a bright disc; class 1: a bright horizontal bar; noisy background (4-tuple batches)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(size) - size / 2 + 0.5
    yy, xx = c[:, None], c[None, :]
    disc = ((yy**2 + xx**2) < (size / 3) ** 2).float()
    bar = ((yy.abs() < size / 8) & (xx.abs() < size * 0.6 / 2 + 2)).float()
    y = torch.randint(0, 2, (n,), generator=g)
    img = torch.where(y[:, None, None] == 0, disc, bar)[:, None] * 1.6 - 0.8
    img = (img + 0.2 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1)
    nan = torch.full((n,), float("nan"))
    return TensorDataset(img, y, nan, nan.clone())


def heads(n: int, size: int = 16, seed: int = 0, unknown_ga: float = 0.0) -> TensorDataset:
    """A fetal head as a bright disc of radius HC(GA)/(2 pi) mm (Hadlock 1984) drawn at ``spacing`` mm/px.

    The image brightness (disc area) alone is ambiguous: GA follows from it only together with the spacing.
    Labels carry N(0, 0.5 week) noise; a fraction ``unknown_ga`` of labels is NaN (must be masked).
    """
    g = torch.Generator().manual_seed(seed)
    ga = 14 + 26 * torch.rand(n, generator=g)
    spacing = 7.5 + 3.0 * torch.rand(n, generator=g)
    r_px = torch.from_numpy(hc_mm(ga.numpy())).float() / (2 * math.pi) / spacing
    c = torch.arange(size) - size / 2 + 0.5
    dist = (c[None, :, None] ** 2 + c[None, None, :] ** 2).sqrt()
    disc = (r_px[:, None, None] - dist + 0.5).clamp(0, 1)  # anti-aliased edge: sub-pixel radii stay visible
    img = (disc * 1.6 - 0.8 + 0.1 * torch.randn(n, size, size, generator=g)).clamp(-1, 1)[:, None]
    label = ga + 0.5 * torch.randn(n, generator=g)
    label[torch.rand(n, generator=g) < unknown_ga] = float("nan")
    return TensorDataset(img, torch.zeros(n, dtype=torch.long), label, spacing)


# -- construction -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 32, 64])
def test_models_are_dp_compatible_and_shaped(size: int) -> None:
    # Prepare
    clf = PlaneClassifier(image_size=size, width=4)
    reg = GARegressor(image_size=size, width=4)
    x = torch.rand(3, 1, size, size) * 2 - 1
    # Execute
    logits, feats = clf(x), clf.features(x)
    mean, logvar = reg(x, torch.tensor([0.5, float("nan"), 2.0]))
    # Assert
    ModuleValidator.validate(clf, strict=True)
    ModuleValidator.validate(reg, strict=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in [*clf.modules(), *reg.modules()])
    assert logits.shape == (3, 6) and feats.shape == (3, 16)
    assert mean.shape == logvar.shape == (3,) and torch.isfinite(mean).all() and torch.isfinite(logvar).all()


def test_bad_inputs_are_rejected() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="multiple of 8"):
        PlaneClassifier(image_size=20)
    with pytest.raises(ValueError, match=r"expected images \[B,1,16,16\]"):
        PlaneClassifier(image_size=16, width=4)(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="spacing must have shape"):
        predict_ga(GARegressor(image_size=16, width=4), torch.zeros(2, 1, 16, 16), torch.ones(3))


def test_spacing_input_encodes_unknown_as_a_flag() -> None:
    # Execute
    s = GARegressor.scale_input(torch.tensor([1.0, float("nan"), math.e, 0.0]))
    # Assert
    assert torch.allclose(s, torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))


# -- losses -----------------------------------------------------------------------------------------------------
def test_regressor_loss_masks_unknown_ga_without_nan_gradients() -> None:
    # Prepare
    torch.manual_seed(0)
    model = GARegressor(image_size=16, width=4)
    data = heads(8, seed=3)
    ga = data.tensors[2].clone()
    ga[[1, 4]] = float("nan")
    spacing = data.tensors[3].clone()
    spacing[2] = float("nan")
    batch = (data.tensors[0], data.tensors[1], ga, spacing)
    # Execute
    losses = regressor_loss(model, batch)
    losses.mean().backward()
    # Assert
    assert losses.shape == (8,)
    assert losses[1] == 0 and losses[4] == 0
    assert torch.isfinite(losses).all() and (losses[[0, 2, 3, 5, 6, 7]] != 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_classifier_loss_is_per_example_cross_entropy() -> None:
    # Prepare
    torch.manual_seed(0)
    model = PlaneClassifier(num_classes=2, image_size=16, width=4)
    data = shapes(5)
    # Execute
    losses = classifier_loss(model, data.tensors)
    # Assert
    expected = nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1], reduction="none")
    assert losses.shape == (5,) and torch.allclose(losses, expected)


# -- training ---------------------------------------------------------------------------------------------------
def test_dp_training_lowers_classifier_loss_at_epsilon_ten() -> None:
    # Prepare
    torch.manual_seed(0)
    model = PlaneClassifier(num_classes=2, image_size=16, width=4)
    train, test = shapes(128, seed=0), shapes(64, seed=1)
    ledger = PrivacyLedger(target_epsilon=10.0, target_delta=1e-5, budget_split={"classifier": 1.0})
    with torch.no_grad():
        before = classifier_loss(model, test.tensors).mean().item()
    # Execute
    result = train_private(model, classifier_loss, train, steps=40, batch_size=32, lr=2e-2, ledger=ledger,
                           model_key="classifier", planned_total_steps=40, grad_sample_mode="hooks")
    with torch.no_grad():
        after = classifier_loss(model, test.tensors).mean().item()
    metrics = evaluate_classifier(model, test)
    # Assert
    assert result.steps == 40 and 9.0 < result.epsilon <= 10.0
    assert after < 0.5 * before
    assert metrics["accuracy"] >= 0.9 and metrics["n"] == 64


def test_ga_regressor_intervals_are_calibrated_and_beat_the_mean() -> None:
    # Prepare
    torch.manual_seed(0)
    model = GARegressor(image_size=16, width=4)
    train, test = heads(1024, seed=0, unknown_ga=0.2), heads(256, seed=1)
    # Execute
    train_private(model, regressor_loss, train, steps=150, batch_size=32, lr=1e-2, ledger=None,
                  model_key="regressor", planned_total_steps=150)
    metrics = evaluate_regressor(model, test, coverage_level=0.9)
    # Assert
    baseline_mae_days = 7 * float((test.tensors[2] - train.tensors[2].nanmean()).abs().mean())
    assert metrics["n"] == 256
    assert 0.7 <= metrics["coverage"] <= 1.0
    assert metrics["mae_days"] < 0.6 * baseline_mae_days
    assert 0 < metrics["interval_width_days"] < 4 * baseline_mae_days


# -- metrics on known predictions -------------------------------------------------------------------------------
class _FixedClassifier(PlaneClassifier):
    """Predicts the class stored in pixel (0, 0) of each image."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), self.num_classes).float() * 10


class _FixedRegressor(GARegressor):
    """Predicts mean = pixel (0, 0), std = pixel (0, 1) (weeks)."""

    def forward(self, x: Tensor, spacing: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, 0, 0, 0], 2 * torch.log(x[:, 0, 0, 1])


def test_evaluate_classifier_on_known_predictions() -> None:
    # Prepare: truth 0,0,1,1,2 ; predictions 0,1,1,1,0 (class 2 never predicted)
    model = _FixedClassifier(num_classes=4, image_size=16, width=2)
    images = torch.zeros(5, 1, 16, 16)
    images[:, 0, 0, 0] = torch.tensor([0.0, 1, 1, 1, 0])
    data = TensorDataset(images, torch.tensor([0, 0, 1, 1, 2]), torch.zeros(5), torch.ones(5))
    # Execute
    m = evaluate_classifier(model, data)
    probs = predict_planes(model, images)
    # Assert: F1 class0 = 2*1/(2+2) = 0.5, class1 = 2*2/(2+3) = 0.8, class2 = 0; class 3 absent -> excluded
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["per_class_recall"][:3] == pytest.approx([0.5, 1.0, 0.0]) and math.isnan(m["per_class_recall"][3])
    assert probs.shape == (5, 4) and torch.allclose(probs.sum(dim=1), torch.ones(5))


def test_evaluate_regressor_on_known_predictions() -> None:
    # Prepare: errors 0.5, 1.0, 3.0 weeks with std 1 each; one unknown GA; z(0.9) = 1.645
    model = _FixedRegressor(image_size=16, width=2)
    images = torch.zeros(4, 1, 16, 16)
    images[:, 0, 0, 0] = torch.tensor([20.0, 30.0, 25.0, 33.0])
    images[:, 0, 0, 1] = 1.0
    ga = torch.tensor([20.5, 31.0, 28.0, float("nan")])
    data = TensorDataset(images, torch.zeros(4, dtype=torch.long), ga, torch.ones(4))
    # Execute
    m = evaluate_regressor(model, data, coverage_level=0.9)
    mean, std = predict_ga(model, images, torch.ones(4))
    # Assert
    assert m["n"] == 3
    assert m["mae_days"] == pytest.approx(7 * (0.5 + 1.0 + 3.0) / 3)
    assert m["coverage"] == pytest.approx(2 / 3)
    assert m["interval_width_days"] == pytest.approx(7 * 2 * 1.6448536, rel=1e-5)
    assert torch.allclose(mean, images[:, 0, 0, 0]) and torch.allclose(std, torch.ones(4))
