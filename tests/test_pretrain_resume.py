"""Pretraining resumes after an interruption and equals an uninterrupted run; the sidecar lists its public data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.analysis.pretrain import CHECKPOINT_FILE, checkpoint_dir, parse_public_data, pretrain_prior
from common.core.config import get_preset
from common.models.generator import load_generator


def _cfg(steps: int = 6, seed: int = 3):
    cfg = get_preset("smoke").to_dict()
    cfg["train"] = {**cfg["train"], "pretrain_steps": steps}
    return get_preset("smoke").__class__.from_dict({**cfg, "seed": seed})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load_generator(folder / "generator")
    return model.state_dict()


def _hc18(root: Path, n: int = 4) -> Path:
    (root / "training_set").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["filename,pixel size(mm),head circumference (mm)"]
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(root / "training_set" / f"{k:03d}_HC.png")
        lines.append(f"{k:03d}_HC.png,0.15,{150 + 10 * k}")
    (root / "training_set_pixel_size_and_HC.csv").write_text("\n".join(lines) + "\n")
    return root


def test_resumed_after_a_stop_equals_an_uninterrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare
    full = pretrain_prior(_cfg(), tmp_path / "full", command="full")

    # Execute: a first sitting stops after 3 of 6 steps (checkpointed), a second call resumes to the end
    first = pretrain_prior(_cfg(), tmp_path / "resumed", checkpoint_every=2, stop_after=3)
    state = checkpoint_dir(tmp_path / "resumed") / CHECKPOINT_FILE
    assert first is None and state.is_file() and not (tmp_path / "resumed").exists()
    resumed = pretrain_prior(_cfg(), tmp_path / "resumed", resume=True, checkpoint_every=2)

    # Assert
    assert "resumed at step 3/6" in capsys.readouterr().out
    assert resumed is not None and not state.exists()
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    ja = json.loads((full / "sidecar.json").read_text())
    jb = json.loads((resumed / "sidecar.json").read_text())
    assert ja["training"]["generator"]["last_loss"] == pytest.approx(jb["training"]["generator"]["last_loss"])
    assert jb["resumed"] is True and ja["command"] == "full"


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    # Prepare
    assert pretrain_prior(_cfg(), tmp_path / "p", stop_after=2) is None

    # Execute / Assert
    with pytest.raises(ValueError, match="another run"):
        pretrain_prior(_cfg(seed=4), tmp_path / "p", resume=True)


def test_public_data_is_trained_on_and_listed_in_the_sidecar(tmp_path: Path) -> None:
    # Prepare
    root = _hc18(tmp_path / "HC18")

    # Execute
    out = pretrain_prior(_cfg(steps=2), tmp_path / "p", public_data=[f"hc18:{root}"], command="cmd")
    sidecar = json.loads((out / "sidecar.json").read_text())

    # Assert
    sources = sidecar["data"]["sources"]
    assert [s["source"] for s in sources] == ["phantom", "hc18"]
    assert sources[1]["images"] == 4 and sources[1]["folder"] == str(root) and len(sources[1]["digest"]) == 64
    assert sources[0]["seed"] == 3 and sidecar["data"]["images"] == sources[0]["images"] + 4
    assert sidecar["command"] == "cmd" and sidecar["seed"] == 3
    with pytest.raises(ValueError, match="LAYOUT:DIR"):
        parse_public_data("nocolon")
