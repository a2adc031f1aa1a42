"""Settings for the whole suite (this process and the pipelines it starts, which inherit them)."""

import os

# Ray Train's controller takes up the workers' reports at its health checks, every 2 s by
# default, and a report with a checkpoint waits for it. The test runs train a few steps between
# checkpoints, so every report would wait up to 2 s: check every 0.2 s instead.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


# ---------------------------------------------------------------- the quick tier and timings
#
# `slow`: a test that starts Ray, DVC or Prefect (a whole pipeline, a Ray Train run, a second
# process): every test of these files, and every test marked `e2e` or using the `ray_session`
# fixture. `pytest -m "not slow"` (`make test-quick`) runs the rest in about 2 minutes on 2
# cores; `make test` runs everything. The summary ends with the seconds each file took.

import collections  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SLOW_FILES = {
    "test_pipeline_e2e.py", "test_ray_train.py", "test_tokenizer_ray.py", "test_sharing.py", "test_failures.py",
    "test_exits.py", "test_serving.py", "test_prepare_scale.py", "test_bench.py",
}
_seconds: dict[str, float] = collections.defaultdict(float)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (Path(str(item.fspath)).name in SLOW_FILES or item.get_closest_marker("e2e") is not None
                or "ray_session" in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    _seconds[report.nodeid.split("::")[0]] += report.duration  # setup, call and teardown


def pytest_terminal_summary(terminalreporter):
    if not _seconds:
        return
    terminalreporter.section("seconds per file")
    for path, s in sorted(_seconds.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{s:8.1f}  {path}")
    terminalreporter.write_line(f"{sum(_seconds.values()):8.1f}  total")
