"""``prepare`` at real data sizes: the streaming, bucketed implementation writes the very bytes the
in-memory one wrote (so existing DVC caches stay valid), its Ray Data path the same bytes as its
in-process path, and its memory does not grow with the number of images."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import tarfile
import tracemalloc
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arvision.config import DataConfig, RayConfig
from arvision.data import prepare as P
from arvision.data.parquet_io import PREPARED_SCHEMA, write_shards
from arvision.data.prepare import _process, is_val, prepare_dataset, split_key
from isolation import run_here
from arvision.data.sources import open_source, read_partition



# --------------------------------------------------------------------------- the reference


def _reference_prepare(cfg: DataConfig, seed: int, out_dir: Union[str, Path]) -> dict[str, Any]:
    """A frozen copy of ``prepare_dataset`` as it was before streaming (every PNG held in a dict),
    trimmed: no progress bar, no warning, no temp folder. Do not "fix" it: it is the yardstick."""
    out_dir = Path(out_dir)
    source = open_source(cfg.source, cfg.path, cfg.image_column, cfg.label_column, label_from=cfg.label_from)

    rows: dict[str, tuple[bytes, int]] = {}
    skipped: list[str] = []
    seen = 0
    for record in source.records():
        origin, image_id, png, label = _process(record, cfg.resolution, cfg.channels)
        seen += 1
        if image_id is None:
            skipped.append(origin)
        elif image_id not in rows:
            rows[image_id] = (png, label)

    ids = sorted(rows)
    if cfg.max_images is not None:
        ids = ids[: cfg.max_images]
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i in ids:
        splits["val" if is_val(i, seed, cfg.val_fraction) else "train"].append(i)
    bucket = lambda i: split_key(i, seed) % 10_000  # noqa: E731
    if not splits["val"] and len(splits["train"]) >= 2:
        moved = min(splits["train"], key=lambda i: (bucket(i), i))
        splits["train"].remove(moved)
        splits["val"].append(moved)
    elif not splits["train"] and len(splits["val"]) >= 2:
        moved = max(splits["val"], key=lambda i: (bucket(i), i))
        splits["val"].remove(moved)
        splits["train"].append(moved)
    for v in splits.values():
        v.sort()

    digest = hashlib.sha256()
    out_dir.mkdir(parents=True)
    for split, split_ids in splits.items():
        table = pa.Table.from_arrays(
            [
                pa.array(split_ids, pa.string()),
                pa.array([rows[i][0] for i in split_ids], pa.binary()),
                pa.array([rows[i][1] for i in split_ids], pa.int32()),
            ],
            schema=PREPARED_SCHEMA,
        )
        write_shards(table, out_dir / split, cfg.shard_size)
        for i in split_ids:
            digest.update(f"{split}\t{i}\t{rows[i][1]}\n".encode())
    labels = sorted({rows[i][1] for i in ids})
    manifest = {
        "format": 1,
        "source": cfg.source,
        "path": cfg.path,
        "counts": {split: len(v) for split, v in splits.items()},
        "resolution": cfg.resolution,
        "channels": cfg.channels,
        "class_names": source.class_names,
        "num_classes": len(source.class_names),
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
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# --------------------------------------------------------------------------- helpers and sources


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _arrays(n: int, seed: int, size: tuple[int, int] = (12, 10)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_same(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) and "manifest.json" in fa, (sorted(fa), sorted(fb))
    for rel in fa:
        assert fa[rel] == fb[rel], rel


NEAR_KEYS = ("near_duplicate_groups", "near_duplicate_images", "near_duplicate_largest_group")


def _as_before(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` without what near-duplicate grouping added: the yardstick's manifest."""
    out = {k: v for k, v in manifest.items() if k not in NEAR_KEYS}
    out["split_rule"] = P.SPLIT_RULE
    return out


def _assert_same_shards(a: Path, b: Path) -> None:
    """The same shards, byte for byte (the manifests are compared as dicts)."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) and "manifest.json" in fa, (sorted(fa), sorted(fb))
    for rel in fa:
        assert rel == "manifest.json" or fa[rel] == fb[rel], rel


def _folder(root: Path) -> Path:
    """3 classes of PNGs and JPEGs (one nested), two unlabelled images at the top, duplicates (the
    same file in two classes; the same pixels as PNG and BMP), a corrupt and a truncated file."""
    arrays = _arrays(30, seed=1)
    for c, name in enumerate(["cat", "bird", "dog"]):
        for i in range(8):
            sub = root / name / ("nested" if i == 7 else "")
            sub.mkdir(parents=True, exist_ok=True)
            fmt = "JPEG" if i % 3 == 0 else "PNG"
            (sub / f"{i}.{fmt.lower()}").write_bytes(_encoded(arrays[8 * c + i], fmt))
    (root / "dog" / "dup_of_cat.png").write_bytes((root / "cat" / "1.png").read_bytes())  # cat comes first
    (root / "bird" / "same_pixels.bmp").write_bytes(_encoded(arrays[9], "BMP"))  # bird/1.png's pixels
    (root / "top_a.png").write_bytes(_png(arrays[24]))
    (root / "top_b.bmp").write_bytes(_encoded(arrays[24], "BMP"))  # the same pixels again, unlabelled
    (root / "cat" / "garbage.png").write_bytes(b"not an image")
    (root / "bird" / "truncated.png").write_bytes(_png(arrays[25])[:50])
    return root


def _parquet(d: Path) -> Path:
    """Two files, small row groups, string labels, a repeated image (a null label is refused:
    tests/test_sources.py; the folder source covers unlabelled images among labelled ones)."""
    d.mkdir(parents=True)
    imgs = [_png(a) for a in _arrays(90, seed=2, size=(16, 16))]
    imgs[50] = imgs[3]
    labels = [["zebra", "ant", "yak"][i % 3] for i in range(90)]
    for k, (lo, hi) in enumerate([(0, 40), (40, 90)]):
        pq.write_table(pa.table({"image": imgs[lo:hi], "label": labels[lo:hi]}), d / f"{k}.parquet", row_group_size=16)
    return d


def _tars(d: Path) -> Path:
    """Two webdataset shards, ``.cls`` labels, a sample without an image, a repeated image."""
    arrays = _arrays(14, seed=4)
    samples = [(f"{i:06d}", {"jpg" if i % 2 else "png": _encoded(a, "JPEG" if i % 2 else "PNG"), "cls": f"{i % 4}".encode()})
               for i, a in enumerate(arrays)]
    samples[9] = ("000009", {"png": samples[2][1]["png"], "cls": b"3"})
    samples[5] = ("000005", {"txt": b"no image", "cls": b"1"})
    for k, chunk in enumerate([samples[:7], samples[7:]]):
        d.mkdir(parents=True, exist_ok=True)
        with tarfile.open(d / f"{k:05d}.tar", "w") as tf:
            for key, parts in chunk:
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return d


def _smooth(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A smooth RGB image (a random 3×3 upsampled): a 1-pixel shift or a JPEG re-encode of it stays close."""
    small = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))


def _planted(root: Path, families: int = 6, singles: int = 30) -> Path:
    """Class ``fK``: an image and three near-copies (noise σ 2, a 1-pixel shift, JPEG q 90);
    class ``other``: unrelated smooth images."""
    rng = np.random.default_rng(11)
    for k in range(families):
        base = _smooth(rng)
        noisy = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
        shifted = np.concatenate([base[:, :1], base[:, :-1]], axis=1)
        (root / f"f{k}").mkdir(parents=True)
        for name, data in (("base.png", _png(base)), ("noisy.png", _png(noisy)), ("shifted.png", _png(shifted)),
                           ("jpeg.jpg", _encoded(base, "JPEG"))):
            (root / f"f{k}" / name).write_bytes(data)
    (root / "other").mkdir()
    for i in range(singles):
        (root / "other" / f"{i}.png").write_bytes(_png(_smooth(rng)))
    return root


def _tiny(root: Path, n: int, seed: int) -> Path:
    root.mkdir(parents=True)
    for i, arr in enumerate(_arrays(n, seed=seed)):
        (root / f"{i}.png").write_bytes(_png(arr))
    return root


def _idx(d: Path) -> Path:
    """MNIST's IDX files (train only, not gzipped), 40 digits, two of them repeated."""
    d.mkdir(parents=True)
    x = np.random.default_rng(6).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    x[30], x[35] = x[2], x[20]
    for name, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", np.arange(40) % 10)):
        (d / name).write_bytes(bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes())
    return d


def _small_spill(monkeypatch) -> None:
    """Small partitions; a spill every few rows; a handful of buckets, each sorted in several id ranges."""
    monkeypatch.setattr("arvision.data.sources.FOLDER_CHUNK", 5)
    monkeypatch.setattr("arvision.data.sources.IDX_CHUNK", 7)
    monkeypatch.setattr(P, "SPILL_BYTES", 4096)
    monkeypatch.setattr(P, "BUCKET_BYTES", 2048)
    monkeypatch.setattr(P, "MAX_BUCKETS", 3)


def _case(name: str, tmp: Path) -> tuple[DataConfig, int]:
    """A source and params for the byte-identity tests."""
    small = dict(resolution=8, shard_size=16)
    if name.startswith("folder"):
        return DataConfig(source="folder", path=str(_folder(tmp / "src")), val_fraction=0.25, **small), int(name[-1])
    if name.startswith("emoji"):
        return DataConfig(resolution=16, max_images=300, shard_size=64), int(name[-1])
    if name == "planted":
        return DataConfig(source="folder", path=str(_planted(tmp / "src")), resolution=16, val_fraction=0.5, shard_size=16), 3
    if name == "parquet":
        return DataConfig(source="parquet", path=str(_parquet(tmp / "src")), val_fraction=0.2, max_images=70, **small), 0
    if name == "webdataset":
        return DataConfig(source="webdataset", path=str(_tars(tmp / "src")), label_column="cls", val_fraction=0.3, **small), 0
    if name == "mnist":
        return DataConfig(source="mnist", path=str(_idx(tmp / "src")), channels=1, val_fraction=0.3, **small), 0
    n, vf = {"balance_to_val": (3, 0.01), "balance_to_train": (3, 0.99), "one_image": (1, 0.5)}[name]
    return DataConfig(source="folder", path=str(_tiny(tmp / "src", n, seed=5)), val_fraction=vf, **small), 0


CASES = ["folder_seed0", "folder_seed3", "emoji_seed0", "emoji_seed3", "parquet", "webdataset", "mnist",
         "balance_to_val", "balance_to_train", "one_image"]


# --------------------------------------------------------------------------- byte identity


@pytest.mark.parametrize("name", CASES)
def test_streaming_prepare_matches_the_in_memory_one(name: str, tmp_path: Path, monkeypatch):
    """Shards byte for byte as the former implementation wrote them, manifest the same but for the
    near-duplicate keys: with the default spill, and with a tiny one (many spill files, several
    buckets, each sorted in id ranges). With no near-duplicate group, grouping changes nothing;
    without grouping (``data.near_duplicates: false``), never."""
    cfg, seed = _case(name, tmp_path)
    warnings.simplefilter("ignore")
    ref = _reference_prepare(cfg, seed, tmp_path / "ref")
    off = cfg.model_copy(update={"near_duplicates": False})
    ref_off = _reference_prepare(off, seed, tmp_path / "ref_off")
    new = prepare_dataset(cfg, seed, tmp_path / "new", progress=False, use_ray=False)
    assert new["near_duplicate_groups"] == 0 or name.startswith("emoji")
    if not new["near_duplicate_groups"]:
        assert _as_before(new) == ref
        _assert_same_shards(tmp_path / "ref", tmp_path / "new")
    assert _as_before(prepare_dataset(off, seed, tmp_path / "off", progress=False, use_ray=False)) == ref_off
    _assert_same_shards(tmp_path / "ref_off", tmp_path / "off")
    _small_spill(monkeypatch)
    assert prepare_dataset(cfg, seed, tmp_path / "small", progress=False, use_ray=False) == new
    _assert_same(tmp_path / "new", tmp_path / "small")
    if name.startswith("balance"):  # _balance did move an image
        assert ref["counts"] == {"train": 2, "val": 1} if name == "balance_to_val" else {"train": 1, "val": 2}
    if name == "one_image":
        assert ref["counts"] == {"train": 1, "val": 0} or ref["counts"] == {"train": 0, "val": 1}
    if name.startswith("folder"):
        assert ref["skipped"] == 2 and ref["duplicates"] == 3 and -1 in ref["labels_present"]


def test_the_warning_names_the_first_skipped_in_source_order(tmp_path: Path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.png").write_bytes(_png(_arrays(1, 0)[0]))
    for i in range(8):
        (root / f"bad{i}.png").write_bytes(b"nope")
    with pytest.warns(UserWarning) as caught:
        m = prepare_dataset(DataConfig(source="folder", path=str(root), resolution=8), 0, tmp_path / "out", progress=False)
    assert m["skipped"] == 8
    names = ", ".join(str(root / f"bad{i}.png") for i in range(5))
    assert str(caught[0].message) == f"prepare: skipped 8 image(s) that could not be decoded, e.g. {names}"


def test_partitions_pickle_and_read_back_as_the_records(tmp_path: Path, monkeypatch):
    """Every source's partitions travel (pickled, no image bytes) and read back as its records."""
    monkeypatch.setattr("arvision.data.sources.IDX_CHUNK", 7)
    mnist = _idx(tmp_path / "mnist")
    sources = [open_source("folder", str(_folder(tmp_path / "f"))), open_source("emoji", None),
               open_source("parquet", str(_parquet(tmp_path / "p"))),
               open_source("webdataset", str(_tars(tmp_path / "w")), label_column="cls"), open_source("mnist", str(mnist))]
    for src in sources:
        parts = src.partitions()
        blob = pickle.dumps(parts)
        assert len(blob) < 20_000, len(blob)
        got = [r for p in pickle.loads(blob) for r in read_partition(p)]
        want = list(src.records())
        assert len(got) == len(want) == src.count
        for g, w in zip(got, want):
            assert g[0] == w[0] and g[2] == w[2] and np.array_equal(np.asarray(g[1]), np.asarray(w[1]))


def test_the_ray_rule(monkeypatch):
    parts = [object(), object()]
    import arvision.cluster as C

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(C, "usable_cores", lambda: 2)
    assert not P.wants_ray(P.RAY_MIN_IMAGES, parts, RayConfig())  # two cores: Ray's start-up costs more than it gives
    monkeypatch.setattr(C, "usable_cores", lambda: C.RAY_MIN_CORES)
    assert not P.wants_ray(P.RAY_MIN_IMAGES - 1, parts, RayConfig())
    assert P.wants_ray(P.RAY_MIN_IMAGES, parts, RayConfig())
    assert not P.wants_ray(P.RAY_MIN_IMAGES, parts[:1], RayConfig())  # one partition: nothing to fan out
    assert P.wants_ray(10, parts, RayConfig(address="ray://head:10001"))
    assert P.bucket_count(10, 32, 3) == 1 and P.bucket_count(10**9, 256, 3) == P.MAX_BUCKETS
    ids = [f"{k:08x}" + "0" * 24 for k in (0, 2**31, 2**32 - 1)]
    assert P.bucket_of(ids, 4).tolist() == [0, 2, 3]


# --------------------------------------------------------------------------- near-duplicates


def _split_of_each(out: Path) -> dict[int, set[str]]:
    """label → the splits its images went to."""
    sides: dict[int, set[str]] = {}
    for split in ("train", "val"):
        for label in (pq.read_table(f, columns=["label"]).column("label").to_pylist()
                      for f in sorted((out / split).glob("*.parquet"))):
            for y in label:
                sides.setdefault(y, set()).add(split)
    return sides


def test_planted_near_duplicates_land_on_one_side(tmp_path: Path):
    """An image and its near-copies (noise, a 1-pixel shift, a JPEG re-encode) share a split for
    every seed, and the manifest counts their groups; without grouping, some family is split (the
    test has teeth); the same data give the same bytes twice."""
    cfg, _ = _case("planted", tmp_path)
    names = json.loads(json.dumps(open_source("folder", cfg.path).class_names))
    families = [names.index(f"f{k}") for k in range(6)]
    split_apart = 0
    for seed in (0, 1, 2, 3, 7):
        m = prepare_dataset(cfg, seed, tmp_path / f"s{seed}", progress=False, use_ray=False)
        sides = _split_of_each(tmp_path / f"s{seed}")
        assert all(len(sides[f]) == 1 for f in families), (seed, sides)
        assert m["near_duplicate_groups"] >= 6 and m["near_duplicate_images"] >= 24
        assert m["near_duplicate_largest_group"] >= 4 and m["counts"]["train"] + m["counts"]["val"] == 6 * 4 + 30
        assert "near-duplicate groups" in m["split_rule"]
        off = prepare_dataset(cfg.model_copy(update={"near_duplicates": False}), seed, tmp_path / f"off{seed}",
                              progress=False, use_ray=False)
        split_apart += sum(len(_split_of_each(tmp_path / f"off{seed}")[f]) == 2 for f in families)
        assert off["near_duplicate_groups"] == 0 and "near-duplicate" not in off["split_rule"]
    assert split_apart > 0
    prepare_dataset(cfg, 7, tmp_path / "again", progress=False, use_ray=False)
    _assert_same(tmp_path / "s7", tmp_path / "again")


def test_near_keys_area_means_and_offset_grids():
    """The thumbnail is the exact area mean (also when the size is not a multiple of the grid);
    a constant image's hashes differ between grids; a change of one level at a grid boundary
    keeps at least one hash."""
    arr = np.full((20, 20, 3), 100, np.uint8)
    hashes, thumb = P.near_keys(arr)
    assert len(set(hashes)) == P.NEAR_HASHES and np.frombuffer(thumb, np.uint8).tolist() == [100] * (P.NEAR_GRID ** 2 * 3)
    ramp = np.repeat(np.arange(20, dtype=np.uint8)[None, :, None] * 10, 20, axis=0)  # (20, 20, 1) columns 0..190
    means = np.frombuffer(P.near_keys(ramp)[1], np.uint8).reshape(P.NEAR_GRID, P.NEAR_GRID)
    assert means[0].tolist() == [round(v) for v in np.arange(20).reshape(P.NEAR_GRID, -1).mean(1) * 10] if 20 % P.NEAR_GRID == 0 \
        else means[0, 0] < means[0, -1]
    a, b = np.full((16, 16, 1), 63, np.uint8), np.full((16, 16, 1), 65, np.uint8)  # across the first grid's boundary at 64
    assert set(P.near_keys(a)[0]) & set(P.near_keys(b)[0])


# --------------------------------------------------------------------------- Ray Data


def test_ray_data_path_writes_the_same_bytes(tmp_path: Path, monkeypatch):
    """Decoding over Ray Data gives the in-process bytes: a folder in several partitions (with
    duplicates across them and undecodable files), Parquet row groups, webdataset shards."""
    import ray

    monkeypatch.setattr("arvision.data.sources.FOLDER_CHUNK", 7)
    ray_cfg = RayConfig(address="local")  # a fresh local instance, never one another process left running
    cases = [_case(n, tmp_path / n) for n in ("folder_seed3", "parquet", "webdataset", "planted")]
    try:
        for k, (cfg, seed) in enumerate(cases):
            warns = k in (0, 2)  # undecodable files in the folder and the tar shards
            with pytest.warns(UserWarning) if warns else contextlib.nullcontext() as caught:
                local = prepare_dataset(cfg, seed, tmp_path / f"local{k}", progress=False, use_ray=False)
            with pytest.warns(UserWarning) if warns else contextlib.nullcontext() as caught_ray:
                on_ray = prepare_dataset(cfg, seed, tmp_path / f"ray{k}", progress=False, use_ray=True, ray_cfg=ray_cfg)
            assert ray.is_initialized() and on_ray == local
            _assert_same(tmp_path / f"local{k}", tmp_path / f"ray{k}")
            if k == 3:  # near-duplicate groups computed from the keys Ray's tasks spilled
                assert local["near_duplicate_groups"] >= 6
            if warns:  # the same names, in source order (Ray's own deprecation warnings aside)
                ours = lambda ws: [str(w.message) for w in ws if str(w.message).startswith("prepare:")]  # noqa: E731
                assert ours(caught_ray) == ours(caught) and len(ours(caught)) == 1
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- memory


def _peaks(root: Path, n: int, out: Path, monkeypatch) -> tuple[int, int]:
    """Peak Python (tracemalloc) and Arrow bytes of an in-process prepare of ``n`` images (the
    source's file listing, opened beforehand, not counted)."""
    _tiny(root, n, seed=n)
    cfg = DataConfig(source="folder", path=str(root), resolution=16, shard_size=64)
    source = open_source("folder", str(root))
    monkeypatch.setattr(P, "open_source", lambda *a, **k: source)
    old_pool = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(old_pool)
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        m = prepare_dataset(cfg, 0, out, progress=False, use_ray=False)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(old_pool)
    assert m["counts"]["train"] + m["counts"]["val"] == n
    return python_peak, pool.max_memory()


def test_memory_does_not_grow_with_the_images(tmp_path: Path, monkeypatch, request):
    if not run_here(request):  # tracemalloc in a fresh interpreter: see tests/isolation.py
        return
    monkeypatch.setattr(P, "SPILL_BYTES", 64 << 10)
    monkeypatch.setattr(P, "BUCKET_BYTES", 64 << 10)
    _peaks(tmp_path / "warm", 50, tmp_path / "out_w", monkeypatch)  # imports and first-use caches
    small = _peaks(tmp_path / "s", 1_000, tmp_path / "out_s", monkeypatch)
    large = _peaks(tmp_path / "l", 4_000, tmp_path / "out_l", monkeypatch)
    print(f"peaks: python {small[0]} → {large[0]} bytes, arrow {small[1]} → {large[1]} bytes")
    assert large[0] < 1.5 * small[0] and large[1] < 1.5 * small[1]
