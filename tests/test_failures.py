"""A run's word can be trusted: failures say why, interrupts stop fast, services fail in seconds.

Pure parts first (atomic outputs, the repo lock, ``arvision sample`` argument and file errors,
the service preflight, closing orphaned MLflow runs); then one tiny project through the real
Prefect, DVC, MLflow and Ray: a failing stage, Ctrl-C, SIGTERM and ``kill -9`` during a stage.
"""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from pipeline_project import make_project
from pipeline_project import env as _env

#: overrides of the project's params.yaml (DVC tracks its keys one by one): steps of 2-4, seconds a stage
TINY = {
    "seed": 0,
    "data": {"source": "emoji", "path": "arvision/data/emoji", "resolution": 16, "channels": 3,
             "val_fraction": 0.2, "max_images": 60, "shard_size": 32},
    "tokenizer": {"kind": "vq", "width": 8, "channel_mult": [1, 2], "num_res_blocks": 0, "codebook_size": 16,
                  "code_dim": 4, "steps": 3, "batch_size": 8, "log_every": 1, "warmup_steps": 1},
    "tokens": {"batch_size": 32, "shard_size": 32},
    "prior": {"kind": "gpt", "size": "tiny", "steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 2,
              "checkpoint_every": 2, "eval_every": 0},
    "ray": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
    "features": {"width": 8, "dim": 8, "steps": 2, "batch_size": 8},
    "evaluate": {"samples_per_class": 1, "num_samples": 10, "max_val_images": 12, "batch_size": 16},
}


def _project(tmp: Path) -> Path:
    return make_project(tmp, TINY)


# --------------------------------------------------------------------------- atomic outputs


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path, monkeypatch, exchange):
    import stages.common as common

    if not exchange:
        monkeypatch.setattr(common, "_exchange", lambda a, b: False)
    out = tmp_path / "models" / "prior"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with common.atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("stage failed")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with common.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old output stays readable until the swap
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["prior"]  # no temporary or old copy left


# --------------------------------------------------------------------------- the repo lock


def _arvision(proj: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arvision.cli", *args], cwd=proj, env=env or _env(proj.parent),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A project that never runs a stage: for checks that must stop before any work."""
    return _project(tmp_path_factory.mktemp("bare"))


def test_second_run_is_told_at_once_who_holds_the_repo(bare):
    from pipelines.lock import RunLock

    lock = RunLock(bare)
    lock.acquire()
    try:
        t0 = time.time()
        proc = _arvision(bare, "run")
        assert proc.returncode == 2, proc.stderr
        assert f"another arvision run (pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr
        assert time.time() - t0 < 30
    finally:
        lock.release()
    assert not (bare / "mlflow.db").exists() and not (bare / "data" / "prepared").exists()


def test_lock_hands_what_a_killed_holder_left_to_the_next(tmp_path):
    from pipelines.lock import RunLock

    first = RunLock(tmp_path)
    first.acquire()
    first.update(parent_run_id="abc")
    first._fh.close()  # the process died: the kernel drops the flock, the file keeps its record
    first._fh = None
    second = RunLock(tmp_path)
    assert second.acquire()["parent_run_id"] == "abc"
    second.release()
    assert RunLock(tmp_path).acquire() == {}  # a clean end leaves nothing behind


# --------------------------------------------------------------------------- services


@pytest.mark.parametrize("setting,value", [
    ("MLFLOW_TRACKING_URI", "http://127.0.0.1:9"),
    ("PREFECT_API_URL", "http://127.0.0.1:9/api"),
    ("RAY_ADDRESS", "127.0.0.1:9"),
])
def test_unreachable_service_fails_fast_naming_the_setting(bare, setting, value):
    env = {**_env(bare.parent), setting: value}
    t0 = time.time()
    proc = _arvision(bare, "run", env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith(f"error: {setting}={value}") and "Traceback" not in proc.stderr
    assert time.time() - t0 < 30
    assert not (bare / "data" / "prepared").exists()  # checked before any stage touched an output


# --------------------------------------------------------------------------- arvision sample


def _model_dir(root: Path) -> Path:
    """A models/ directory whose files pass the cheap checks (valid JSON, zip checkpoints)."""
    for part in ("tokenizer", "prior"):
        d = root / "models" / part
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        with zipfile.ZipFile(d / "weights.pt", "w") as z:
            z.writestr("archive/data.pkl", b"")
    return root / "models"


@pytest.mark.parametrize("args,expected", [
    (["--n", "0"], "-n/--num must be at least 1"),  # --n: the old spelling, an alias
    (["-n", "-3"], "-n/--num must be at least 1"),
    (["--num", "0"], "-n/--num must be at least 1"),
    (["--temperature", "0"], "--temperature: input should be greater than 0"),
    (["--top-p", "0"], "--top-p: input should be greater than 0"),
    (["--top-p", "1.5"], "--top-p: input should be less than or equal to 1"),
    (["--top-k", "-1"], "--top-k: input should be greater than or equal to 0"),
    (["--cfg-scale", "-1"], "--cfg-scale: input should be greater than or equal to 0"),
])
def test_sample_bad_arguments(tmp_path, capsys, args, expected):
    from arvision.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sample", str(_model_dir(tmp_path)), "--out", str(tmp_path / "g.png"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage,expected", [
    ("truncate prior/weights.pt", "prior/weights.pt is not a complete torch checkpoint"),
    ("garbage prior/config.json", "prior/config.json is not valid JSON"),
    ("remove tokenizer/weights.pt", "tokenizer/weights.pt is missing"),
])
def test_sample_damaged_model(tmp_path, capsys, damage, expected):
    from arvision.cli import main

    models = _model_dir(tmp_path)
    action, name = damage.split(" ")
    f = models / name
    if action == "truncate":
        f.write_bytes(f.read_bytes()[:20])
    elif action == "garbage":
        f.write_text("{not json")
    else:
        f.unlink()
    with pytest.raises(SystemExit) as e:
        main(["sample", str(models), "--out", str(tmp_path / "g.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- orphaned MLflow runs


def test_orphaned_runs_of_a_dead_process_are_closed(tmp_path):
    from mlflow.tracking import MlflowClient

    from arvision.tracking import CLOSED_REASON_TAG, close_orphaned_runs, process_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("arvision", artifact_location=(tmp_path / "art").as_uri())
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_tags = {**process_tags(), "arvision.pid": str(dead.pid)}
    parent = client.create_run(exp, tags=dead_tags).info.run_id
    orphan = client.create_run(exp, tags={**dead_tags, "mlflow.parentRunId": parent}).info.run_id
    alive = client.create_run(exp, tags={**process_tags(), "mlflow.parentRunId": parent}).info.run_id  # this process
    closed = close_orphaned_runs(uri, parent, "killed")
    assert sorted(closed) == sorted([parent, orphan])
    for rid in (parent, orphan):
        run = client.get_run(rid)
        assert run.info.status == "KILLED" and run.data.tags[CLOSED_REASON_TAG] == "killed"
    assert client.get_run(alive).info.status == "RUNNING"


# --------------------------------------------------------------------------- through the real pipeline


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    """One tiny project shared by the pipeline cases (they run in file order)."""
    return _project(tmp_path_factory.mktemp("fail"))


def _set(proj: Path, **sections) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _mlflow_runs(proj: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("arvision")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def test_failed_stage_says_why_and_ends_failed(proj, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"  # the check passes (a Parquet file with rows); prepare cannot read it
    pq.write_table(pa.table({"image": list(range(80)), "label": [0] * 80}), bad)
    _set(proj, data={"source": "parquet", "path": str(bad)})
    proc = _arvision(proj, "run")
    assert proc.returncode == 2  # data the user must fix: prepare exits 2, and so does the run (README, "Exit statuses")
    reason = "column 'image' holds int64, not image bytes"
    assert f"prepare failed: {bad}: {reason}" in proc.stdout, proc.stdout[-3000:]
    assert "registered" not in proc.stdout and "bits/dim" not in proc.stdout  # nothing of an earlier run
    record = json.loads((proj / ".arvision" / "last_run.json").read_text())
    assert record["stages"][0]["failed"] and reason in record["stages"][0]["reason"]
    parent = [r for r in _mlflow_runs(proj) if r.data.tags.get("arvision.stage") == "pipeline"][0]
    assert parent.info.status == "FAILED" and parent.data.params["data.source"] == "parquet"
    _set(proj, data={"source": "emoji", "path": "arvision/data/emoji"})


def _interrupt(proj: Path, sig: int, marker: str = "python -m stages.tokenizer", delay: float = 1.0) -> tuple[int, float, str]:
    """Start ``arvision run``, send ``sig`` ``delay`` s after ``marker`` is printed and the
    tokenizer stage has opened its MLflow run (SIGINT to the
    process group, as Ctrl-C at a terminal; others to the main process); returns (rc, seconds
    from the signal to the exit, output)."""
    # Ctrl-C as at a terminal: SIGINT handled by default in the run, even where this test runs
    # with SIGINT ignored (a background job of a non-interactive shell, e.g. `make test &`)
    p = subprocess.Popen([sys.executable, "-m", "arvision.cli", "run"], cwd=proj, env=_env(proj.parent),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = []
    for line in p.stdout:
        out.append(line)
        if marker in line:
            break
    else:  # the run ended before the stage started: say why instead of waiting
        p.wait()
        raise AssertionError(f"the run ended (status {p.returncode}) before '{marker}':\n" + "".join(out)[-3000:])
    deadline = time.time() + 180
    while time.time() < deadline and not any(  # the stage has opened its MLflow run: it is working
            r.info.status == "RUNNING" and r.data.tags.get("arvision.stage") == "tokenizer" for r in _mlflow_runs(proj)):
        time.sleep(0.5)
    time.sleep(delay)
    t0 = time.time()
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    elif sig == signal.SIGKILL:
        os.killpg(p.pid, sig)  # everything at once: the run and its stage
    else:
        os.kill(p.pid, sig)
    rest, _ = p.communicate(timeout=120)
    return p.returncode, time.time() - t0, "".join(out) + rest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_fast_and_ends_runs_killed(proj, sig):
    _set(proj, tokenizer={"steps": 5000})  # a stage that is surely still running when the signal comes
    rc, seconds, out = _interrupt(proj, sig)
    assert rc == 130, out[-3000:]
    assert seconds < 10, out[-3000:]
    assert "interrupted" in out and out.count("Traceback") == 0, out[-3000:]
    runs = _mlflow_runs(proj)
    parent = [r for r in runs if r.data.tags.get("arvision.stage") == "pipeline"][0]
    stage = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
             and r.data.tags["arvision.stage"] == "tokenizer"][0]
    assert parent.info.status == "KILLED" and stage.info.status == "KILLED"
    assert not (proj / "models" / "tokenizer").exists()  # nothing half-written kept
    # the parent run holds the run's params and the numbers of the stages that ran in it
    assert parent.data.params["tokenizer.steps"] == "5000"
    if sig == signal.SIGINT:  # prepare ran in this run (after the failed one)
        assert parent.data.metrics["prepare.train_images"] > 0


def test_kill_9_leaves_runs_that_the_next_run_closes(proj):
    rc, _, out = _interrupt(proj, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    lost = [r for r in _mlflow_runs(proj) if r.info.status == "RUNNING"]
    assert {r.data.tags["arvision.stage"] for r in lost} == {"pipeline", "tokenizer"}
    rc, _, out = _interrupt(proj, signal.SIGINT)
    assert rc == 130 and "closed 2 MLflow run(s) left RUNNING by a killed arvision run" in out, out[-3000:]
    for r in lost:
        run = [x for x in _mlflow_runs(proj) if x.info.run_id == r.info.run_id][0]
        assert run.info.status == "KILLED" and "was killed" in run.data.tags["arvision.end_reason"]


def _ray_daemons() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}


def test_sigterm_while_the_tokenizer_trains_on_ray_workers(proj):
    """SIGTERM while two Ray Train workers train the tokenizer. ``ray.init`` puts its own SIGTERM
    handler in place, which aborted the stage (exit 134, Failed); the stage's handler is put
    back, so it ends "interrupted", its runs KILLED, and Ray's processes are gone."""
    before = _ray_daemons()
    _set(proj, tokenizer={"steps": 5000, "num_workers": 2})
    try:
        # the bar rank 0 relays (drawn by the stage: arvision.progress): training has begun on the workers
        rc, seconds, out = _interrupt(proj, signal.SIGTERM, marker="tokenizer/vq:")
    finally:
        _set(proj, tokenizer={"num_workers": 0})
    assert rc == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out, out[-3000:]
    assert seconds < 60, out[-3000:]  # Ray's shutdown included
    runs = _mlflow_runs(proj)
    parent = [r for r in runs if r.data.tags.get("arvision.stage") == "pipeline"][0]
    stage = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id][0]
    assert parent.data.params["tokenizer.num_workers"] == "2"
    assert parent.info.status == "KILLED" and stage.info.status == "KILLED"
    assert not (proj / "models" / "tokenizer").exists()
    deadline = time.time() + 30
    while _ray_daemons() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_daemons() - before, "Ray's daemons outlived the interrupted stage"


def test_prefect_recorded_how_each_run_ended(proj):
    """The flow runs above, read back from the Prefect database through a Prefect server."""
    script = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    flows = c.read_flow_runs()\n"
        "    tasks = c.read_task_runs()\n"
        "    logs = c.read_logs()\n"

        "print(json.dumps({'flows': sorted([f.created.isoformat(), f.state.type.value, f.state.name] for f in flows),\n"
        "                  'tasks': sorted([t.created.isoformat(), t.name, t.state.type.value, t.state.name] for t in tasks),\n"
        "                  'logs': [[l.name, l.message] for l in logs]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=proj, env=_env(proj.parent), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    flows = [f[1:] for f in data["flows"]]
    # failed stage; Ctrl-C; SIGTERM; kill -9 (left Running: nothing could record it); Ctrl-C;
    # SIGTERM during the tokenizer's Ray training
    assert flows[0] == ["FAILED", "Failed"]
    assert all(f[0] in ("CANCELLED", "CRASHED") for f in (flows[1], flows[2], flows[4], flows[5])), flows
    tasks = [t[1:] for t in data["tasks"]]
    assert ["prepare", "FAILED", "Failed"] in tasks
    assert ["prepare", "COMPLETED", "Skipped"] in tasks  # unchanged in the later runs
    assert ["tokenizer", "CANCELLED", "Cancelled"] in tasks
    # what the stage printed reached the Prefect run's logs
    assert any(name == "arvision.stage" and "error: prepare:" in msg for name, msg in data["logs"])


def test_serve_flow_needs_a_prefect_server_and_a_cron(bare):
    proc = _arvision(bare, "serve-flow", "--cron", "every day")
    assert proc.returncode == 2 and "--cron 'every day': not a cron expression" in proc.stderr
    proc = _arvision(bare, "serve-flow", "--cron", "0 3 * * *")
    assert proc.returncode == 2 and "serve-flow needs a Prefect server" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["--num", "100000"], "-n/--num must be at least 1 and at most 256 images per label"),
    (["--scale", "100000"], "--scale must be at least 1 and at most 32 (the grid's pixel enlargement), got 100000"),
    (["--scale", "0"], "--scale must be at least 1"),
])
def test_sample_bounds_checked_before_loading(tmp_path, capsys, monkeypatch, args, expected):
    from arvision import cli

    monkeypatch.setattr(cli, "_load", lambda source: pytest.fail("loaded a model for arguments out of bounds"))
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(tmp_path), "--out", str(tmp_path / "g.png"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1


class _FakeGenerator:
    """What ``arvision sample`` reads of a generator: 9 classes of 32² RGB images."""

    num_classes, class_names = 9, None
    tokenizer = type("Tok", (), {"resolution": 32})()

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def compile_sampling(self) -> bool:
        return False

    def generate(self, labels, **kw):
        self.calls.append(kw)
        return np.zeros((len(labels), 32, 32, 3), np.uint8)


def test_sample_grid_too_large_refused_before_sampling(tmp_path, capsys, monkeypatch):
    from arvision import cli

    gen = _FakeGenerator()
    monkeypatch.setattr(cli, "_load", lambda source: gen)
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(tmp_path), "--out", str(tmp_path / "g.png"), "--n", "256", "--scale", "32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: -n/--num, --scale, --labels: a grid of 9 rows × 256 images at 32x is 262768×9236") \
        and "more than 67 Mpx" in err
    assert gen.calls == [] and not (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit) as e:  # the images alone: no grid to bound
        cli.main(["sample", str(tmp_path), "--images-dir", str(tmp_path / "imgs"), "--n", "2", "--labels", "0"])
    assert e.value.code == 0 and gen.calls[0]["progress"] is True and len(list((tmp_path / "imgs").iterdir())) == 2


# --------------------------------------------------------------------------- the registry's journal


def test_registration_is_keyed_by_content_and_stands_only_where_dvc_recorded_it(tmp_path, monkeypatch):
    """The same tokenizer files registered twice give one version; a stage that did not end
    well undoes what it registered (version deleted, aliases put back); a registration whose
    outputs DVC never recorded is undone by the next run's settling, one DVC recorded is kept."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from arvision import journal
    from arvision.config import TokenizerConfig
    from arvision.registry import register_tokenizer
    from arvision.tokenizers import build_tokenizer, save_tokenizer
    from arvision.tracking import TOKENIZER_MODEL, setup_mlflow, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    saved_uri = mlflow.get_tracking_uri()
    root = tmp_path / "repo"
    out = root / "models" / "tokenizer"
    tok = build_tokenizer(TokenizerConfig(kind="vq", width=8, channel_mult=[1, 2], num_res_blocks=0, codebook_size=16,
                                          code_dim=4), channels=3, resolution=16)
    save_tokenizer(tok, out)
    try:
        exp = setup_mlflow(root)
        client = MlflowClient(tracking_uri(root))
        run = lambda: client.create_run(exp, tags={"git.commit": "abc"}).info.run_id  # noqa: E731
        monkeypatch.setattr(journal, "_STAGE", {})
        journal.open_stage(root, "tokenizer")
        first = register_tokenizer(run(), out, {})
        (out / "registry.json").write_text(json.dumps(first))  # not content: the key leaves it out
        again = register_tokenizer(run(), out, {})
        assert again == first  # the same version, made by the same run: the same registry.json
        versions = lambda: sorted(int(v.version) for v in client.search_model_versions(f"name='{TOKENIZER_MODEL}'"))  # noqa: E731
        assert versions() == [1]
        journal.settle(root, unchanged=lambda stage: True)  # DVC recorded these outputs: kept
        assert versions() == [1] and not list((root / journal.JOURNAL_DIR).iterdir())

        (out / "weights.pt").write_bytes((out / "weights.pt").read_bytes() + b"\0")  # other weights: a new version
        second = register_tokenizer(run(), out, {})
        assert second["version"] == "2" and str(client.get_model_version_by_alias(TOKENIZER_MODEL, "candidate").version) == "2"
        assert journal.undo_own() == [f"{TOKENIZER_MODEL}: version 2 deleted; candidate put back"]
        assert versions() == [1] and str(client.get_model_version_by_alias(TOKENIZER_MODEL, "candidate").version) == "1"

        register_tokenizer(run(), out, {})  # v3, its stage ended well, but DVC did not record it
        monkeypatch.setattr(journal, "_STAGE", {})  # as in the next run's process
        assert journal.settle(root, unchanged=lambda stage: False)[0].endswith("version 3 deleted; candidate put back")
        assert versions() == [1] and str(client.get_model_version_by_alias(TOKENIZER_MODEL, "candidate").version) == "1"
    finally:
        mlflow.set_tracking_uri(saved_uri)


# --------------------------------------------------------------------------- a stage's own lifetime


_STAGE_SCRIPT = """
import os, signal, sys, time
from stages.common import stage_main

def run(params, paths, tracker):
    if sys.argv[1] == "error-after-ctrl-c":  # Ray's worker got the Ctrl-C too and died first
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass  # caught on the way, as Ray Train's start-up does
        raise RuntimeError("the worker died")
    while True:  # orphaned: trains until its run is gone
        time.sleep(0.05)

stage_main("tokenizer", run, reads=[])
"""


def test_an_error_after_ctrl_c_is_the_interrupt(bare, tmp_path):
    """Ctrl-C while Ray Train starts its worker: the worker dies of it first and the stage sees a
    Ray error before its KeyboardInterrupt; that still ends the stage "interrupted", 130."""
    env = {**_env(bare.parent), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-c", _STAGE_SCRIPT, "error-after-ctrl-c"], cwd=bare, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "tokenizer: interrupted; no output was kept" in proc.stderr and "Traceback" not in proc.stderr


def test_a_stage_whose_run_is_gone_stops_within_seconds(bare, tmp_path):
    """The stage's guard sees the pid in ``ARVISION_RUN_TREE`` gone and stops the stage as Ctrl-C does."""
    from arvision.lifetime import TREE_ENV

    top = subprocess.Popen(["sleep", "60"])
    env = {**_env(bare.parent), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", TREE_ENV: f"{top.pid}-test"}
    stage = subprocess.Popen([sys.executable, "-c", _STAGE_SCRIPT, "orphaned"], cwd=bare, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # imports, params, the MLflow run opened
    assert stage.poll() is None, stage.communicate()[1][-3000:]
    top.kill()
    top.wait()
    t0 = time.time()
    _, err = stage.communicate(timeout=30)
    assert time.time() - t0 < 5, err[-3000:]
    assert stage.returncode == 130 and f"its arvision run (pid {top.pid}) is gone: stopping" in err, err[-3000:]
