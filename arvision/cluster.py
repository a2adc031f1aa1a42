"""Starting or joining the Ray cluster every Ray user here shares (``prepare``, ``tokens``, the
prior's Ray Train run): light on imports, so a stage that only needs Ray for data does not depend
on the training code."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arvision.config import RayConfig

#: fewer cores than this and a stage's Ray Data path is no faster than one process (measured on
#: 2 cores: prepare took MNIST from 11 s to 23 s; tokens gained nothing, bench/data_scale.py)
RAY_MIN_CORES = 4


@dataclass(frozen=True)
class TrainRun:
    """Where a Ray Train run keeps its state and reports: the folder ``storage/name`` (Ray's run
    folder: checkpoints, a resumable run), the MLflow run its rank 0 logs to, and the project
    root (on every worker's ``PYTHONPATH``). Shared by the prior and the tokenizer."""

    storage: Path
    name: str
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    root: Path = Path(".")

    @staticmethod
    def name_for(kind: str, payload: dict[str, Any]) -> str:
        """``kind-<hash of payload>``: the same params and data give the same name (and so, for a
        run that checkpoints, a resume); a change gives a fresh run."""
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return f"{kind}-" + hashlib.sha256(blob).hexdigest()[:16]

    def cleanup(self) -> None:
        """Drop the run's folder: the stage's outputs now hold the result."""
        shutil.rmtree(self.storage / self.name, ignore_errors=True)


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ray_data_pays(rows: int, min_rows: int, ray_cfg: RayConfig, *, gpu_work: bool = False) -> bool:
    """The one rule for a stage's Ray Data path (``prepare``, ``tokens``): always when a cluster
    is named (``ray.address`` / ``$RAY_ADDRESS``); else for ``min_rows`` rows or more on a machine
    Ray speeds up: :data:`RAY_MIN_CORES` cores or more, or (``gpu_work``: the stage encodes on
    GPUs) a GPU. Never for no rows."""
    if rows <= 0:
        return False
    if ray_cfg.address or os.environ.get("RAY_ADDRESS"):
        return True
    if rows < min_rows:
        return False
    if usable_cores() >= RAY_MIN_CORES:
        return True
    if gpu_work:
        import torch

        return torch.cuda.is_available()
    return False


def quiet_worker_logs() -> None:
    """Runs at the start of every Ray worker process (``worker_process_setup_hook``): silence
    what repeats without telling the user anything. The placement-group cleaner warns about
    every second that it cannot reach the state API (there is no dashboard by default), and
    Ray's own deprecation warnings are about Ray's internals."""
    import logging
    import warnings

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed", module=r"ray\.")


def init_ray(ray_cfg: RayConfig, root: Path) -> None:
    """Join ``ray.address`` / ``$RAY_ADDRESS`` if given, else start a local instance sized for
    the job (with the Ray dashboard when ``ray.dashboard``). ``ray.env`` goes to every worker's
    environment (e.g. NCCL settings a deployment needs).

    Logs stay readable: repeated lines are deduplicated across workers, the workers' output
    reaches this process's stdout and stderr without Ray's prefixes and set-up chatter, and
    our progress bars on the workers are drawn here, one line on a terminal
    (:mod:`arvision.progress`); the known repeating warnings are silenced
    (:func:`quiet_worker_logs`). ``RAY_*``/``TQDM_*`` settings already in the environment win.
    """
    import ray

    address, num_workers, cpus_per_worker = ray_cfg.address, ray_cfg.num_workers, ray_cfg.cpus_per_worker
    from arvision.progress import RELAY_ENV, install_ray_output

    quiet = {
        "RAY_DEDUP_LOGS": "1",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # a cloud-preemption poller: noise on one machine
        "TQDM_MININTERVAL": "15",  # any other bar on a worker (ours relay their state: arvision.progress)
    }
    for k, v in quiet.items():
        os.environ.setdefault(k, v)
    env_vars = dict(ray_cfg.env)
    env_vars["TQDM_MININTERVAL"] = os.environ["TQDM_MININTERVAL"]
    env_vars[RELAY_ENV] = "1"
    env_vars["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key in ("MLFLOW_TRACKING_URI",):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = dict(
        runtime_env={"env_vars": env_vars, "worker_process_setup_hook": "arvision.cluster.quiet_worker_logs"},
        log_to_driver=True, configure_logging=True, logging_level=logging.WARNING,
    )
    if address is None:
        kwargs["include_dashboard"] = ray_cfg.dashboard
        # Logical CPUs: the workers' plus room for Ray Data's read tasks and Train's actors,
        # whatever the core count (too few and the data read waits forever for a free CPU).
        kwargs["num_cpus"] = max(os.cpu_count() or 1, num_workers * cpus_per_worker + 2)
        # the raylet warns when more workers start at once than this; Train + Data start ~8
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, kwargs["num_cpus"])))
    if not ray.is_initialized():
        import signal
        import threading

        # ray.init puts its own SIGTERM handler in place (it prints a stack and aborts): the
        # caller's handlers (a stage ends its runs KILLED on Ctrl-C / SIGTERM) are put back
        main = threading.current_thread() is threading.main_thread()
        saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        # "local": a new instance of our own, never one another process left running here
        # "Token authentication is enabled for this Ray cluster": at every start, to every user
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ctx = ray.init(address=address or "local", **kwargs)
        install_ray_output()  # the workers' output without Ray's prefixes and chatter; their bars drawn here
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        if ray_cfg.dashboard and address is None:
            print(f"Ray dashboard: http://{ctx.dashboard_url}", flush=True)
