"""How long each process of an ``arvision run`` lives, and who ends whom.

The tree of one run::

    arvision run (the top: holds the repo lock; DVC and the Prefect flow run in it)
    ├── the temporary Prefect server       (own session; PR_SET_PDEATHSIG from the top)
    └── $SHELL -c "python -m stages.X"    (DVC's; ends when its command does)
        └── the stage                      (guard: watches the top; PR_SET_PDEATHSIG from the shell)
            ├── Ray's daemons: gcs_server, raylet, dashboard, log monitor ...
            └── Ray's workers               (the raylet's children, not the stage's)

Ray's workers are not the stage's children, and a daemon whose parent died is nobody's, so
the tree cannot be walked by parent pids. Every process carries a mark in its environment
instead, which a child inherits and Ray copies into each process it starts:
``ARVISION_RUN_TREE=<top pid>-<token>`` (:func:`mark_tree`, by the top), and
``ARVISION_STAGE_TREE=<stage pid>-<token>`` (:func:`guard_stage`, by a stage) on what the stage
starts. :func:`members` finds a mark's processes in ``/proc/<pid>/environ``.

Who ends whom:

- **Ctrl-C** at the terminal: SIGINT reaches the whole foreground group (top, shell, stage, Ray).
  The stage ends itself "interrupted" (exit 130: ``stages.common``); the top records the flow
  Cancelled (``pipelines.run``).
- **SIGTERM to the top**: forwarded to the stage, which handles it as Ctrl-C (``pipelines.run``).
- **The top dies outright** (``kill -9``, the OOM killer, a lost session): the stage's guard sees
  the top's pid gone within :data:`POLL_S`, kills what the stage started (its mark), and
  interrupts the stage: its MLflow run ends KILLED, its registrations are undone (nothing will
  record its outputs in ``dvc.lock``), no output is kept. If that takes longer than
  :data:`HARD_EXIT_S` the stage exits at once. The Prefect server dies of its parent-death
  signal; the shell ends with its stage.
- **The stage dies outright**: Ray's daemons die of the parent-death signal Ray gives them; what
  is left carries the run's mark and is ended when the top's lock is released
  (:func:`end_tree`), or, if the top died too, by the next run that takes over the lock
  (:func:`take_over`).
- **Any end of a stage**: at exit, Ray is shut down and whatever still carries the stage's mark
  is killed (:func:`guard_stage`'s exit hook).

Linux only where it reads ``/proc`` or calls ``prctl``; elsewhere the marks are set and the
rest does nothing.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

TREE_ENV = "ARVISION_RUN_TREE"
STAGE_ENV = "ARVISION_STAGE_TREE"
#: how often a stage's guard looks for its top (seconds)
POLL_S = 0.2
#: how long a stage whose top died may take to end its runs and undo its registrations (seconds)
HARD_EXIT_S = 6.0
#: how long :func:`end` waits between SIGTERM and SIGKILL (seconds)
GRACE_S = 3.0

_LINUX = sys.platform.startswith("linux")


def mark_tree() -> str:
    """Mark this process as the top of a run's tree (idempotent for one process); returns the mark."""
    mark = os.environ.get(TREE_ENV, "")
    if not mark.startswith(f"{os.getpid()}-"):
        mark = f"{os.getpid()}-{secrets.token_hex(4)}"
        os.environ[TREE_ENV] = mark
    return mark


def unmark_tree() -> None:
    """This process is no longer a run's top (a served flow's run ended)."""
    if os.environ.get(TREE_ENV, "").startswith(f"{os.getpid()}-"):
        del os.environ[TREE_ENV]


def top_pid(mark: str) -> int | None:
    """The pid of a mark's top (``<pid>-<token>``)."""
    head = mark.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def members(var: str, mark: str) -> list[int]:
    """The live processes (this one excepted) whose environment holds ``var=mark``, read from
    ``/proc/<pid>/environ`` (a process's own, or root's to read), and their descendants: a
    process that sets its title (Ray's agents: ``ray::DashboardAgent``) overwrites what
    ``/proc`` shows of its environment, but it is the child of one that does not (the raylet).
    Zombies are left out."""
    if not mark or not _LINUX:
        return []
    needle = f"{var}={mark}".encode()
    marked, parent = set(), {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[-1].split()
            if fields[0] == "Z":
                continue
            parent[pid] = int(fields[1])
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                marked.add(pid)
        except OSError:  # gone, or another user's
            continue
    marked.discard(os.getpid())  # nor what this process started unmarked (the top's Prefect server)
    found, grew = set(marked), True
    while grew:  # the descendants of marked processes
        more = {pid for pid, ppid in parent.items() if ppid in found and pid not in found and pid != os.getpid()}
        found |= more
        grew = bool(more)
    return sorted(found)


def end(pids: list[int], grace_s: float = GRACE_S) -> int:
    """SIGTERM ``pids``, SIGKILL those left after ``grace_s``; returns how many there were."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if _signal(p, sig)]
        if not alive:
            break
        deadline = time.time() + (grace_s if sig == signal.SIGTERM else 1.0)
        while alive and time.time() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _alive(p)]
        pids = alive
    return len(pids)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def end_tree(grace_s: float = GRACE_S) -> int:
    """Called by the top when its run ends: end every process still carrying its mark."""
    mark = os.environ.get(TREE_ENV, "")
    if not mark.startswith(f"{os.getpid()}-"):
        return 0
    pids = members(TREE_ENV, mark)
    return end(pids, grace_s) if pids else 0


def take_over(mark: str, wait_s: float = HARD_EXIT_S + 2.0) -> int:
    """A new top found the lock of a dead one: wait up to ``wait_s`` for the dead tree's
    processes to end themselves (their guards see the top gone), then end the rest; returns
    how many there were at the start."""
    pids = members(TREE_ENV, mark)
    if not pids:
        return 0
    deadline = time.time() + wait_s
    left = pids
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [p for p in left if _alive(p)]
    if left:
        end(left, grace_s=1.0)
    return len(pids)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``sig`` to this process when the thread that started it ends (Linux ``PR_SET_PDEATHSIG``).
    Safe in a ``preexec_fn``."""
    if _LINUX:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(sig))


_GUARD: dict[str, object] = {}


def guard_stage(stage: str, on_orphaned=None, on_hard_exit=None) -> None:
    """Bind a stage's life to its run's: mark what it starts (``ARVISION_STAGE_TREE``), die
    with its parent, shut Ray down and kill what carries the mark at exit, and, under an
    ``arvision run`` (``ARVISION_RUN_TREE`` set), watch the top's pid: when it is gone, kill what
    the stage started and call ``on_orphaned`` (default: SIGTERM to this process, which a stage
    handles as Ctrl-C), exiting at once after :data:`HARD_EXIT_S` if the stage has not ended
    (after ``on_hard_exit``: what must not wait for the next run)."""
    if _GUARD:
        return
    mark = f"{os.getpid()}-{secrets.token_hex(4)}"
    os.environ[STAGE_ENV] = mark
    _GUARD.update(mark=mark, on_hard_exit=on_hard_exit)
    die_with_parent(signal.SIGTERM)
    atexit.register(_stage_exit)
    top = top_pid(os.environ.get(TREE_ENV, ""))
    if top is None or not _LINUX:
        return
    born = _start_time(top)
    if born is None:  # the top is gone already
        born = -1.0

    def watch() -> None:
        while _start_time(top) == born:
            time.sleep(POLL_S)
        print(f"{stage}: its arvision run (pid {top}) is gone: stopping", file=sys.stderr, flush=True)
        _GUARD["orphaned"] = True
        end(members(STAGE_ENV, mark), grace_s=0.0)  # Ray's processes: nothing of theirs to save
        threading.Thread(target=_hard_exit, daemon=True).start()
        (on_orphaned or (lambda: os.kill(os.getpid(), signal.SIGTERM)))()

    threading.Thread(target=watch, name="arvision-guard", daemon=True).start()


def _hard_exit() -> None:
    time.sleep(HARD_EXIT_S)
    end(members(STAGE_ENV, str(_GUARD.get("mark", ""))), grace_s=0.0)
    last = _GUARD.get("on_hard_exit")
    if callable(last):
        done = threading.Thread(target=last, daemon=True)
        done.start()
        done.join(timeout=2.0)
    os._exit(137)


def _start_time(pid: int) -> float | None:
    """A process's start (clock ticks since boot, from ``/proc/<pid>/stat``): a pid reused by a
    new process reads differently. None when there is no such live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else float(fields[19])


def _stage_exit() -> None:
    """At a stage's exit: Ray shut down (its daemons and workers), then anything still marked killed."""
    ray = sys.modules.get("ray")
    if ray is not None and not _GUARD.get("orphaned"):  # orphaned: its daemons are killed already
        try:
            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # best effort: what is left is killed below
            pass
    mark = str(_GUARD.get("mark", ""))
    pids = members(STAGE_ENV, mark)
    if pids:
        end(pids, grace_s=1.0)
