"""Parquet shards: one writer configuration for every stage, and fast image loading.

Shards are named ``<prefix>-00000.parquet``, ``<prefix>-00001.parquet``, ... and hold
``shard_size`` rows each (the last one fewer), one row group a shard. The writer options
live in :data:`WRITE_OPTIONS` only, so that the same table always gives the same bytes
(with the same pyarrow version): no timestamps, fixed compression and page settings.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from arvision.errors import UserError

#: Prepared images (stage ``prepare``): the contract in docs/architecture.md, "Prepared data".
PREPARED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # 32 hex chars: sha256 of the pixel bytes, first 16 bytes
        pa.field("image", pa.binary(), nullable=False),  # PNG bytes, (resolution, resolution, channels)
        pa.field("label", pa.int32(), nullable=False),  # class index, -1 when unlabelled
    ]
)

#: The one set of ``pyarrow.parquet.write_table`` options every shard writer uses.
#: PNG bytes do not compress further, token codes and ids do; zstd level 3 is cheap both ways.
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,  # ids are unique, images are opaque bytes: dictionaries only cost
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "store_schema": True,
}


def shard_name(index: int, prefix: str = "part") -> str:
    """The file name of shard ``index``: ``part-00000.parquet`` for index 0."""
    return f"{prefix}-{index:05d}.parquet"


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write one Parquet file with :data:`WRITE_OPTIONS` (a single row group)."""
    pq.write_table(table, str(path), row_group_size=max(1, table.num_rows), **WRITE_OPTIONS)


def write_shards(
    table: pa.Table,
    out_dir: str | Path,
    shard_size: int,
    prefix: str = "part",
    metadata: Optional[dict[str, str]] = None,
) -> list[Path]:
    """Write ``table`` as consecutive shards of ``shard_size`` rows into ``out_dir``.

    The table's own schema (and schema metadata, merged with ``metadata``) is kept, so any
    stage can use this with its own schema. An empty table still gives one (empty) shard,
    so that readers always find the schema. Returns the paths written, in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    paths = []
    n_shards = max(1, -(-table.num_rows // shard_size))  # ceil, and at least one
    for i in range(n_shards):
        path = out_dir / shard_name(i, prefix)
        write_table(table.slice(i * shard_size, shard_size), path)
        paths.append(path)
    return paths


def shard_paths(split_dir: str | Path, prefix: str = "part") -> list[Path]:
    """The shards of a split directory, in order; a UserError if there are none."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: no such directory (has the stage that writes it run?)")
    paths = sorted(split_dir.glob(f"{prefix}-*.parquet"))
    if not paths:
        raise UserError(f"{split_dir}: no {prefix}-*.parquet shards in it")
    return paths


def read_split(split_dir: str | Path, columns: Optional[list[str]] = None) -> pa.Table:
    """All shards of a split directory as one table (rows in shard order)."""
    tables = [pq.read_table(str(p), columns=columns) for p in shard_paths(split_dir)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any Pillow-readable) bytes → ``uint8`` ``(H, W, C)``."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_images(
    split_dir: str | Path, limit: Optional[int] = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Decode a prepared split.

    Returns ``(ids, images, labels)``: ``ids`` a list of N strings, ``images`` ``uint8``
    ``(N, H, W, C)``, ``labels`` ``int32`` ``(N,)``. ``limit`` keeps the first rows (rows are
    sorted by id, so this is a fixed pseudo-random subset).
    """
    table = read_split(split_dir, columns=["id", "image", "label"])
    if limit is not None:
        table = table.slice(0, limit)
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_numpy().astype(np.int32)
    blobs = table.column("image").to_pylist()
    if not blobs:
        res, ch = _shape_from_manifest(Path(split_dir))
        return ids, np.zeros((0, res, res, ch), np.uint8), labels
    first = decode_png(blobs[0])
    images = np.empty((len(blobs), *first.shape), np.uint8)  # (N, H, W, C)
    images[0] = first
    for i in range(1, len(blobs)):
        images[i] = decode_png(blobs[i])
    return ids, images, labels


def _shape_from_manifest(split_dir: Path) -> tuple[int, int]:
    """(resolution, channels) of an empty split, from the manifest next to it if there is one."""
    import json

    manifest = split_dir.parent / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        return int(m["resolution"]), int(m["channels"])
    return 0, 0
