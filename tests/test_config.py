"""Config: presets validate, overrides coerce, bad values name the field and range."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from common.core.config import PRESETS, RunConfig, get_preset, run_config_declaration
from common.core.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict_and_flat(name: str) -> None:
    # Prepare
    cfg = get_preset(name)
    # Execute
    again = RunConfig.from_dict(cfg.to_dict())
    flat_again = RunConfig.from_flat(cfg.to_flat())
    # Assert
    assert again == cfg
    assert flat_again == cfg


def test_overrides_coerce_types_and_aliases() -> None:
    cfg = RunConfig.from_flat(
        {"preset": "smoke", "num-server-rounds": "3", "privacy.target-epsilon": "none",
         "generator.block-out-channels": "8,8", "train.lr": 0.01, "generator.attention": "true"}
    )
    assert cfg.federation.num_rounds == 3
    assert cfg.privacy.target_epsilon is None
    assert cfg.generator.block_out_channels == (8, 8)
    assert cfg.train.lr == 0.01
    assert cfg.generator.attention is True
    assert cfg.data.image_size == 32  # untouched smoke value


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"data.image-size": 48}, "data.image_size=48"),
        ({"privacy.target-delta": 0.5}, "privacy.target_delta"),
        ({"federation.strategy": "fedsgd"}, "federation.strategy"),
        ({"train.bogus": 1}, "unknown config key 'train.bogus'"),
        ({"train.local-steps": "ten"}, "cannot read 'ten'"),
        ({"preset": "huge"}, "preset='huge'"),
    ],
)
def test_invalid_values_name_field_and_range(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        RunConfig.from_flat({"preset": "smoke", **override})


def test_real_source_needs_root() -> None:
    with pytest.raises(ConfigError, match="data.root"):
        RunConfig.from_flat({"preset": "smoke", "data.source": "african"})


def _through_flower(cfg: RunConfig, tmp_path: Path, *, resume: bool = False) -> dict:
    """What ``context.run_config`` holds after ``flwr run --run-config <file>``: Flower's own parser and merge."""
    from flwr.common.config import fuse_dicts, parse_config_args

    from simulations.launcher import PROJECT_ROOT, write_run_config

    declared = flatten_dict(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    path = write_run_config(cfg, tmp_path / "flwr home", resume=resume)
    return fuse_dicts(declared, parse_config_args([str(path)]))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_flower_run_config_with_awkward_paths(name: str, tmp_path: Path) -> None:
    # Prepare: a data root and run dir with spaces, quotes, '=' and non-ASCII, and non-default values
    root = tmp_path / 'scans of "site A" = 2026 é'
    cfg = replace(get_preset(name), seed=7, run_dir=str(tmp_path / "run dir; x=1"), prior="",
                  data=replace(get_preset(name).data, root=str(root)),
                  privacy=replace(get_preset(name).privacy, target_epsilon=None))
    # Execute
    run_config = _through_flower(cfg, tmp_path, resume=True)
    again = RunConfig.from_run_config(run_config)
    # Assert
    assert again == cfg
    assert run_config["resume"] is True
    assert run_config["data.root"] == str(root)


def test_pyproject_declares_every_config_field() -> None:
    # Prepare
    from simulations.launcher import PROJECT_ROOT

    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # Assert: the section is exactly the generated one (regenerate with common.core.config.run_config_declaration)
    assert declared == tomllib.loads(run_config_declaration())["tool"]["flwr"]["app"]["config"]
    assert set(flatten_dict(declared)) == set(get_preset("demo").to_flat()) | {"resume"}


def test_declared_empty_values_take_the_presets_and_set_keys_override_them() -> None:
    # Prepare: pyproject's defaults with two keys set, as `flwr run --run-config 'preset="demo" train.local-steps=5'`
    declared = flatten_dict(tomllib.loads(run_config_declaration())["tool"]["flwr"]["app"]["config"])
    run_config = {**declared, "preset": "demo", "train.local-steps": 5, "privacy.target-epsilon": "none"}
    # Execute
    cfg = RunConfig.from_run_config(run_config)
    # Assert
    demo = get_preset("demo")
    assert cfg.train.local_steps == 5 and cfg.privacy.target_epsilon is None
    assert cfg.generator == demo.generator and cfg.data == demo.data


def test_undeclared_run_config_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'train.local-stepz'"):
        RunConfig.from_run_config({"preset": "smoke", "train.local-stepz": 3})


def test_ghost_clipping_with_noise_multiplicity_is_refused() -> None:
    with pytest.raises(ConfigError, match="ghost"):
        RunConfig.from_flat({"preset": "smoke", "privacy.grad-sample-mode": "ghost"})


def test_data_presets_set_source_and_site_split_and_later_overrides_win(tmp_path) -> None:
    # Prepare
    from simulations.cli import build_config

    # Execute
    african = build_config("demo", [], data="african", data_root=str(tmp_path))
    hc18 = build_config("smoke", ["data.num-sites=3"], data="hc18", data_root=str(tmp_path))
    fpdb = build_config("demo", ["data.partition=dirichlet"], data="fetal_planes_db", data_root=str(tmp_path))
    phantom = build_config("demo", [], data="phantom")
    # Assert: countries / machines are the natural sites, HC18 is split by patient, --set still overrides
    assert (african.data.source, african.data.partition, african.data.root) == ("african", "natural", str(tmp_path))
    # real scans run at 64 px at least (the demo's 32 px is raised, paper's 128 kept, --set still wins); the African
    # preset stands on the encoder that has seen public real scans
    assert african.data.image_size == 64 and hc18.data.image_size == 64 and fpdb.data.image_size == 64
    assert build_config("paper", [], data="african", data_root=str(tmp_path)).data.image_size == 128
    assert build_config("demo", ["data.image-size=32"], data="african", data_root=str(tmp_path)).data.image_size == 32
    assert phantom.data.image_size == 32
    assert african.train.downstream_backbone == "public_cnn"
    # besides the backbone, the African preset only keeps its DP classifier off the release (chosen by CV)
    assert african.train.release_models == "regressor"
    assert replace(african.train, downstream_backbone="phantom_cnn", release_models="classifier,regressor") == \
        build_config("demo", []).train
    # no GA label in the African set: the regressor's share goes to the classifier; HC18 (one plane): the converse
    assert (african.privacy.budget_classifier, african.privacy.budget_regressor) == (0.39, 0.01)
    assert (hc18.privacy.budget_classifier, hc18.privacy.budget_regressor) == (0.01, 0.39)
    assert (hc18.data.source, hc18.data.partition, hc18.data.num_sites) == ("hc18", "iid", 3)
    # the HC18 regressor trains its head alone (the spacing FiLM stays at zero), with Adam at 0.003 (patient-grouped CV)
    assert (hc18.train.regressor_film, hc18.train.rate("regressor")) == (False, (0.003, "adam"))
    assert african.train.regressor_film and build_config("demo", []).train.regressor_film
    assert (fpdb.data.source, fpdb.data.partition) == ("fetal_planes_db", "dirichlet")
    assert phantom == build_config("demo", [])
    # the consortium's label scope follows the data: four fetal planes (African), brain only (HC18), all six
    assert african.data.plane_scope() == (0, 1, 2, 3)
    assert hc18.data.plane_scope() == (0,)
    assert fpdb.data.plane_scope() == phantom.data.plane_scope() == tuple(range(6))
    with pytest.raises(ConfigError, match="unknown plane.*fetal_brain"):
        build_config("demo", ["data.planes=fetal_brain,heart"])
    with pytest.raises(ConfigError, match="--data-root"):
        build_config("demo", [], data="african")
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        build_config("demo", [], data="mnist", data_root=str(tmp_path))


def _float_keys() -> list[str]:
    """Every ``float`` or ``float | None`` field, as a flat key."""
    from dataclasses import fields

    cfg = get_preset("smoke")
    return sorted(f"{section}.{f.name.replace('_', '-')}" for section in ("data", "generator", "sampling", "privacy",
                                                                          "train", "federation")
                  for f in fields(getattr(cfg, section)) if "float" in str(f.type))


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_floats_are_refused_for_every_float_key(key: str, value: object) -> None:
    # Prepare / Execute / Assert: refused at config time, naming the key as it was written and the fix
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}.*not a finite number.*finite value"):
        RunConfig.from_flat({"preset": "smoke", key: value})


def test_non_finite_floats_are_refused_when_a_config_is_rebuilt_from_a_dict() -> None:
    # Prepare: a saved config.json edited by hand (json.loads reads NaN)
    d = get_preset("smoke").to_dict()
    d["privacy"]["target_epsilon"] = float("nan")
    # Execute / Assert
    with pytest.raises(ConfigError, match="privacy.target_epsilon.*not a finite number"):
        RunConfig.from_dict(d)


def test_data_root_without_a_real_data_preset_is_an_error(tmp_path) -> None:
    # Prepare
    from simulations.cli import build_config

    # Execute / Assert: a phantom run never reads the folder, so passing one is a mistake to report
    with pytest.raises(ConfigError, match="--data-root.*--data african"):
        build_config("smoke", [], data_root=str(tmp_path))
    with pytest.raises(ConfigError, match="--data-root.*phantom"):
        build_config("smoke", [], data="phantom", data_root=str(tmp_path))
    assert build_config("smoke", [], data="hc18", data_root=str(tmp_path)).data.root == str(tmp_path)


@pytest.mark.parametrize(
    ("key", "choices"),
    [("data.source", ["phantom", "african", "fetal_planes_db", "hc18"]), ("privacy.accountant", ["rdp", "prv"]),
     ("privacy.grad-sample-mode", ["hooks", "functorch", "ghost"]),
     ("federation.al-acquisition", ["uncertainty", "kcenter", "random"]), ("sampling.scheduler", ["ddpm", "ddim", "dpmsolver"])],
)
def test_a_choice_outside_its_literal_type_is_refused_with_the_choices(key: str, choices: list[str]) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"is not allowed; choose one of {choices}")):
        get_preset("smoke").from_flat({"preset": "smoke", key: "bogus"})


def test_the_budget_split_is_config_and_reaches_the_sites_ledger(tmp_path: Path) -> None:
    # Prepare
    from common.privacy.site_state import SiteStateStore

    cfg = RunConfig.from_flat({"preset": "smoke", "privacy.budget-generator": 0.5, "privacy.budget-classifier": 0.3})
    store = SiteStateStore(tmp_path / "site")
    # Execute
    ledger = store.load_ledger(before_round=1, privacy=cfg.privacy)
    store.save_ledger(1, ledger, info={})
    other = replace(cfg.privacy, budget_generator=0.6, budget_classifier=0.2)
    # Assert: the ledger enforces the configured shares; a resumed site with another split is refused
    assert ledger.budget_split == {"generator": 0.5, "classifier": 0.3, "regressor": 0.2}
    assert ledger.budget("generator")[0] == pytest.approx(0.5 * cfg.privacy.target_epsilon)
    with pytest.raises(ConfigError, match="a run keeps one split"):
        store.load_ledger(before_round=2, privacy=other)
    with pytest.raises(ConfigError, match="sum to at most 1"):
        RunConfig.from_flat({"preset": "smoke", "privacy.budget-generator": 0.9})


@pytest.mark.parametrize(("every", "drawn"), [(0, [5]), (2, [2, 4, 5]), (1, [1, 2, 3, 4, 5])])
def test_the_sample_grid_is_drawn_after_the_last_round_and_every_kth(every: int, drawn: list[int]) -> None:
    fed = RunConfig.from_flat({"preset": "smoke", "federation.num-rounds": 5,
                               "federation.sample-grid-every": every}).federation
    assert [r for r in range(1, 6) if fed.draws_sample_grid(r)] == drawn
    with pytest.raises(ConfigError, match="federation.sample_grid_every"):
        RunConfig.from_flat({"preset": "smoke", "federation.sample-grid-every": -1})


def test_the_demo_command_runs_the_64px_demo_whose_settings_differ_from_the_demo_preset_as_documented() -> None:
    from simulations.cli import make_parser

    assert make_parser().parse_args(["demo"]).preset == "demo64"
    assert make_parser().parse_args(["simulate"]).preset == "smoke"
    demo, demo64 = get_preset("demo").to_flat(), get_preset("demo64").to_flat()
    changed = {k: (demo[k], demo64[k]) for k in demo if demo[k] != demo64[k]}
    assert changed == {"preset": ("demo", "demo64"), "data.image-size": (32, 64), "privacy.noise-multiplicity": (4, 2),
                       "sampling.num-inference-steps": (20, 12)}
