"""Image sources for ``prepare``: each yields records ``(origin, data, label)`` plus class names.

``data`` is encoded image bytes (any format Pillow reads) or a ``uint8`` array ``(H, W)`` /
``(H, W, C)``; ``origin`` names the record in messages (a path, or ``file#row``); ``label`` is
the class index, -1 when unlabelled. Every source reads in a sorted, deterministic order.

A source also splits into :class:`Partition` s: small, picklable descriptions (paths, row
groups, index ranges; never image bytes) that :func:`read_partition` reads, anywhere, into that
slice of the records. ``prepare`` fans them out over worker processes; chained in order, they are
the records (``records()`` is just that).

``SOURCES[name](path, image_column=..., label_column=..., label_from=...)`` builds a
:class:`Source`; a missing path, file, column or label is a :class:`~arvision.errors.UserError`
that names it. What cannot be read (an undecodable image, a symlink loop, a dangling link) is
yielded with empty data, so ``prepare`` skips, counts and names it like any bad image.
"""

from __future__ import annotations

import errno
import functools
import gzip
import json
import stat
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

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
#: Schema-metadata key the Hugging Face ``datasets`` library writes (features, with ClassLabel names).
HF_METADATA_KEY = b"huggingface"
#: ``label_from`` values: a label per sample (``label_column``), or one class per webdataset shard.
LABEL_FROM = ("key", "shard")

Record = tuple[str, Union[bytes, np.ndarray], int]
#: Records per partition of an image folder and of an MNIST file.
FOLDER_CHUNK = 512
IDX_CHUNK = 4096


@dataclass(frozen=True)
class Partition:
    """A slice of a source, in source order: ``read_partition`` runs reader ``kind`` on ``args``.
    Small and picklable (paths, row groups, index ranges), so a worker reads its own bytes."""

    kind: str
    args: tuple[Any, ...]


@dataclass
class Source:
    """What a source provides: class names (index = label), a record count (for progress), the
    records, and the partitions that, read in order, are those records (None: not partitioned)."""

    class_names: list[str]
    count: int
    records: Callable[[], Iterator[Record]]
    partitions: Optional[Callable[[], list[Partition]]] = None


def _partitioned(names: list[str], count: int, parts: Callable[[], list[Partition]]) -> Source:
    """A source whose records are its partitions read one after the other."""

    def records() -> Iterator[Record]:
        for part in parts():
            yield from read_partition(part)

    return Source(names, count, records, parts)


def _int_names(top: Optional[int]) -> list[str]:
    """Class names ``"0"`` … ``str(top)`` for integer labels whose largest is ``top``."""
    return [str(i) for i in range((top + 1) if top is not None and top >= 0 else 0)]


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


def _hf_class_names(md: dict, column: str) -> Optional[list[str]]:
    """The ClassLabel names of ``column`` in a Hugging Face ``datasets`` Parquet file, if any."""
    try:
        feature = json.loads(md[HF_METADATA_KEY])["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _labels_or_none(files: list[Path], label_column: str) -> Optional[pa.ChunkedArray]:
    """Every row's label in ``label_column``; None when the column is null in every row (the
    data are then unlabelled, with a warning). A null in some rows only is a UserError naming the
    first such row: -1 would silently make those images unlabelled among labelled ones."""
    per_file = [(f, pq.read_table(f, columns=[label_column]).column(label_column)) for f in files]
    values = pa.chunked_array([c for _, col in per_file for c in col.chunks], per_file[0][1].type)
    nulls = values.null_count
    if nulls and nulls == len(values):
        where = files[0] if len(files) == 1 else files[0].parent
        warnings.warn(f"data.label_column: '{label_column}' is null in every row of {where}; the data are read as "
                      "unlabelled (set data.label_column: null to say so)", stacklevel=3)
        return None
    if nulls:
        f, col = next((f, col) for f, col in per_file if col.null_count)
        row = pc.index(pc.is_null(col), True).as_py()
        raise UserError(
            f"data.label_column: '{label_column}' is null at {f}#{row} ({nulls} of {len(values)} rows have no label); "
            "give every row a label, or set data.label_column: null to read the data as unlabelled"
        )
    return values


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
    values = _labels_or_none(files, label_column) if label_column else None
    if values is None:
        label_column = None
    else:
        ltype = values.type
        if pa.types.is_integer(ltype):
            md = schema.metadata or {}
            top = pc.max(values).as_py()
            names = json.loads(md[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in md else \
                _hf_class_names(md, label_column) or _int_names(top)
        elif pa.types.is_string(ltype) or pa.types.is_large_string(ltype):
            names = sorted(set(values.to_pylist()))
            to_index = {n: i for i, n in enumerate(names)}
        else:
            raise UserError(f"{files[0]}: label column '{label_column}' holds {ltype}; need integers or strings")
    count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    def parts() -> list[Partition]:  # one per row group
        out = []
        for f in files:
            md, first = pq.ParquetFile(f).metadata, 0
            for rg in range(md.num_row_groups):
                out.append(Partition("parquet", (str(f), rg, first, image_column, label_column, to_index)))
                first += md.row_group(rg).num_rows
        return out

    return _partitioned(names, count, parts)


def _read_parquet_rows(f: str, row_group: int, first: int, image_column: str, label_column: Optional[str],
                       to_index: Optional[dict]) -> Iterator[Record]:
    """Row group ``row_group`` of file ``f`` (whose first row is row ``first`` of the file)."""
    cols = [image_column] + ([label_column] if label_column else [])
    table = pq.ParquetFile(f).read_row_group(row_group, columns=cols)
    imgs = _image_bytes(table.column(image_column))
    labels = table.column(label_column).to_pylist() if label_column else [None] * len(imgs)
    for i, (img, lab) in enumerate(zip(imgs, labels), start=first):
        lab = -1 if lab is None else (to_index[lab] if to_index is not None else int(lab))
        yield f"{f}#{i}", img, lab


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
    """A Parquet file, or a folder of them (sorted, recursive), with an image-bytes column (or the
    Hugging Face ``{bytes, path}`` struct) and an optional label column (integers, with class
    names from the ``arvision.class_names`` schema metadata or a Hugging Face ClassLabel if
    present, else ``str(i)``; or strings, indexed in sorted order)."""
    return _parquet_source(_require(path, "parquet"), image_column, label_column)


# --------------------------------------------------------------------------- folder


def _scan(d: Path, ancestors: tuple[Path, ...], bad: list[tuple[Path, str]]) -> tuple[list[Path], list[Path]]:
    """``d``'s sub-folders and image files (sorted, hidden names skipped). Folder links are
    followed, except one back to a folder in ``ancestors`` (a loop); a link that loops or points
    nowhere goes to ``bad`` with the reason, and so does any entry that cannot be looked at."""
    dirs, files = [], []
    for e in sorted(d.iterdir()):
        if e.name.startswith("."):
            continue
        try:
            mode = e.stat().st_mode  # follows links
        except OSError as err:
            why = "symlink loop" if err.errno == errno.ELOOP else \
                "dangling symlink" if e.is_symlink() else (err.strerror or "unreadable")
            bad.append((e, why))
            continue
        if stat.S_ISDIR(mode):
            if e.resolve() in ancestors:
                bad.append((e, "symlink loop"))
            else:
                dirs.append(e)
        elif stat.S_ISREG(mode) and e.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(e)
    return dirs, files


def _images_under(d: Path, ancestors: tuple[Path, ...], bad: list[tuple[Path, str]]) -> list[Path]:
    """Image files under ``d``, recursively, in sorted path order (see :func:`_scan`)."""
    ancestors = ancestors + (d.resolve(),)
    dirs, files = _scan(d, ancestors, bad)
    return sorted(files + [f for sub in dirs for f in _images_under(sub, ancestors, bad)])


def _read(f: Path) -> tuple[bytes, str]:
    """A file's bytes and ``""``; or empty bytes and why it cannot be read (``prepare`` then
    skips it and names it with the reason, e.g. "Permission denied")."""
    try:
        return f.read_bytes(), ""
    except OSError as err:
        return b"", err.strerror or type(err).__name__


def _read_files(items: tuple[tuple[str, int], ...]) -> Iterator[Record]:
    """Image files ``(path, label)``, read one at a time; one that cannot be read is named
    ``path (unreadable: why)`` with empty data."""
    for f, lab in items:
        data, why = _read(Path(f))
        yield (f"{f} (unreadable: {why})" if why else f), data, lab


def _read_unreadable(origins: tuple[str, ...]) -> Iterator[Record]:
    """Entries that cannot be read (named with the reason): empty data, so ``prepare`` skips them."""
    for origin in origins:
        yield origin, b"", -1


def folder_source(path: Optional[str], **_) -> Source:
    """An image folder. With sub-folders holding images: one class per sub-folder (label = index
    in sorted name order; images found recursively inside it; images directly at the top are then
    unlabelled, -1). Without: every image unlabelled (-1). Extensions are case-insensitive, so an
    ImageNet-style ``train/n01440764/*.JPEG`` tree reads as is. Folder links are followed; a
    symlink loop or a dangling link is not: it is yielded with empty data, so ``prepare`` skips
    and names it."""
    root = _require(path, "folder")
    if not root.is_dir():
        raise UserError(f"data.path '{root}' is not a folder (data.source 'folder')")
    bad: list[tuple[Path, str]] = []
    top = (root.resolve(),)
    subdirs, top_files = _scan(root, top, bad)
    classes = [(d, files) for d in subdirs if (files := _images_under(d, top, bad))]
    names = [d.name for d, _ in classes]
    items = [(str(f), -1) for f in top_files] + [(str(f), i) for i, (_, files) in enumerate(classes) for f in files]
    unreadable = tuple(f"{f} ({why})" for f, why in bad)

    def parts() -> list[Partition]:  # FOLDER_CHUNK files each, then the unreadable entries
        chunks = [Partition("files", (tuple(items[i : i + FOLDER_CHUNK]),)) for i in range(0, len(items), FOLDER_CHUNK)]
        return chunks + ([Partition("unreadable", (unreadable,))] if unreadable else [])

    return _partitioned(names, len(items) + len(bad), parts)


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
        parts.append((str(img_f), str(lab_f), len(imgs)))
    if not parts:
        raise UserError(f"{root}: no MNIST files (expected train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)")

    def slices() -> list[Partition]:  # IDX_CHUNK images each
        return [Partition("idx", (img_f, lab_f, i, min(i + IDX_CHUNK, n))) for img_f, lab_f, n in parts
                for i in range(0, n, IDX_CHUNK)]

    return _partitioned([str(d) for d in range(10)], sum(p[2] for p in parts), slices)


@functools.lru_cache(maxsize=2)
def _cached_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """An IDX file, parsed once per process and version of the file (each slice is a partition)."""
    return read_idx(Path(path))


def _idx_array(path: str) -> np.ndarray:
    st = Path(path).stat()
    return _cached_idx(path, st.st_mtime_ns, st.st_size)


def _read_idx_rows(images: str, labels: str, start: int, stop: int) -> Iterator[Record]:
    """Images ``start..stop`` of an MNIST pair of IDX files."""
    imgs, labs = _idx_array(images), _idx_array(labels)
    name = Path(images).name
    for i in range(start, stop):
        yield f"{name}#{i}", imgs[i], int(labs[i])


# --------------------------------------------------------------------------- webdataset


#: Member extensions read as the image of a webdataset sample (the first one a sample has).
WDS_IMAGE_EXTENSIONS = frozenset(e[1:] for e in IMAGE_EXTENSIONS)

Sample = tuple[str, dict[str, Optional[bytes]]]  # (key, {extension: bytes, or None when not read})


def _tar_files(p: Path) -> list[Path]:
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() == ".tar" and f.is_file()
                   and not any(s.startswith(".") for s in f.relative_to(p).parts)) if p.is_dir() else [p]
    if not files:
        raise UserError(f"data.path '{p}' holds no .tar files (data.source 'webdataset')")
    return files


def _split_member(name: str) -> Optional[tuple[str, str]]:
    """A member name → (key, extension): the key runs to the first dot of the base name (with the
    directory prefix), the extension (lower-cased) is the rest. None for hidden or dot-less names."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_samples(f: Path, want: Callable[[str], bool], stream: bool) -> Iterator[Sample]:
    """One tar's samples in order: its members grouped by key (consecutive, as webdataset writes
    them). Only the members whose extension ``want`` accepts are read, one sample at a time.
    ``stream``: read front to back (``r|*``); else random access, which skips unread members."""
    try:
        with tarfile.open(f, "r|*" if stream else "r:*") as tf:
            key, parts = None, {}
            for m in tf:
                split = _split_member(m.name) if m.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        yield key, parts
                    key, parts = split[0], {}
                if split[1] not in parts:
                    parts[split[1]] = tf.extractfile(m).read() if want(split[1]) else None
            if key is not None:
                yield key, parts
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{f}: not a readable tar file ({err}) (data.source 'webdataset')") from None


def _image_ext(parts: dict) -> Optional[str]:
    return next((e for e in parts if e in WDS_IMAGE_EXTENSIONS), None)


def _text_label(raw: bytes) -> Union[int, str, None]:
    """A text label member: an integer if it reads as one, else the stripped string; None if empty."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        return text or None


def _sample_label(f: Path, key: str, parts: dict, name: str) -> Union[int, str, None]:
    """Sample ``key``'s label: member ``KEY.<name>`` (an integer, else a string), or field
    ``name`` of ``KEY.json``; None (unlabelled) for an empty member or a JSON null. UserError,
    naming file and key, if neither exists."""
    if parts.get(name) is not None:
        return _text_label(parts[name])
    if parts.get("json") is not None:
        try:
            meta = json.loads(parts["json"])
        except ValueError as err:
            raise UserError(f"{f}#{key}: {key}.json is not valid JSON ({err})") from None
        if isinstance(meta, dict) and name in meta:
            value = meta[name]
            if value is None or (isinstance(value, (int, str)) and not isinstance(value, bool)):
                return value
            raise UserError(f"{f}#{key}: field '{name}' of {key}.json is {value!r}; need an integer or a string")
    raise UserError(
        f"{f}#{key}: no label '{name}' (no member {key}.{name}, no field '{name}' in {key}.json);"
        " set data.label_column to the member extension or JSON field, or to null for unlabelled data"
    )


def _wds_labels(files: list[Path], name: str) -> tuple[int, list[str], Optional[dict]]:
    """A first pass: (sample count, class names, string label → index or None for integer labels)."""
    count, values, first = 0, set(), {}  # first: int / str → the first sample with such a label
    want = lambda ext: ext in (name, "json")  # noqa: E731
    for f in files:
        for key, parts in _tar_samples(f, want, stream=False):
            count += 1
            if _image_ext(parts) is None:
                continue  # no image: prepare names it, its label does not matter
            value = _sample_label(f, key, parts, name)
            if value is not None:
                values.add(value)
                first.setdefault(type(value), f"{f}#{key}")
    if len(first) > 1:
        raise UserError(f"webdataset labels '{name}' mix integers ({first[int]}) and strings ({first[str]})")
    if str in first:
        names = sorted(values)
        return count, names, {n: i for i, n in enumerate(names)}
    return count, _int_names(max(values, default=None)), None


def webdataset_source(path: Optional[str], label_column: Optional[str] = "label", label_from: str = "key", **_) -> Source:
    """A webdataset ``.tar`` shard, or a folder of them (sorted, recursive), as img2dataset writes
    them: members grouped by key, each sample with an image member (``KEY.jpg``, ``.png``,
    ``.webp``, ...) and optional ``KEY.cls``, ``KEY.txt``, ``KEY.json``. Labels, with
    ``label_from="key"``: member ``KEY.<label_column>`` (e.g. ``cls``: an integer; other text: a
    string), else field ``label_column`` of ``KEY.json``; unlabelled (-1) when ``label_column`` is
    None. With ``label_from="shard"``: one class per shard stem (label = index in sorted order).
    Integer labels are their own index (class names ``str(i)``); strings are indexed in sorted
    order. A sample without an image is yielded with empty data (``prepare`` skips and names it).
    Origins: ``{tar}#{key}``; tar files are streamed, one sample in memory at a time."""
    if label_from not in LABEL_FROM:
        raise UserError(f"data.label_from '{label_from}': allowed {', '.join(LABEL_FROM)}")
    files = _tar_files(_require(path, "webdataset"))
    to_index: Optional[dict] = None
    by_shard = label_from == "shard"
    name = None if by_shard else label_column
    if name:
        count, names, to_index = _wds_labels(files, name)
    else:
        names = sorted({f.stem for f in files}) if by_shard else []
        count = sum(1 for f in files for _ in _tar_samples(f, lambda ext: False, stream=False))
    shard_index = {n: i for i, n in enumerate(names)} if by_shard else {}

    def parts() -> list[Partition]:  # one per tar file
        return [Partition("tar", (str(f), name, shard_index[f.stem] if by_shard else None, to_index)) for f in files]

    return _partitioned(names, count, parts)


def _read_tar(f: str, name: Optional[str], shard_label: Optional[int], to_index: Optional[dict]) -> Iterator[Record]:
    """One webdataset shard, streamed front to back. Labels: ``shard_label`` for every sample if
    given, else the sample's label ``name`` (None: unlabelled), via ``to_index`` for strings."""
    path = Path(f)

    def label(key: str, parts: dict) -> int:
        if shard_label is not None:
            return shard_label
        value = _sample_label(path, key, parts, name) if name else None
        return -1 if value is None else (to_index[value] if to_index is not None else value)

    def want(ext: str) -> bool:
        return ext in WDS_IMAGE_EXTENSIONS or (name is not None and ext in (name, "json"))

    for key, parts in _tar_samples(path, want, stream=True):
        img = _image_ext(parts)
        if img is None:
            yield f"{f}#{key} (no image member)", b"", -1
        else:
            yield f"{f}#{key}", parts[img], label(key, parts)


SOURCES: dict[str, Callable[..., Source]] = {
    "emoji": emoji_source,
    "folder": folder_source,
    "mnist": mnist_source,
    "parquet": parquet_source,
    "webdataset": webdataset_source,
}


_READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "files": _read_files,
    "unreadable": _read_unreadable,
    "parquet": _read_parquet_rows,
    "idx": _read_idx_rows,
    "tar": _read_tar,
}


def read_partition(part: Partition) -> Iterator[Record]:
    """The records of one partition, in source order (it reads the bytes itself)."""
    return _READERS[part.kind](*part.args)


def open_source(name: str, path: Optional[str], image_column: str = "image", label_column: Optional[str] = "label",
                label_from: str = "key") -> Source:
    """``SOURCES[name]`` with a UserError for an unknown name."""
    if name not in SOURCES:
        raise UserError(f"unknown data.source '{name}'; allowed: {', '.join(SOURCES)}")
    return SOURCES[name](path, image_column=image_column, label_column=label_column, label_from=label_from)
