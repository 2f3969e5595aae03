"""The GA-conditioning benchmark reads GA back with the shipped public regressor (phantoms are its yardstick)."""

from __future__ import annotations

from pathlib import Path

from common.core.config import GeneratorConfig
from common.models.generator import build_generator, save_generator


def test_phantoms_read_back_in_gestational_order_and_the_report_has_both_rows(tmp_path: Path) -> None:
    from simulations.benchmarks.ga_conditioning import measure

    tiny = GeneratorConfig(block_out_channels=(8, 16), num_train_timesteps=100)
    save_generator(build_generator(tiny, image_size=32, seed=0), tmp_path / "generator", sidecar={})
    # Execute
    out = measure(tmp_path, gas=(16.0, 38.0), per_ga=6, seed=0)
    # Assert: the public GA head orders phantoms of 16 and 38 weeks (an untrained generator's samples need not)
    phantoms, samples = out["phantoms"], out["samples"]
    assert phantoms["spearman"] > 0.7  # type: ignore[index]
    assert phantoms["by_ga"]["16"]["mean"] < phantoms["by_ga"]["38"]["mean"]  # type: ignore[index]
    assert set(samples["by_ga"]) == {"16", "38"} and out["image_size"] == 32  # type: ignore[index]
