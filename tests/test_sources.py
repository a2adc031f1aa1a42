"""Sources where large image sets live, read end to end through ``prepare``: webdataset tar
shards (img2dataset layout), Hugging Face Parquet, ImageNet-style folders, and folders with
symlink loops or dangling links."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arvision.config import DataConfig
from arvision.data.parquet_io import load_images
from arvision.data.prepare import content_id, normalise, prepare_dataset
from arvision.data.sources import SOURCES, open_source
from arvision.errors import UserError

RES = 8


def _image(seed: int, fmt: str = "PNG", size: tuple[int, int] = (12, 10)) -> bytes:
    """A small random RGB image, encoded."""
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _id(data: bytes) -> str:
    """The id ``prepare`` gives an image at RES."""
    return content_id(normalise(data, RES, 3))


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset shard: each sample's members ``KEY.ext``, consecutive, in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))
    return path


def _prep(tmp: Path, name: str = "out", **data) -> tuple[dict, Path]:
    out = tmp / name
    return prepare_dataset(DataConfig(resolution=RES, **data), 0, out, progress=False), out


def _labels_by_id(out: Path) -> dict[str, int]:
    """id → label over both splits of a prepared folder."""
    found: dict[str, int] = {}
    for split in ("train", "val"):
        ids, _, y = load_images(out / split)
        found.update(zip(ids, (int(v) for v in y)))
    return found


def _same_files(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) >= 3
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _sample(seed: int, fmt: str = "JPEG", cls: Optional[int] = None, meta: Optional[dict] = None) -> dict[str, bytes]:
    """An img2dataset sample: the image, a caption, optional ``.cls`` and ``.json``."""
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    parts = {ext: _image(seed, fmt), "txt": f"caption {seed}".encode()}
    if cls is not None:
        parts["cls"] = f"{cls}\n".encode()
    if meta is not None:
        parts["json"] = json.dumps(meta).encode()
    return parts


# --------------------------------------------------------------------------- webdataset


def test_webdataset_cls_labels_folder_of_shards(tmp_path: Path):
    """A folder of shards (sorted, recursive, hidden ones skipped), ``.cls`` integer labels."""
    d = tmp_path / "shards"
    labels = [0, 2, 1, 2, 0, 1, 2]
    samples = [(f"{i:09d}", _sample(i, "PNG" if i % 3 == 0 else "JPEG", cls=c)) for i, c in enumerate(labels)]
    _write_tar(d / "00000.tar", samples[:3])
    _write_tar(d / "sub" / "00001.tar", samples[3:6])
    _write_tar(d / "sub" / "00002.tar", [("part/000000006", samples[6][1])])  # a key with a directory prefix
    _write_tar(d / ".cache" / "stale.tar", [("x", _sample(99, cls=5))])  # hidden: not read
    (d / "00000_stats.json").write_text("{}")  # img2dataset's side files: not shards
    expected = {_id(next(v for e, v in parts.items() if e in ("jpg", "png"))): c for (_, parts), c in zip(samples, labels)}
    assert len(expected) == 7

    src = open_source("webdataset", str(d), label_column="cls")
    recs = list(src.records())
    assert src.count == len(recs) == 7 and src.class_names == ["0", "1", "2"]
    assert [r[0] for r in recs][:2] == [f"{d / '00000.tar'}#000000000", f"{d / '00000.tar'}#000000001"]
    assert recs[-1][0] == f"{d / 'sub' / '00002.tar'}#part/000000006"
    assert [r[2] for r in recs] == labels

    m, out = _prep(tmp_path, source="webdataset", path=str(d), label_column="cls")
    assert m["class_names"] == ["0", "1", "2"] and m["num_classes"] == 3
    assert m["images_in_source"] == 7 and m["skipped"] == 0 and m["unlabelled"] == 0
    assert m["counts"]["train"] + m["counts"]["val"] == 7 and m["labels_present"] == [0, 1, 2]
    assert _labels_by_id(out) == expected
    _prep(tmp_path, "again", source="webdataset", path=str(d), label_column="cls")
    _same_files(out, tmp_path / "again")


def test_webdataset_json_field_string_labels(tmp_path: Path):
    """One ``.tar`` file; labels from a ``.json`` field, strings indexed in sorted order; a JSON null
    is unlabelled; a ``.txt`` member, present too, is not a label unless named."""
    species = ["zebra", "ant", "zebra", "moth", None, "ant"]
    samples = [(f"{i:09d}", _sample(10 + i, "WEBP" if i == 1 else "JPEG", meta={"species": s, "width": 12}))
               for i, s in enumerate(species)]
    tar = _write_tar(tmp_path / "data.tar", samples)
    names = ["ant", "moth", "zebra"]
    expected = {_id(p.get("jpg") or p["webp"]): (names.index(s) if s else -1) for (_, p), s in zip(samples, species)}

    m, out = _prep(tmp_path, source="webdataset", path=str(tar), label_column="species")
    assert m["class_names"] == names and m["unlabelled"] == 1 and m["images_in_source"] == 6
    assert _labels_by_id(out) == expected
    # a string label in a text member: KEY.txt holds the class name
    as_text = [(k, {"jpg": p.get("jpg") or _image(10 + i), "txt": (s or "moth").encode()})
               for i, ((k, p), s) in enumerate(zip(samples, species))]
    src = SOURCES["webdataset"](str(_write_tar(tmp_path / "txt.tar", as_text)), label_column="txt")
    assert src.class_names == names and [r[2] for r in src.records()] == [2, 0, 2, 1, 1, 0]


def test_webdataset_class_per_shard(tmp_path: Path):
    """``data.label_from: shard``: the label is the index of the shard's stem in sorted order."""
    d = tmp_path / "classes"
    expected = {}
    for c, name in enumerate(["bird", "cat", "dog"]):
        samples = [(f"{name}_{i:04d}", {"jpg": _image(100 * c + i, "JPEG")}) for i in range(3)]
        _write_tar(d / ("" if name != "cat" else "more") / f"{name}.tar", samples)
        expected.update({_id(p["jpg"]): c for _, p in samples})
    src = open_source("webdataset", str(d), label_from="shard")  # data.label_column ("label") is not used
    assert src.class_names == ["bird", "cat", "dog"] and sorted(r[2] for r in src.records()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    m, out = _prep(tmp_path, source="webdataset", path=str(d), label_from="shard")
    assert m["class_names"] == ["bird", "cat", "dog"] and m["images_in_source"] == 9
    assert _labels_by_id(out) == expected


def test_webdataset_unlabelled_and_a_sample_without_image(tmp_path: Path):
    """``data.label_column: null``: every image -1. A sample with no image member is skipped and named."""
    samples = [(f"{i:09d}", _sample(200 + i)) for i in range(4)] + [("000000004", {"txt": b"a caption, no image"})]
    tar = _write_tar(tmp_path / "u.tar", samples)
    with pytest.warns(UserWarning, match="000000004"):
        m, out = _prep(tmp_path, source="webdataset", path=str(tar), label_column=None)
    assert m["class_names"] == [] and m["num_classes"] == 0 and m["unlabelled"] == 4
    assert m["images_in_source"] == 5 and m["skipped"] == 1
    assert _labels_by_id(out) == {_id(p["jpg"]): -1 for _, p in samples[:4]}


def test_webdataset_errors_name_file_and_key(tmp_path: Path):
    samples = [(f"{i:09d}", _sample(300 + i, cls=i % 2)) for i in range(3)]
    samples[1][1].pop("cls")
    tar = _write_tar(tmp_path / "s.tar", samples)
    with pytest.raises(UserError, match=r"s\.tar#000000001: no label 'cls'.*000000001\.cls"):
        _prep(tmp_path, source="webdataset", path=str(tar), label_column="cls")
    with pytest.raises(UserError, match=r"s\.tar#000000000: no label 'label'.*null for unlabelled"):
        _prep(tmp_path, source="webdataset", path=str(tar))  # the default label_column
    mixed = _write_tar(tmp_path / "m.tar", [("a", _sample(1, meta={"y": 3})), ("b", _sample(2, meta={"y": "cat"}))])
    with pytest.raises(UserError, match=r"mix integers \(.*m\.tar#a\) and strings \(.*m\.tar#b\)"):
        SOURCES["webdataset"](str(mixed), label_column="y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .tar files"):
        _prep(tmp_path, source="webdataset", path=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does_not_exist"):
        _prep(tmp_path, source="webdataset", path=str(tmp_path / "does_not_exist"))
    (tmp_path / "fake.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(UserError, match="fake.tar: not a readable tar file"):
        SOURCES["webdataset"](str(tmp_path / "fake.tar"), label_column=None)
    assert not (tmp_path / "out").exists()


def test_webdataset_streams_one_sample_at_a_time(tmp_path: Path, monkeypatch):
    """The count comes from a first pass (random access); the records then stream each shard
    front to back (``r|*``), sample by sample."""
    tar = _write_tar(tmp_path / "big.tar", [(f"{i:09d}", _sample(400 + i, cls=1)) for i in range(50)])
    opened, real_open = [], tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name, mode="r", **kw: opened.append(mode) or real_open(name, mode, **kw))
    src = SOURCES["webdataset"](str(tar), label_column="cls")
    assert src.count == 50 and opened == ["r:*"]
    records = src.records()
    first = next(records)
    assert opened == ["r:*", "r|*"]
    assert first[0] == f"{tar}#000000000" and first[2] == 1 and first[1] == _image(400, "JPEG")
    assert sum(1 for _ in records) == 49


# --------------------------------------------------------------------------- Hugging Face Parquet


def test_hugging_face_parquet_struct_and_class_label(tmp_path: Path):
    """The ``datasets`` layout: ``data/train-0000x-of-00002.parquet``, an image struct
    ``{bytes, path}`` and an integer label whose names are in the ClassLabel metadata."""
    d = tmp_path / "hf" / "data"
    d.mkdir(parents=True)
    names = ["tench", "goldfish", "shark"]
    hf_meta = {"info": {"features": {"image": {"_type": "Image"},
                                     "label": {"names": names, "_type": "ClassLabel"}}}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    expected = {}
    for shard in range(2):
        imgs = [_image(500 + 10 * shard + i, "JPEG") for i in range(4)]
        labels = [(shard + i) % 3 for i in range(4)]
        expected.update({_id(b): y for b, y in zip(imgs, labels)})
        table = pa.table({
            "image": pa.array([{"bytes": b, "path": f"img_{shard}_{i}.jpg"} for i, b in enumerate(imgs)], image_type),
            "label": pa.array(labels, pa.int64()),
        }).replace_schema_metadata({"huggingface": json.dumps(hf_meta)})
        pq.write_table(table, d / f"train-{shard:05d}-of-00002.parquet")
    m, out = _prep(tmp_path, source="parquet", path=str(tmp_path / "hf"))
    assert m["class_names"] == names and m["images_in_source"] == 8 and m["skipped"] == 0
    assert _labels_by_id(out) == expected
    _prep(tmp_path, "again", source="parquet", path=str(tmp_path / "hf"))
    _same_files(out, tmp_path / "again")


# --------------------------------------------------------------------------- folders


def test_imagenet_style_folder(tmp_path: Path):
    """``train/n01440764/*.JPEG``: one class per synset folder, upper-case extensions."""
    root = tmp_path / "imagenet" / "train"
    synsets = ["n01443537", "n01440764", "n01484850"]
    expected = {}
    for s, synset in enumerate(synsets):
        (root / synset).mkdir(parents=True)
        for i in range(3):
            data = _image(600 + 10 * s + i, "JPEG", size=(20, 16))
            (root / synset / f"{synset}_{i}.JPEG").write_bytes(data)
            expected[_id(data)] = sorted(synsets).index(synset)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")  # not an image
    m, out = _prep(tmp_path, source="folder", path=str(root))
    assert m["class_names"] == sorted(synsets) and m["images_in_source"] == 9 and m["skipped"] == 0
    assert _labels_by_id(out) == expected
    _prep(tmp_path, "again", source="folder", path=str(root))
    _same_files(out, tmp_path / "again")


def test_folder_symlink_loops_and_dangling_links_skipped_and_named(tmp_path: Path):
    """A loop back up the tree, a link to itself, a dangling link (file or folder): not followed,
    no crash, each skipped and named; a link to a real folder elsewhere is followed."""
    root, extra = tmp_path / "d", tmp_path / "extra"
    expected = {}
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            data = _image(700 + 10 * c + i)
            (root / name / f"{i}.png").write_bytes(data)
            expected[_id(data)] = c
    extra.mkdir()
    (extra / "x.png").write_bytes(data := _image(799))
    expected[_id(data)] = 1
    os.symlink(extra, root / "dog" / "more")  # followed: a folder elsewhere
    os.symlink(root, root / "loop")  # d/loop -> d
    os.symlink("..", root / "cat" / "up")  # d/cat/up -> d
    os.symlink("self.png", root / "cat" / "self.png")  # a link to itself
    os.symlink("missing.png", root / "cat" / "gone.png")  # dangling, an image name
    os.symlink(tmp_path / "nowhere", root / "gone_class")  # dangling, a folder name

    src = SOURCES["folder"](str(root))
    assert src.class_names == ["cat", "dog"] and src.count == 10
    with pytest.warns(UserWarning, match="skipped 5 image") as caught:
        m, out = _prep(tmp_path, source="folder", path=str(root))
    msg = str(caught[0].message)
    for bad in ("loop (symlink loop)", "up (symlink loop)", "self.png (symlink loop)",
                "gone.png (dangling symlink)", "gone_class (dangling symlink)"):
        assert bad in msg, (bad, msg)
    names = {r[0] for r in src.records() if r[1] == b""}
    assert names == {f"{root / 'gone_class'} (dangling symlink)", f"{root / 'loop'} (symlink loop)",
                     f"{root / 'cat' / 'gone.png'} (dangling symlink)", f"{root / 'cat' / 'self.png'} (symlink loop)",
                     f"{root / 'cat' / 'up'} (symlink loop)"}
    assert m["class_names"] == ["cat", "dog"] and m["images_in_source"] == 10 and m["skipped"] == 5
    assert _labels_by_id(out) == expected


def test_folder_unreadable_image_skipped_and_named(tmp_path: Path, monkeypatch):
    """A file that cannot be read (``chmod 000`` for a user who is not root; simulated, since
    root reads it anyway) is skipped, counted and named with the reason; prepare goes on."""
    root = tmp_path / "d"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(_image(900 + i))
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "2.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.warns(UserWarning, match="skipped 1 image") as caught:
        m, _ = _prep(tmp_path, source="folder", path=str(root))
    assert f"{root / '2.png'} (unreadable: Permission denied)" in str(caught[0].message)
    assert m["images_in_source"] == 4 and m["skipped"] == 1


@pytest.mark.parametrize("label_type", [pa.int64(), pa.string()])
def test_parquet_null_label_refused_with_its_row(tmp_path: Path, label_type):
    """A null among labels would become -1 (unlabelled) inside labelled data: refused, the row named."""
    imgs = [_image(950 + i) for i in range(4)]
    labels = [0, 1, None, 1] if label_type == pa.int64() else ["a", "b", None, "b"]
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": imgs, "label": pa.array(labels, label_type)}), f)
    with pytest.raises(UserError) as err:
        SOURCES["parquet"](str(f))
    assert str(err.value) == (f"data.label_column: 'label' is null at {f}#2 (1 of 4 rows have no label); give every row "
                              "a label, or set data.label_column: null to read the data as unlabelled")


def test_parquet_all_null_labels_read_as_unlabelled(tmp_path: Path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [_image(960 + i) for i in range(3)], "label": pa.array([None] * 3, pa.int32())}), f)
    with pytest.warns(UserWarning, match="'label' is null in every row.*read as unlabelled"):
        src = SOURCES["parquet"](str(f))
    assert src.class_names == [] and {lab for _, _, lab in src.records()} == {-1}
    with pytest.warns(UserWarning, match="null in every row"):  # a column of Arrow type null, too
        pq.write_table(pa.table({"image": [_image(970)], "label": pa.array([None])}), f)
        assert SOURCES["parquet"](str(f)).class_names == []
