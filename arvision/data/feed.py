"""Feeding prepared splits to trainers and judges in bounded memory: seeded shuffled batches
(:func:`shuffled_batches`, a shuffle buffer of at most :func:`shuffle_buffer_rows` images) and
lazy, sliceable views of a split (:class:`ImageSplit`) that decode on demand with a bounded cache.
Kept apart from :mod:`arvision.data.parquet_io` (which ``prepare`` uses) so that the data stage
does not depend on the training utilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq

from arvision.data.parquet_io import _shape_from_manifest, decode_png, load_images, shard_paths, split_labels, split_rows  # noqa: F401
from arvision.errors import UserError


def shuffle_buffer_rows(batch_size: int, image_bytes: int, max_bytes: int = 1 << 30) -> int:
    """The shuffle buffer of :func:`shuffled_batches` for a trainer's batch: ``max(16 × batch,
    4096)`` images, held to ``max_bytes`` for large images (never under 4 batches)."""
    rows = max(16 * batch_size, 4096)
    return int(max(4 * batch_size, min(rows, max_bytes // max(1, image_bytes))))


def shuffled_batches(
    split_dir: str | Path, batch_size: int, seed: int, buffer_rows: int, *, labels: bool = False,
    part: tuple[int, int] = (0, 1), skip: int = 0,
) -> Iterator[Any]:
    """Endless, seeded batches of a prepared split: uint8 ``(batch, H, W, C)`` (with ``labels``:
    ``(images, labels int32 (batch,))``), in memory bounded by ``buffer_rows`` images.

    A split of at most ``buffer_rows`` rows is decoded whole and drawn as
    :func:`arvision.train.common.endless_indices` draws it (epoch e: the permutation seeded
    ``seed + e``, cut into full batches): the same batches as a trainer indexing the whole
    array. A larger split streams: each epoch visits the shards in a seeded order, each shard's
    rows in a seeded order, through a shuffle buffer of ``buffer_rows`` images (each incoming
    row takes the place of a random buffered one, which is emitted). Memory: the buffer, one
    shard's PNG bytes and one batch. The same files and arguments give the same batches.

    ``part=(rank, world)`` (data-parallel training: one stream a replica) draws only the rows
    whose index in the split (the prepared order) is ``rank`` modulo ``world``, as above with
    seed ``seed + rank``; only those rows are decoded. The parts of a split are disjoint and
    together cover it; ``(0, 1)`` is the whole split, the same batches as without ``part``.

    ``skip`` drops the first batches without decoding them (a resumed trainer continues where it
    stopped): the buffer holds the rows' PNG bytes, and only the batches given out are decoded.
    """
    rank, world = part
    if batch_size < 1 or buffer_rows < 1:
        raise ValueError(f"batch_size and buffer_rows must be >= 1, got {batch_size}, {buffer_rows}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {part}")
    seed = seed + rank
    total = split_rows(split_dir)
    n = len(range(rank, total, world))  # the rows of this part
    if n == 0:
        if total and world > 1:
            raise UserError(f"{split_dir}: {total} rows cannot be split over {world} workers: part {rank} gets none")
        raise UserError(f"{split_dir}: no rows to draw batches from")
    if n <= buffer_rows:
        from arvision.train.common import endless_indices

        if world == 1:
            _, images, ys = load_images(split_dir)
        else:  # this part's rows only, decoded shard by shard
            rows = np.arange(rank, total, world)
            whole = ImageSplit(split_dir, cache_bytes=0)
            images, ys = whole[rows], whole.labels[rows]
            del whole
        for idx in endless_indices(n, batch_size, seed, skip=skip):
            i = idx.numpy()
            yield (images[i], ys[i]) if labels else images[i]
        return  # not reached: the batches are endless
    paths = shard_paths(split_dir)
    starts = np.cumsum([0] + [pq.ParquetFile(str(p)).metadata.num_rows for p in paths])  # first row of each shard
    rng = np.random.default_rng(seed)
    buf_png = np.empty(buffer_rows, object)  # PNG bytes: decoded only when given out
    buf_y = np.zeros(buffer_rows, np.int32)
    filled = 0
    out_png: list[np.ndarray] = []
    out_y: list[np.ndarray] = []
    pending = 0
    chunk = min(256, buffer_rows)  # rows taken into the buffer at a time (a sample of them: at most the buffer)
    while True:  # one pass over the split an epoch
        for s in rng.permutation(len(paths)):
            table = pq.read_table(str(paths[s]), columns=["image", "label"])
            blobs = table.column("image")
            ys = table.column("label").to_numpy().astype(np.int32)
            order = rng.permutation(table.num_rows)
            if world > 1:  # this part's rows, in the same seeded order
                order = order[(starts[s] + order) % world == rank]
            for c in range(0, len(order), chunk):
                rows = order[c : c + chunk]
                x = np.empty(len(rows), object)
                x[:] = [blobs[int(r)].as_py() for r in rows]
                y = ys[rows]
                take = min(buffer_rows - filled, len(x))
                buf_png[filled : filled + take], buf_y[filled : filled + take] = x[:take], y[:take]
                filled += take
                x, y = x[take:], y[take:]
                if len(x):
                    slots = rng.choice(buffer_rows, size=len(x), replace=False)
                    out_png.append(buf_png[slots])  # fancy indexing copies
                    out_y.append(buf_y[slots])
                    buf_png[slots], buf_y[slots] = x, y
                    pending += len(x)
                while pending >= batch_size:
                    bp, by = np.concatenate(out_png), np.concatenate(out_y)
                    out_png, out_y, pending = [bp[batch_size:]], [by[batch_size:]], pending - batch_size
                    if skip > 0:
                        skip -= 1
                        continue
                    bx = np.stack([decode_png(b) for b in bp[:batch_size]])
                    yield (bx, by[:batch_size]) if labels else bx
            del table, blobs


def prefetched(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``items`` in the same order, produced ``depth`` ahead by a background thread: the next
    batches decode (Pillow and pyarrow release the GIL) while the caller computes, e.g. while a
    GPU trains on the current one. An exception in the producer is raised here; closing this
    generator stops the thread."""
    import queue
    import threading

    q: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e))

    thread = threading.Thread(target=produce, name="arvision-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


class LazyImages:
    """A read-only sequence of uint8 images ``(N, H, W, C)`` computed block by block on demand:
    what a function that takes an image array and walks it in slices (``len(x)``, ``x[i:j]``,
    ``x[index_array]``, ``x.shape``) can take instead, in bounded memory. Blocks of
    ``block_rows`` rows are made by :meth:`_load_block` and kept in a cache of at most
    ``cache_bytes`` (least recently used dropped first); a split that fits stays decoded.
    ``np.asarray`` of it is refused: that would load everything."""

    #: the default cache of decoded blocks, per sequence
    CACHE_BYTES = 128 << 20

    def __init__(self, n: int, image_shape: tuple[int, ...], block_rows: int, cache_bytes: Optional[int] = None):
        from collections import OrderedDict

        self._n, self._image_shape, self.block_rows = int(n), tuple(image_shape), max(1, int(block_rows))
        self.cache_bytes = self.CACHE_BYTES if cache_bytes is None else cache_bytes
        self._cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._cached = 0

    # what subclasses provide
    def _load_block(self, k: int) -> np.ndarray:
        """Rows ``[k × block_rows, min(N, (k + 1) × block_rows))``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._image_shape)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __array__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} streams its images: slice it (x[i:j]) instead of loading it whole")

    def _block(self, k: int) -> np.ndarray:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        block = self._load_block(k)
        if block.nbytes <= self.cache_bytes:
            self._cache[k] = block
            self._cached += block.nbytes
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return block

    def _empty(self, n: int = 0) -> np.ndarray:
        return np.zeros((n, *self._image_shape), np.uint8)

    def _range(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return self._empty()
        bs = self.block_rows
        parts = [self._block(k)[max(a - k * bs, 0) : b - k * bs] for k in range(a // bs, (b - 1) // bs + 1)]
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        out = self._empty(len(idx))
        blocks = idx // self.block_rows
        for k in np.unique(blocks):
            sel = np.nonzero(blocks == k)[0]
            out[sel] = self._block(int(k))[idx[sel] - int(k) * self.block_rows]
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(self._n)
            if step == 1:
                return self._range(a, b)
            key = np.arange(a, b, step)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self._n if key < 0 else 0)
            if not 0 <= i < self._n:
                raise IndexError(f"index {key} out of range for {self._n} images")
            return self._range(i, i + 1)[0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        idx = idx.astype(np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + self._n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"index out of range for {self._n} images")
        return self._take(idx)

    def fits_cache(self) -> bool:
        """Whether every block fits the cache at once (then a second walk computes nothing)."""
        return self._n * int(np.prod(self._image_shape)) <= self.cache_bytes

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The images in order, ``batch_size`` at a time."""
        for i in range(0, self._n, batch_size):
            yield self[i : i + batch_size]


class ImageSplit(LazyImages):
    """A prepared split (or its first ``limit`` rows) as a :class:`LazyImages`: PNGs decoded on
    demand, one shard's PNG bytes held at a time. ``labels``: int32 ``(N,)``, read at once
    (no image is). Slices and index arrays give what ``load_images(split_dir, limit)[1]``
    would, without holding the split."""

    def __init__(self, split_dir: str | Path, limit: Optional[int] = None, *, block_rows: int = 256,
                 cache_bytes: Optional[int] = None):
        self.split_dir = Path(split_dir)
        self._paths = shard_paths(self.split_dir)
        counts = [pq.ParquetFile(str(p)).metadata.num_rows for p in self._paths]
        self._starts = np.cumsum([0] + counts)  # first row of each shard, then the total
        n = int(self._starts[-1]) if limit is None else min(int(self._starts[-1]), int(limit))
        self._shard_cache: tuple[int, Any] = (-1, None)
        self.labels = split_labels(self.split_dir, limit=n)
        if n:
            shape = self._decode_rows(0, np.array([0]))[0].shape
        else:
            res, ch = _shape_from_manifest(self.split_dir)
            shape = (res, res, ch)
        super().__init__(n, shape, block_rows, cache_bytes)

    def _blobs(self, s: int):
        if self._shard_cache[0] != s:
            self._shard_cache = (-1, None)  # the old one goes first
            self._shard_cache = (s, pq.read_table(str(self._paths[s]), columns=["image"]).column("image"))
        return self._shard_cache[1]

    def _decode_rows(self, s: int, rows: np.ndarray) -> np.ndarray:
        blobs = self._blobs(s)
        return np.stack([decode_png(blobs[int(r)].as_py()) for r in rows])

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (global, sorted or not), decoded shard by shard."""
        out = self._empty(len(idx))
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self._decode_rows(int(s), idx[sel] - self._starts[s])
        return out

    def _load_block(self, k: int) -> np.ndarray:
        a = k * self.block_rows
        return self._rows(np.arange(a, min(self._n, a + self.block_rows)))

    def _take(self, idx: np.ndarray) -> np.ndarray:
        """Only the rows asked for are decoded (blocks already cached are used)."""
        out = self._empty(len(idx))
        blocks = idx // self.block_rows
        cached = np.isin(blocks, list(self._cache.keys()))
        for k in np.unique(blocks[cached]):
            sel = np.nonzero(blocks == k)[0]
            out[sel] = self._block(int(k))[idx[sel] - int(k) * self.block_rows]
        if (~cached).any():
            sel = np.nonzero(~cached)[0]
            out[sel] = self._rows(idx[sel])
        return out
