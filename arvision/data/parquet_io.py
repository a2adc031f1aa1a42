"""Parquet shards: one writer configuration for every stage, and fast image loading.

Shards are named ``<prefix>-00000.parquet``, ``<prefix>-00001.parquet``, ... and hold
``shard_size`` rows each (the last one fewer), one row group a shard. The writer options
live in :data:`WRITE_OPTIONS` only, so that the same table always gives the same bytes
(with the same pyarrow version): no timestamps, fixed compression and page settings.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator, Optional

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


class ShardWriter:
    """:func:`write_shards` one batch at a time: rows are buffered until a shard is full (at most
    ``shard_size`` rows held), so a stage streams any number of rows in bounded memory. Gives the
    same files, byte for byte, as :func:`write_shards` on the concatenated table. ``close()``
    writes the last, partial shard (an empty shard when no row came) and returns the paths.
    """

    def __init__(self, out_dir: str | Path, schema: pa.Schema, shard_size: int, prefix: str = "part",
                 metadata: Optional[dict[str, str]] = None) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if metadata:
            merged = dict(schema.metadata or {})
            merged.update({k.encode(): v.encode() for k, v in metadata.items()})
            schema = schema.with_metadata(merged)
        self.out_dir, self.schema, self.shard_size, self.prefix = Path(out_dir), schema, shard_size, prefix
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.paths: list[Path] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if not table.schema.equals(self.schema, check_metadata=False):
            table = table.cast(self.schema)
        table = table.replace_schema_metadata(self.schema.metadata)
        self.buffer.append(table)
        self.buffered += table.num_rows
        self.rows += table.num_rows
        while self.buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.buffer) if self.buffer else self.schema.empty_table()
        path = self.out_dir / shard_name(len(self.paths), self.prefix)
        write_table(table.slice(0, n).combine_chunks(), path)
        self.paths.append(path)
        rest = table.slice(n)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[Path]:
        if self.buffered or not self.paths:
            self._flush(self.buffered)
        return self.paths


def iter_images(
    split_dir: str | Path, batch_size: int, columns: tuple[str, ...] = ("id", "image", "label"),
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """A prepared split decoded ``batch_size`` rows at a time, in file order: ``(ids, images
    uint8 (b, H, W, C), labels int32 (b,))``. Memory: one batch (and one Parquet row group)."""
    for path in shard_paths(split_dir):
        pf = pq.ParquetFile(str(path))
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
            ids = batch.column("id").to_pylist()
            labels = batch.column("label").to_numpy().astype(np.int32)
            blobs = batch.column("image").to_pylist()
            images = np.stack([decode_png(b) for b in blobs]) if blobs else np.zeros((0, 0, 0, 0), np.uint8)
            yield ids, images, labels


def split_rows(split_dir: str | Path) -> int:
    """Rows in a split's shards, from the Parquet footers only (0 when there are none)."""
    return sum(pq.ParquetFile(str(f)).metadata.num_rows for f in sorted(Path(split_dir).glob("*.parquet")))


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


def read_parquet_files(batch: dict[str, Any], columns: Optional[list[str]] = None) -> pa.Table:
    """A Ray Data task: the rows of the Parquet files named in ``batch["path"]``, in order."""
    return pa.concat_tables([pq.read_table(str(p), columns=columns) for p in batch["path"]])


def decode_png_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray Data task (the ``tokens`` stage's decoding): prepared rows (``id``, ``image`` PNG
    bytes, ``label``) → ``id``, ``label``, ``pixels`` uint8 ``(b, H, W, C)``."""
    return {"id": batch["id"], "label": batch["label"], "pixels": np.stack([decode_png(b) for b in batch["image"]])}


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


# ----------------------------------------------------------------------------------------------
# Streaming readers: a split in bounded memory (one batch, one shard, a fixed-size cache).


def iter_image_batches(
    split_dir: str | Path, batch_size: int, limit: Optional[int] = None,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """:func:`iter_images` cut into batches of exactly ``batch_size`` rows across shard
    boundaries (the last one fewer): the batches ``load_images(split_dir)[k][i : i + batch_size]``
    would give, so a model sees the same batches as on the whole array. ``limit``: the first
    rows only. Memory: one batch (and one Parquet row group)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids: list[str] = []
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    held = 0
    left = limit  # rows still wanted; None: all
    for b_ids, b_images, b_labels in iter_images(split_dir, batch_size):
        if not len(b_ids):
            continue
        if left is not None:
            if left <= 0:
                break
            b_ids, b_images, b_labels = b_ids[:left], b_images[:left], b_labels[:left]
            left -= len(b_ids)
        ids += b_ids
        images.append(b_images)
        labels.append(b_labels)
        held += len(b_ids)
        while held >= batch_size:
            x, y = (np.concatenate(images) if len(images) > 1 else images[0]), np.concatenate(labels)
            yield ids[:batch_size], x[:batch_size], y[:batch_size]
            ids, images, labels, held = ids[batch_size:], [x[batch_size:]], [y[batch_size:]], held - batch_size
    if held:
        yield ids, np.concatenate(images), np.concatenate(labels)


def split_labels(split_dir: str | Path, limit: Optional[int] = None) -> np.ndarray:
    """The ``label`` column of a split, int32 ``(N,)`` (4 bytes a row; no image is read)."""
    parts = [pq.read_table(str(p), columns=["label"]).column("label").to_numpy() for p in shard_paths(split_dir)]
    labels = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    return labels[:limit] if limit is not None else labels
