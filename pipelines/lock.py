"""One ``arvision run`` at a time per repo: ``.arvision/run.lock``, naming its holder.

Light on purpose (no Prefect, no MLflow imports): a second run is told at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from arvision import lifetime
from arvision.errors import UserError

LOCK_FILE = Path(".arvision") / "run.lock"


class RunLock:
    """An exclusive lock on the repo for one ``arvision run`` and every process it starts.

    ``fcntl.flock`` holds it for the run's own process (the kernel drops it when that process
    dies, however it dies); the run's other processes carry its mark
    (:mod:`arvision.lifetime`), which the file names. A run ends what still carries its mark
    before it lets go; a run that takes over the lock of a killed one first waits for the
    killed run's processes to end (their guards stop them within seconds) and ends the rest,
    saying so in one line. So no run starts while a process of the one before it lives.

    The file holds JSON about the holder: pid, host, start time, the mark of its processes and
    the parent MLflow run id. It is emptied at a clean end, so content found by the next holder
    means its predecessor was killed outright, and names the MLflow runs it left RUNNING.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_FILE
        self._fh = None
        self.record: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}  # what a killed predecessor left, until handled

    def acquire(self) -> dict[str, Any]:
        """Take the lock or raise :class:`UserError` naming the holder; returns what a killed
        predecessor left in the file ({} after a clean end)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _parse(fh.read())
            fh.close()
            who = f"pid {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
            since = time.strftime("%H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else "?"
            raise UserError(
                f"another arvision run ({who}, started {since}) holds this repo ({self.path}); "
                "wait for it to finish or stop it, then run again"
            ) from None
        fh.seek(0)
        self.previous = _parse(fh.read())
        self._fh = fh
        if self.previous:
            print(_take_over(self.previous), flush=True)
        self.update(pid=os.getpid(), host=socket.gethostname(), started=time.time(), tree=lifetime.mark_tree())
        return self.previous

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps(self.record))
        self._fh.flush()

    def release(self) -> None:
        if self._fh is None:
            return
        lifetime.end_tree()  # what of this run's tree is still running (nothing, normally)
        lifetime.unmark_tree()
        self._fh.seek(0)
        self._fh.truncate()  # a clean end: nothing left for the next run to close
        self._fh.close()  # closing the file drops the flock
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None


def _take_over(previous: dict[str, Any]) -> str:
    """End what is left of a killed holder's tree; the one line that says so."""
    since = time.strftime("%H:%M:%S", time.localtime(previous["started"])) if previous.get("started") else "?"
    left = lifetime.take_over(previous["tree"]) if previous.get("tree") else 0
    ended = f"ended {left} of its processes still running" if left else "none of its processes was left"
    return f"taking over the repo lock of a killed arvision run (pid {previous.get('pid', '?')}, started {since}): {ended}"


def _parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
