"""Image grids people can look at: samples one row per class, originals beside reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


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
    canvas = Image.new("RGB", (left + cols * cell_w + pad, len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, imgs in enumerate(rows):
        for c, img in enumerate(imgs):
            arr = img if img.shape[-1] == 3 else np.repeat(img, 3, axis=-1)
            tile = Image.fromarray(arr.astype(np.uint8), "RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (left + pad + c * cell_w, pad + r * cell_h))
        if row_names:
            draw.text((4, pad + r * cell_h + cell_h // 2 - 6), str(row_names[r])[:18], fill="black")
    return canvas


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
