"""``kill -9`` of ``arvision run`` in the middle of a stage leaves nothing behind.

One tiny project through the real Prefect, DVC, MLflow and Ray. A first run, never killed, is
the baseline. Then, for each of ``tokenizer``, ``prior`` and ``evaluate`` in turn, the stage's
output is removed (DVC: the stage alone is stale), ``arvision run`` is started and killed
outright (SIGKILL to its own pid only, as the OOM killer or a lost session does) in the middle
of the stage, and:

- within 10 s no process of the run is left: none of its descendants seen just before the kill,
  none carrying its mark (``ARVISION_RUN_TREE``), none in its process group;
- the registry holds the versions and aliases it held before (the killed ``evaluate`` had
  registered a version: it is gone);
- ``dvc status`` tells the truth: the stage is stale and ``dvc.lock`` is as before;
- the next run takes over the lock in one line, closes what the killed run left RUNNING, re-runs
  the stage alone, and its outputs are identical (md5) to the baseline's, the registry too.

Deselect with ``-m "not chaos"``.
"""

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_project import env as _env
from pipeline_project import make_project

from test_failures import TINY

pytestmark = pytest.mark.chaos

#: the tokenizer trains for a few seconds, so that it is killed while it trains
PARAMS = {**TINY, "tokenizer": {**TINY["tokenizer"], "steps": 60, "checkpoint_every": 20}}
#: the files a run writes that measure time (stage seconds, throughput): left out of the comparison
TIMING_FILES = {"reports/speed.json"}


def _arvision(proj: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arvision.cli", *args], cwd=proj, env=_env(proj.parent),
                          capture_output=True, text=True, timeout=600)


def _fingerprint(proj: Path) -> dict[str, str]:
    """md5 of every output file (JSON metrics without their timing keys)."""
    out = {}
    for top in ("data/prepared", "data/tokens", "models", "metrics", "reports"):
        for f in sorted((proj / top).rglob("*")):
            rel = f.relative_to(proj).as_posix()
            if not f.is_file() or rel in TIMING_FILES:
                continue
            data = f.read_bytes()
            if f.suffix == ".json" and rel.startswith(("metrics/", "reports/")):  # e.g. stage_seconds, cpu_seconds
                values = {k: v for k, v in json.loads(data).items() if not _timing(k)}
                data = json.dumps(values, sort_keys=True).encode()
            elif f.suffix == ".csv" and rel.startswith("metrics/"):
                rows = list(csv.DictReader(io.StringIO(data.decode())))
                data = json.dumps([{k: v for k, v in r.items() if not _timing(k)} for r in rows]).encode()
            out[rel] = hashlib.md5(data).hexdigest()
    return out


def _timing(key: str) -> bool:
    return "seconds" in key or key.endswith("_per_s")


def _client(proj: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")


def _registry(proj: Path) -> dict[str, dict]:
    """Every registered model's live versions and aliases."""
    client = _client(proj)
    return {m.name: {"versions": sorted(int(v.version) for v in client.search_model_versions(f"name='{m.name}'")),
                     "aliases": {k: str(v) for k, v in m.aliases.items()}}
            for m in client.search_registered_models()}


def _runs(proj: Path) -> dict[str, str]:
    client = _client(proj)
    exp = client.get_experiment_by_name("arvision")
    return {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])}


def _proc(pid: int) -> tuple[str, int, bytes] | None:
    """(state, process group, environment) of a live process; None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return fields[0], int(fields[2]), env


def _left(watched: set[int], pgid: int, mark: str) -> dict[int, str]:
    """Live (not zombie) processes of the killed run: watched, in its group, or with its mark."""
    needle = f"ARVISION_RUN_TREE={mark}".encode()
    left = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        info = _proc(int(name))
        if info is None or info[0] == "Z":
            continue
        if int(name) in watched or info[1] == pgid or needle in info[2].split(b"\0"):
            try:
                left[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
            except OSError:
                pass
    return left


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _kill_mid_stage(proj: Path, marker: str, ready=lambda mark: True) -> dict:
    """Start ``arvision run``; once ``marker`` is printed and ``ready(mark)`` holds, SIGKILL its
    process; return what was seen and how long the rest of the tree took to end."""
    p = subprocess.Popen([sys.executable, "-m", "arvision.cli", "run"], cwd=proj, env=_env(proj.parent),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if marker in line:
            break
    else:
        p.wait()
        raise AssertionError(f"the run ended (status {p.returncode}) before '{marker}':\n" + "".join(out)[-3000:])
    mark = json.loads((proj / ".arvision" / "run.lock").read_text())["tree"]
    deadline = time.time() + 120
    while not ready(mark):
        assert time.time() < deadline, "".join(out)[-3000:]
        time.sleep(0.2)
    watched = _descendants(p.pid)
    t0 = time.time()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    while _left(watched, p.pid, mark) and time.time() - t0 < 30:
        time.sleep(0.2)
    left = _left(watched, p.pid, mark)
    seconds = time.time() - t0
    out.extend(p.stdout.read())  # what the rest of the tree printed on its way out
    return {"seconds": seconds, "left": left, "watched": len(watched), "out": "".join(out)}


def _marked(mark: str, name: str) -> bool:
    """A process named ``name`` carries the run's mark (or is the child of one that does)."""
    from arvision.lifetime import TREE_ENV, members

    for pid in members(TREE_ENV, mark):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith(name):
                return True
        except OSError:
            pass
    return False


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The project after one run never killed: its outputs' md5s and its registry."""
    proj = make_project(tmp_path_factory.mktemp("chaos"), PARAMS)
    first = _arvision(proj, "run")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return {"proj": proj, "outputs": _fingerprint(proj), "registry": _registry(proj)}


def _evaluate_first_time(proj: Path) -> None:
    """The registry as it was when the baseline's evaluate ran: no generator yet."""
    _client(proj).delete_registered_model("arvision-generator")


CASES = {
    # stage: (output removed to make it stale, what is printed mid-stage, what must be running, set-up)
    "tokenizer": ("models/tokenizer", "tokenizer/vq:", lambda mark: True, None),
    "prior": ("models/prior", "python -m stages.prior",
              lambda mark: _marked(mark, "raylet") and _marked(mark, "ray::"), None),
    "evaluate": ("metrics/eval.json", "Created version '1' of model 'arvision-generator'", lambda mark: True,
                 _evaluate_first_time),
}


@pytest.mark.parametrize("stage", list(CASES))
def test_kill_9_mid_stage_leaves_nothing_behind(baseline, stage):
    proj = baseline["proj"]
    output, marker, ready, setup = CASES[stage]
    target = proj / output
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    if setup is not None:
        setup(proj)
    registry, lock_file, runs = _registry(proj), (proj / "dvc.lock").read_bytes(), _runs(proj)

    killed = _kill_mid_stage(proj, marker, ready)
    assert not killed["left"], f"{stage}: left running after {killed['seconds']:.1f} s: {killed['left']}"
    assert killed["seconds"] < 10, killed["out"][-3000:]
    print(f"{stage}: {killed['watched']} processes ended {killed['seconds']:.1f} s after kill -9")
    assert _registry(proj) == registry, killed["out"][-3000:]
    assert (proj / "dvc.lock").read_bytes() == lock_file
    status = subprocess.run([sys.executable, "-m", "dvc", "status", stage], cwd=proj, env=_env(proj.parent),
                            capture_output=True, text=True)
    assert f"{stage}:" in status.stdout and output in status.stdout, status.stdout  # stale, and why
    # the parent's RUNNING, and the stage's, KILLED by the stage itself unless it had to exit at
    # once (stuck in Ray with Ray's daemons gone): the next run closes what is RUNNING
    new_runs = sorted(st for rid, st in _runs(proj).items() if rid not in runs)
    assert new_runs in (["KILLED", "RUNNING"], ["RUNNING", "RUNNING"]), new_runs

    again = _arvision(proj, "run")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert sum("taking over the repo lock of a killed arvision run" in ln for ln in lines) == 1, again.stdout[:2000]
    assert any(f"closed {new_runs.count('RUNNING')} MLflow run(s) left RUNNING" in ln for ln in lines), again.stdout[:2000]
    ran = {r["stage"]: r["ran"] for r in json.loads((proj / ".arvision" / "last_run.json").read_text())["stages"]}
    assert [s for s, r in ran.items() if r] == [stage]
    assert _fingerprint(proj) == baseline["outputs"]
    assert _registry(proj) == baseline["registry"]
    assert "RUNNING" not in _runs(proj).values()
    assert not list((proj / ".arvision" / "registry-journal").glob("*.json"))
