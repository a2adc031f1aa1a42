"""``prepare``: a source's images → normalised, deduplicated, split Parquet shards + manifest.

Every image is decoded, converted to ``data.channels`` (transparency composited on white),
resized on its shorter side and centre-cropped to ``data.resolution``, and re-encoded as PNG
(no metadata, fixed compression). Its ``id`` is a hash of the processed pixels, so duplicates
collapse (the first occurrence in source order wins) and the split depends on content only.

The split: ``key % 10_000 < val_fraction * 10_000`` → val, where ``key = int(id, 16)`` for
``seed == 0`` and ``key = int(sha256(f"{seed}:{id}")[:32], 16)`` otherwise (the seed salts the
split; seed 0 is the plain rule). If that leaves a split empty (tiny data sets), the one image
nearest the boundary moves over, so both splits always hold at least one image.

Near-duplicates go to one side (``data.near_duplicates``, on by default): a generator that
copies its training images must not find their near-copies in val, nor the train/val floor be
made easy by them. Images are grouped, and a group is split by the key of its smallest id, so
a group of one is split exactly as before. Two images are linked when (a) they share one of
``NEAR_HASHES`` coarse hashes, a value held by at most ``NEAR_MAX_SHARED`` images (a value more
images share is a flat or average image, e.g. noise or blank, not a near-duplicate signal: it is
not used, so the pair checks and the thumbnails held stay bounded however many images share it) (the image area-averaged to ``NEAR_HASH_GRID``², channels averaged,
quantised in steps of ``NEAR_STEP``/255, each hash on a grid offset by a further
``NEAR_STEP / NEAR_HASHES``: offset grids cut the boundary effects of any one), and (b) their
``NEAR_GRID``² area-averaged thumbnails are within RMS ``NEAR_RMS + 1``/255 (area averaging
never increases an RMS distance; +1 covers the thumbnails' rounding to integers, so every pair
within RMS ``NEAR_RMS`` of each other that shares a hash passes). Groups are the connected
components (union-find). Measured (``bench/near_duplicates.py``; bench/RESULTS.md, "Near-duplicates
and the split"): val images with a train image within RMS 5/255, emoji 32² 7 → 0, emoji 64²
7 → 0, MNIST 20k 0 → 0; 6.3 % / 6.6 % / 4.6 % of images grouped, the largest group 18 / 18 / 523
(MNIST: "1"s, whose 8×8 thumbnails chain within RMS 6; measured before ``NEAR_MAX_SHARED``). The cost:
pairs within one hash value, at most ``NEAR_MAX_SHARED``² per value.

Memory does not grow with the number of images; two passes over a spill on disk:

1. Decode. The source's partitions (:class:`~arvision.data.sources.Partition`: file chunks, row
   groups, index ranges, tar files) are decoded and normalised in this process, or by Ray Data
   tasks (one CPU each, on every core; the workers read their own bytes) when ``ray.address`` /
   ``$RAY_ADDRESS`` names a cluster, or from ``RAY_MIN_IMAGES`` records on
   ``arvision.cluster.RAY_MIN_CORES`` cores or more (:func:`wants_ray`,
   :func:`arvision.cluster.ray_data_pays`). Arrival order does not matter. The processed rows
   (id, PNG, label, ``order`` = position in the source, ``near``: the coarse hashes, ``thumb``:
   the thumbnail) are spilled ``SPILL_BYTES`` at a time
   into buckets by id prefix: ids are uniform hashes, so buckets are even, and in id order.
2. Write. A sweep of the buckets' ids, labels and hashes (no image bytes) settles
   de-duplication, the ``max_images`` cap (the lowest ids), the near-duplicate candidates (images
   that share a hash value held by at most ``NEAR_MAX_SHARED`` images; further sweeps read only
   their thumbnails, about ``BUCKET_BYTES`` of them at a time, so memory is a few ints per image),
   the groups, the split and its balance, and the
   manifest's counts;
   then each bucket in turn (``BUCKET_BYTES`` in memory; a larger one in id ranges) is sorted,
   de-duplicated and streamed into the train and val shards.

Both ways give the same bytes, the same as the former all-in-memory implementation (tested).
Output is built in a temporary folder next to ``out_dir`` and renamed into place at the end:
an interrupted run leaves nothing a later run would trust. The same source and params give
byte-identical files (with the same Pillow, zlib and pyarrow).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import io
import json
import logging
import math
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from tqdm import tqdm

from arvision.progress import bar as progress_bar

from arvision.cluster import ray_data_pays
from arvision.config import DataConfig, RayConfig
from arvision.data.checks import split_too_small
from arvision.data.parquet_io import PREPARED_SCHEMA, ShardWriter, write_shards
from arvision.data.sources import Partition, Record, Source, open_source, read_partition
from arvision.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the prepared layout + manifest
PNG_COMPRESS_LEVEL = 6  # zlib level: fixed, so the same pixels give the same bytes
BUCKETS = 10_000  # split resolution: val_fraction is honoured to 1e-4
RAY_MIN_IMAGES = 20_000  # records from which decoding fans out over Ray Data (its start-up: ~5-10 s) ...
SPILL_BYTES = 16 << 20  # processed rows held before they are spilled into the buckets
BUCKET_BYTES = 16 << 20  # the size a bucket aims at: pass 2 sorts one bucket (or id range) in memory
MAX_BUCKETS = 256  # files one spill writes, at most; beyond, buckets grow and are sorted in id ranges
NEAR_HASH_GRID = 4  # the hashed thumbnail: 4×4, channels averaged (per channel, or 8×8, the hashes miss pairs within RMS 5)
NEAR_STEP = 64  # its quantisation step, in 1/255: 4-5 levels a cell
NEAR_HASHES = 4  # hashes an image, on grids offset by NEAR_STEP / NEAR_HASHES
NEAR_GRID = 8  # the verifying thumbnail: 8×8 per channel, uint8 (64 or 192 bytes an image)
NEAR_RMS = 5.0  # in 1/255: images this close (pixel RMS) and sharing a hash are in one group
# A hash value shared by more images than this is uninformative and not used for linking: so many
# images on one coarse 4×4 grey thumbnail are flat/average images (noise averages to mid-grey, blank
# backgrounds), not near-copies; using it would hold all their thumbnails and check all their pairs
# at once (memory and time growing with the data set) and chain them into giant groups (MNIST: 523).
NEAR_MAX_SHARED = 64
_CHUNK = 512  # records processed into one table
_SKIPPED_NAMED = 5  # undecodable records named in the warning
#: A processed record: ``id`` "" when undecodable (``origin`` then names it), else ``origin`` "".
PROCESSED_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int32()),
                              ("order", pa.int64()), ("origin", pa.string()),
                              ("near", pa.list_(pa.int64(), NEAR_HASHES)), ("thumb", pa.binary())])
SPILL_COLUMNS = ["id", "image", "label", "order", "near", "thumb"]
ROW_COLUMNS = ["id", "image", "label", "order"]  # what the write pass reads back


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


@functools.lru_cache(maxsize=8)
def _area_weights(size: int, grid: int) -> np.ndarray:
    """``(grid, size)`` int64: how much of pixel ``i`` falls in cell ``j``, in units of 1/grid of a
    pixel (each row sums to ``size``), so area averages are exact integers over ``size²``."""
    lo, hi = np.arange(size) * grid, (np.arange(size) + 1) * grid  # pixel i: [lo, hi)
    cell_lo, cell_hi = np.arange(grid)[:, None] * size, (np.arange(grid)[:, None] + 1) * size
    return np.clip(np.minimum(hi, cell_hi) - np.maximum(lo, cell_lo), 0, None).astype(np.int64)


def _area_sums(arr_HWC: np.ndarray, grid: int) -> np.ndarray:
    """``(grid, grid, C)`` int64: area sums whose mean is ``sums / (H * W)``. Integer arithmetic,
    so the same pixels give the same hashes on every machine and in every Ray task."""
    H, W, _ = arr_HWC.shape
    return np.einsum("jh,hwc,kw->jkc", _area_weights(H, grid), arr_HWC.astype(np.int64), _area_weights(W, grid))


def near_keys(arr_HWC: np.ndarray) -> tuple[list[int], bytes]:
    """A processed image's near-duplicate keys (module docstring): ``NEAR_HASHES`` int64 hashes of
    its quantised ``NEAR_HASH_GRID``² thumbnail, one per offset grid, and its ``NEAR_GRID``²
    thumbnail (uint8 area means, row-major ``(g, g, C)``) that verifies a shared hash."""
    H, W, _ = arr_HWC.shape
    area = H * W
    sums = _area_sums(arr_HWC, NEAR_HASH_GRID).sum(-1, keepdims=True)  # (g, g, 1): the channels' sum
    per = area * arr_HWC.shape[-1]  # so the mean is over channels too: one grey 4×4, 16 cells to cross
    hashes = []
    for k in range(NEAR_HASHES):
        levels = (sums + k * NEAR_STEP * per // NEAR_HASHES) // (NEAR_STEP * per)  # floor((mean + offset) / step)
        digest = hashlib.blake2b(bytes([k]) + levels.astype(np.uint8).tobytes(), digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little", signed=True))
    thumb = (2 * _area_sums(arr_HWC, NEAR_GRID) + area) // (2 * area)  # rounded means
    return hashes, thumb.astype(np.uint8).tobytes()


def _process_full(record: Record, resolution: int, channels: int
                  ) -> tuple[str, Optional[str], Optional[bytes], int, Optional[tuple[list[int], bytes]]]:
    """(origin, data, label) → (origin, id or None if undecodable, png, label, near keys)."""
    origin, data, label = record
    try:
        arr = normalise(data, resolution, channels)
    except Exception:  # any undecodable input is skipped and counted, never fatal on its own
        return origin, None, None, label, None
    return origin, content_id(arr), encode_png(arr), label, near_keys(arr)


def _process(record: Record, resolution: int, channels: int) -> tuple[str, Optional[str], Optional[bytes], int]:
    """(origin, data, label) → (origin, id or None if undecodable, png, label)."""
    return _process_full(record, resolution, channels)[:4]


# --------------------------------------------------------------------------- pass 1: decode and spill


def _processed(index: int, records: Iterable[Record], resolution: int, channels: int) -> Iterator[pa.Table]:
    """Partition ``index``'s records processed, ``_CHUNK`` to a table (:data:`PROCESSED_SCHEMA`);
    ``order = index << 32 | offset``, so orders follow the source's order."""
    rows: list[tuple[str, bytes, int, int, str, list[int], bytes]] = []
    for offset, record in enumerate(records):
        origin, image_id, png, label, near = _process_full(record, resolution, channels)
        hashes, thumb = near or ([0] * NEAR_HASHES, b"")
        rows.append((image_id or "", png or b"", label, index << 32 | offset, "" if image_id else origin, hashes, thumb))
        if len(rows) == _CHUNK:
            yield _processed_table(rows)
            rows = []
    if rows:
        yield _processed_table(rows)


def _processed_table(rows: list[tuple[str, bytes, int, int, str, list[int], bytes]]) -> pa.Table:
    columns = [pa.array(list(col), f.type) for col, f in zip(zip(*rows), PROCESSED_SCHEMA)]
    return pa.Table.from_arrays(columns, schema=PROCESSED_SCHEMA)


def process_partitions(batch: pa.Table, resolution: int, channels: int) -> Iterator[pa.Table]:
    """A Ray Data task: read and process the partitions of ``batch`` (columns ``index``, ``part``: a
    pickled :class:`~arvision.data.sources.Partition`)."""
    for index, blob in zip(batch.column("index").to_pylist(), batch.column("part").to_pylist()):
        yield from _processed(index, read_partition(pickle.loads(blob)), resolution, channels)


def _ray_tables(parts: list[Partition], cfg: DataConfig, ray_cfg: RayConfig, root: Path) -> Iterator[pa.Table]:
    """The processed records of ``parts``, decoded by Ray Data tasks (one CPU each), as they come.
    Arrival order does not matter: every row carries its ``order``."""
    import ray.data

    from arvision.cluster import init_ray

    init_ray(ray_cfg, root)
    ray.data.DataContext.get_current().enable_progress_bars = False  # prepare's bar counts images
    items = [{"index": i, "part": pickle.dumps(p)} for i, p in enumerate(parts)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        process_partitions, batch_size=1, batch_format="pyarrow", num_cpus=1,
        fn_kwargs={"resolution": cfg.resolution, "channels": cfg.channels},
    )
    del items  # in Ray's object store now
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("prepare on Ray Data:\n%s", ds.stats())


def _local_tables(source: Source, parts: Optional[list[Partition]], cfg: DataConfig) -> Iterator[pa.Table]:
    """The processed records of ``source``, decoded in this process."""
    if parts is None:
        yield from _processed(0, source.records(), cfg.resolution, cfg.channels)
        return
    for index, part in enumerate(parts):
        yield from _processed(index, read_partition(part), cfg.resolution, cfg.channels)


def wants_ray(count: int, parts: Optional[list[Partition]], ray_cfg: RayConfig) -> bool:
    """Whether to decode over Ray Data: when a cluster is named (``ray.address`` /
    ``$RAY_ADDRESS``), or for ``RAY_MIN_IMAGES`` records or more on ``RAY_MIN_CORES`` cores or
    more; never for fewer than two partitions."""
    return parts is not None and len(parts) > 1 and ray_data_pays(count, RAY_MIN_IMAGES, ray_cfg)


def bucket_count(count: int, resolution: int, channels: int) -> int:
    """Buckets for ``count`` images: ``BUCKET_BYTES`` each at their raw pixel size (their PNGs are
    rarely larger), between 1 and ``MAX_BUCKETS``."""
    return max(1, min(MAX_BUCKETS, math.ceil(count * resolution * resolution * channels / BUCKET_BYTES)))


def bucket_of(ids: list[str], buckets: int) -> np.ndarray:
    """The bucket of each id: its first 32 bits scaled to ``buckets`` (so buckets are in id order)."""
    prefix = np.fromiter((int(i[:8], 16) for i in ids), np.uint64, len(ids))
    return ((prefix * np.uint64(buckets)) >> np.uint64(32)).astype(np.int64)


class _Spill:
    """Processed rows on disk, ``bucket-NNNNN/run-KKKKKK-00000.parquet``: one file per bucket and
    flush, a flush once ``SPILL_BYTES`` are held. ``nbytes[b]``: PNG bytes in bucket ``b``."""

    def __init__(self, root: Path, buckets: int) -> None:
        self.root, self.buckets = root, buckets
        self.buffer: list[pa.Table] = []
        self.buffered = self.flushes = self.rows = 0
        self.nbytes = np.zeros(buckets, np.int64)

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.nbytes
        self.rows += table.num_rows
        if self.buffered >= SPILL_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        self.buffer, self.buffered = [], 0
        which = bucket_of(table.column("id").to_pylist(), self.buckets)
        perm = np.argsort(which, kind="stable")
        table, which = table.take(pa.array(perm)), which[perm]
        sizes = pc.binary_length(table.column("image")).to_numpy()
        self.nbytes += np.bincount(which, weights=sizes, minlength=self.buckets).astype(np.int64)
        starts = np.searchsorted(which, np.arange(self.buckets + 1))
        for b in np.flatnonzero(np.diff(starts)):
            part = table.slice(starts[b], starts[b + 1] - starts[b])
            write_shards(part, self.root / f"bucket-{b:05d}", part.num_rows, prefix=f"run-{self.flushes:06d}")
        self.flushes += 1

    def files(self, b: int) -> list[Path]:
        return sorted((self.root / f"bucket-{b:05d}").glob("run-*.parquet"))


@dataclass
class _Skipped:
    """Undecodable records: how many, and the first few in source order as (order, origin)."""

    count: int = 0
    first: list[tuple[int, str]] = field(default_factory=list)

    def add(self, table: pa.Table) -> None:
        self.count += table.num_rows
        new = zip(table.column("order").to_pylist(), table.column("origin").to_pylist())
        self.first = heapq.nsmallest(_SKIPPED_NAMED, [*self.first, *new])


def _spill(tables: Iterable[pa.Table], spill: _Spill, bar: tqdm) -> tuple[int, _Skipped]:
    """Pass 1: every processed table into the spill. Returns (records seen, the skipped)."""
    seen, skipped = 0, _Skipped()
    for table in tables:
        bad = pc.equal(table.column("id"), "")
        if pc.any(bad).as_py():
            skipped.add(table.filter(bad))
        spill.add(table.filter(pc.invert(bad)).select(SPILL_COLUMNS))
        seen += table.num_rows
        bar.update(table.num_rows)
    spill.flush()
    return seen, skipped


# --------------------------------------------------------------------------- pass 2: plan and write


def _first_occurrences(table: pa.Table) -> pa.Table:
    """``table`` sorted by id, one row per id: the first in source order (smallest ``order``)."""
    table = table.sort_by([("id", "ascending"), ("order", "ascending")])
    if table.num_rows < 2:
        return table
    ids = table.column("id").combine_chunks()
    new = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), new]))


def _read_bucket(files: list[Path], columns: list[str], lo: Optional[str] = None, hi: Optional[str] = None) -> pa.Table:
    """A bucket's first occurrences (ids in ``[lo, hi)`` when given), in id order."""
    tables = []
    for f in files:
        t = pq.read_table(f, columns=columns)
        if lo is not None:
            t = t.filter(pc.greater_equal(t.column("id"), lo))
        if hi is not None:
            t = t.filter(pc.less(t.column("id"), hi))
        tables.append(t)
    return _first_occurrences(pa.concat_tables(tables))


def _bucket_rows(spill: _Spill, b: int) -> Iterator[pa.Table]:
    """Bucket ``b``'s first occurrences with their images, in id order: all at once, or, when it
    holds more than ``BUCKET_BYTES``, in as many id ranges (each a scan of the bucket's files)."""
    files = spill.files(b)
    ranges = math.ceil(spill.nbytes[b] / BUCKET_BYTES)
    if ranges <= 1:
        yield _read_bucket(files, ROW_COLUMNS)
        return
    ids = _read_bucket(files, ["id", "order"]).column("id")
    bounds = sorted({ids[len(ids) * j // ranges].as_py() for j in range(1, ranges)})
    for lo, hi in zip([None, *bounds], [*bounds, None]):
        yield _read_bucket(files, ROW_COLUMNS, lo, hi)


class _Groups:
    """Union-find over image indices (kept images in id order); a set's root is its smallest index,
    so its smallest id. ``parent``: one int64 an image."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = int(parent[i])
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        """``(N,)`` int64: each image's root. Roots are smaller than their members, so one pass in
        index order resolves every chain."""
        parent = self.parent
        for i in range(len(parent)):
            parent[i] = parent[parent[i]]
        return parent


def _hash_runs(nears: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The sets of images that share a hash value, each of two to ``NEAR_MAX_SHARED`` images (larger
    sets are uninformative and dropped: see ``NEAR_MAX_SHARED``), as ``(members, bounds)``: set ``r``
    is ``members[bounds[r]:bounds[r + 1]]`` (image indices, ascending). Flat arrays, not an object a
    set: a few ints an image. ``nears``: the images' hashes ``(n, NEAR_HASHES)``, bucket by bucket in
    index order; emptied here, so one copy is held. Hashes of different grids differ (the grid is
    hashed in)."""
    flat = np.concatenate(nears).ravel() if nears else np.zeros(0, np.int64)
    nears.clear()
    perm = np.argsort(flat, kind="stable")  # stable: within a value, images ascending (row-major)
    flat = flat[perm]
    image = perm // NEAR_HASHES
    del perm
    same = flat[1:] == flat[:-1]
    keep = np.r_[True, ~(same & (image[1:] == image[:-1]))]  # one image twice on a value (two grids' hashes collide)
    flat, image = flat[keep], image[keep]
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    del flat, same, keep
    sizes = np.diff(np.r_[starts, len(image)])
    ok = (sizes >= 2) & (sizes <= NEAR_MAX_SHARED)
    members = image[np.repeat(ok, sizes)]
    return members, np.r_[0, np.cumsum(sizes[ok])].astype(np.int64)


def _link(groups: _Groups, members: np.ndarray, thumbs_MD: np.ndarray) -> None:
    """Union the pairs of ``members`` (one hash's images) whose thumbnails ``thumbs_MD`` (uint8, in
    ``members``' order) are within RMS ``NEAR_RMS + 1``. Integer thumbnails: the float64 distances
    are exact, so no summation order can change a decision."""
    M, D = thumbs_MD.shape
    limit = (NEAR_RMS + 1.0) ** 2 * D  # squared L2 over the D cells
    n2 = np.einsum("md,md->m", thumbs_MD, thumbs_MD, dtype=np.int64).astype(np.float64)
    for a in range(0, M, 256):  # (256, 1024) distances at a time, as float64 only there: memory bounded
        ta = thumbs_MD[a:a + 256].astype(np.float64)
        for c in range(a, M, 1024):
            d2 = n2[a:a + 256, None] + n2[None, c:c + 1024] - 2.0 * (ta @ thumbs_MD[c:c + 1024].T.astype(np.float64))
            for i, j in zip(*np.nonzero(d2 <= limit)):
                if a + i < c + j:
                    groups.union(int(members[a + i]), int(members[c + j]))


@dataclass
class _Plan:
    """What pass 2 writes, from the ids, labels and near-duplicate keys alone: counts, the split of
    every kept image (``val``, by index in id order), the one image ``moved`` to the other split (if
    a split would be empty), the near-duplicate groups, and the manifest's label statistics."""

    seed: int
    val_fraction: float
    unique: int = 0  # distinct ids
    kept: int = 0  # of them, under the cap
    counts: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    labels: set[int] = field(default_factory=set)
    unlabelled: int = 0
    moved: Optional[int] = None  # the index of the image moved over by balance()
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (kept,): in val
    group_count: int = 0  # groups of two or more
    grouped: int = 0  # images in them
    largest_group: int = 1

    def split(self, bucket_N: np.ndarray, root_N: np.ndarray) -> None:
        """Each image takes its group root's split bucket (``bucket_N``: ``split_key % BUCKETS``
        of each image's own id; a root is its group's smallest id), then balance()."""
        group_bucket_N = bucket_N[root_N]
        self.val = group_bucket_N < self.val_fraction * BUCKETS
        self.counts = {"train": int((~self.val).sum()), "val": int(self.val.sum())}
        sizes = np.bincount(root_N, minlength=len(root_N))
        self.group_count, self.grouped = int((sizes >= 2).sum()), int(sizes[sizes >= 2].sum())
        self.largest_group = int(sizes.max(initial=1))
        self.balance(group_bucket_N)

    def balance(self, bucket_N: np.ndarray) -> None:
        """Neither split empty (when there are >= 2 images): move the image nearest the boundary
        (by (split bucket, id)). Deterministic, and a no-op for any data set of realistic size."""
        if not self.counts["val"] and self.counts["train"] >= 2:
            self.moved, src, dst = int(np.argmin(bucket_N)), "train", "val"  # argmin: the first, so the smallest id
        elif not self.counts["train"] and self.counts["val"] >= 2:
            top = np.flatnonzero(bucket_N == bucket_N.max())
            self.moved, src, dst = int(top[-1]), "val", "train"
        else:
            return
        self.counts[src] -= 1
        self.counts[dst] += 1
        self.val[self.moved] = not self.val[self.moved]


def _kept_index(spill: _Spill, b: int, columns: list[str], room: Optional[int]) -> pa.Table:
    """Bucket ``b``'s first occurrences (``columns`` of them), the first ``room`` only (the cap)."""
    index = _read_bucket(spill.files(b), columns)
    return index if room is None else index.slice(0, room)


def _plan(spill: _Spill, seed: int, cfg: DataConfig) -> _Plan:
    """Sweep the buckets' ids, labels and hashes (no image bytes): de-duplicate, cap; then, when
    ``data.near_duplicates``, a second sweep for the thumbnails of the images that share a hash,
    the groups; then split, balance."""
    plan = _Plan(seed, cfg.val_fraction)
    buckets, nears = [], []
    for b in range(spill.buckets):
        if not spill.files(b):
            continue
        index = _read_bucket(spill.files(b), ["id", "label", "order", "near"])
        plan.unique += index.num_rows
        room = None if cfg.max_images is None else max(0, cfg.max_images - plan.kept)
        index = index if room is None else index.slice(0, room)
        ids, labels = index.column("id").to_pylist(), index.column("label").to_pylist()
        buckets.append(np.fromiter((split_key(i, seed) % BUCKETS for i in ids), np.int32, len(ids)))
        if cfg.near_duplicates:
            nears.append(index.column("near").combine_chunks().flatten().to_numpy().reshape(-1, NEAR_HASHES))
        plan.kept += len(ids)
        plan.labels.update(labels)
        plan.unlabelled += sum(label < 0 for label in labels)
    bucket_N = np.concatenate(buckets) if buckets else np.zeros(0, np.int32)
    groups = _Groups(plan.kept)
    if cfg.near_duplicates and plan.kept:
        members, bounds = _hash_runs(nears)
        # The sets in batches whose thumbnails fit in about BUCKET_BYTES (as pass 2's buckets), each
        # batch's read in a sweep of the spill: the thumbnails held are bounded, not one a candidate.
        # A set holds <= NEAR_MAX_SHARED images, so any one fits; the groups (roots: smallest
        # index) do not depend on the order of the unions, so neither does the output.
        per_batch = max(NEAR_MAX_SHARED, BUCKET_BYTES // (NEAR_GRID * NEAR_GRID * cfg.channels))
        r, runs = 0, len(bounds) - 1
        while r < runs:
            e = max(r + 1, int(np.searchsorted(bounds, bounds[r] + per_batch, "right")) - 1)
            candidates = np.unique(members[bounds[r]:bounds[e]])  # images that share a hash: their thumbnails
            thumbs = _candidate_thumbs(spill, cfg, candidates)
            for k in range(r, e):
                run = members[bounds[k]:bounds[k + 1]]
                _link(groups, run, thumbs[np.searchsorted(candidates, run)])
            del thumbs
            r = e
    plan.split(bucket_N, groups.roots())
    return plan


def _candidate_thumbs(spill: _Spill, cfg: DataConfig, candidates: np.ndarray) -> np.ndarray:
    """``(len(candidates), D)`` uint8: the thumbnails of the kept images at indices ``candidates``
    (ascending), from a second sweep of the spill."""
    out, offset, got = None, 0, 0
    for b in range(spill.buckets):
        if not spill.files(b) or got == len(candidates):
            continue
        room = None if cfg.max_images is None else max(0, cfg.max_images - offset)
        index = _kept_index(spill, b, ["id", "order", "thumb"], room)
        lo, hi = np.searchsorted(candidates, [offset, offset + index.num_rows])
        if hi > lo:
            want = index.column("thumb").take(pa.array(candidates[lo:hi] - offset)).to_pylist()
            rows = np.frombuffer(b"".join(want), np.uint8).reshape(hi - lo, -1)
            out = np.zeros((len(candidates), rows.shape[1]), np.uint8) if out is None else out
            out[lo:hi] = rows
            got = hi
        offset += index.num_rows
    return out


def _write_splits(spill: _Spill, plan: _Plan, shard_size: int, out: Path) -> dict[str, list[Path]]:
    """Pass 2: the kept rows, in id order, streamed into ``out/{train,val}`` shards."""
    writers = {split: ShardWriter(out / split, PREPARED_SCHEMA, shard_size) for split in ("train", "val")}
    left, at = plan.kept, 0
    for b in range(spill.buckets):
        if not left:
            break
        for rows in _bucket_rows(spill, b) if spill.files(b) else ():
            rows = rows.slice(0, left).select(["id", "image", "label"])
            left -= rows.num_rows
            val = pa.array(plan.val[at:at + rows.num_rows], pa.bool_())  # rows come in id order: the plan's indices
            at += rows.num_rows
            writers["train"].write(rows.filter(pc.invert(val)))
            writers["val"].write(rows.filter(val))
            if not left:
                break
    return {split: w.close() for split, w in writers.items()}


def _content_hash(shards: dict[str, list[Path]]) -> str:
    r"""sha256 over ``split\tid\tlabel\n`` of every row in file order (train, then val), read back."""
    digest = hashlib.sha256()
    for split, paths in shards.items():
        for path in paths:
            t = pq.read_table(path, columns=["id", "label"])
            for image_id, label in zip(t.column("id").to_pylist(), t.column("label").to_pylist()):
                digest.update(f"{split}\t{image_id}\t{label}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the data set


def _atomic_replace(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


SPLIT_RULE = ("val iff key % 10000 < val_fraction * 10000; key = int(id, 16) if seed == 0 "
              "else int(sha256(f'{seed}:{id}')[:32], 16)")
NEAR_RULE = (f"; near-duplicate groups take the key of their smallest id: images linked when they share one of "
             f"{NEAR_HASHES} hashes of the {NEAR_HASH_GRID}x{NEAR_HASH_GRID} area-mean thumbnail (channels averaged) "
             f"(a hash value held by more than {NEAR_MAX_SHARED} images is not used) quantised in steps of {NEAR_STEP}/255 (grids offset by {NEAR_STEP // NEAR_HASHES}/255) and their "
             f"{NEAR_GRID}x{NEAR_GRID} thumbnails are within RMS {NEAR_RMS + 1:g}/255 (so images within pixel RMS "
             f"{NEAR_RMS:g}/255 sharing a hash are linked); groups are connected components")


def _manifest(cfg: DataConfig, seed: int, source: Source, seen: int, skipped: int, plan: _Plan,
              content_hash: str) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "path": cfg.path,  # as given: absolute paths would make the manifest machine-dependent
        "counts": dict(plan.counts),
        "resolution": cfg.resolution,
        "channels": cfg.channels,
        "class_names": source.class_names,
        "num_classes": len(source.class_names),  # 0: unlabelled
        "unlabelled": plan.unlabelled,
        "labels_present": sorted(plan.labels),
        "images_in_source": seen,
        "skipped": skipped,
        "duplicates": seen - skipped - plan.unique,
        "capped": plan.unique - plan.kept,
        "content_hash": content_hash,
        "split_rule": SPLIT_RULE + (NEAR_RULE if cfg.near_duplicates else ""),
        "near_duplicate_groups": plan.group_count,
        "near_duplicate_images": plan.grouped,
        "near_duplicate_largest_group": plan.largest_group,
        "columns": {f.name: str(f.type) for f in PREPARED_SCHEMA},
        "params": {"seed": seed, "data": cfg.model_dump(mode="json")},
    }


def prepare_dataset(cfg: DataConfig, seed: int, out_dir: Union[str, Path], progress: bool = True, *,
                    use_ray: Optional[bool] = None, ray_cfg: Optional[RayConfig] = None,
                    root: Optional[Path] = None, min_split: Optional[tuple[int, str]] = None) -> dict[str, Any]:
    """Run ``prepare``: read ``cfg.source``, write ``out_dir/{train,val}/part-*.parquet`` and
    ``out_dir/manifest.json`` (docs/architecture.md, "Prepared data"). Returns the manifest.

    ``use_ray``: decode over Ray Data (True), in this process (False), or by :func:`wants_ray`'s
    rule (None); ``ray_cfg`` (default ``RayConfig()``) and ``root`` (the project root, put on the
    workers' ``PYTHONPATH``) are for :func:`arvision.cluster.init_ray`. ``min_split``: ``(n, who
    needs them)``, the fewest images each split must hold (the stage passes
    :func:`arvision.data.checks.min_split_images`); checked once the split is known, before any shard
    is written. Raises UserError for a missing path or column, a source with no usable image, or
    a split smaller than ``min_split``.
    """
    out_dir = Path(out_dir)
    source = open_source(cfg.source, cfg.path, cfg.image_column, cfg.label_column, label_from=cfg.label_from)
    ray_cfg = ray_cfg or RayConfig()
    parts = source.partitions() if source.partitions else None
    on_ray = parts is not None and (use_ray if use_ray is not None else wants_ray(source.count, parts, ray_cfg))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        spill = _Spill(tmp / ".spill", bucket_count(source.count, cfg.resolution, cfg.channels))
        tables = _ray_tables(parts, cfg, ray_cfg, root or Path(__file__).resolve().parents[2]) if on_ray \
            else _local_tables(source, parts, cfg)
        with progress_bar(source.count, f"prepare {cfg.source}", "img", disable=not progress) as bar:
            seen, skipped = _spill(tables, spill, bar)
        if skipped.count:
            names = ", ".join(origin for _, origin in skipped.first)
            msg = f"prepare: skipped {skipped.count} image(s) that could not be decoded, e.g. {names}"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        if not spill.rows:
            where = f" at '{cfg.path}'" if cfg.path else ""
            raise UserError(
                f"data source '{cfg.source}'{where} has no usable image ({seen} found, {skipped.count} could not be decoded)"
            )
        plan = _plan(spill, seed, cfg)
        too_small = min_split and split_too_small(plan.counts, *min_split, cfg, f"of {plan.kept} distinct images")
        if too_small:
            raise UserError(too_small)
        shards = _write_splits(spill, plan, cfg.shard_size, tmp)
        shutil.rmtree(spill.root)
        manifest = _manifest(cfg, seed, source, seen, skipped.count, plan, _content_hash(shards))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _atomic_replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
