"""The source listing: what ``prepare`` depends on instead of the raw data itself.

DVC hashing ``data.path`` directly walks and hashes every raw file: 56 s the first time and
5-6 s for every no-op re-run at 200k files (bench/data_scale.py), and a symlink loop in the
folder stops it ("Too many levels of symbolic links"). Instead, the ``source`` DVC stage
(always run: ``always_changed``) writes ``data/source.json``: the number of files, their bytes
and a sha256 over ``relative path, size, md5`` of every file, sorted. ``prepare`` depends on
that file, so it re-runs exactly when a file is added, removed or changed in content, and not
when files are only touched or copied to another machine (the listing is content-based).

Speed: a file's md5 is kept in a local state file (``.arvision/source_state.parquet``, not
shared) keyed by path, size, mtime and inode, so an unchanged folder costs one ``stat`` walk.
Links: links to files count as the file they point to; links to folders are followed unless
they lead back to a folder already on the way (a loop), which is skipped and named, as is a
dangling link or a file that cannot be read (no read permission), in ``skipped``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

#: where the listing is written, relative to the project root (a dependency of ``prepare``)
LISTING_FILE = "data/source.json"
STATE_FILE = ".arvision/source_state.parquet"
_STATE_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("ino", pa.int64()),
                           ("md5", pa.string())])


def walk_files(root: Path) -> Iterator[tuple[str, Optional[os.stat_result], str]]:
    """``(relative path, stat of the file or None, why skipped or "")`` for every file under
    ``root`` (a file: just itself), in sorted order; hidden entries (``.name``) are left out."""
    root = Path(root)
    if root.is_file():
        yield root.name, root.stat(), ""
        return
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}

    def visit(d: str, rel: str, ancestors: frozenset) -> Iterator[tuple[str, Optional[os.stat_result], str]]:
        try:
            with os.scandir(d) as it:
                entries = sorted(((e.name, e.path, e.is_symlink()) for e in it if not e.name.startswith(".")))
        except OSError as err:
            yield rel or ".", None, f"unreadable folder ({err.strerror})"
            return
        for name, full, link in entries:
            r = f"{rel}/{name}" if rel else name
            try:
                st = os.stat(full)  # follows links
            except OSError as err:
                yield r, None, "symlink loop" if err.errno == errno.ELOOP else ("dangling link" if link else err.strerror)
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors or (link and key in seen):
                    yield r, None, "symlink loop"
                    continue
                seen.add(key)
                yield from visit(full, r, ancestors | {key})
            else:
                yield r, st, ""

    yield from visit(str(root), "", frozenset(seen))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_state(state_file: Path) -> dict[str, tuple[int, int, int, str]]:
    if not state_file.exists():
        return {}
    try:
        t = pq.read_table(state_file)
    except Exception:  # a damaged cache is only a cache: rebuild it
        return {}
    cols = [t.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "ino", "md5")]
    return {p: (s, m, i, h) for p, s, m, i, h in zip(*cols)}


def _save_state(state_file: Path, rows: list[tuple[str, int, int, int, str]]) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(f".tmp-{os.getpid()}")
    cols = list(zip(*rows)) if rows else [[], [], [], [], []]
    pq.write_table(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, _STATE_SCHEMA)], schema=_STATE_SCHEMA),
                   tmp)
    os.replace(tmp, state_file)


def source_listing(path: Path, state_file: Path, exclude: frozenset[str] = frozenset()) -> dict:
    """The listing of ``path`` (a file or a folder, less the relative paths in ``exclude``):
    ``files``, ``bytes``, ``sha256`` (module docstring) and ``skipped`` (``[relative path,
    why]``, at most 20 named; ``skipped_count``: all)."""
    path = Path(path)
    folder = path.is_dir()
    base = str(path.resolve()) + "/"  # the state's keys: absolute paths
    old = _load_state(state_file)
    digest = hashlib.sha256()
    rows, skipped, n, total, hashed = [], [], 0, 0, 0
    for rel, st, why in walk_files(path):
        if st is None:
            skipped.append([rel, why])
            continue
        if rel in exclude:
            continue
        key = base + rel if folder else base.rstrip("/")
        prev = old.get(key)
        if prev and prev[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
            md5 = prev[3]
        else:
            try:
                md5, hashed = _md5(Path(key)), hashed + 1
            except OSError as err:  # e.g. no read permission: prepare skips it too, so it is not data
                skipped.append([rel, f"unreadable ({err.strerror or type(err).__name__})"])
                continue
        rows.append((key, st.st_size, st.st_mtime_ns, st.st_ino, md5))
        digest.update(f"{rel}\t{st.st_size}\t{md5}\n".encode())
        n, total = n + 1, total + st.st_size
    if hashed or len(rows) != len(old):  # else the state holds exactly these rows already
        _save_state(state_file, rows)
    return {"files": n, "bytes": total, "sha256": digest.hexdigest(), "skipped": skipped[:20], "skipped_count": len(skipped)}


def write_listing(root: Path, source: str, data_path: Optional[str]) -> dict:
    """Write ``root/data/source.json`` for ``data.source`` / ``data.path`` (relative paths are
    taken from ``root``); the file is rewritten only when its content changes. Returns it."""
    from arvision.data.sources import EMOJI_DIR

    where = root / Path(data_path).expanduser() if data_path else EMOJI_DIR  # as DataConfig.location
    out = root / LISTING_FILE
    inside = out.resolve().is_relative_to(where.resolve()) and where.is_dir()
    exclude = frozenset({str(out.resolve().relative_to(where.resolve()))}) if inside else frozenset()
    listing = {"source": source, "path": data_path, **source_listing(where, root / STATE_FILE, exclude)}
    text = json.dumps(listing, indent=2) + "\n"
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, out)
    return listing
