"""Presets: a partial ``params.yaml`` (``configs/gpu/token-64.yaml``) applied in one step.

``params.yaml`` stays the one source of parameters, the file DVC reads to decide what is
stale: :func:`apply_preset` merges a preset's keys into it, section by section, keeping its
comments and the keys the preset does not name, after checking the merged result (an
unknown key or a value out of range is refused and ``params.yaml`` is left as it was). A
preset may name a base with ``extends: other.yaml`` (relative to itself), applied first.

A preset's own top-level ``about:`` (what it is for, what it reached, its wall time) is
documentation, never merged.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml

from arvision.config import ParamsError, parse_params
from arvision.errors import UserError

#: top-level keys of a preset that are not parameters
META_KEYS = ("about", "extends")


def read_preset(path: Path) -> dict[str, Any]:
    """The parameters a preset sets (its ``extends`` chain first), as nested dicts."""
    path = Path(path)
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = f"; presets there: {', '.join(near)}" if near else ""
        raise UserError(f"--config {path}: no such file{hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: a preset is a mapping of params.yaml sections, got {type(raw).__name__}")
    base: dict[str, Any] = {}
    if raw.get("extends"):
        base = read_preset(path.parent / str(raw["extends"]))
    return _merge(base, {k: v for k, v in raw.items() if k not in META_KEYS})


def _merge(into: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``into`` with ``over``'s keys: sections (dicts) merge key by key, other values replace."""
    out = dict(into)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "env":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def changed_keys(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key.path, old, new)`` for every parameter whose value differs."""
    rows = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key), after.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            rows += changed_keys(a, b, name + ".")
        elif a != b:
            rows.append((name, a, b))
    return rows


def apply_preset(params_file: Path, preset_file: Path) -> list[tuple[str, Any, Any]]:
    """Merge ``preset_file`` into ``params_file`` in place (comments kept, see the module's
    docstring); returns the keys it changed. Raises :class:`UserError` naming the preset and
    the key when the merged parameters are invalid, before anything is written."""
    from ruamel.yaml import YAML  # DVC's own YAML library: round-trips comments and order

    preset = read_preset(preset_file)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_file.read_text()) or {}
    before = yaml.safe_load(params_file.read_text()) or {}
    merged = _merge(before, preset)
    try:
        parse_params(merged, f"{params_file.name} with {preset_file}")
    except ParamsError as err:
        raise UserError(str(err)) from None
    _merge_into_doc(doc, preset)
    buf = io.StringIO()
    rt.dump(doc, buf)
    tmp = params_file.with_name(params_file.name + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(params_file)  # atomic: a reader sees the old file or the new one
    return changed_keys(before, merged)


def _merge_into_doc(doc, over: dict[str, Any]) -> None:
    """:func:`_merge` on ruamel's round-trip mapping, so untouched lines keep their comments."""
    for key, value in over.items():
        if isinstance(value, dict) and key in doc and hasattr(doc[key], "keys") and key != "env":
            _merge_into_doc(doc[key], value)
        else:
            doc[key] = value
