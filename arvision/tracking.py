"""MLflow helpers, with a do-nothing stand-in for unit tests.

Every stage logs through a :class:`Tracker`. :class:`MlflowTracker` writes to one MLflow run
(nested under the pipeline's parent run when ``ARVISION_PARENT_RUN_ID`` is set);
:class:`NullTracker` drops everything, for model tests.

Defaults need nothing running: the tracking store is ``sqlite:///<repo>/mlflow.db`` (an
absolute path) and artifacts go to ``<repo>/mlartifacts``, unless ``MLFLOW_TRACKING_URI`` says
otherwise.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

EXPERIMENT = "arvision"
PARENT_RUN_ENV = "ARVISION_PARENT_RUN_ID"
TOKENIZER_MODEL = "arvision-tokenizer"
GENERATOR_MODEL = "arvision-generator"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...


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


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the sqlite store at the repo root (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def setup_mlflow(root: str | Path = ".") -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    Called once by the flow (before any parallel writer) and by each stage.
    """
    import logging

    import mlflow

    # alembic prints a line per migration on the first use of a fresh sqlite store
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        artifacts = (Path(root).resolve() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    except Exception:  # created concurrently by another process
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    """Logs to one existing MLflow run through the client API (safe in any process)."""

    def __init__(self, run_id: str, uri: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.uri = uri
        self.client = MlflowClient(uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
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

    The run ends FINISHED on success and FAILED on an exception (which propagates).
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    exp_id = setup_mlflow(root)
    client = MlflowClient(uri)
    all_tags = {"arvision.stage": stage, "git.commit": git_commit(root)}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    all_tags.update(tags or {})
    run = client.create_run(exp_id, run_name=stage, tags={k: str(v) for k, v in all_tags.items()})
    tracker = MlflowTracker(run.info.run_id, uri)
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    else:
        client.set_terminated(run.info.run_id, "FINISHED")
