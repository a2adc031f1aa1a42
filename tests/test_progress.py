"""Progress as a person at a terminal and a log reader see it (:mod:`arvision.progress`): one
line redrawn in place on a terminal, plain lines at intervals in a log, and a Ray worker's bar
drawn by the stage process without Ray's prefixes, colours or chatter."""

import io
import threading

from arvision import progress as P


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_at_intervals_and_a_terminal_one_redrawn_line(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.0)  # every update a line, to count them
    b = P.local_bar(40, "prior", "step", stream=log)
    for _ in range(40):
        b.update(1)
        b.set_postfix(loss=1.5, refresh=False)
    b.close()
    lines = log.getvalue().splitlines()
    assert lines and all("\r" not in ln and "\x1b" not in ln and "█" not in ln for ln in lines)
    assert lines[-1].startswith("prior: 100% 40/40 [") and "loss=1.5" in lines[-1]
    assert len(lines) == len(set(lines))  # no line twice (tqdm's close redraws the last state)

    monkeypatch.setattr(P, "LOG_INTERVAL_S", 3600.0)  # the real interval: a fast loop logs its start and end only
    log = io.StringIO()
    with P.local_bar(1000, "tokens/train", "img", stream=log) as b:
        for _ in range(100):
            b.update(10)
    assert [ln.split(" [")[0] for ln in log.getvalue().splitlines()] == ["tokens/train:   0% 0/1000", "tokens/train: 100% 1000/1000"]

    tty = _Terminal()
    with P.local_bar(5, "prior", "step", stream=tty) as b:
        for _ in range(5):
            b.update(1)
    out = tty.getvalue()
    assert out.count("\n") == 1 and "\r" in out  # one line, redrawn in place, left at the end


def _as_ray_thread(fn):
    t = threading.Thread(target=fn, name=P.RayOutput.RAY_THREAD)
    t.start()
    t.join()


def test_ray_output_strips_prefixes_and_colours_drops_chatter_and_draws_relayed_bars(monkeypatch):
    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.0)
    sink = io.StringIO()
    out, err = P.RayOutput(sink), P.RayOutput(sink)  # stdout's and stderr's: Ray Train relays a worker's stdout on both
    relayed = [
        '{"id": "a1", "desc": "prior", "n": 0, "total": 30, "unit": "step", "postfix": "", "closed": false}',
        '{"id": "a1", "desc": "prior", "n": 10, "total": 30, "unit": "step", "postfix": "loss=2.1", "closed": false}',
        '{"id": "a1", "desc": "prior", "n": 30, "total": 30, "unit": "step", "postfix": "loss=1.7", "closed": true}',
    ]

    def ray_prints():
        for text in ["\x1b[36m(RayTrainWorker pid=14532)\x1b[0m prior: resuming from the checkpoint at step 6",
                     "\x1b[36m(TrainController pid=14440)\x1b[0m Requesting resources: {'CPU': 1} * 1",
                     "\x1b[36m(RayTrainWorker pid=14532)\x1b[0m Checkpoint successfully created at: Checkpoint(...)",
                     "(TrainController pid=9, ip=10.0.0.2) GetTimeoutError: Get timed out: some object(s) not ready.",
                     "(PlacementGroupCleaner pid=7) Exception in thread PlacementGroupCleanerMonitor:",
                     "(PlacementGroupCleaner pid=7) Traceback (most recent call last):",
                     "(PlacementGroupCleaner pid=7) ConnectionError: Found multiple active Ray instances",
                     *[f"\x1b[36m(RayTrainWorker pid=14532)\x1b[0m {P.MARK}{r}" for r in relayed],
                     "\x1b[36m(RayTrainWorker pid=14532)\x1b[0m RuntimeError: the token shard holds 3 images"]:
            print(text, file=out)  # as Ray's log thread does: the text, then the newline
            if P.MARK in text:
                print(text, file=err)  # the same state again, on the other stream: drawn once

    _as_ray_thread(ray_prints)
    out.write("── prior ──\n")  # the stage's own output passes as it is
    lines = sink.getvalue().splitlines()
    assert lines[0] == "prior: resuming from the checkpoint at step 6"
    assert [ln.split(" [")[0] for ln in lines[1:4]] == ["prior:   0% 0/30", "prior:  33% 10/30", "prior: 100% 30/30"]
    assert lines[3].endswith("loss=1.7]")
    assert lines[4:] == ["RuntimeError: the token shard holds 3 images", "── prior ──"]


# Through real Ray Train: tests/test_pipeline_e2e.py checks the prior's relayed bar in the log of a whole run.
