"""The main job as a Prefect flow: one task a stage, in DAG order, each deferring to DVC.

DVC alone decides whether a stage runs (``dvc.yaml`` + ``dvc.lock``); there is no Prefect
result caching on top. The flow opens one parent MLflow run and hands its id to the stages
(``ARVISION_PARENT_RUN_ID``), so each stage that runs logs a nested run under it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

STAGES = ["prepare", "tokenizer", "tokens", "prior", "evaluate"]


@task(name="stage", retries=0, cache_policy=None)
def run_stage(stage: str, root: str, force: bool = False) -> dict[str, Any]:
    """Reproduce one stage through DVC: it runs only if its deps, params or outs changed."""
    from dvc.exceptions import DvcException, ReproductionError
    from dvc.repo import Repo

    t0 = time.time()
    print(f"── {stage} " + "─" * max(0, 60 - len(stage)), flush=True)
    try:
        with Repo(root) as repo:
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
def arvision_flow(root: str, parent_run_id: str | None = None, force: bool = False) -> list[dict[str, Any]]:
    """prepare → tokenizer → tokens → prior → evaluate, each skipped when DVC says unchanged."""
    if parent_run_id:
        os.environ["ARVISION_PARENT_RUN_ID"] = parent_run_id
    results: list[dict[str, Any]] = []
    for stage in STAGES:
        results.append(run_stage.with_options(task_run_name=stage)(stage, root, force))
        if results[-1].get("failed"):
            break
    return results


def run_pipeline(root: Path, force: bool = False) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run the flow under one parent MLflow run; returns (stage results, parent run id, seconds)."""
    from mlflow.tracking import MlflowClient

    from arvision.tracking import git_commit, setup_mlflow, tracking_uri

    # Stage commands are run by DVC through the shell: put this interpreter's bin first.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    t0 = time.time()
    exp_id = setup_mlflow(root)  # creates the store once, before any stage writes to it
    client = MlflowClient(tracking_uri(root))
    parent = client.create_run(exp_id, run_name="arvision-run", tags={"git.commit": git_commit(root), "arvision.stage": "pipeline"})
    status = "FAILED"
    try:
        results = arvision_flow(str(root), parent.info.run_id, force)
        failed = any(r.get("failed") for r in results)
        status = "FAILED" if failed else "FINISHED"
        client.set_tag(parent.info.run_id, "arvision.stages_ran", ",".join(r["stage"] for r in results if r["ran"]) or "none")
        return results, parent.info.run_id, time.time() - t0
    finally:
        client.set_terminated(parent.info.run_id, status)
