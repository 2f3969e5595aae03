"""Conditioning that shows at 64 px: a phantom classifier recognises the requested plane in the shipped 64 px prior's
samples well above chance (slow: ~2 min on 2 cores; `pytest -m slow tests/test_conditioning_64.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.models.assets import ASSETS
from simulations.benchmarks.sampling_quality import run

PRIOR = ASSETS / "prior-demo64" / "generator"
CHANCE = 1 / 6  # the phantoms' six planes


@pytest.mark.slow
@pytest.mark.skipif(not PRIOR.is_dir(), reason="the 64 px prior is not shipped in this checkout")
def test_samples_of_the_64px_prior_show_the_requested_plane(tmp_path: Path) -> None:
    report = json.loads(run(tmp_path, prior=PRIOR, size=64, train_images=512, train_steps=0, batch_size=32, lr=2e-3,
                            channels=(32, 64, 64), classifier_steps=300, classifier_width=16, n_samples=48,
                            configs=[("dpmsolver", 20, "", {}, None)], guidance=2.0, seed=0).read_text())
    judge = report["floors"]["classifier_accuracy_on_reference"]
    assert judge >= 0.5, f"the judging classifier recognises only {judge} of real phantoms: the test cannot judge"
    accuracy = report["results"][0]["plane_accuracy"]
    assert accuracy >= 1.8 * CHANCE, f"samples show the requested plane {accuracy} of the time (chance {CHANCE:.2f})"
