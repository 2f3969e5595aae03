"""The README's prior figure: phantom | prior sample per plane x GA, written from any generator folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.core.config import GeneratorConfig
from common.models.generator import build_generator, save_generator
from common.phantoms.simulator import PLANES


def test_the_grid_has_a_phantom_and_a_sample_per_plane_and_ga(tmp_path: Path) -> None:
    from simulations.prior_figure import main, prior_grid

    tiny = GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100)
    save_generator(build_generator(tiny, image_size=32, seed=0), tmp_path / "prior" / "generator", sidecar={})
    # Execute
    path = prior_grid(tmp_path / "prior", tmp_path / "out", gas=(20.0, 30.0), steps=2)
    # Assert: 6 rows x (2 GA x 2) cells of 128 px each (32 px magnified 4x)
    assert path.name == "prior_samples_32px.png"
    img = np.asarray(Image.open(path).convert("L"))
    assert img.shape[0] > len(PLANES) * 128 and img.shape[1] > 4 * 128
    # a folder without a generator is refused with what to pass
    with pytest.raises(SystemExit, match="holds no generator"):
        main(["--prior", str(tmp_path / "out"), "--out", str(tmp_path)])
