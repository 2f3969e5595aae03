"""Score a checkpoint's (or a prior's) classifier and regressor on a dataset folder: a hospital's own test set.

``python -m simulations.cli evaluate FOLDER --data SOURCE --data-root DIR [--split train|test|all] [--json OUT]``
prints (and writes to ``OUT``) one JSON object with exactly the keys of :data:`SCORE_KEYS`:

- ``accuracy``, ``macro_f1``: plane classification over the ``n`` scored images;
- ``per_plane_recall``: ``{plane name: recall}`` for every plane of the model's label scope (``data.planes`` of
  the folder's config; ``null`` where the data has no image of that plane), plus any plane the data holds
  outside the scope (recall 0: the model never predicts it);
- ``ga_mae_days``, ``ga_coverage``, ``ga_interval_width_days``: GA error, and the coverage and mean width of the
  central 90 % Gaussian interval of the regressor (mean +- 1.645 std), as the downstream protocol reports them;
- ``n``: images scored.

A metric the data cannot give (no GA label: African, FETAL_PLANES_DB; no plane of the scope) is JSON ``null``
(standard JSON; Python's ``NaN`` token is not), both on stdout and in ``OUT``.

The metrics are computed by :func:`common.analysis.evaluation.evaluate_models` (the protocol's own code) on one
"site" holding the scored images. User errors (a missing or incomplete model folder, a missing dataset folder,
a corrupt CSV, a split the dataset does not publish) raise :class:`ScoreError` or the loaders'
``FileNotFoundError`` / :class:`DataError`, each saying what to fix.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError

from common.analysis.evaluation import checkpoint_models, evaluate_models
from common.core.config import DataConfig
from common.core.errors import DataError, DifusalError
from common.core.records import UltrasoundRecord
from common.data.loaders import SOURCES, load_source
from common.data.sites import SiteData
from common.models.downstream import DownstreamSpec

SCORE_KEYS: tuple[str, ...] = ("accuracy", "macro_f1", "per_plane_recall", "ga_mae_days", "ga_coverage",
                               "ga_interval_width_days", "n")
SPLITS: tuple[str, ...] = ("train", "test", "all")
COVERAGE_LEVEL = 0.9  # the downstream protocol's interval (EvalSettings.coverage_level)
_MODEL_FILES = ("classifier.safetensors", "regressor.safetensors", "sidecar.json")


class ScoreError(DifusalError, ValueError):
    """The model folder or the requested data cannot be scored; the message says what to fix."""


def model_spec(folder: Path) -> DownstreamSpec:
    """How the models in a checkpoint's or prior's folder are built: a :class:`DownstreamSpec`.

    Read from the run config in its ``sidecar.json`` (``data.image_size``, ``data.planes``, an older config's
    ``federation.al_planes``, neither: all planes; ``train.downstream_*`` and ``train.scattering_*``, a config
    older than frozen backbones: the end-to-end CNN). Only these fields are read, so a prior written by an older
    version of the project (whose other fields no longer validate) still scores.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScoreError(f"model folder {folder} does not exist: pass a checkpoint folder "
                         f"(runs/<run>/checkpoints/round-NNN/) or a prior folder (e.g. common/assets/prior-demo)")
    missing = [name for name in _MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ScoreError(f"model folder {folder} lacks {missing}: it is not a complete checkpoint/prior folder "
                         f"(expected {list(_MODEL_FILES)}, as written by save_bundle)")
    try:
        config = json.loads((folder / "sidecar.json").read_text())["config"]
        data = config["data"]
        planes = data.get("planes", config.get("federation", {}).get("al_planes", ""))
        train = config["train"]
        return DownstreamSpec(image_size=int(data["image_size"]), backbone=str(train.get("downstream_backbone", "cnn")),
                              width=int(train["downstream_width"]), hidden=int(train.get("downstream_hidden", 0)),
                              scattering_j=int(train.get("scattering_j", 2)),
                              scattering_grid=int(train.get("scattering_grid", 2)),
                              planes=DataConfig(planes=planes).plane_scope())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ScoreError(f"{folder / 'sidecar.json'} does not hold a readable run config (config.data.image_size, "
                         f"config.train.downstream_width, config.data.planes): {type(err).__name__}: {err}. Re-copy "
                         f"the folder as it was written") from None


def load_scored_records(source: str, root: str | Path, *, split: str, image_size: int,
                        log: Callable[[str], None] = lambda s: None) -> list[UltrasoundRecord]:
    """The records of ``split`` in the dataset folder ``root`` (published layout of ``source``), fitted to
    ``image_size``; the loader's summary (rows read, skipped and why) goes to ``log``."""
    if source not in SOURCES:
        raise ScoreError(f"--data {source!r} is not a dataset layout; choose one of {list(SOURCES)}")
    if split not in SPLITS:
        raise ScoreError(f"--split {split!r} is not allowed; choose one of {list(SPLITS)}")
    kw: dict[str, Any] = {"split": split}
    if source == "hc18":
        if split == "test":
            raise ScoreError("HC18's published test set has no head-circumference labels, and the HC18 loader reads "
                             "the labelled training_set/ layout only: pass --split all (or train) with a folder in "
                             "that layout (training_set_pixel_size_and_HC.csv + training_set/)")
        kw = {}  # one labelled set, no official split: train and all are the same images
    try:
        loaded = load_source(source, root, image_size=image_size, **kw)
    except csv.Error as err:  # e.g. an unterminated quote: the rest of the file becomes one oversized field
        raise DataError(f"the {source} metadata CSV under {root} is not a readable CSV ({err}); use the file "
                        f"exactly as published (a truncated or hand-edited copy often leaves a quote "
                        f"unclosed)") from None
    log(loaded.report.summary())
    if not loaded.records:
        raise DataError(f"no {split!r} image of {source} could be read at {root}:\n{loaded.report.summary()}")
    return loaded.records


def _json_value(value: Any) -> Any:
    """NaN -> None (JSON ``null``), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def score_folder(folder: Path, source: str, root: str | Path, *, split: str = "test",
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Score the classifier and regressor of ``folder`` on ``split`` of the dataset at ``root``.

    Returns
    -------
    The object of the module docstring: exactly :data:`SCORE_KEYS`, NaN written as ``None``.
    """
    spec = model_spec(folder)
    size, planes = spec.image_size, spec.planes or ()
    try:
        models = checkpoint_models(Path(folder), spec)
    except (RuntimeError, OSError, ValueError, SafetensorError) as err:  # shape errors; bad header, truncated file
        raise ScoreError(f"the weights in {folder} do not load as the models its sidecar.json describes "
                         f"(image size {size}, {spec.backbone} backbone, width {spec.width}): {err}") from None
    records = load_scored_records(source, root, split=split, image_size=size, log=log)
    outside = sum(r.plane not in planes for r in records)
    if outside:
        log(f"{outside} of {len(records)} images have a plane outside the model's label scope; they count as errors")
    site = SiteData(name=f"{source}:{split}", train=[], test=records)
    pooled = evaluate_models({site.name: models}, [site], image_size=size, coverage_level=COVERAGE_LEVEL)["pooled"]
    out = {"accuracy": pooled["accuracy"], "macro_f1": pooled["macro_f1"],
           "per_plane_recall": pooled["per_plane_recall"], "ga_mae_days": pooled["mae_days"],
           "ga_coverage": pooled["coverage"], "ga_interval_width_days": pooled["interval_width_days"],
           "n": pooled["n"]}
    return _json_value(out)
