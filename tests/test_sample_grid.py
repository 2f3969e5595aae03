"""The server's per-round sample grid draws the planes of the run's label scope only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import server.reporting as reporting
from common.core.config import RunConfig
from common.core.records import PLANE_INDEX, PLANES
from common.models.bundle import build_bundle


@pytest.mark.parametrize("planes", ["", "fetal_brain,fetal_femur"])
def test_the_sample_grid_has_one_row_per_plane_in_scope(tmp_path: Path, planes: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the smoke preset's generator; record what the grid asks the sampler for
    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path), "data.planes": planes})
    asked: dict[str, torch.Tensor] = {}
    real_sample = reporting.sample

    def recording(model, *, plane, ga, **kw):  # type: ignore[no-untyped-def]
        asked.update(plane=plane, ga=ga)
        return real_sample(model, plane=plane, ga=ga, **kw)

    monkeypatch.setattr(reporting, "sample", recording)
    # Execute
    out = reporting.save_sample_grid(build_bundle(cfg), cfg, tmp_path / "grid.png", server_round=1)
    # Assert: rows = the scope's planes in PLANES order, each at every grid GA
    scope = [PLANE_INDEX[p] for p in planes.split(",")] if planes else list(range(len(PLANES)))
    n_ga = len(reporting.GRID_GA_WEEKS)
    assert asked["plane"].tolist() == [p for p in scope for _ in range(n_ga)]
    assert asked["ga"].tolist() == list(reporting.GRID_GA_WEEKS) * len(scope)
    assert out.is_file() and out.stat().st_size > 0
