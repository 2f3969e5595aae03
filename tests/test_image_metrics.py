"""Image metrics: FD, KID, k-NN precision/recall, diversity, nearest neighbours and the LPIPS plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.analysis.image_metrics import (
    ALEXNET_FILE,
    alexnet_weights_path,
    feature_set_metrics,
    kernel_inception_distance,
    load_lpips,
    lpips_distance,
    lpips_diversity,
    mean_pairwise_distance,
    nearest_neighbours,
    precision_recall,
)
from common.analysis.metrics import frechet_distance


@pytest.fixture(scope="module")
def lpips_test_model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """LPIPS loaded by :func:`load_lpips` from a stand-in AlexNet state dict (seeded random weights, not ImageNet):
    for the plumbing only, never an LPIPS number (built once: constructing AlexNet takes a moment)."""
    import torchvision

    path = tmp_path_factory.mktemp("alexnet") / ALEXNET_FILE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return load_lpips(weights=path)


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_frechet_distance_of_a_set_to_itself_is_zero_and_grows_with_a_shift() -> None:
    # Prepare
    x = _gauss(200, 6, seed=0)
    # Execute
    same, shifted = frechet_distance(x, x), frechet_distance(x, x + 1.0)
    # Assert: a pure mean shift of 1 in each of 6 dims adds |mu_a - mu_b|^2 = 6
    assert same == pytest.approx(0.0, abs=1e-6)
    assert shifted == pytest.approx(6.0, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one() -> None:
    # Prepare
    a, b = _gauss(300, 8, seed=1), _gauss(300, 8, seed=2)
    # Execute
    same = kernel_inception_distance(a, b, num_subsets=20, subset_size=100, seed=0)
    shifted = kernel_inception_distance(a, _gauss(300, 8, seed=3, shift=1.5), num_subsets=20, subset_size=100, seed=0)
    # Assert
    assert abs(same.kid) < 0.1 * shifted.kid
    assert abs(same.kid) < 3 * same.kid_std + 0.05
    assert shifted.kid > 1.0
    assert same.subset_size == 100 and same.num_subsets == 20


def test_kid_matches_a_direct_unbiased_mmd_computation() -> None:
    # Prepare: whole sets as the only subset, so the estimate is the plain unbiased MMD^2
    x, y = _gauss(5, 3, seed=4), _gauss(6, 3, seed=5, shift=0.3)

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / 3 + 1) ** 3)

    kxx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    kyy_sub = [y[i] for i in range(6)]
    # Execute
    res = kernel_inception_distance(x, y[:5], num_subsets=1, subset_size=5, seed=0)
    # Assert: subsets of size 5 drawn from 5 rows are permutations of all rows
    kyy = sum(k(kyy_sub[i], kyy_sub[j]) for i in range(5) for j in range(5) if i != j) / 20
    kxy = sum(k(x[i], kyy_sub[j]) for i in range(5) for j in range(5)) / 25
    assert res.kid == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)


def test_precision_recall_is_one_on_identical_sets_and_lower_for_disjoint_ones() -> None:
    # Prepare
    real = _gauss(100, 4, seed=6)
    far = _gauss(100, 4, seed=7, shift=20.0)
    half = np.concatenate([real[:50], far[:50]])
    # Execute
    same, disjoint, mixed = precision_recall(real, real), precision_recall(real, far), precision_recall(real, half)
    # Assert
    assert (same.precision, same.recall) == (1.0, 1.0)
    assert (disjoint.precision, disjoint.recall) == (0.0, 0.0)
    assert mixed.precision == pytest.approx(0.5)  # the half drawn from real lies inside the real manifold
    assert 0.0 < mixed.recall < 1.0


def test_precision_recall_rejects_sets_not_larger_than_k() -> None:
    # Prepare
    x = _gauss(3, 2, seed=8)
    # Execute / Assert
    with pytest.raises(ValueError, match="N >= 4"):
        precision_recall(x, x, k=3)


def test_diversity_and_nearest_neighbours_on_known_points() -> None:
    # Prepare: a 3-4-5 triangle
    pts = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    # Execute
    div = mean_pairwise_distance(pts)
    idx, dist = nearest_neighbours(np.array([[2.9, 0.1], [0.0, 5.0]]), pts)
    # Assert
    assert div == pytest.approx((3 + 4 + 5) / 3)
    assert idx.tolist() == [1, 2]
    assert dist == pytest.approx([np.hypot(0.1, 0.1), 1.0])


def test_feature_set_metrics_names_the_feature_space() -> None:
    # Prepare
    x = _gauss(40, 4, seed=9)
    # Execute
    res = feature_set_metrics(x, x, feature_space="toy-space", kid_subsets=2)
    # Assert
    assert res["feature_space"] == "toy-space"
    assert res["fd"] == pytest.approx(0.0, abs=1e-6)
    assert res["precision"] == res["recall"] == 1.0
    assert res["diversity_fake"] == pytest.approx(res["diversity_real"])


def test_lpips_is_symmetric_and_zero_on_identical_images(lpips_test_model: torch.nn.Module) -> None:
    # Prepare
    rng = np.random.default_rng(10)
    a = rng.integers(0, 256, size=(4, 32, 32), dtype=np.uint8)
    b = rng.integers(0, 256, size=(4, 32, 32), dtype=np.uint8)
    # Execute
    ab, ba, aa = (lpips_distance(lpips_test_model, *p) for p in ((a, b), (b, a), (a, a)))
    # Assert
    assert np.allclose(ab, ba, atol=1e-6)
    assert np.allclose(aa, 0.0, atol=1e-7)
    assert (ab > 0).all()


def test_lpips_grayscale_is_read_as_three_equal_channels(lpips_test_model: torch.nn.Module) -> None:
    # Prepare
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, size=(2, 64, 64), dtype=np.uint8)
    b = rng.integers(0, 256, size=(2, 64, 64), dtype=np.uint8)
    to3 = [torch.from_numpy(x.astype(np.float32) / 127.5 - 1)[:, None].repeat(1, 3, 1, 1) for x in (a, b)]
    # Execute
    gray, rgb = lpips_distance(lpips_test_model, a, b), lpips_distance(lpips_test_model, *to3)
    # Assert
    assert np.allclose(gray, rgb, atol=1e-6)
    assert lpips_diversity(lpips_test_model, np.concatenate([a, a])) > 0  # pairs (a0,a1) differ


def test_load_lpips_without_cached_alexnet_says_which_file_and_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Execute
    with pytest.raises(FileNotFoundError) as err:
        load_lpips()
    # Assert
    msg = str(err.value)
    assert ALEXNET_FILE in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert alexnet_weights_path() == tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE


def test_load_lpips_puts_the_cached_alexnet_weights_into_the_trunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a stand-in AlexNet state dict at the cache path (random weights with the right layout)
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(12)
    alex = torchvision.models.alexnet(weights=None)
    alexnet_weights_path().parent.mkdir(parents=True)
    torch.save(alex.state_dict(), alexnet_weights_path())
    # Execute
    model = load_lpips()
    # Assert: first conv (features.0) and last conv (features.10) came from the file
    assert torch.equal(getattr(model.net.slice1, "0").weight, alex.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").weight, alex.features[10].weight)
    assert not model.training
