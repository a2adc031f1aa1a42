"""The main job as a Prefect flow: one task a stage, in DAG order, each deferring to DVC.

DVC alone decides whether a stage runs (``dvc.yaml`` + ``dvc.lock``); there is no Prefect
result caching on top. The first stage that has to run opens the parent MLflow run of this
``arvision run`` and hands its id to the stages (``ARVISION_PARENT_RUN_ID``), so each stage
that runs logs a nested run under it; a run in which everything is unchanged stays quick and
leaves MLflow alone.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

STAGES = ["prepare", "tokenizer", "tokens", "prior", "evaluate"]


class ParentRun:
    """The parent MLflow run of one ``arvision run``, created on first need."""

    def __init__(self, root: Path):
        self.root = root
        self.run_id: str | None = None

    def ensure(self) -> str:
        if self.run_id is None:
            from mlflow.tracking import MlflowClient

            from arvision.tracking import PARENT_RUN_ENV, git_commit, setup_mlflow, tracking_uri

            exp_id = setup_mlflow(self.root)  # creates the store once, before any stage writes to it
            run = MlflowClient(tracking_uri(self.root)).create_run(
                exp_id, run_name="arvision-run", tags={"git.commit": git_commit(self.root), "arvision.stage": "pipeline"}
            )
            self.run_id = run.info.run_id
            os.environ[PARENT_RUN_ENV] = self.run_id
        return self.run_id

    def finish(self, results: list[dict[str, Any]]) -> None:
        if self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        from arvision.tracking import tracking_uri

        client = MlflowClient(tracking_uri(self.root))
        client.set_tag(self.run_id, "arvision.stages_ran", ",".join(r["stage"] for r in results if r["ran"]) or "none")
        client.set_terminated(self.run_id, "FAILED" if any(r.get("failed") for r in results) else "FINISHED")


_PARENT: ParentRun | None = None


@task(name="stage", retries=0, cache_policy=None)
def run_stage(stage: str, root: str, force: bool = False) -> dict[str, Any]:
    """Reproduce one stage through DVC: it runs only if its deps, params or outs changed."""
    from dvc.exceptions import DvcException, ReproductionError
    from dvc.repo import Repo

    import logging

    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)  # "git add dvc.lock" hints, every stage
    t0 = time.time()
    print(f"── {stage} " + "─" * max(0, 60 - len(stage)), flush=True)
    try:
        with Repo(root) as repo:
            if _PARENT is not None:
                with repo.lock:
                    stale = force or any(s.changed() for s in repo.stage.collect(stage))
                if stale:
                    _PARENT.ensure()
            done = repo.reproduce(targets=[stage], single_item=True, force=force)
    except ReproductionError:  # the stage's own output above says why
        return {"stage": stage, "ran": False, "failed": True, "seconds": time.time() - t0}
    except DvcException as err:  # e.g. an invalid dvc.yaml, a missing dependency
        print(f"error: {stage}: {err}", file=sys.stderr, flush=True)
        return {"stage": stage, "ran": False, "failed": True, "seconds": time.time() - t0}
    ran = bool(done)
    seconds = time.time() - t0
    print(f"   {stage}: {'ran' if ran else 'skipped (unchanged)'} in {seconds:.1f} s", flush=True)
    return {"stage": stage, "ran": ran, "seconds": seconds}


@flow(name="arvision", log_prints=False, persist_result=False)
def arvision_flow(root: str, force: bool = False) -> list[dict[str, Any]]:
    """prepare → tokenizer → tokens → prior → evaluate, each skipped when DVC says unchanged."""
    results: list[dict[str, Any]] = []
    for stage in STAGES:
        results.append(run_stage.with_options(task_run_name=stage)(stage, root, force))
        if results[-1].get("failed"):
            break
    return results


def run_pipeline(root: Path, force: bool = False) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run the flow; returns (stage results, parent MLflow run id or None, seconds)."""
    global _PARENT

    # Stage commands are run by DVC through the shell: put this interpreter's bin first.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    t0 = time.time()
    _PARENT = ParentRun(root)
    results: list[dict[str, Any]] = []
    try:
        results = arvision_flow(str(root), force)
        return results, _PARENT.run_id, time.time() - t0
    finally:
        _PARENT.finish(results or [{"stage": "flow", "ran": False, "failed": True}])
