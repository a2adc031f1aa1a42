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
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from arvision.config import Params, load_params
from arvision.dag import METRICS_FILE, PARAM_SECTIONS
from arvision.errors import UserError
from arvision.tracking import Tracker, defer_interrupt, in_deferred_section, interrupts_deferred, stage_run

log = logging.getLogger("arvision")


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root (docs/architecture.md, "Stages and paths")."""

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
    def features(self) -> Path:
        return self.root / "models" / "features"

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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds.

    Guarantee: ``final`` is at every instant either the complete old output or the complete
    new one, never a mix and never half-written. On Linux the two directories are swapped in
    one ``renameat2(RENAME_EXCHANGE)``; elsewhere the old one is renamed aside, the new one
    renamed in, and only then the old one deleted, so a crash between the two renames leaves
    no ``final`` (a stage that did not finish, which DVC re-runs) and the old output intact
    at ``.<name>.old-<pid>``. A failed or interrupted block leaves ``final`` as it was.
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
    if final.is_dir() and _exchange(tmp, final):
        shutil.rmtree(tmp)  # now the old output
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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


def stage_log(root: Path, stage: str) -> Path:
    """Everything the stage printed in its last run (the flow forwards it to the Prefect run)."""
    return Path(root) / ".arvision" / "logs" / f"{stage}.log"


def stage_error(root: Path, stage: str) -> Path:
    """The one-line reason the stage's last run failed; absent after a success."""
    return Path(root) / ".arvision" / "logs" / f"{stage}.error"


class _Tee:
    """A text stream that writes to the terminal's stream and to the stage's log file."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding...: the terminal's
        return getattr(self._stream, name)


_PENDING = {"interrupt": False, "received": False, "handling": False}


def _raise_interrupt(signum, frame) -> None:
    """Ctrl-C / SIGTERM: raise KeyboardInterrupt, and again every second until
    :func:`stage_main` has it. A KeyboardInterrupt raised while Python runs a garbage-collector
    or weakref callback is printed ("Exception ignored in ...") and dropped; without the repeat
    the stage would then run on to its end. Inside an MLflow write
    (:func:`arvision.tracking.interrupts_deferred`) it waits for the write to end."""
    if _PENDING["handling"]:  # the stage is ending its runs already: a second Ctrl-C changes nothing
        return
    _PENDING["received"] = True  # for good: an error after it is the interrupt's (Ray's processes got it too)
    if not _PENDING["interrupt"]:
        _PENDING["interrupt"] = True
        signal.setitimer(signal.ITIMER_REAL, 0.5, 1.0)
    if not defer_interrupt():
        raise KeyboardInterrupt


def _raise_again(signum, frame) -> None:
    if _PENDING["interrupt"] and not in_deferred_section():
        raise KeyboardInterrupt


def _interrupt_handled() -> None:
    _PENDING.update(interrupt=False, handling=True)
    signal.setitimer(signal.ITIMER_REAL, 0)
    defer_interrupt(pending=False)


def stage_main(stage: str, run: Callable[[Params, Paths, Tracker], dict[str, Any]], reads: list[str]) -> None:
    """The thin ``main()`` of a stage: params → MLflow run → ``run`` → ``metrics/<stage>.json``.

    What the stage prints also goes to :func:`stage_log`; when it fails, the reason goes to
    :func:`stage_error` in one line. A user's mistake exits 2 with one line, no traceback;
    Ctrl-C or SIGTERM exit 130 with its MLflow run ended KILLED and no output kept, at any
    moment: an error raised after the signal came (Ray's processes got the Ctrl-C too, and one
    of them may fail first, Ray Train's start-up included) counts as the interrupt. The stage
    lives no longer than its ``arvision run`` (:func:`arvision.lifetime.guard_stage`), and what
    it registered stands only once DVC records its outputs (:mod:`arvision.journal`): a stage
    that fails or is interrupted undoes it.
    """
    from arvision import journal, lifetime

    root = Path.cwd()
    error_file = stage_error(root, stage)
    error_file.parent.mkdir(parents=True, exist_ok=True)
    error_file.unlink(missing_ok=True)
    log_file = open(stage_log(root, stage), "w", encoding="utf-8", errors="replace", buffering=1)
    sys.stdout, sys.stderr = _Tee(sys.stdout, log_file), _Tee(sys.stderr, log_file)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGALRM, _raise_again)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
        signal.signal(signal.SIGINT, _raise_interrupt)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lifetime.guard_stage(stage, on_hard_exit=lambda: _undo_registrations(stage))
    journal.open_stage(root, stage)
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
            tracker.log_params({k: v for k, v in section.items() if k in PARAM_SECTIONS[stage]})
            try:
                metrics = run(params, paths, tracker)
            except KeyboardInterrupt:
                _interrupt_handled()  # no repeat while the MLflow run is ended KILLED
                raise
            except Exception:
                if not _PENDING["received"]:
                    raise
                _interrupt_handled()
                raise KeyboardInterrupt from None  # the run ends KILLED, the stage "interrupted"
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            metrics["stage_seconds"] = round(time.time() - t0, 2)
            tracker.log_metrics(metrics)
            write_json(paths.metrics / f"{METRICS_FILE.get(stage, stage)}.json", metrics)
    except UserError as err:
        _undo_registrations(stage)
        error_file.write_text(str(err) + "\n")
        print(f"error: {stage}: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupt_handled()
        _undo_registrations(stage)
        error_file.write_text("interrupted\n")
        print(f"{stage}: interrupted; no output was kept", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # a bug or a failure of the machinery: the traceback follows
        _undo_registrations(stage)
        lines = str(err).strip().splitlines()
        error_file.write_text(f"{type(err).__name__}: {lines[-1] if lines else ''}\n")
        raise


def _undo_registrations(stage: str) -> None:
    """The stage did not end well, so DVC will not record its outputs: what it registered goes."""
    from arvision import journal

    try:
        with interrupts_deferred():
            for line in journal.undo_own():
                print(f"{stage}: registry: {line}", file=sys.stderr, flush=True)
    except (Exception, KeyboardInterrupt) as err:  # the next arvision run settles what is left (journal.settle)
        print(f"{stage}: could not undo its registrations ({type(err).__name__}: {err}); "
              "the next arvision run will", file=sys.stderr, flush=True)

