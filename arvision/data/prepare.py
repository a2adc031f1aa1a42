"""``prepare``: a source's images → normalised, deduplicated, split Parquet shards + manifest.

Every image is decoded, converted to ``data.channels`` (transparency composited on white),
resized on its shorter side and centre-cropped to ``data.resolution``, and re-encoded as PNG
(no metadata, fixed compression). Its ``id`` is a hash of the processed pixels, so duplicates
collapse and the split depends on content only, never on the order the source yields.

The split: ``key % 10_000 < val_fraction * 10_000`` → val, where ``key = int(id, 16)`` for
``seed == 0`` and ``key = int(sha256(f"{seed}:{id}")[:32], 16)`` otherwise (the seed salts the
split; seed 0 is the plain rule). If that leaves a split empty (tiny data sets), the one image
nearest the boundary moves over, so both splits always hold at least one image.

Output is built in a temporary folder next to ``out_dir`` and renamed into place at the end:
an interrupted run leaves nothing a later run would trust. The same source and params give
byte-identical files (with the same Pillow, zlib and pyarrow).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from tqdm import tqdm

from arvision.config import DataConfig
from arvision.data.parquet_io import PREPARED_SCHEMA, write_shards
from arvision.data.sources import Record, open_source
from arvision.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the prepared layout + manifest
PNG_COMPRESS_LEVEL = 6  # zlib level: fixed, so the same pixels give the same bytes
BUCKETS = 10_000  # split resolution: val_fraction is honoured to 1e-4
_CHUNK = 512  # images per progress update


# --------------------------------------------------------------------------- one image


def _to_pil(data: Union[bytes, np.ndarray]) -> Image.Image:
    if isinstance(data, np.ndarray):
        arr = data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {arr.dtype}")
        return Image.fromarray(arr)
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now: a truncated or corrupt file fails here
    return ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img


def normalise(data: Union[bytes, np.ndarray], resolution: int, channels: int) -> np.ndarray:
    """Decode and normalise one image → ``uint8`` ``(resolution, resolution, channels)``."""
    img = _to_pil(data)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / float: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        # Lanczos to shrink (sharp, little aliasing); bicubic to enlarge (less ringing)
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)


def encode_png(arr: np.ndarray) -> bytes:
    """``uint8`` ``(H, W, C)`` → deterministic PNG bytes (no metadata chunks, fixed compression)."""
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def content_id(arr: np.ndarray) -> str:
    """The image id: sha256 of the processed pixel bytes, first 16 bytes as 32 hex characters."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]


def split_key(image_id: str, seed: int) -> int:
    """The number whose ``% 10_000`` decides the split (module docstring)."""
    if seed == 0:
        return int(image_id, 16)
    return int(hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()[:32], 16)


def is_val(image_id: str, seed: int, val_fraction: float) -> bool:
    """Whether ``image_id`` goes to the validation split."""
    return split_key(image_id, seed) % BUCKETS < val_fraction * BUCKETS


def _process(record: Record, resolution: int, channels: int) -> tuple[str, Optional[str], Optional[bytes], int]:
    """(origin, data, label) → (origin, id or None if undecodable, png, label)."""
    origin, data, label = record
    try:
        arr = normalise(data, resolution, channels)
    except Exception:  # any undecodable input is skipped and counted, never fatal on its own
        return origin, None, None, label
    return origin, content_id(arr), encode_png(arr), label


# --------------------------------------------------------------------------- the data set


def _balance(splits: dict[str, list[str]], seed: int) -> None:
    """Make sure neither split is empty (when there are >= 2 images): move the image nearest the
    boundary. Deterministic, and a no-op for any data set of realistic size."""
    bucket = lambda i: split_key(i, seed) % BUCKETS  # noqa: E731
    if not splits["val"] and len(splits["train"]) >= 2:
        moved = min(splits["train"], key=lambda i: (bucket(i), i))
        splits["train"].remove(moved)
        splits["val"].append(moved)
    elif not splits["train"] and len(splits["val"]) >= 2:
        moved = max(splits["val"], key=lambda i: (bucket(i), i))
        splits["val"].remove(moved)
        splits["train"].append(moved)
    for ids in splits.values():
        ids.sort()


def _atomic_replace(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(cfg: DataConfig, seed: int, out_dir: Union[str, Path], progress: bool = True) -> dict[str, Any]:
    """Run ``prepare``: read ``cfg.source``, write ``out_dir/{train,val}/part-*.parquet`` and
    ``out_dir/manifest.json`` (docs/architecture.md, "Prepared data"). Returns the manifest.

    One process: MNIST's 70k images take ~12 s on one core, so a worker pool (and its start-up
    and ``__main__``-guard pitfalls) is not worth it.
    Raises UserError for a missing path or column, or a source with no usable image.
    """
    out_dir = Path(out_dir)
    source = open_source(cfg.source, cfg.path, cfg.image_column, cfg.label_column, label_from=cfg.label_from)

    rows: dict[str, tuple[bytes, int]] = {}  # id → (png, label); the first occurrence wins
    skipped: list[str] = []
    seen = 0
    with tqdm(total=source.count, desc=f"prepare {cfg.source}", unit="img", disable=not progress) as bar:
        for record in source.records():
            origin, image_id, png, label = _process(record, cfg.resolution, cfg.channels)
            seen += 1
            if image_id is None:
                skipped.append(origin)
            elif image_id not in rows:
                rows[image_id] = (png, label)
            if seen % _CHUNK == 0:
                bar.update(_CHUNK)
        bar.update(seen - bar.n)
    if skipped:
        msg = f"prepare: skipped {len(skipped)} image(s) that could not be decoded, e.g. {', '.join(skipped[:5])}"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    if not rows:
        where = f" at '{cfg.path}'" if cfg.path else ""
        raise UserError(
            f"data source '{cfg.source}'{where} has no usable image ({seen} found, {len(skipped)} could not be decoded)"
        )

    ids = sorted(rows)
    if cfg.max_images is not None:
        ids = ids[: cfg.max_images]  # the lowest ids: a fixed pseudo-random subset
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i in ids:
        splits["val" if is_val(i, seed, cfg.val_fraction) else "train"].append(i)
    _balance(splits, seed)

    digest = hashlib.sha256()  # over split, id and label of every row, in file order
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for split, split_ids in splits.items():
            table = pa.Table.from_arrays(
                [
                    pa.array(split_ids, pa.string()),
                    pa.array([rows[i][0] for i in split_ids], pa.binary()),
                    pa.array([rows[i][1] for i in split_ids], pa.int32()),
                ],
                schema=PREPARED_SCHEMA,
            )
            write_shards(table, tmp / split, cfg.shard_size)
            for i in split_ids:
                digest.update(f"{split}\t{i}\t{rows[i][1]}\n".encode())
        labels = sorted({rows[i][1] for i in ids})
        manifest = {
            "format": FORMAT_VERSION,
            "source": cfg.source,
            "path": cfg.path,  # as given: absolute paths would make the manifest machine-dependent
            "counts": {split: len(v) for split, v in splits.items()},
            "resolution": cfg.resolution,
            "channels": cfg.channels,
            "class_names": source.class_names,
            "num_classes": len(source.class_names),  # 0: unlabelled
            "unlabelled": sum(1 for i in ids if rows[i][1] < 0),
            "labels_present": labels,
            "images_in_source": seen,
            "skipped": len(skipped),
            "duplicates": seen - len(skipped) - len(rows),
            "capped": len(rows) - len(ids),
            "content_hash": digest.hexdigest(),
            "split_rule": "val iff key % 10000 < val_fraction * 10000; key = int(id, 16) if seed == 0 "
                          "else int(sha256(f'{seed}:{id}')[:32], 16)",
            "columns": {f.name: str(f.type) for f in PREPARED_SCHEMA},
            "params": {"seed": seed, "data": cfg.model_dump(mode="json")},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _atomic_replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
