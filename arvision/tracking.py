"""MLflow helpers, with a do-nothing stand-in for unit tests.

Every stage logs through a :class:`Tracker`. :class:`MlflowTracker` writes to one MLflow run
(nested under the pipeline's parent run when ``ARVISION_PARENT_RUN_ID`` is set);
:class:`NullTracker` drops everything, for model tests.

Defaults need nothing running: the tracking store is ``sqlite:///<repo>/mlflow.db`` and
artifacts go to ``<repo>/mlartifacts``, both found from the repo root at run time (see
:func:`setup_mlflow`), unless ``MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

EXPERIMENT = "arvision"
PARENT_RUN_ENV = "ARVISION_PARENT_RUN_ID"
TOKENIZER_MODEL = "arvision-tokenizer"
GENERATOR_MODEL = "arvision-generator"
#: the default store at the repo root: the sqlite database and the artifacts beside it
STORE_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
#: the experiment tag MLflow 3's UI reads for the experiment's type: "Model training" (runs,
#: models, metrics), not the GenAI view it infers for an experiment without it
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def link_model(self, model_id: str, keys: Callable[[str], bool] | None = None) -> None: ...


class NullTracker:
    """A tracker that records nothing (unit tests of model code)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def link_model(self, model_id: str, keys: Callable[[str], bool] | None = None) -> None:
        pass


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the sqlite store ``<root>/mlflow.db``.

    ``root`` is resolved at call time, so a moved or copied repo finds its own store.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return _default_uri(Path(root).resolve())


def _default_uri(root: Path) -> str:
    return f"sqlite:///{root / STORE_DB}"


def _relocate_store(db: Path, artifacts: Path, stored: str) -> None:
    """Rewrite the artifact paths of a default store that was moved or copied with its repo.

    MLflow's sqlite store keeps absolute artifact URIs (experiment, runs, logged models, model
    versions). ``mlflow.db`` and ``mlartifacts/`` belong together at the repo root, so a store
    whose experiment points at another ``.../mlartifacts`` came from another place: every
    text value that holds the old artifacts path gets the new one, in one transaction.
    """
    import sqlite3
    from urllib.parse import unquote, urlparse

    old = unquote(urlparse(stored).path).rstrip("/")
    new = str(artifacts)
    with sqlite3.connect(db) as con:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            columns = con.execute(f'PRAGMA table_info("{table}")').fetchall()  # (cid, name, type, ...)
            for col in [c[1] for c in columns if "CHAR" in c[2].upper() or "TEXT" in c[2].upper()]:
                con.execute(
                    f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0', (old, new, old)
                )


def setup_mlflow(root: str | Path = ".", create: bool = True) -> str | None:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    The default store is ``<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts/``; the two
    move together: a default store found at a new path has its artifact paths rewritten first
    (:func:`_relocate_store`). A tracking server (``MLFLOW_TRACKING_URI``) keeps its own
    artifact root. Called once by the flow (before any parallel writer) and by each stage.

    ``create=False`` is for reading registered models (``arvision sample``): a missing default
    store is a :class:`UserError` rather than a new empty ``mlflow.db``, and a missing experiment
    is not created (returns None).
    """
    import logging

    import mlflow

    from arvision.errors import UserError

    # alembic prints a line per migration on the first use of a fresh sqlite store
    logging.getLogger("alembic").setLevel(logging.WARNING)
    root = Path(root).resolve()
    uri = tracking_uri(root)
    # compared with the URI, not with the variable's presence: mlflow.set_tracking_uri exports
    # MLFLOW_TRACKING_URI to every child process (the stages), so it is set there for the default too
    default = uri == _default_uri(root)
    artifacts = root / ARTIFACTS_DIR
    if default and not create and not (root / STORE_DB).exists():
        raise UserError(
            f"no MLflow store at {root / STORE_DB}: run this in the project root "
            "or set MLFLOW_TRACKING_URI to the store that holds the model"
        )
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        stored = exp.artifact_location
        moved = stored.startswith("file:") and stored.rstrip("/").endswith("/" + ARTIFACTS_DIR) and stored != artifacts.as_uri()
        if default and moved:
            _relocate_store(root / STORE_DB, artifacts, stored)
        if create and any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # a store made before the tag
            for k, v in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    if not create:
        return None
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri() if default else None,
                                        tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another process
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def flatten(d: dict[str, Any]) -> dict[str, Any]:
    """Nested sections as dotted keys: ``{"prior": {"lr": 1}}`` → ``{"prior.lr": 1}`` (lists and
    ``None`` kept as values, empty sections dropped), by ``pandas.json_normalize``."""
    import pandas as pd

    return pd.json_normalize(d, sep=".").to_dict(orient="records")[0]


_DEFERRED = {"depth": 0, "pending": False}


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A section a stage's Ctrl-C / SIGTERM handler (``stages.common``) does not interrupt: it
    raises the KeyboardInterrupt as the outermost section ends (:func:`defer_interrupt`). A
    KeyboardInterrupt raised inside an MLflow write can leave the SQLite store locked, and the
    stage then cannot end its run KILLED."""
    _DEFERRED["depth"] += 1
    try:
        yield
    finally:
        _DEFERRED["depth"] -= 1
    if _DEFERRED["depth"] == 0 and _DEFERRED["pending"]:
        _DEFERRED["pending"] = False
        raise KeyboardInterrupt


def in_deferred_section() -> bool:
    return _DEFERRED["depth"] > 0


def defer_interrupt(pending: bool = True) -> bool:
    """For a signal handler: inside a deferred section, note the interrupt (the section raises it
    at its end; not relying on a timer, which MLflow's own ``signal.alarm`` timeouts cancel) and
    return True; else False. ``pending=False`` forgets a noted one (the interrupt is handled)."""
    if not pending:
        _DEFERRED["pending"] = False
        return False
    if _DEFERRED["depth"] > 0:
        _DEFERRED["pending"] = True
        return True
    return False


class _Deferred:
    """An MlflowClient whose calls run in :func:`interrupts_deferred`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with interrupts_deferred():
                return attr(*args, **kwargs)

        return call


def deferred_client(uri: str | None = None) -> Any:
    """An MlflowClient (of ``uri``, default the current tracking URI) whose every call waits out
    a stage's Ctrl-C (:class:`_Deferred`): a write cut short can leave the SQLite store locked."""
    from mlflow import MlflowClient

    return _Deferred(MlflowClient(uri))


class MlflowTracker:
    """Logs to one existing MLflow run through the client API (safe in any process)."""

    def __init__(self, run_id: str, uri: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.uri = uri
        self.client = _Deferred(MlflowClient(uri))
        self._model: tuple[str, Callable[[str], bool]] | None = None

    def link_model(self, model_id: str, keys: Callable[[str], bool] | None = None) -> None:
        """Metrics logged from now on (those ``keys`` accepts; default all) are linked to the
        logged model ``model_id`` (MLflow 3's ``model_id``): the model's page shows them, once."""
        self._model = (model_id, keys or (lambda key: True))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        model_id, linked = self._model or (None, lambda key: False)
        items = [Metric(k, float(v), ts, step or 0, model_id=model_id if linked(k) else None) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


CLOSED_REASON_TAG = "arvision.end_reason"


def process_tags() -> dict[str, str]:
    """Which process holds a run open (host, pid): how a later run tells a live run from an orphan."""
    import socket

    return {"arvision.host": socket.gethostname(), "arvision.pid": str(os.getpid())}


def close_orphaned_runs(uri: str, parent_run_id: str, reason: str) -> list[str]:
    """End ``parent_run_id`` and its nested runs that are still RUNNING but whose process is
    gone (same host, pid not alive) as KILLED, tagged with ``reason``; returns their ids."""
    import socket

    import psutil
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    closed = []
    for run in [parent, *children]:
        tags = run.data.tags
        if run.info.status != "RUNNING" or tags.get("arvision.host") != socket.gethostname():
            continue
        pid = int(tags.get("arvision.pid", "0") or 0)
        if pid and psutil.pid_exists(pid):
            continue
        client.set_tag(run.info.run_id, CLOSED_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def git_commit(root: str | Path = ".") -> str:
    """The code commit, with ``-dirty`` when the work tree has changes; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


@contextmanager
def stage_run(stage: str, root: str | Path = ".", tags: dict[str, Any] | None = None) -> Iterator[MlflowTracker]:
    """An MLflow run for one stage: nested under ``$ARVISION_PARENT_RUN_ID`` if set.

    The run ends FINISHED on success, KILLED on Ctrl-C / SIGTERM (KeyboardInterrupt) and
    FAILED on any other exception (which propagates). A run left RUNNING because its process
    was killed outright is closed by the next ``arvision run`` (:func:`close_orphaned_runs`).
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    exp_id = setup_mlflow(root)
    client = _Deferred(MlflowClient(uri))
    all_tags = {"arvision.stage": stage, "git.commit": git_commit(root), **process_tags()}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    all_tags.update(tags or {})
    run = client.create_run(exp_id, run_name=stage, tags={k: str(v) for k, v in all_tags.items()})
    tracker = MlflowTracker(run.info.run_id, uri)
    try:
        yield tracker
    except KeyboardInterrupt:
        client.set_tag(run.info.run_id, CLOSED_REASON_TAG, "interrupted (Ctrl-C or SIGTERM)")
        client.set_terminated(run.info.run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    else:
        client.set_terminated(run.info.run_id, "FINISHED")
