"""What every stage shares: its paths, its MLflow run, atomic outputs and a thin ``main()``.

Each stage module has ``run(params, paths, tracker) -> metrics`` (pure work, testable with a
``NullTracker``) and a ``main()`` that DVC calls: it loads ``params.yaml``, opens the stage's
MLflow run, calls ``run`` and writes ``metrics/<stage>.json``. A user's mistake ends the stage
with one clear line and exit code 2, never a traceback.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from arvision.config import Params, load_params
from arvision.errors import UserError
from arvision.tracking import Tracker, stage_run

log = logging.getLogger("arvision")


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root (DESIGN.md's table)."""

    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def tokens(self) -> Path:
        return self.root / "data" / "tokens"

    @property
    def tokenizer(self) -> Path:
        return self.root / "models" / "tokenizer"

    @property
    def prior(self) -> Path:
        return self.root / "models" / "prior"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def cache(self) -> Path:
        """Scratch space DVC does not track (resumable checkpoints, Ray storage)."""
        return self.root / ".arvision"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds.

    An interrupted stage so leaves no half-written output that a later run would trust.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (write a sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.rename(path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    """A CSV of per-step metrics for ``dvc plots`` (columns: the union of keys, step first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["step"] + sorted({k for r in rows for k in r} - {"step"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(r[k], 6) if isinstance(r.get(k), float) else r.get(k, "")) for k in keys})


def resolve_device(name: str):
    """``auto`` → CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(name)


def dvc_hashes(root: Path, paths: list[str]) -> dict[str, str]:
    """The DVC hashes (from ``dvc.lock``) of upstream outputs this stage reads: lineage tags."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {}
    found: dict[str, str] = {}
    for st in stages.values():
        for out in st.get("outs", []) or []:
            if out.get("path") in paths and "md5" in out:
                found[out["path"]] = out["md5"]
    return found


def stage_main(stage: str, run: Callable[[Params, Paths, Tracker], dict[str, Any]], reads: list[str]) -> None:
    """The thin ``main()`` of a stage: params → MLflow run → ``run`` → ``metrics/<stage>.json``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path.cwd()
    try:
        params = load_params(root / "params.yaml")
        paths = Paths(root)
        tags = {f"dvc.dep.{k}": v for k, v in dvc_hashes(root, reads).items()}
        manifest = paths.prepared / "manifest.json"
        if manifest.exists() and stage != "prepare":
            tags["data.content_hash"] = read_json(manifest).get("content_hash", "")
        t0 = time.time()
        with stage_run(stage, root, tags=tags) as tracker:
            section = {"seed": params.seed}
            section.update(params.model_dump(mode="json"))
            tracker.log_params({k: v for k, v in section.items() if k in _PARAM_SECTIONS[stage]})
            metrics = run(params, paths, tracker)
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            metrics["stage_seconds"] = round(time.time() - t0, 2)
            tracker.log_metrics(metrics)
            write_json(paths.metrics / f"{METRICS_FILE.get(stage, stage)}.json", metrics)
    except UserError as err:
        print(f"error: {stage}: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{stage}: interrupted; no output was kept", file=sys.stderr)
        sys.exit(130)


# metrics/<name>.json per stage (DESIGN.md names evaluate's metrics/eval.json)
METRICS_FILE = {"evaluate": "eval"}

# The params sections each stage reads (mirrors dvc.yaml).
_PARAM_SECTIONS = {
    "prepare": {"seed", "data"},
    "tokenizer": {"seed", "tokenizer"},
    "tokens": {"tokens"},
    "prior": {"seed", "prior", "ray"},
    "evaluate": {"evaluate"},
}
