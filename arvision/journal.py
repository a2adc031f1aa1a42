"""The registry's journal: what a stage registered and which aliases it moved, kept until DVC
has recorded the outputs the registration stands for.

A version is registered by a stage, before DVC records the stage's outputs in ``dvc.lock``
(DVC does that after the stage exits). So each registration is written down first, in
``.arvision/registry-journal/<stage>-<model>-<pid>.json``: the model, the content key of the
outputs it stands for (:func:`outputs_key`) and where they will lie, the stage's MLflow run,
the aliases as they were before, and the versions it created. Then:

- the stage fails or is interrupted (its top gone included): it undoes its own entries at
  once (:func:`undo_own`): versions it created deleted, aliases put back;
- the stage ends well: the flow, once DVC has had its say, and every ``arvision run`` at its
  start, settle the entries of stages no longer running (:func:`settle`): kept where DVC
  records the stage as up to date with outputs of the entry's key, undone otherwise.

Registration is idempotent on the same key: a version whose ``arvision.outputs_md5`` tag holds
it is reused, not registered again (:func:`find_version`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

JOURNAL_DIR = Path(".arvision") / "registry-journal"
#: the version tag holding the content key of the outputs a version stands for
KEY_TAG = "arvision.outputs_md5"
#: files of an output that name its registration rather than its content (written after it)
NOT_CONTENT = {"registry.json"}

_STAGE: dict[str, Any] = {}


def outputs_key(dirs: list[Path]) -> str:
    """md5 over the files of ``dirs`` (their paths relative to each dir, then their bytes),
    :data:`NOT_CONTENT` left out: the same trained model gives the same key."""
    h = hashlib.md5()
    for i, d in enumerate(dirs):
        for f in sorted(p for p in Path(d).rglob("*") if p.is_file() and p.name not in NOT_CONTENT):
            h.update(f"{i}/{f.relative_to(d).as_posix()}\0".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def open_stage(root: Path, stage: str) -> None:
    """Registrations in this process from now on are journaled as ``stage``'s, under ``root``."""
    _STAGE.update(root=Path(root), stage=stage)


def find_version(client, name: str, key: str):
    """The live version of ``name`` registered from outputs of content ``key``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    matches = [v for v in versions if (v.tags or {}).get(KEY_TAG) == key]
    return max(matches, key=lambda v: int(v.version)) if matches else None


def _aliases(client, name: str) -> dict[str, str] | None:
    """``{alias: version}`` of ``name``; None when there is no such registered model."""
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        return None


def begin(client, name: str, key: str, recorded_as: list[str], run_id: str, uri: str) -> Path | None:
    """Write down a registration about to happen (None outside a stage: nothing to settle)."""
    if not _STAGE:
        return None
    before = _aliases(client, name)
    entry = {"stage": _STAGE["stage"], "pid": os.getpid(), "name": name, "key": key, "recorded_as": recorded_as,
             "run_id": run_id, "tracking_uri": uri, "model_existed": before is not None,
             "aliases_before": before or {}, "created": []}
    path = _STAGE["root"] / JOURNAL_DIR / f"{_STAGE['stage']}-{name}-{os.getpid()}.json"
    _write(path, entry)
    return path


def created(path: Path | None, version: str) -> None:
    """The registration in ``path`` created ``version``."""
    if path is None:
        return
    entry = json.loads(path.read_text())
    entry["created"].append(str(version))
    _write(path, entry)


def _write(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=1))
    tmp.replace(path)


def _entries(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for p in sorted((Path(root) / JOURNAL_DIR).glob("*.json")):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):  # half-written by a killed stage: nothing registered after it
            p.unlink(missing_ok=True)
    return out


def undo(entry: dict[str, Any]) -> str:
    """Delete the versions ``entry`` created (those of its run that it had no time to note too)
    and put the aliases back; returns what was done, in words."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(entry["tracking_uri"])
    name = entry["name"]
    versions = set(entry["created"])
    try:
        versions |= {str(v.version) for v in client.search_model_versions(f"name='{name}' and run_id='{entry['run_id']}'")}
    except MlflowException:
        pass
    for v in sorted(versions, key=int):
        try:
            client.delete_model_version(name, v)
        except MlflowException:  # gone already
            pass
    now = _aliases(client, name)
    if now is None:
        return f"{name}: nothing to undo"
    before = entry["aliases_before"]
    moved = []
    for alias in sorted(set(now) | set(before)):
        if now.get(alias) == before.get(alias):
            continue
        try:
            if alias in before:
                client.set_registered_model_alias(name, alias, before[alias])
            else:
                client.delete_registered_model_alias(name, alias)
            moved.append(alias)
        except MlflowException:
            pass
    if not entry["model_existed"] and not client.search_model_versions(f"name='{name}'"):
        client.delete_registered_model(name)
    what = [f"version {', '.join(sorted(versions, key=int))} deleted"] if versions else []
    what += [f"{', '.join(moved)} put back"] if moved else []
    return f"{name}: " + ("; ".join(what) or "nothing to undo")


def undo_own() -> list[str]:
    """Undo this process's registrations (its stage failed or was interrupted: DVC will not
    record its outputs)."""
    if not _STAGE:
        return []
    done = []
    for path, entry in _entries(_STAGE["root"]):
        if entry.get("pid") == os.getpid():
            done.append(undo(entry))
            path.unlink(missing_ok=True)
    return done


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        return state != "Z"
    except OSError:
        if not Path("/proc/self").exists():  # not Linux: ask the kernel
            try:
                os.kill(pid, 0)
                return True
            except OSError:
                return False
        return False


def settle(root: Path, unchanged: Callable[[str], bool]) -> list[str]:
    """Settle the entries of stages no longer running: kept (the file dropped) where
    ``unchanged(stage)`` (DVC: the stage is up to date) and the outputs at ``recorded_as`` have
    the entry's key; undone otherwise. Returns a line for each undone entry."""
    done = []
    for path, entry in _entries(root):
        if entry.get("pid") != os.getpid() and _running(int(entry.get("pid", 0))):
            continue
        dirs = [Path(root) / p for p in entry["recorded_as"]]
        recorded = all(d.is_dir() for d in dirs) and outputs_key(dirs) == entry["key"] and unchanged(entry["stage"])
        if not recorded:
            done.append(f"{entry['stage']} (pid {entry['pid']}): " + undo(entry))
        path.unlink(missing_ok=True)
    return done
