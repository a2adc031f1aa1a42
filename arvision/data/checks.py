"""Checks of the params against the data, before any work starts: split sizes, batch sizes and
what the local Ray instance may ask of this machine. ``arvision check`` and ``arvision run`` call
:func:`check_batches`; ``prepare`` checks the exact split counts with :func:`split_too_small`.

Counts come from metadata only (Parquet footers, IDX headers, a file count, or the manifest of
an earlier ``prepare`` with the same params), so a check takes moments on any data set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from arvision.config import DataConfig, Params, ParamsError


def _source_rows(data: DataConfig, root: Path) -> Optional[int]:
    """Images in the source, from metadata only (Parquet footers, IDX headers, a file count);
    None when that is not cheap to know."""
    import pyarrow.parquet as pq

    from arvision.data.sources import EMOJI_DIR, EMOJI_FILE, IMAGE_EXTENSIONS

    where = data.location(root) or EMOJI_DIR
    if data.source in ("emoji", "parquet"):
        if data.source == "emoji" and where.is_dir():
            where = where / EMOJI_FILE
        files = sorted(where.rglob("*.parquet")) if where.is_dir() else [where]
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if data.source == "mnist":
        import gzip

        total = 0
        for f in where.iterdir():
            if "labels" in f.name and ("idx1" in f.name):
                opener = gzip.open if f.suffix == ".gz" else open
                with opener(f, "rb") as fh:
                    total += int.from_bytes(fh.read(8)[4:8], "big")  # IDX header: magic, then the count
        return total
    if data.source == "folder":
        return sum(1 for f in where.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    return None


#: KID needs this many images in each set (arvision/metrics/samples.py, kernel_distance)
KID_MIN_IMAGES = 4


def min_split_images(params: Params) -> tuple[int, str]:
    """The fewest images each split must hold for the pipeline to finish, and who needs them:
    ``evaluate`` scores samples, and train images (the floor), against val with k-NN radii (more
    than ``evaluate.nearest_k`` points in each set) and KID (at least :data:`KID_MIN_IMAGES`)."""
    k = params.evaluate.nearest_k
    need = max(KID_MIN_IMAGES, k + 1)
    return need, f"evaluate needs at least {need} in each (more than evaluate.nearest_k {k}, and KID's {KID_MIN_IMAGES})"


def split_images(params: Params, root: Path) -> tuple[Optional[dict[str, int]], str]:
    """How many ``{"train", "val"}`` images ``prepare`` gives with these params, and where that
    number is from.

    ``data/prepared/manifest.json`` when it was made with the same ``seed`` and ``data``
    params; else an estimate from the source's size, ``data.max_images`` and
    ``data.val_fraction`` (duplicates and undecodable images make the real numbers smaller, and
    the split by content hash makes them vary a little around the estimate).
    """
    manifest = root / "data" / "prepared" / "manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
        except ValueError:
            m = {}
        if m.get("params") == {"seed": params.seed, "data": params.data.model_dump(mode="json")}:
            return {s: int(m["counts"][s]) for s in ("train", "val")}, "data/prepared/manifest.json"
    n = _source_rows(params.data, root)
    if n is None:
        return None, ""
    why = f"{n} images in the source"
    if params.data.max_images is not None and params.data.max_images < n:
        n, why = params.data.max_images, f"data.max_images {params.data.max_images}"
    vf = params.data.val_fraction
    return {"train": int(n * (1 - vf)), "val": int(n * vf)}, f"about: {why}, {vf:.0%} of them for val"


def train_images(params: Params, root: Path) -> tuple[Optional[int], str]:
    """How many training images ``prepare`` gives with these params, and where that number is
    from (see :func:`split_images`)."""
    counts, source = split_images(params, root)
    return (None if counts is None else counts["train"]), source


def split_too_small(counts: dict[str, int], need: int, why: str, data: DataConfig, source: str = "") -> Optional[str]:
    """The message when a split holds fewer than ``need`` images (``why``: who needs them), else None."""
    if min(counts.values()) >= need:
        return None
    enough = math.ceil(need / min(data.val_fraction, 1 - data.val_fraction))  # images for `need` in the smaller split
    where = f" ({source})" if source else ""
    cap = f", data.max_images {data.max_images}" if data.max_images is not None else ""
    return (f"data.val_fraction / data.path: the split gives {counts['val']} val and {counts['train']} train images"
            f"{where}; {why}; use at least about {enough} images (data.val_fraction {data.val_fraction}{cap}), "
            "or change data.val_fraction")


def check_splits(params: Params, root: Path) -> None:
    """Neither split is too small for the pipeline (:func:`min_split_images`), by
    :func:`split_images`' count or estimate; ``prepare`` checks the exact counts again."""
    counts, source = split_images(params, root)
    if counts is None:
        return
    need, why = min_split_images(params)
    msg = split_too_small(counts, need, why, params.data, source)
    if msg:
        raise ParamsError(msg)


def check_local_ray(params: Params) -> None:
    """Where a local Ray instance would be started (no ``ray.address``, no ``RAY_ADDRESS``), a
    worker cannot ask for more CPUs than this machine has: it would run ``ray.cpus_per_worker``
    torch threads on fewer cores. A cluster's nodes are its own business."""
    import os

    from arvision.cluster import usable_cores

    if params.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    cores = usable_cores()
    if params.ray.cpus_per_worker > cores:
        raise ParamsError(
            f"ray.cpus_per_worker: {params.ray.cpus_per_worker} CPUs per worker, but this machine has {cores} "
            f"core{'s' if cores != 1 else ''} for the local Ray instance (no ray.address or RAY_ADDRESS); "
            f"use at most {cores}, or set ray.address to a cluster"
        )


def check_batches(params: Params, root: Path) -> None:
    """A local Ray instance fits this machine (:func:`check_local_ray`), both splits hold enough images for the pipeline (:func:`check_splits`), and a training
    batch fits in the data: the prior's per-worker batch is drawn from the worker's share of the
    training tokens (training images / ``ray.num_workers``)."""
    check_local_ray(params)
    train, source = train_images(params, root)
    if train is None:
        return
    workers = max(1, params.ray.num_workers)  # 0: the stage's own process, the whole split
    share = train // workers
    if params.prior.batch_size > share:
        each = f"the {share} each of ray.num_workers={workers} workers gets" if workers > 1 else f"the {train}"
        raise ParamsError(
            f"prior.batch_size / data: a batch of {params.prior.batch_size} per worker is larger than {each} "
            f"training images ({source}); lower prior.batch_size to {max(1, share)} or less, or use more data"
        )
    check_splits(params, root)
