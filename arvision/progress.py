"""Progress bars and Ray's relayed output, for a person at a terminal and for a log.

One model for every stage:

- **in the stage's own process** (:func:`bar`): on a terminal, one tqdm line redrawn in place
  (the stage leaves that one line); in a log (stderr not a terminal: CI, ``.arvision/logs``,
  Prefect), a plain line every :data:`LOG_INTERVAL_S` seconds, without ``\\r`` redraws or
  bar glyphs;
- **on a Ray worker** (the prior's and the tokenizer's Ray Train rank 0): the bar prints its
  state as one marked line (:data:`MARK`) on stderr, which Ray relays to the stage process;
  there :class:`RayOutput` draws it as its own bar, by the rule above;
- **Ray's relayed output** (:class:`RayOutput`, installed by :func:`arvision.cluster.init_ray`):
  the ``(RayTrainWorker pid=...)`` prefixes and colour codes are taken off, and Ray's own
  chatter that says nothing to the user (worker-group set-up, each checkpoint's path, health
  checks timing out under load, the placement-group cleaner) is dropped (:data:`RAY_NOISE`,
  :data:`RAY_QUIET_ACTORS`).

Written here, not by ``ray.experimental.tqdm_ray``: that one colours its bars and names each by
worker pid, and draws them in a log as tqdm's carriage-return redraws do.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import uuid
from typing import Any, Iterable

from tqdm import tqdm

#: seconds between two progress lines in a log (stderr not a terminal)
LOG_INTERVAL_S = 5.0
#: seconds between two redraws on a terminal
TTY_INTERVAL_S = 0.2
#: set (to 1) in every Ray worker's environment by init_ray: bars there relay their state
RELAY_ENV = "ARVISION_PROGRESS_RELAY"
#: the start of a relayed bar-state line (JSON follows)
MARK = "arvision-progress "
#: a log line: description, share, count, time spent and left, rate, postfix; no bar glyphs
LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

#: Ray's relayed lines that say nothing to the user of a run: set-up and bookkeeping of Ray
#: Train and Ray Data, and warnings that are Ray's and not the run's (a health check or the
#: placement-group cleaner timing out under load). Errors and tracebacks are kept.
RAY_NOISE = re.compile("|".join([
    r"GetTimeoutError", r"PlacementGroupCleaner", r"placement_group_cleaner",
    r"^Requesting resources: ", r"^Attempting to start training worker group", r"^Started training worker group",
    r"^- \(ip=[^)]*\) world_rank=", r"^Setting up process group for", r"^Moving model to device",
    r"^Wrapping provided model in DistributedDataParallel", r"^Checkpoint successfully created at",
    r"^Reporting training result \d+", r"^Starting execution of Dataset", r"^Execution plan of Dataset",
    r"^Progress bars disabled\. To enable", r"Dataset \S+ execution finished in", r"^Registered dataset logger",
]))
#: Ray's own actors whose output is Ray's bookkeeping, every line of it (a traceback of the
#: placement-group cleaner's monitor thread when it cannot reach the state API, say): the
#: run's errors reach the stage as exceptions of ``fit()`` or of the data it reads
RAY_QUIET_ACTORS = {"PlacementGroupCleaner", "SplitCoordinator", "_StatsActor", "AutoscalingRequester"}
#: Ray's relay prefix: ``(RayTrainWorker pid=123)``, ``(pid=123, ip=10.0.0.2)``, ``(raylet)`` ...
_PREFIX = re.compile(r"^\((?:(?P<name>[^()]+?(?:\([^()]*\))?) )?pid=[^,)]+(?:, ip=[^)]+)?\) |^\((?:raylet|autoscaler[^)]*)\) ")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """A file for tqdm that turns each redraw into one plain line (no ``\\r``, no padding), and
    a redraw at the count of the line before (tqdm's close, a postfix alone) into none."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        count = line.split(" [", 1)[0]  # "prior:  40% 120/300": what a new line must change
        if line and count != self.last:
            self.stream.write(line + "\n")
            self.last = count

    def flush(self) -> None:
        self.stream.flush()


def local_bar(total: int | None, desc: str, unit: str = "step", initial: int = 0, stream: Any = None,
              iterable: Iterable | None = None) -> tqdm:
    """A bar drawn in this process on ``stream`` (default stderr): in place on a terminal,
    a :data:`LOG_FORMAT` line every :data:`LOG_INTERVAL_S` seconds elsewhere."""
    stream = sys.stderr if stream is None else stream
    common = dict(iterable=iterable, total=total, desc=desc, unit=unit, initial=initial, leave=True)
    if _isatty(stream):
        return tqdm(file=stream, dynamic_ncols=True, mininterval=TTY_INTERVAL_S, **common)
    return tqdm(file=_Lines(stream), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, bar_format=LOG_FORMAT,
                **common)


class _RelayBar(tqdm):
    """On a Ray worker: each redraw prints the bar's state as one :data:`MARK` line on stdout,
    which Ray relays to the stage process (:class:`RayOutput` draws it there)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import io

        self._relay_id, self._closed = uuid.uuid4().hex[:8], False
        super().__init__(*args, file=io.StringIO(), mininterval=1.0, **kwargs)

    def _send(self, closed: bool = False) -> None:
        d = self.format_dict
        state = {"id": self._relay_id, "desc": d.get("prefix") or "", "n": int(d["n"]), "total": d["total"],
                 "unit": d.get("unit", "it"), "postfix": d.get("postfix") or "", "closed": closed}
        print(MARK + json.dumps(state), file=sys.stderr, flush=True)  # Ray Train copies a worker's stdout to stderr

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if not self.disable and not self._closed:
            self._send()

    def close(self) -> None:
        if not self.disable and not self._closed:
            self._send(closed=True)
            self._closed = True  # tqdm's own close displays once more
        super().close()


def bar(total: int | None, desc: str, unit: str = "step", initial: int = 0, disable: bool = False,
        iterable: Iterable | None = None) -> tqdm:
    """The progress bar of a stage's long loop (training steps, images encoded): drawn here, or
    relayed to the stage process when this is a Ray worker (:data:`RELAY_ENV`)."""
    if disable:
        return tqdm(iterable=iterable, total=total, disable=True)
    if os.environ.get(RELAY_ENV) == "1":
        return _RelayBar(iterable=iterable, total=total, desc=desc, unit=unit, initial=initial)
    return local_bar(total, desc, unit, initial, iterable=iterable)


class RayOutput:
    """``sys.stdout`` / ``sys.stderr`` of a process that runs Ray: what Ray's log thread relays
    from the workers is cleaned line by line (prefix and colours off, :data:`RAY_NOISE` dropped,
    relayed bars drawn here); everything else passes as it is."""

    #: the driver thread that prints the workers' output (``ray._private.worker``)
    RAY_THREAD = "ray_print_logs"

    #: relayed bars by id, shared by the stdout and the stderr filter (drawn on stderr), and
    #: the ids of those closed (a state that arrives on both streams is drawn once)
    _bars: dict[str, tqdm] = {}
    _closed: set[str] = set()
    _lock = threading.Lock()

    def __init__(self, stream: Any, bar_stream: Any = None) -> None:
        self._stream = stream
        self._bar_stream = stream if bar_stream is None else bar_stream
        self._partial = ""

    def write(self, text: str) -> int:
        if threading.current_thread().name != self.RAY_THREAD:
            return self._stream.write(text)
        with self._lock:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r")
        prefix = _PREFIX.match(line)
        if prefix is not None:
            if (prefix.group("name") or "") in RAY_QUIET_ACTORS:
                return
            line = line[prefix.end():]
        if line.startswith(MARK):
            self._relayed_bar(json.loads(line[len(MARK):]))
        elif line.strip() and not RAY_NOISE.search(line):
            self._stream.write(line + "\n")

    def _relayed_bar(self, state: dict[str, Any]) -> None:
        key = state["id"]
        if key in self._closed:
            return
        b = self._bars.get(key)
        if b is None:
            b = self._bars[key] = local_bar(state["total"], state["desc"], state["unit"], state["n"], stream=self._bar_stream)
        if state["postfix"]:
            b.set_postfix_str(state["postfix"].lstrip(", "), refresh=False)
        if state["n"] > b.n:
            b.update(state["n"] - b.n)
        if state["closed"]:
            b.close()
            del self._bars[key]
            self._closed.add(key)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the stream's
        return getattr(self._stream, name)


def install_ray_output() -> None:
    """Put :class:`RayOutput` on ``sys.stdout`` and ``sys.stderr`` (once per process); relayed
    bars are drawn on stderr, as the bars of this process are."""
    if isinstance(sys.stderr, RayOutput):
        return
    err = sys.stderr
    sys.stdout, sys.stderr = RayOutput(sys.stdout, bar_stream=err), RayOutput(err)
