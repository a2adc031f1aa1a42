"""The source listing ``prepare`` depends on: content-based (touching or copying files changes
nothing; adding, removing or editing one does), fast on a re-run (no file is hashed twice), and
a symlink loop or dangling link is skipped and named instead of stopping the run."""

import json
import os
import shutil
import time
from pathlib import Path


from arvision.data import listing as L


def _folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.bin").write_bytes(f"{c}{i}".encode() * 10)
    return root


def test_content_not_mtime_decides(tmp_path):
    data = _folder(tmp_path / "data")
    state = tmp_path / "state.parquet"
    first = L.source_listing(data, state)
    assert first["files"] == 6 and first["skipped_count"] == 0
    later = time.time() + 100
    os.utime(data / "a" / "0.bin", (later, later))  # touched only
    assert L.source_listing(data, state)["sha256"] == first["sha256"]
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)  # another place, other inodes and mtimes: the same data
    assert L.source_listing(copy, tmp_path / "other_state.parquet")["sha256"] == first["sha256"]
    (data / "b" / "1.bin").write_bytes(b"changed")
    edited = L.source_listing(data, state)
    assert edited["sha256"] != first["sha256"] and edited["files"] == 6
    (data / "b" / "new.bin").write_bytes(b"x")
    assert L.source_listing(data, state)["files"] == 7
    (data / "b" / "new.bin").unlink()
    (data / "b" / "1.bin").write_bytes(b"b1" * 10)
    assert L.source_listing(data, state)["sha256"] == first["sha256"]


def test_unchanged_files_are_not_hashed_again(tmp_path, monkeypatch):
    data = _folder(tmp_path / "data")
    state = tmp_path / "state.parquet"
    L.source_listing(data, state)
    calls = []
    real = L._md5
    monkeypatch.setattr(L, "_md5", lambda p: calls.append(p) or real(p))
    L.source_listing(data, state)
    assert calls == []
    (data / "a" / "2.bin").write_bytes(b"new content")
    L.source_listing(data, state)
    assert [p.name for p in calls] == ["2.bin"]


def test_symlink_loop_and_dangling_link_skipped_and_named(tmp_path):
    data = _folder(tmp_path / "data")
    os.symlink(data, data / "a" / "loop")  # a → data → a → ...
    os.symlink(tmp_path / "missing.png", data / "b" / "gone.png")
    out = L.source_listing(data, tmp_path / "state.parquet")
    assert out["files"] == 6
    assert sorted(out["skipped"]) == [["a/loop", "symlink loop"], ["b/gone.png", "dangling link"]]


def test_write_listing_rewrites_only_on_change(tmp_path):
    data = _folder(tmp_path / "data")
    listing = L.write_listing(tmp_path, "folder", "data")
    f = tmp_path / L.LISTING_FILE
    assert json.loads(f.read_text()) == listing and listing["path"] == "data"
    mtime = f.stat().st_mtime_ns
    time.sleep(0.01)
    L.write_listing(tmp_path, "folder", "data")
    assert f.stat().st_mtime_ns == mtime  # DVC sees the same file
    (data / "a" / "0.bin").write_bytes(b"edited")
    assert L.write_listing(tmp_path, "folder", "data")["sha256"] != listing["sha256"]


def test_a_single_file_source(tmp_path):
    f = tmp_path / "images.parquet"
    f.write_bytes(b"PAR1")
    out = L.source_listing(f, tmp_path / "state.parquet")
    assert out["files"] == 1 and out["bytes"] == 4


def _deny(monkeypatch, name: str) -> None:
    """Reading a file called ``name`` raises PermissionError, as a ``chmod 000`` file does for
    a user who is not root (root reads it anyway, so the test cannot rely on chmod)."""
    real_open = open

    def fake_open(path, *args, **kwargs):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)


def test_unreadable_file_skipped_and_named(tmp_path, monkeypatch):
    data = _folder(tmp_path / "data")
    _deny(monkeypatch, "1.bin")
    out = L.source_listing(data, tmp_path / "state.parquet")
    assert out["files"] == 4 and out["skipped_count"] == 2
    assert sorted(out["skipped"]) == [["a/1.bin", "unreadable (Permission denied)"],
                                      ["b/1.bin", "unreadable (Permission denied)"]]
    monkeypatch.undo()  # readable again: counted, and the listing changes (prepare re-runs)
    again = L.source_listing(data, tmp_path / "state.parquet")
    assert again["files"] == 6 and again["sha256"] != out["sha256"]


def test_chmod_000_file_skipped_and_named(tmp_path):
    if os.geteuid() == 0:
        import pytest

        pytest.skip("root reads a chmod 000 file; test_unreadable_file_skipped_and_named covers it")
    data = _folder(tmp_path / "data")
    (data / "a" / "0.bin").chmod(0)
    try:
        out = L.source_listing(data, tmp_path / "state.parquet")
    finally:
        (data / "a" / "0.bin").chmod(0o644)
    assert out["files"] == 5 and out["skipped"] == [["a/0.bin", "unreadable (Permission denied)"]]
