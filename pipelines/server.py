"""A temporary local Prefect server that survives Ctrl-C long enough to record how the flow ended.

Prefect's own temporary server is started in the caller's process group, so Ctrl-C at the
terminal kills it together with the stage, and the flow can no longer be marked as ended
(it then shows "Running" for good, and every client call retries for minutes). This one is
the same server (the command Prefect runs for its temporary server), started in a new
session: the terminal's SIGINT does not reach it. It is stopped when the run ends, and dies
with its parent (``PR_SET_PDEATHSIG``) if that is killed outright.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from arvision import lifetime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(timeout_s: float = 5.0) -> None:
    """Send what Prefect's background workers still hold (logs, events), waiting at most
    ``timeout_s`` each: once the server is gone they would retry and report failures at exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception:  # draining is best effort: the run's outcome is already recorded
            pass


@contextmanager
def prefect_api() -> Iterator[subprocess.Popen | None]:
    """Yield the temporary server's process (None where ``PREFECT_API_URL`` names a server),
    with Prefect's API URL pointing at it for the duration."""
    import prefect
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    # not one of the run's marked processes: the run ends those before it lets go of the lock,
    # while the server must outlive that to record the flow's end (it dies with its parent)
    env.pop(lifetime.TREE_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env=env, start_new_session=True, preexec_fn=lifetime.die_with_parent,
    )
    try:
        deadline = time.time() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {proc.returncode} while starting")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not answer on {url} within "
                                   f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s")
            time.sleep(0.2)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield proc
            finally:
                _drain()  # logs and events still queued go out while the server is up
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
