"""The data layer: sources, ``prepare`` (schema, determinism, split, skips, atomicity), Parquet I/O."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arvision.config import DataConfig
from arvision.data import parquet_io
from arvision.data.parquet_io import PREPARED_SCHEMA, load_images, read_split, write_shards
from arvision.data.prepare import is_val, normalise, prepare_dataset
from arvision.data.sources import SOURCES, emoji_class_names, read_idx
from arvision.errors import UserError

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"
if not MNIST.exists():
    MNIST = Path("/work/shared/datasets/mnist")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _random_images(n: int, seed: int = 0, size: tuple[int, int] = (12, 10)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _prep(tmp: Path, name: str = "out", seed: int = 0, **data) -> tuple[dict, Path]:
    out = tmp / name
    return prepare_dataset(DataConfig(**data), seed, out, progress=False), out


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """3 classes (sorted names → labels 0, 1, 2), 4 images each, one in a nested folder."""
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "bird", "dog"]):
        for i, arr in enumerate(_random_images(4, seed=c)):
            sub = root / name / ("nested" if i == 3 else "")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i}.png").write_bytes(_png(arr))
    return root


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    imgs = _random_images(300, seed=7, size=(16, 16))
    labels = np.arange(300, dtype=np.int64) % 3
    table = pa.table({"img": [_png(a) for a in imgs], "y": labels})
    table = table.replace_schema_metadata({"arvision.class_names": json.dumps(["a", "b", "c"])})
    path = tmp_path / "src.parquet"
    pq.write_table(table, path)
    return path


# --------------------------------------------------------------------------- prepare


def test_prepared_schema_and_rows(class_folder: Path, tmp_path: Path):
    m, out = _prep(tmp_path, source="folder", path=str(class_folder), resolution=8, val_fraction=0.25, shard_size=16)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train", "val"]
    for split in ("train", "val"):
        shards = sorted((out / split).glob("*.parquet"))
        assert shards[0].name == "part-00000.parquet"
        schema = pq.read_schema(shards[0])
        assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in PREPARED_SCHEMA]
        table = read_split(out / split)
        ids = table.column("id").to_pylist()
        assert ids == sorted(ids) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
        _, x, y = load_images(out / split)
        assert x.dtype == np.uint8 and x.shape == (len(ids), 8, 8, 3) and y.dtype == np.int32
    assert m["class_names"] == ["bird", "cat", "dog"] and m["num_classes"] == 3
    assert m["counts"]["train"] + m["counts"]["val"] == 12 and m["resolution"] == 8 and m["channels"] == 3
    assert json.loads((out / "manifest.json").read_text()) == m


def test_prepare_is_byte_identical(class_folder: Path, tmp_path: Path):
    _prep(tmp_path, "a", source="folder", path=str(class_folder), resolution=8, shard_size=16)
    _prep(tmp_path, "b", source="folder", path=str(class_folder), resolution=8, shard_size=16)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 3
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_split_disjoint_fraction_and_seed(parquet_file: Path, tmp_path: Path):
    kw = dict(source="parquet", path=str(parquet_file), image_column="img", label_column="y", resolution=8,
              val_fraction=0.2, shard_size=64)
    m, out = _prep(tmp_path, **kw)
    train, val = set(read_split(out / "train").column("id").to_pylist()), set(read_split(out / "val").column("id").to_pylist())
    assert not train & val and len(train | val) == 300
    assert 0.12 < len(val) / 300 < 0.28
    assert all(is_val(i, 0, 0.2) == (int(i, 16) % 10_000 < 2_000) for i in train | val)  # the documented rule
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"part-0000{i}.parquet" for i in range(-(-len(train) // 64))]
    m7, out7 = _prep(tmp_path, "seed7", seed=7, **kw)
    val7 = set(read_split(out7 / "val").column("id").to_pylist())
    assert val7 != val and len(val7 | set(read_split(out7 / "train").column("id").to_pylist())) == 300
    assert m7["content_hash"] != m["content_hash"]


def test_corrupt_images_skipped_and_counted(tmp_path: Path):
    root = tmp_path / "flat"
    root.mkdir()
    for i, arr in enumerate(_random_images(4)):
        (root / f"{i}.png").write_bytes(_png(arr))
    (root / "garbage.png").write_bytes(b"this is not a png")
    (root / "truncated.png").write_bytes(_png(_random_images(1, seed=9)[0])[:40])
    (root / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match="garbage.png"):
        m, out = _prep(tmp_path, source="folder", path=str(root), resolution=8)
    assert m["skipped"] == 2 and m["counts"]["train"] + m["counts"]["val"] == 4
    assert m["num_classes"] == 0 and (load_images(out / "train")[2] == -1).all()


def test_empty_or_unusable_source_is_a_user_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no usable image"):
        _prep(tmp_path, source="folder", path=str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no usable image"):
        _prep(tmp_path, source="folder", path=str(tmp_path / "bad"))
    with pytest.raises(UserError, match="does_not_exist"):
        _prep(tmp_path, source="mnist", path=str(tmp_path / "does_not_exist"))
    assert not (tmp_path / "out").exists()


def test_interrupted_prepare_keeps_the_previous_output(class_folder: Path, tmp_path: Path, monkeypatch):
    m, out = _prep(tmp_path, source="folder", path=str(class_folder), resolution=8)
    before = (out / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("arvision.data.prepare.write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        _prep(tmp_path, source="folder", path=str(class_folder), resolution=16)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out"]  # no temp dir left behind


def test_normalise_channels_alpha_and_crop():
    rgba = np.zeros((10, 20, 4), np.uint8)  # fully transparent black → white
    rgba[:, 8:12] = (255, 0, 0, 255)  # an opaque red band in the middle
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    x = normalise(buf.getvalue(), 8, 3)
    assert x.shape == (8, 8, 3) and (x[:, 0] >= 240).all()  # transparent → white (Lanczos rings a little)
    assert x[4, 4, 0] > 200 and x[4, 4, 1] < 60  # the centre crop keeps the red band
    g = normalise(np.full((28, 28), 7, np.uint8), 32, 1)
    assert g.shape == (32, 32, 1) and (g == 7).all()
    assert normalise(rgba[..., :3].copy(), 8, 1).shape == (8, 8, 1)


# --------------------------------------------------------------------------- sources


def test_folder_classes_and_flat(class_folder: Path, tmp_path: Path):
    src = SOURCES["folder"](str(class_folder))
    recs = list(src.records())
    assert src.class_names == ["bird", "cat", "dog"] and src.count == len(recs) == 12
    assert [r[2] for r in recs] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r[0] for r in recs] == sorted(r[0] for r in recs)  # a sorted walk
    flat = SOURCES["folder"](str(class_folder / "cat"))  # one level down: only "nested" is a class
    assert flat.class_names == ["nested"] and sorted(r[2] for r in flat.records()) == [-1, -1, -1, 0]
    (tmp_path / "flat").mkdir()
    for i, arr in enumerate(_random_images(3)):
        (tmp_path / "flat" / f"{i}.JPG").write_bytes(_png(arr))  # extension case-insensitive
    flat = SOURCES["folder"](str(tmp_path / "flat"))
    assert flat.class_names == [] and [r[2] for r in flat.records()] == [-1, -1, -1]


def test_parquet_source(parquet_file: Path, tmp_path: Path):
    src = SOURCES["parquet"](str(parquet_file), image_column="img", label_column="y")
    assert src.class_names == ["a", "b", "c"] and src.count == 300
    assert [r[2] for r in list(src.records())[:4]] == [0, 1, 2, 0]
    with pytest.raises(UserError, match="'image'"):
        SOURCES["parquet"](str(parquet_file), image_column="image", label_column="y")
    with pytest.raises(UserError, match="'label'"):
        SOURCES["parquet"](str(parquet_file), image_column="img", label_column="label")
    unlabelled = SOURCES["parquet"](str(parquet_file), image_column="img", label_column=None)
    assert unlabelled.class_names == [] and {r[2] for r in unlabelled.records()} == {-1}
    # a folder of files; string labels (indexed in sorted order); the Hugging Face image struct
    d = tmp_path / "pq"
    d.mkdir()
    imgs = [_png(a) for a in _random_images(4)]
    struct = pa.array([{"bytes": b, "path": None} for b in imgs], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "label": ["zebra", "ant", "zebra", None]}), d / "0.parquet")
    with pytest.raises(UserError, match=r"data.label_column: 'label' is null at .*0\.parquet#3 \(1 of 4 rows"):
        SOURCES["parquet"](str(d))  # a null label is refused, not read as -1 (tests/test_sources.py)
    pq.write_table(pa.table({"image": struct, "label": ["zebra", "ant", "zebra", "ant"]}), d / "0.parquet")
    src = SOURCES["parquet"](str(d))
    assert src.class_names == ["ant", "zebra"] and [r[2] for r in src.records()] == [1, 0, 1, 0]
    assert all(isinstance(r[1], bytes) for r in src.records())
    m, _ = _prep(tmp_path, source="parquet", path=str(d), resolution=8)
    assert m["num_classes"] == 2 and m["unlabelled"] == 0


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    data = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_mnist_idx_variants(tmp_path: Path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte", x, gz=False)  # plain names, not gzipped
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte"), x)
    src = SOURCES["mnist"](str(tmp_path))
    assert src.count == 20 and src.class_names == [str(d) for d in range(10)]
    recs = list(src.records())
    np.testing.assert_array_equal(recs[3][1], x[3])
    assert [r[2] for r in recs] == list(y)
    (tmp_path / "t10k-images.idx3-ubyte").write_bytes(b"")  # a test pair without labels
    with pytest.raises(UserError, match="t10k-labels"):
        SOURCES["mnist"](str(tmp_path))


@pytest.mark.skipif(not MNIST.exists(), reason="shared MNIST not present")
def test_mnist_shared(tmp_path: Path):
    src = SOURCES["mnist"](str(MNIST))
    assert src.count == 70_000
    m, out = _prep(tmp_path, source="mnist", path=str(MNIST), channels=1, max_images=300, shard_size=128)
    assert m["counts"]["train"] + m["counts"]["val"] == 300 and m["capped"] == 70_000 - m["duplicates"] - 300
    ids, x, y = load_images(out / "train")
    assert x.shape == (len(ids), 32, 32, 1) and set(np.unique(y)) <= set(range(10)) and len(np.unique(y)) == 10


def test_emoji_default(tmp_path: Path):
    m, out = _prep(tmp_path, resolution=16, val_fraction=0.1)
    n = m["counts"]["train"] + m["counts"]["val"]
    assert 3_500 <= n <= 3_700 and m["num_classes"] == 9 and m["labels_present"] == list(range(9))
    assert m["class_names"] == emoji_class_names() and m["class_names"][0] == "Smileys & Emotion"
    assert "Component" not in m["class_names"]
    _, x, _ = load_images(out / "val", limit=10)
    assert x.shape == (10, 16, 16, 3)
    # data.path may name the shipped folder, as params.yaml does
    assert SOURCES["emoji"](str(Path(__file__).resolve().parents[1] / "arvision/data/emoji")).count == n


# --------------------------------------------------------------------------- parquet_io


def test_write_shards_sizes_metadata_and_empty(tmp_path: Path):
    table = pa.table({"id": [f"{i:03d}" for i in range(10)], "label": pa.array(range(10), pa.int32())})
    paths = write_shards(table, tmp_path / "t", 4, metadata={"arvision.note": "x"})
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [4, 4, 2]
    back = read_split(tmp_path / "t")
    assert back.column("id").to_pylist() == table.column("id").to_pylist()
    assert back.schema.metadata[b"arvision.note"] == b"x"
    empty = write_shards(table.slice(0, 0), tmp_path / "e", 4)
    assert len(empty) == 1 and read_split(tmp_path / "e").num_rows == 0
    with pytest.raises(UserError, match="no such directory"):
        read_split(tmp_path / "missing")
    assert parquet_io.WRITE_OPTIONS["compression"] == "zstd"


def test_a_split_too_small_for_the_pipeline_stops_prepare(tmp_path: Path):
    """One image gives 1 train and 0 val: the stage (min_split) stops before writing anything,
    saying how many images evaluate needs; the library alone (no min_split) still prepares it."""
    from arvision.config import Params
    from arvision.data.checks import min_split_images

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(_random_images(1)[0]))
    need = min_split_images(Params())
    assert need == (6, "evaluate needs at least 6 in each (more than evaluate.nearest_k 5, and KID's 4)")
    with pytest.raises(UserError) as err:
        prepare_dataset(DataConfig(source="folder", path=str(folder), resolution=8), 0, tmp_path / "out", progress=False,
                        min_split=need)
    assert str(err.value) == (
        "data.val_fraction / data.path: the split gives 0 val and 1 train images (of 1 distinct images); evaluate "
        "needs at least 6 in each (more than evaluate.nearest_k 5, and KID's 4); use at least about 60 images "
        "(data.val_fraction 0.1), or change data.val_fraction")
    assert not (tmp_path / "out").exists()
    m, _ = _prep(tmp_path, source="folder", path=str(folder), resolution=8)
    assert m["counts"] == {"train": 1, "val": 0}
