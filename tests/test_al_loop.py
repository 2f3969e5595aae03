"""The active-learning comparison across seeds: paired differences to the no-synthetic arm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.experiments import al_loop


def _row(rnd: int, acc: float, mae: float | None) -> dict[str, Any]:
    return {"round": rnd, "plane_accuracy": acc, "plane_macro_f1": acc / 2, "ga_mae_days": mae,
            "ga_coverage": 0.9, "release_size": 0}


def _write(folder: Path, seed: int, table: dict[str, list[dict[str, Any]]], **argv: Any) -> Path:
    folder.mkdir(parents=True)
    args = {"preset": "demo", "prior": "shipped", "seed": seed, "out": str(folder), "arms": ",".join(table),
            "set": [], "data": None, "data_root": None, **argv}
    (folder / "al_loop.json").write_text(json.dumps({"arms": al_loop.ARMS, "table": table, "argv": args}))
    return folder


def test_across_seeds_pairs_each_arm_with_the_baseline_of_its_own_seed() -> None:
    # Prepare: at round 2 seed 0 lifts accuracy by 0.1, seed 1 lowers it by 0.05 and has no GA error
    seed0 = {"none": [_row(1, 0.5, 30.0), _row(2, 0.5, 29.0)], "acquisition": [_row(1, 0.5, 30.0), _row(2, 0.6, 28.0)]}
    seed1 = {"none": [_row(1, 0.8, 34.0), _row(2, 0.7, 33.0)],
             "acquisition": [_row(1, 0.8, 34.0), _row(2, 0.65, None)]}
    seed2 = {"acquisition": [_row(1, 0.1, 1.0), _row(2, 0.1, 1.0)]}  # no baseline: must not count
    # Execute
    rows = al_loop.across_seeds([seed0, seed1, seed2])
    # Assert
    assert [(r["arm"], r["round"]) for r in rows] == [("acquisition", 1), ("acquisition", 2)]
    r2 = rows[1]
    assert r2["plane_accuracy_vs_none"]["n"] == 2
    assert r2["plane_accuracy_vs_none"]["mean"] == pytest.approx(0.025)
    assert r2["plane_accuracy_vs_none"]["min"] == pytest.approx(-0.05)
    assert r2["plane_accuracy_vs_none"]["max"] == pytest.approx(0.1)
    assert r2["plane_accuracy"]["mean"] == pytest.approx(0.625)
    assert r2["ga_mae_days_vs_none"] == {"n": 1, "mean": -1.0, "min": -1.0, "max": -1.0}
    assert rows[0]["plane_accuracy_vs_none"]["max"] == 0.0
    md = al_loop.seeds_markdown(rows)
    assert "| acquisition | 2 | 2 | 0.625 [0.600, 0.650] | +0.025 [-0.050, +0.100] | 28.0 [28.0, 28.0] | -1.0" in md


def test_combine_writes_the_table_and_refuses_repeated_seeds_or_other_settings(tmp_path: Path) -> None:
    # Prepare
    table = {"none": [_row(1, 0.5, 30.0)], "random": [_row(1, 0.55, 29.0)]}
    a = _write(tmp_path / "a", 0, table)
    b = _write(tmp_path / "b", 1, table)
    same_seed = _write(tmp_path / "c", 0, table)
    other = _write(tmp_path / "d", 2, table, set=["federation.al-refine-steps=20"])
    # Execute
    rows = al_loop.combine([a, b], tmp_path / "out")
    # Assert
    assert rows[0]["arm"] == "random" and rows[0]["plane_accuracy_vs_none"]["n"] == 2
    assert json.loads((tmp_path / "out" / "al_loop_seeds.json").read_text())["seeds"] == [0, 1]
    assert "| random | 1 | 2 |" in (tmp_path / "out" / "al_loop_seeds.md").read_text()
    with pytest.raises(SystemExit, match="share a seed"):
        al_loop.combine([a, same_seed], tmp_path / "out2")
    with pytest.raises(SystemExit, match="set differ"):
        al_loop.combine([a, other], tmp_path / "out3")
    with pytest.raises(SystemExit, match="run the comparison first"):
        al_loop.combine([a, tmp_path / "missing"], tmp_path / "out4")


def test_combine_pairs_the_releases_with_the_acquisition_release_of_their_seed(tmp_path: Path) -> None:
    # Prepare: private evolution's release is 0.1 / 0.2 more accurate (synthetic-only) than acquisition's
    def table(acq: float, pe: float) -> dict[str, list[dict[str, Any]]]:
        return {"none": [_row(1, 0.5, 30.0)],
                "acquisition": [{**_row(1, 0.5, 30.0), "fd": 2.0, "synthetic_only": acq}],
                "private-evolution": [{**_row(1, 0.5, 30.0), "fd": 1.0, "synthetic_only": pe}]}
    a = _write(tmp_path / "a", 0, table(0.4, 0.5))
    b = _write(tmp_path / "b", 1, table(0.3, 0.5))
    # Execute
    al_loop.combine([a, b], tmp_path / "out")
    # Assert
    rows = json.loads((tmp_path / "out" / "al_loop_seeds_release.json").read_text())["rows"]
    (pe,) = [r for r in rows if r["arm"] == "private-evolution"]
    assert pe["synthetic_only_vs_acquisition"]["mean"] == pytest.approx(0.15)
    assert pe["fd_vs_acquisition"] == {"n": 2, "mean": -1.0, "min": -1.0, "max": -1.0}
    assert pe["real_plus_synthetic_smallest"] is None
    md = (tmp_path / "out" / "al_loop_seeds_release.md").read_text()
    assert "| private-evolution | 1 | 1.000 [1.000, 1.000] (n=2) | -1.000 [-1.000, -1.000] (n=2) |" in md


def test_an_arm_added_later_gets_the_site_secrets_of_an_arm_that_already_ran(tmp_path: Path) -> None:
    # Prepare: an --out folder in which an earlier call ran "none" and "acquisition"; nothing in "empty"
    from common.privacy.site_state import SECRET_FILE

    for arm in ("none", "acquisition"):
        (tmp_path / arm / "sites" / "Ghana").mkdir(parents=True)
        (tmp_path / arm / "sites" / "Ghana" / SECRET_FILE).write_bytes(b"x" * 32)
    # Execute
    later = al_loop.secret_source(tmp_path, ["private-evolution-generator"])
    listed_first = al_loop.secret_source(tmp_path, ["acquisition", "random"])
    fresh = al_loop.secret_source(tmp_path / "empty", ["random", "acquisition"])
    # Assert: the same hospitals (and DP noise) as the arms already there; a fresh folder starts from its first arm
    assert later == tmp_path / "none"
    assert listed_first == tmp_path / "acquisition"
    assert fresh == tmp_path / "empty" / "random"


def test_every_arm_is_a_valid_run_config_and_top2_differs_from_private_evolution_only_by_its_votes() -> None:
    from common.core.config import RunConfig
    from common.privacy.votes import sensitivity

    base = {"preset": "smoke", "run-dir": "", "prior": ""}
    configs = {arm: RunConfig.from_flat({**base, **sets}) for arm, sets in al_loop.ARMS.items()}
    pe, top2 = configs["private-evolution"], configs["private-evolution-top2"]
    assert top2.federation.pe_votes_per_image == 2 and pe.federation.pe_votes_per_image == 1
    assert RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution-top2"],
                                "federation.pe-votes-per-image": 1}) == pe
    assert sensitivity(2) == pytest.approx(2 ** 0.5)


def test_the_any_plane_arm_differs_from_private_evolution_only_by_class_awareness() -> None:
    from common.core.config import RunConfig

    base = {"preset": "smoke", "run-dir": "", "prior": ""}
    pe = RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution"]})
    anyplane = RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution-any-plane"]})
    assert pe.federation.pe_class_aware is True and anyplane.federation.pe_class_aware is False
    assert RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution-any-plane"],
                                "federation.pe-class-aware": True}) == pe


def test_the_generator_any_plane_arm_differs_from_the_any_plane_arm_only_by_its_proposals() -> None:
    from common.core.config import RunConfig

    base = {"preset": "smoke", "run-dir": "", "prior": ""}
    anyplane = RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution-any-plane"]})
    gen = RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution-generator-any-plane"]})
    assert gen.federation.pe_source == "generator" and anyplane.federation.pe_source == "phantom"
    assert gen.federation.pe_class_aware is False
    assert RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution-generator-any-plane"],
                                "federation.pe-source": "phantom"}) == anyplane
    assert RunConfig.from_flat({**base, **al_loop.ARMS["private-evolution-generator-only"],
                                "federation.pe-class-aware": False}) == gen
