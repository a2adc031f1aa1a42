"""Image sources for ``prepare``: each yields records ``(origin, data, label)`` plus class names.

``data`` is encoded image bytes (any format Pillow reads) or a ``uint8`` array ``(H, W)`` /
``(H, W, C)``; ``origin`` names the record in messages (a path, or ``file#row``); ``label`` is
the class index, -1 when unlabelled. Every source reads in a sorted, deterministic order.

``SOURCES[name](path, image_column=..., label_column=...)`` builds a :class:`Source`; a missing
path, file or column is a :class:`~arvision.errors.UserError` that names it.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from arvision.errors import UserError

#: The embedded default data set (rendered by scripts/make_emoji.py).
EMOJI_DIR = Path(__file__).parent / "emoji"
EMOJI_FILE = "emoji.parquet"
#: Schema-metadata key of a Parquet file's class names (a JSON list, index = label).
CLASS_NAMES_KEY = b"arvision.class_names"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

Record = tuple[str, Union[bytes, np.ndarray], int]


@dataclass
class Source:
    """What a source provides: class names (index = label), a record count (for progress), the records."""

    class_names: list[str]
    count: int
    records: Callable[[], Iterator[Record]]


def _require(path: Optional[str], what: str) -> Path:
    if not path:
        raise UserError(f"data.path is required for data.source '{what}'")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data.path '{path}' does not exist (data.source '{what}')")
    return p


# --------------------------------------------------------------------------- parquet / emoji


def _parquet_files(p: Path) -> list[Path]:
    files = sorted(f for f in p.rglob("*.parquet") if not any(s.startswith(".") for s in f.relative_to(p).parts)) \
        if p.is_dir() else [p]
    if not files:
        raise UserError(f"data.path '{p}' holds no .parquet files")
    return files


def _image_bytes(col: pa.ChunkedArray) -> list:
    """An image column as a list of bytes: plain binary, or a struct with a ``bytes`` field
    (the Hugging Face ``datasets`` Image layout)."""
    if pa.types.is_struct(col.type):
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], col.type.field("bytes").type)
    return col.to_pylist()


def _parquet_source(path: Path, image_column: str, label_column: Optional[str]) -> Source:
    files = _parquet_files(path)
    schema = pq.read_schema(files[0])
    if image_column not in schema.names:
        raise UserError(
            f"{files[0]}: no image column '{image_column}' (data.image_column); columns: {', '.join(schema.names)}"
        )
    itype = schema.field(image_column).type
    if not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype)
            or (pa.types.is_struct(itype) and itype.get_field_index("bytes") >= 0)):
        raise UserError(f"{files[0]}: column '{image_column}' holds {itype}, not image bytes (data.image_column)")
    if label_column and label_column not in schema.names:
        raise UserError(
            f"{files[0]}: no label column '{label_column}' (data.label_column; set it to null for unlabelled data);"
            f" columns: {', '.join(schema.names)}"
        )
    for f in files[1:]:
        names = pq.read_schema(f).names
        for col in filter(None, (image_column, label_column)):
            if col not in names:
                raise UserError(f"{f}: no column '{col}'")

    names: list[str] = []
    to_index: Optional[dict] = None  # string labels → index by sorted value
    if label_column:
        ltype = schema.field(label_column).type
        values = pa.chunked_array(
            [c for f in files for c in pq.read_table(f, columns=[label_column]).column(label_column).chunks], ltype
        )
        if pa.types.is_integer(ltype):
            md = schema.metadata or {}
            top = pc.max(values).as_py()
            names = json.loads(md[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in md else \
                [str(i) for i in range((top + 1) if top is not None and top >= 0 else 0)]
        elif pa.types.is_string(ltype) or pa.types.is_large_string(ltype):
            names = sorted(set(values.to_pylist()) - {None})
            to_index = {n: i for i, n in enumerate(names)}
        else:
            raise UserError(f"{files[0]}: label column '{label_column}' holds {ltype}; need integers or strings")
    count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    def records() -> Iterator[Record]:
        for f in files:
            cols = [image_column] + ([label_column] if label_column else [])
            table = pq.read_table(f, columns=cols)
            imgs = _image_bytes(table.column(image_column))
            labels = table.column(label_column).to_pylist() if label_column else [None] * len(imgs)
            for i, (img, lab) in enumerate(zip(imgs, labels)):
                lab = -1 if lab is None else (to_index[lab] if to_index is not None else int(lab))
                yield f"{f}#{i}", img, lab

    return Source(names, count, records)


def emoji_source(path: Optional[str] = None, **_) -> Source:
    """The embedded default: Noto Color Emoji, 32×32 RGB, labelled with the Unicode group (9 classes).

    ``path``: the folder holding ``emoji.parquet`` or the file itself; None → the copy shipped
    inside the package.
    """
    p = Path(path).expanduser() if path else EMOJI_DIR
    if p.is_dir():
        p = p / EMOJI_FILE
    if not p.exists():
        raise UserError(f"the emoji data set is missing at {p} (regenerate it with scripts/make_emoji.py)")
    return _parquet_source(p, "image", "label")


def emoji_class_names() -> list[str]:
    """The emoji data set's class names (Unicode emoji groups), index = label."""
    md = pq.read_schema(EMOJI_DIR / EMOJI_FILE).metadata or {}
    return json.loads(md[CLASS_NAMES_KEY])


def parquet_source(path: Optional[str], image_column: str = "image", label_column: Optional[str] = "label", **_) -> Source:
    """A Parquet file, or a folder of them (sorted, recursive), with an image-bytes column and an
    optional label column (integers, with class names from the ``arvision.class_names`` schema
    metadata if present; or strings, indexed in sorted order)."""
    return _parquet_source(_require(path, "parquet"), image_column, label_column)


# --------------------------------------------------------------------------- folder


def _images_under(d: Path) -> list[Path]:
    return sorted(
        f for f in d.rglob("*")
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(s.startswith(".") for s in f.relative_to(d).parts)
    )


def folder_source(path: Optional[str], **_) -> Source:
    """An image folder. With sub-folders holding images: one class per sub-folder (label = index
    in sorted name order; images found recursively inside it; images directly at the top are then
    unlabelled, -1). Without: every image, recursively, unlabelled (-1)."""
    root = _require(path, "folder")
    if not root.is_dir():
        raise UserError(f"data.path '{root}' is not a folder (data.source 'folder')")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [(d, files) for d in subdirs if (files := _images_under(d))]
    if classes:
        names = [d.name for d, _ in classes]
        top = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        items = [(f, -1) for f in top] + [(f, i) for i, (_, files) in enumerate(classes) for f in files]
    else:
        names = []
        items = [(f, -1) for f in _images_under(root)]

    def records() -> Iterator[Record]:
        for f, lab in items:
            yield str(f), f.read_bytes(), lab

    return Source(names, len(items), records)


# --------------------------------------------------------------------------- mnist


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not): 2 zero bytes, a type byte (0x08 = uint8), the number of
    dimensions, each dimension as a big-endian int32, then the data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int(d) for d in np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4")]
    data = np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _find_idx(root: Path, prefix: str, kind: str) -> Optional[Path]:
    """``train-images-idx3-ubyte[.gz]`` or the dotted variant ``train-images.idx3-ubyte[.gz]``."""
    ext = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    for name in (f"{prefix}-{kind}-{ext}", f"{prefix}-{kind}.{ext}"):
        for suffix in ("", ".gz"):
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
    return None


def mnist_source(path: Optional[str], **_) -> Source:
    """A folder with the MNIST IDX files (train and t10k pooled; ``prepare`` re-splits by hash).
    Labels 0-9. Either pair may be absent, not both."""
    root = _require(path, "mnist")
    if not root.is_dir():
        raise UserError(f"data.path '{root}' is not a folder (data.source 'mnist')")
    parts = []
    for prefix in ("train", "t10k"):
        img_f, lab_f = _find_idx(root, prefix, "images"), _find_idx(root, prefix, "labels")
        if img_f is None and lab_f is None:
            continue
        if img_f is None or lab_f is None:
            missing = f"{prefix}-images-idx3-ubyte" if img_f is None else f"{prefix}-labels-idx1-ubyte"
            raise UserError(f"{root}: MNIST file '{missing}[.gz]' is missing")
        imgs, labs = read_idx(img_f), read_idx(lab_f)  # (N, 28, 28), (N,)
        if imgs.ndim != 3 or labs.ndim != 1 or len(imgs) != len(labs):
            raise UserError(f"{root}: {img_f.name} ({imgs.shape}) and {lab_f.name} ({labs.shape}) do not match")
        parts.append((img_f.name, imgs, labs))
    if not parts:
        raise UserError(f"{root}: no MNIST files (expected train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)")

    def records() -> Iterator[Record]:
        for name, imgs, labs in parts:
            for i in range(len(imgs)):
                yield f"{name}#{i}", imgs[i], int(labs[i])

    return Source([str(d) for d in range(10)], sum(len(p[1]) for p in parts), records)


SOURCES: dict[str, Callable[..., Source]] = {
    "emoji": emoji_source,
    "folder": folder_source,
    "mnist": mnist_source,
    "parquet": parquet_source,
}


def open_source(name: str, path: Optional[str], image_column: str = "image", label_column: Optional[str] = "label") -> Source:
    """``SOURCES[name]`` with a UserError for an unknown name."""
    if name not in SOURCES:
        raise UserError(f"unknown data.source '{name}'; allowed: {', '.join(SOURCES)}")
    return SOURCES[name](path, image_column=image_column, label_column=label_column)
