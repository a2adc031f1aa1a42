"""The main job as a Prefect flow: one task a stage, in DAG order, each deferring to DVC.

DVC alone decides whether a stage runs (``dvc.yaml`` + ``dvc.lock``); there is no Prefect
result caching on top. The first stage that has to run opens the parent MLflow run of this
``arvision run`` and hands its id to the stages (``ARVISION_PARENT_RUN_ID``), so each stage
that runs logs a nested run under it; a run in which everything is unchanged stays quick and
leaves MLflow alone.

What a run's word rests on:

- one run at a time per repo (:class:`RunLock`, ``.arvision/run.lock``, with the holder's pid);
- the services it needs are reachable before any stage touches an output (:mod:`pipelines.preflight`);
- a failed stage ends its task and the flow Failed with the stage's own one-line reason; an
  unchanged stage ends in a state named ``Skipped``; Ctrl-C or SIGTERM end the flow Cancelled
  (or Crashed, between stages) and the MLflow runs KILLED, within seconds;
- the temporary Prefect server runs in its own session, so Ctrl-C at the terminal reaches the
  stage but not the server, which records the end of the flow before it is stopped.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.states import Cancelled, Completed, Failed

from arvision.dag import STAGES
from arvision.tracking import tracking_uri
from pipelines.lock import RunLock, _parse


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a failed task's state with ``exc_info`` even when the task returned a
    Failed state rather than raising: drop the resulting "NoneType: None" line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


logging.getLogger("prefect.task_runs").addFilter(_NoEmptyTraceback())
logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)  # "git add dvc.lock" hints, every stage
logging.getLogger("dvc").propagate = False  # DVC prints its lines itself; Prefect's console handler printed them again


class ParentRun:
    """The parent MLflow run of one ``arvision run``, created on first need: it holds the run's
    params (all of params.yaml) and, at the end, the headline metrics of the stages that ran."""

    def __init__(self, root: Path, lock: RunLock | None = None):
        self.root = root
        self.lock = lock
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def ensure(self) -> str:
        if self.run_id is None:
            import yaml
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            from arvision.tracking import PARENT_RUN_ENV, flatten, git_commit, process_tags, setup_mlflow

            self.experiment_id = setup_mlflow(self.root)  # creates the store once, before any stage writes to it
            client = MlflowClient(tracking_uri(self.root))
            run = client.create_run(
                self.experiment_id, run_name="arvision-run",
                tags={"git.commit": git_commit(self.root), "arvision.stage": "pipeline", **process_tags()},
            )
            self.run_id = run.info.run_id
            os.environ[PARENT_RUN_ENV] = self.run_id
            if self.lock is not None and self.lock.held:
                self.lock.update(parent_run_id=self.run_id, tracking_uri=tracking_uri(self.root))
            raw = yaml.safe_load((self.root / "params.yaml").read_text()) or {}
            params = [Param(k, str(v)[:6000]) for k, v in flatten(raw).items()]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i : i + 100])
        return self.run_id

    def finish(self, results: list[dict[str, Any]]) -> None:
        """Log this run's headline metrics (``<metrics file>.<key>`` of every stage that ran) and end it."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from arvision.dag import METRICS_FILE
        from arvision.tracking import CLOSED_REASON_TAG

        client = MlflowClient(tracking_uri(self.root))
        ts = int(time.time() * 1000)
        metrics = []
        for r in results:
            if not r.get("ran") or r.get("failed"):
                continue
            name = METRICS_FILE.get(r["stage"], r["stage"])
            f = self.root / "metrics" / f"{name}.json"
            if f.exists():
                for k, v in _parse(f.read_text()).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        metrics.append(Metric(f"{name}.{k}", float(v), ts, 0))
        if metrics:
            client.log_batch(self.run_id, metrics=metrics)
        client.set_tag(self.run_id, "arvision.stages_ran", ",".join(r["stage"] for r in results if r.get("ran")) or "none")
        if any(r.get("interrupted") for r in results):
            client.set_tag(self.run_id, CLOSED_REASON_TAG, "interrupted (Ctrl-C or SIGTERM)")
            status = "KILLED"
        else:
            status = "FAILED" if any(r.get("failed") for r in results) else "FINISHED"
        client.set_terminated(self.run_id, status)


class PipelineRun:
    """One ``arvision run`` in this process: its lock, parent MLflow run and stage results."""

    def __init__(self, root: Path, force: bool, lock: RunLock | None = None):
        self.root = Path(root)
        self.force = force
        self.lock = lock or RunLock(self.root)
        self.parent = ParentRun(self.root, self.lock)
        self.results: list[dict[str, Any]] = []
        self.on_sigterm = None  # set by run_pipeline: SIGTERM ends the run as Ctrl-C does

    def start(self) -> None:
        """Take the lock (unless this process holds it already)."""
        if not self.lock.held:
            self.lock.acquire()

    def close_orphans(self) -> None:
        """End the MLflow runs a killed predecessor left RUNNING (it left their ids in the lock
        file), and settle the registrations of stages whose outputs DVC never recorded."""
        settle_registry(self.root)
        previous, self.lock.previous = self.lock.previous, {}
        if previous.get("parent_run_id"):
            from arvision.tracking import close_orphaned_runs

            closed = close_orphaned_runs(
                previous.get("tracking_uri") or tracking_uri(self.root), previous["parent_run_id"],
                f"its arvision run (pid {previous.get('pid')}) was killed; closed by the next arvision run",
            )
            if closed:
                print(f"closed {len(closed)} MLflow run(s) left RUNNING by a killed arvision run (pid {previous.get('pid')})",
                      flush=True)


_RUN: PipelineRun | None = None


def settle_registry(root: Path, repo=None) -> None:
    """Keep the registrations whose outputs DVC recorded, undo the others
    (:func:`arvision.journal.settle`); one line for each undone."""
    from arvision import journal

    if not (Path(root) / journal.JOURNAL_DIR).is_dir():
        return

    def unchanged(stage: str) -> bool:
        from dvc.repo import Repo

        def check(r) -> bool:
            with r.lock:
                return not any(s.changed() for s in r.stage.collect(stage))

        if repo is not None:
            return check(repo)
        with Repo(str(root)) as r:
            return check(r)

    for line in journal.settle(Path(root), unchanged):
        print(f"   registry: {line} (outputs DVC never recorded)", flush=True)


def _stage_reason(root: Path, stage: str, err: BaseException, t0: float) -> str:
    """The stage's own one-line reason if it wrote one in this run, else DVC's message."""
    from stages.common import stage_error

    f = stage_error(root, stage)
    if f.exists() and f.stat().st_mtime >= t0 - 1:
        return " ".join(f.read_text().split())
    chain, e = [], err
    while e is not None:
        chain.append(str(e).strip())
        e = e.__cause__ or e.__context__
    return "; ".join(dict.fromkeys(c for c in chain if c)) or type(err).__name__


def _forward_log(root: Path, stage: str, t0: float, max_lines: int = 2000) -> None:
    """Send what the stage printed in this run to the Prefect task run's logs (API only: the
    terminal has shown it already). Progress-bar redraws (``\\r``) keep their last state.

    Read from the stage's log file rather than through Prefect's ``log_prints``: the stage is a
    process DVC starts, whose prints never pass through this process's ``print``."""
    from prefect.logging.handlers import APILogHandler

    from stages.common import stage_log

    f = stage_log(root, stage)
    if not f.exists() or f.stat().st_mtime < t0 - 1:
        return
    logger = logging.getLogger("arvision.stage")
    if not logger.handlers:
        logger.addHandler(APILogHandler())
        logger.propagate = False
        logger.setLevel(logging.INFO)
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in f.read_text(errors="replace").split("\n")]
    lines = [ln for ln in lines if ln][-max_lines:]
    for ln in lines:
        logger.info(ln)


@task(name="stage", retries=0, cache_policy=None)
def run_stage(stage: str, root: str, force: bool = False):
    """Reproduce one stage through DVC: it runs only if its deps, params or outs changed.

    Ends Completed (ran), Completed named ``Skipped`` (unchanged), Failed with the stage's own
    reason, or Cancelled when the stage was interrupted.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    run = _RUN
    rootp = Path(root)
    t0 = time.time()
    print(f"── {stage} " + "─" * max(0, 60 - len(stage)), flush=True)
    record: dict[str, Any] = {"stage": stage, "ran": False, "seconds": 0.0}
    run.results.append(record)
    try:
        with Repo(root) as repo:
            with repo.lock:
                stale = force or any(s.changed() for s in repo.stage.collect(stage))
            if stale:
                run.parent.ensure()
            # unchanged: no second look at the deps (reproduce would check them all again)
            try:
                done = repo.reproduce(targets=[stage], single_item=True, force=force) if stale else []
            finally:
                if stale:  # what the stage registered stands only if DVC recorded its outputs
                    settle_registry(rootp, repo)
    except DvcException as err:  # the stage failed (its reason is in its error file) or DVC refused
        record["seconds"] = time.time() - t0
        reason = _stage_reason(rootp, stage, err, t0)
        _forward_log(rootp, stage, t0)
        code = _exit_code(err)  # None: DVC itself refused (its CLI would exit 255)
        if reason == "interrupted" or code in (130, -signal.SIGINT, -signal.SIGTERM):
            record.update(failed=True, interrupted=True, reason="interrupted")
            print(f"   {stage}: interrupted after {record['seconds']:.1f} s", file=sys.stderr, flush=True)
            return Cancelled(message=f"{stage}: interrupted")
        record.update(failed=True, reason=reason, exit_code=code)
        print(f"   {stage} FAILED: {reason}", file=sys.stderr, flush=True)
        return Failed(message=f"{stage}: {reason}")
    record["ran"] = bool(done)
    record["seconds"] = time.time() - t0
    if not done:
        print(f"   {stage}: skipped (unchanged)", flush=True)
        return Completed(name="Skipped", message=f"{stage}: unchanged since the last run (DVC: deps, params and outs match dvc.lock)")
    _forward_log(rootp, stage, t0)
    print(f"   {stage}: ran in {record['seconds']:.1f} s", flush=True)
    return Completed(message=f"{stage}: ran in {record['seconds']:.1f} s")


def _exit_code(err: BaseException) -> int | None:
    """The stage command's exit status: a ``returncode`` in the chain, or DVC's
    "failed to run: CMD, exited with N" (its error keeps the status only in the message)."""
    e: BaseException | None = err
    while e is not None:
        if getattr(e, "returncode", None) is not None:
            return int(e.returncode)
        m = re.search(r"exited with (-?\d+)\s*$", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _publish_report(run: PipelineRun) -> None:
    """``reports/report.md`` as a Prefect markdown artifact, with a link to the parent MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    report = run.root / "reports" / "report.md"
    if not report.exists():
        return
    uri = tracking_uri(run.root)
    link = ""
    if run.parent.run_id:
        path = f"#/experiments/{run.parent.experiment_id}/runs/{run.parent.run_id}"
        if uri.startswith(("http://", "https://")):
            link = f"MLflow run: [{run.parent.run_id}]({uri.rstrip('/')}/{path})"
        else:
            link = (f"MLflow run: [{run.parent.run_id}](http://127.0.0.1:5000/{path}) "
                    f"(after `mlflow ui --backend-store-uri {uri}`)")
    create_markdown_artifact(
        markdown=report.read_text() + ("\n\n" + link if link else ""), key="arvision-report",
        description="arvision evaluation report",
    )


@flow(name="arvision", log_prints=False, persist_result=False)
def arvision_flow(root: str, force: bool = False):
    """prepare → tokenizer → features → tokens → prior → evaluate, each skipped when DVC says unchanged.

    Called by :func:`run_pipeline` (``arvision run``) or by a Prefect deployment
    (:mod:`pipelines.serve`); in the latter case the flow takes the repo lock itself.
    """
    global _RUN

    own = _RUN is None or _RUN.root != Path(root)
    if own:  # a deployment's run: nothing set up by run_pipeline
        _RUN = PipelineRun(Path(root), force)
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
        _RUN.start()
        _RUN.close_orphans()
    run = _RUN
    if run.on_sigterm is not None:  # Prefect's flow engine installed its own SIGTERM handler: ours instead
        signal.signal(signal.SIGTERM, run.on_sigterm)
    from dvc.exceptions import DvcException

    try:
        try:
            _write_listing(run.root)
        except DvcException as err:
            reason = _stage_reason(run.root, "source", err, time.time())
            run.results.append({"stage": "source", "ran": False, "failed": True, "seconds": 0.0, "reason": reason,
                                "exit_code": _exit_code(err)})
            print(f"   source FAILED: {reason}", file=sys.stderr, flush=True)
            return Failed(message=f"source: {reason}")
        for stage in STAGES:
            state = run_stage.with_options(task_run_name=stage)(stage, root, force, return_state=True)
            if state.is_cancelled():
                return Cancelled(message=state.message)
            if state.is_failed():  # the stage failed, or the task itself did (an error outside DVC's)
                record = next((r for r in reversed(run.results) if r["stage"] == stage), None)
                if record is not None and not record.get("failed"):
                    record.update(failed=True, reason=state.message or "the task failed", exit_code=None)
                return Failed(message=state.message)
        if any(r["stage"] == "evaluate" and r["ran"] for r in run.results):
            _publish_report(run)
        ran = [r["stage"] for r in run.results if r["ran"]]
        return Completed(message=f"ran: {', '.join(ran) or 'nothing (all unchanged)'}")
    finally:
        if own:
            _finish(run)


def _write_listing(root: Path) -> None:
    """dvc.yaml's ``source`` stage (always run; not one of the flow's stages): it writes
    ``data/source.json``, the listing of ``data.path`` that ``prepare`` depends on, and records
    it in ``dvc.lock``. A stat walk when nothing changed (``arvision.data.listing``)."""
    from dvc.repo import Repo

    from arvision.dag import LISTING_STAGE

    with Repo(str(root)) as repo:  # the stage prints its one line (files, bytes, what it skipped)
        repo.reproduce(targets=[LISTING_STAGE], single_item=True)


def _finish(run: PipelineRun) -> None:
    try:
        run.parent.finish(run.results or [{"stage": "flow", "ran": False, "failed": True}])
    finally:
        run.lock.release()


def run_pipeline(root: Path, force: bool = False, lock: RunLock | None = None) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run the flow; returns (stage results, parent MLflow run id or None, seconds).

    Order: the repo lock (``lock`` if the caller took it already; a second run stops there at
    once), the preflight of every service
    (before any stage deletes an output), the temporary Prefect server (in its own session)
    unless ``PREFECT_API_URL`` names one, then the flow. SIGTERM is handled like Ctrl-C.
    """
    global _RUN

    from arvision.config import load_params
    from pipelines.preflight import preflight
    from pipelines.server import prefect_api

    # Stage commands are run by DVC through the shell: put this interpreter's bin first.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    t0 = time.time()
    run = _RUN = PipelineRun(root, force, lock)
    run.start()
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        preflight(root, load_params(root / "params.yaml"))
        run.close_orphans()
        with prefect_api() as server:
            run.on_sigterm = _on_sigterm(server.pid if server else None)
            signal.signal(signal.SIGTERM, run.on_sigterm)
            try:
                arvision_flow(str(root), force, return_state=True)
            except KeyboardInterrupt:  # between stages: the flow ended Crashed
                run.results.append({"stage": "flow", "ran": False, "failed": True, "interrupted": True, "reason": "interrupted"})
            finally:
                _finish(run)
                signal.signal(signal.SIGTERM, old_term)
    finally:
        run.lock.release()
        _RUN = None
    return run.results, run.parent.run_id, time.time() - t0


def _on_sigterm(server_pid: int | None):
    """SIGTERM to ``arvision run``: end the way Ctrl-C does. The running stage and DVC get the
    SIGTERM too, which a stage handles as Ctrl-C (SIGINT may be ignored in a process started in
    the background); with no stage running, the flow is interrupted. What a stage started
    (Ray's daemons and workers) is the stage's to stop: killed under it, Ray ended the stage
    with status 1 before it could end its runs (``ray.shutdown`` at the stage's exit stops them)."""

    def handler(signum, frame) -> None:
        import psutil

        kids = [p for p in psutil.Process().children(recursive=True) if p.pid != server_pid]
        if server_pid is not None:
            server_kids = _descendants(server_pid)
            kids = [p for p in kids if p.pid not in server_kids]
        # DVC runs a stage as `$SHELL -c CMD`; a shell that did not exec its command (dash,
        # when SHELL is unset) dies of SIGTERM at once, and DVC would return before the stage
        # has ended its MLflow run and removed its partial output. The shell is left to end
        # when its command does.
        started = set().union(*(_descendants(p.pid) for p in kids if _is_stage(p)))  # a stage's own: its to stop
        targets = [p for p in kids if not _is_waiting_shell(p) and p.pid not in started] or kids
        for p in targets:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        if not kids:
            raise KeyboardInterrupt

    return handler


_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}


def _is_stage(proc) -> bool:
    """A stage's own process: ``python -m stages.<name>``."""
    import psutil

    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    return any(a == "-m" and b.startswith("stages.") for a, b in zip(cmd, cmd[1:]))


def _descendants(pid: int) -> set[int]:
    """The pids of process ``pid``'s descendants (none when it has gone)."""
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _is_waiting_shell(proc) -> bool:
    """A shell process with children of its own (it waits for the command it runs)."""
    import psutil

    try:
        return proc.name() in _SHELLS and bool(proc.children())
    except psutil.Error:
        return False
