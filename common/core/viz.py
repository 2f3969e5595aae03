"""Image-grid PNG writer (Pillow only) for phantoms, samples and releases.

Layout of :func:`save_grid` (all in output pixels): a ``pad``-pixel gutter around and between cells; a title
band of ``line_height`` on top if ``title``; a column-label band of ``line_height`` if ``col_labels``; a
row-label column as wide as the widest row label (+ ``pad``) if ``row_labels``; a caption band of
``line_height`` per caption line (captions may hold ``\n``) under every row if ``cell_captions``. Cells are
``scale`` times the largest image, and columns widen to the longest caption line so captions never overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.core.atomic_io import atomic_path

FONT_SIZE = 11
LINE_HEIGHT = 14


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a grayscale or RGB image to ``uint8``: ``uint8`` passes, floats are read as [-1, 1].

    Parameters
    ----------
    image:
        ``(H, W)`` or ``(H, W, 3)`` array; ``uint8``, bool or float in [-1, 1].

    Returns
    -------
    np.ndarray
        ``uint8`` array of the same shape.
    """
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"image of shape {arr.shape} is not supported; give (H, W) or (H, W, 3)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        return np.clip(arr, 0, 255).astype(np.uint8)
    return np.clip((arr.astype(np.float64) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def save_grid(images: Sequence[Sequence[np.ndarray]], path: Path, *, row_labels: Sequence[str] = (),
              col_labels: Sequence[str] = (), title: str = "",
              cell_captions: Sequence[Sequence[str]] | None = None, scale: int = 2, pad: int = 2) -> Path:
    """Write a labelled grid of images as a PNG, atomically (:func:`common.core.atomic_io.atomic_path`).

    Parameters
    ----------
    images:
        Rows of images (rows may be ragged; missing cells stay blank); ``uint8`` or float in [-1, 1],
        grayscale ``(H, W)`` or RGB ``(H, W, 3)``.
    path:
        Output ``.png`` path; its folder is created.
    row_labels, col_labels, title:
        Optional text left of each row, above each column and above the grid.
    cell_captions:
        Optional text under each cell (same ragged shape as ``images``); ``\n`` starts a new line.
    scale:
        Integer nearest-neighbour magnification of every image (>= 1).
    pad:
        Gutter in pixels (>= 0).

    Returns
    -------
    Path
        ``path``.
    """
    if not images or not any(len(r) for r in images):
        raise ValueError("images is empty; give at least one row with one image")
    if scale < 1 or pad < 0:
        raise ValueError(f"scale={scale} must be >= 1 and pad={pad} >= 0")
    cells = [[to_uint8(im) for im in row] for row in images]
    rgb = any(c.ndim == 3 for row in cells for c in row)
    font = ImageFont.load_default(size=FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    lines = [str(t).split("\n") for row in (cell_captions or []) for t in row]
    caption_w = max((int(measure.textlength(line, font=font)) + 2 for cap in lines for line in cap), default=0)
    ch = max(c.shape[0] for row in cells for c in row) * scale
    cw = max(max(c.shape[1] for row in cells for c in row) * scale, caption_w)
    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    label_w = max((int(measure.textlength(str(t), font=font)) for t in row_labels), default=0)
    left = label_w + pad if row_labels else 0
    top = (LINE_HEIGHT if title else 0) + (LINE_HEIGHT if col_labels else 0)
    cap = LINE_HEIGHT * max((len(c) for c in lines), default=1) if cell_captions is not None else 0
    width = left + pad + n_cols * (cw + pad)
    height = top + pad + n_rows * (ch + cap + pad)
    canvas = Image.new("RGB" if rgb else "L", (width, height), (255, 255, 255) if rgb else 255)
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if rgb else 0
    if title:
        draw.text((left + pad, 1), title, fill=ink, font=font)
    for c, text in enumerate(col_labels[:n_cols]):
        draw.text((left + pad + c * (cw + pad), top - LINE_HEIGHT + 1), str(text), fill=ink, font=font)
    for r, row in enumerate(cells):
        y = top + pad + r * (ch + cap + pad)
        if r < len(row_labels):
            draw.text((0, y + ch // 2 - LINE_HEIGHT // 2), str(row_labels[r]), fill=ink, font=font)
        for c, cell in enumerate(row):
            big = np.kron(cell, np.ones((scale, scale) + ((1,) if cell.ndim == 3 else ()), np.uint8))
            tile = Image.fromarray(big)
            canvas.paste(tile.convert(canvas.mode), (left + pad + c * (cw + pad), y))
            if cell_captions is not None and r < len(cell_captions) and c < len(cell_captions[r]):
                for i, line in enumerate(str(cell_captions[r][c]).split("\n")):
                    draw.text((left + pad + c * (cw + pad), y + ch + 1 + i * LINE_HEIGHT), line, fill=ink, font=font)
    path = Path(path)
    with atomic_path(path, mode=0o644) as tmp:  # a figure is meant to be read
        canvas.save(tmp, format="PNG")
    return path


def plot_series(ax: Any, x: Sequence[float], values: Sequence[float | None], **kw: Any) -> bool:
    """Plot ``values`` against ``x`` on a matplotlib axis; when none is finite, say so in the frame instead.

    Returns whether anything was plotted (a GA panel on data without GA labels is left with a note, not an
    empty frame that reads as zero).
    """
    y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    if not np.isfinite(y).any():
        ax.text(0.5, 0.5, "no values\n(no such labels in this data)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
        if len(x):
            ax.set_xlim(min(x) - 0.5, max(x) + 0.5)
        return False
    ax.plot(list(x), y, marker="o", **kw)
    return True
