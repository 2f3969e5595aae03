"""Image-grid PNG writer: exact layout, readability, value conversion, atomic write, input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.core.viz import LINE_HEIGHT, save_grid, to_uint8


def test_grid_without_labels_has_the_documented_size_and_cells(tmp_path: Path) -> None:
    # Prepare: 2 rows x 3 columns of 8x10 images, scale 2, gutter 2
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 256, (8, 10), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    # Execute
    path = save_grid(images, tmp_path / "grid.png", scale=2, pad=2)
    # Assert
    with Image.open(path) as im:
        assert im.size == (2 + 3 * (20 + 2), 2 + 2 * (16 + 2))
        arr = np.asarray(im.convert("L"))
    assert np.array_equal(arr[2:18, 2:22], np.kron(images[0][0], np.ones((2, 2), np.uint8)))
    second_row_third_col = arr[2 + 18:2 + 18 + 16, 2 + 2 * 22:2 + 2 * 22 + 20]
    assert np.array_equal(second_row_third_col, np.kron(images[1][2], np.ones((2, 2), np.uint8)))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left behind


def test_labels_title_and_captions_add_bands_and_text(tmp_path: Path) -> None:
    # Prepare
    images = [[np.zeros((16, 16), np.uint8)] * 2] * 2
    # Execute
    plain = save_grid(images, tmp_path / "plain.png")
    labelled = save_grid(images, tmp_path / "labelled.png", row_labels=["brain", "femur"], col_labels=["a", "b"],
                         title="Phantoms", cell_captions=[["x", "y"], ["z", "w"]])
    # Assert
    with Image.open(plain) as p, Image.open(labelled) as q:
        assert q.size[1] == p.size[1] + 2 * LINE_HEIGHT + 2 * LINE_HEIGHT  # title + column labels + 2 captions
        assert q.size[0] > p.size[0]  # room for the row labels
        top_band = np.asarray(q.convert("L"))[:LINE_HEIGHT]
    assert top_band.min() < 128  # dark title text on the white band


def test_float_images_in_minus_one_one_and_rgb_are_accepted(tmp_path: Path) -> None:
    # Prepare
    ramp = np.linspace(-1.0, 1.0, 16, dtype=np.float32)[None, :].repeat(4, axis=0)
    rgb = np.zeros((4, 16, 3), np.uint8)
    rgb[..., 0] = 255
    # Execute
    path = save_grid([[ramp, rgb]], tmp_path / "mixed.png", scale=1, pad=0)
    # Assert
    assert to_uint8(np.array([[-1.0, 0.0, 1.0]]))[0].tolist() == [0, 128, 255]
    with Image.open(path) as im:
        arr = np.asarray(im)
    assert arr.shape == (4, 32, 3)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[0, 15].tolist() == [255, 255, 255]
    assert arr[0, 20].tolist() == [255, 0, 0]


def test_bad_input_raises_value_error(tmp_path: Path) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="images is empty"):
        save_grid([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="scale=0"):
        save_grid([[np.zeros((4, 4), np.uint8)]], tmp_path / "x.png", scale=0)
    with pytest.raises(ValueError, match=r"shape \(4, 4, 2\)"):
        save_grid([[np.zeros((4, 4, 2), np.uint8)]], tmp_path / "x.png")


def test_long_and_multiline_captions_widen_columns_and_do_not_overlap(tmp_path: Path) -> None:
    # Prepare: 8x8 images (16 px at scale 2) with captions much wider than a cell, on three lines
    images = [[np.zeros((8, 8), np.uint8)] * 3]
    captions = [["q 0.91\nu 0.40\nsite0-voluson"] * 3]
    # Execute
    path = save_grid(images, tmp_path / "captions.png", cell_captions=captions, scale=2, pad=2)
    # Assert: three caption lines of band, and every caption ends before the next column starts
    with Image.open(path) as im:
        width, height = im.size
        arr = np.asarray(im.convert("L"))
    assert height == 2 + 16 + 3 * LINE_HEIGHT + 2
    col_w = (width - 2) // 3 - 2
    assert col_w > 16  # widened beyond the image for the text
    band = arr[2 + 16:, :]
    for c in range(3):
        x0 = 2 + c * (col_w + 2)
        ink = np.flatnonzero((band[:, x0:x0 + col_w] < 128).any(axis=0))
        assert ink.size and ink.max() < col_w  # the caption is inside its own column
        assert (band[:, x0 + col_w:x0 + col_w + 2] == 255).all()  # the gutter between columns stays blank
    assert (band[2 * LINE_HEIGHT:, 2:2 + col_w] < 128).any()  # the third line was drawn


def test_plot_series_plots_finite_values_and_notes_a_panel_without_any() -> None:
    # Prepare
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.core.viz import plot_series

    fig, (a, b) = plt.subplots(1, 2)
    # Execute
    plotted = plot_series(a, [1, 2, 3], [0.5, None, 0.7])
    empty = plot_series(b, [1, 2, 3], [None, float("nan"), None])
    # Assert: one line with the gap kept as NaN; the empty panel has a note and no line
    assert plotted and len(a.lines) == 1 and np.isnan(a.lines[0].get_ydata()[1])
    assert not empty and not b.lines and "no values" in b.texts[0].get_text()
    plt.close(fig)
