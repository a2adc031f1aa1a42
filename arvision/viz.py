"""Image grids people can look at: samples one row per class, originals beside reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

#: the largest grid :func:`image_grid` draws: 64 Mpx, 192 MiB as RGB (and as much again to encode it)
MAX_GRID_PIXELS = 64 * 2**20


def grid_size(rows: int, cols: int, h: int, w: int, *, scale: int = 2, pad: int = 2, label_width: int = 0) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`image_grid`'s picture of ``rows`` × ``cols``
    images of ``h`` × ``w`` (``label_width``: the margin when rows are named)."""
    return label_width + cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad


def image_grid(
    rows: Sequence[np.ndarray],
    *,
    row_names: Sequence[str] | None = None,
    scale: int = 2,
    pad: int = 2,
    label_width: int = 110,
) -> Image.Image:
    """Lay out rows of uint8 images ``(N, H, W, C)`` into one RGB picture.

    Each row may hold a different number of images; ``scale`` enlarges pixels (nearest) so
    32×32 images stay readable; ``row_names`` are written in a left margin.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    left = label_width if row_names else 0
    size = grid_size(len(rows), cols, h, w, scale=scale, pad=pad, label_width=left)
    if size[0] * size[1] > MAX_GRID_PIXELS:
        raise ValueError(f"image_grid: {size[0]}x{size[1]} pixels is more than MAX_GRID_PIXELS ({MAX_GRID_PIXELS})")
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for r, imgs in enumerate(rows):
        for c, img in enumerate(imgs):
            arr = img if img.shape[-1] == 3 else np.repeat(img, 3, axis=-1)
            tile = Image.fromarray(arr.astype(np.uint8), "RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (left + pad + c * cell_w, pad + r * cell_h))
        if row_names:
            draw.text((4, pad + r * cell_h + cell_h // 2 - 6), str(row_names[r])[:18], fill="black")
    return canvas


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(path: str | Path, rows: Sequence[np.ndarray], **kwargs) -> Path:
    """:func:`image_grid` written as PNG (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, **kwargs).save(path, format="PNG")
    return path


def png_bytes(img: np.ndarray) -> bytes:
    """One uint8 image ``(H, W, C)`` as PNG bytes."""
    import io

    arr = img[..., 0] if img.shape[-1] == 1 else img
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def memorisation_panel(
    samples_u8: np.ndarray, nearest_train_u8: np.ndarray, scores: np.ndarray, path: str | Path, n: int = 8
) -> Path:
    """The ``n`` most copy-like samples (top row) above their nearest training images, each
    column captioned with its copy score (threshold / distance: >= 1 is flagged a copy).

    ``samples_u8`` and ``nearest_train_u8``: uint8 ``(M, H, W, C)``, row i of the second the
    nearest training image of sample i; ``scores``: ``(M,)``. Written as PNG to ``path``.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")[:n]
    scale, pad, label_width = 3, 2, 110  # as image_grid's defaults, but 3× so the text fits under
    grid = image_grid(
        [samples_u8[order], nearest_train_u8[order]],
        row_names=["sample", "nearest train"],
        scale=scale,
        pad=pad,
        label_width=label_width,
    )
    caption_h = 16
    canvas = Image.new("RGB", (grid.width, grid.height + caption_h), "white")
    canvas.paste(grid, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, grid.height), "copy score", fill="black")
    cell_w = samples_u8.shape[2] * scale + pad
    for c, i in enumerate(order):
        s = float(scores[i])
        draw.text((label_width + pad + c * cell_w, grid.height), f"{s:.2f}", fill="red" if s >= 1 else "black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
