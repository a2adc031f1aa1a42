"""A colleague reproduces a run from the repo alone, as the README says, through real DVC.

Clone A runs the pipeline (real Prefect, DVC, MLflow and Ray, a tiny config), commits
``dvc.lock`` and the metrics, and ``dvc push``es to the remote that the committed
``.dvc/config`` names (``../../arvision-dvcstore``: a folder beside the repo). Clone B, a
``git clone`` of A next to it, gets every output with ``dvc pull``, and its ``arvision run``
then skips every stage. B's ``dvc plots show`` page holds the curves and the sample grid and
loads nothing from the network.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arvision.dag import STAGES, complete_params

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "data": {"source": "emoji", "path": "arvision/data/emoji", "resolution": 16, "channels": 3,
             "val_fraction": 0.2, "max_images": 60, "shard_size": 64},
    "tokenizer": {"kind": "vq", "width": 16, "channel_mult": [1, 2], "num_res_blocks": 0, "codebook_size": 16,
                  "code_dim": 4, "steps": 3, "batch_size": 8, "log_every": 1, "warmup_steps": 1},
    "tokens": {"batch_size": 64, "shard_size": 64},
    "prior": {"kind": "gpt", "size": "tiny", "steps": 3, "batch_size": 8, "lr": 0.001, "warmup_steps": 1,
              "log_every": 1, "eval_every": 0, "checkpoint_every": 3},
    "ray": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
    "features": {"width": 8, "dim": 16, "steps": 2, "batch_size": 8},
    "evaluate": {"samples_per_class": 1, "num_samples": 10, "max_val_images": 12, "batch_size": 64, "nearest_k": 3},
}


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_ADDRESS", "ARVISION_"))}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    })
    return env


def _project(tmp: Path) -> Path:
    """Clone A: the project's code, dvc.yaml, ignore files and the committed .dvc/config."""
    proj = tmp / "a"
    proj.mkdir()
    for name in ["arvision", "stages", "pipelines"]:
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ["dvc.yaml", ".gitignore", ".dvcignore"]:
        shutil.copy(ROOT / name, proj / name)
    (proj / "params.yaml").write_text(yaml.safe_dump(complete_params(TINY), sort_keys=False))
    env = _env(tmp)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=proj, check=True, env=env)
    for name in ["config", "plots_offline.html"]:
        shutil.copy(ROOT / ".dvc" / name, proj / ".dvc" / name)
    _git(proj, "add", "-A")
    _git(proj, "commit", "-q", "-m", "code")
    return proj


def _git(proj: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=proj, env=_env(proj.parent), check=True, capture_output=True,
                          text=True).stdout


def _run(proj: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=proj, env=_env(proj.parent), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:])
    return proc


def _ran(proj: Path) -> dict[str, bool]:
    record = json.loads((proj / ".arvision" / "last_run.json").read_text())
    return {r["stage"]: r["ran"] for r in record["stages"]}


@pytest.mark.e2e
def test_second_clone_pulls_everything_and_skips_every_stage(tmp_path):
    a = _project(tmp_path)
    first = _run(a, sys.executable, "-m", "arvision.cli", "run")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _ran(a) == {s: True for s in STAGES}

    # what the README asks after a run: commit dvc.lock (and the metrics), push the outputs
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "a run")
    assert "dvc.lock" in _git(a, "ls-files")
    push = _run(a, sys.executable, "-m", "dvc", "push")
    assert push.returncode == 0, push.stderr[-3000:]
    store = tmp_path / "arvision-dvcstore"  # the committed remote: beside the repo, not inside it
    assert store.is_dir() and any(store.rglob("*"))

    subprocess.run(["git", "clone", "-q", str(a), str(tmp_path / "b")], check=True, env=_env(tmp_path))
    b = tmp_path / "b"
    assert not (b / "models").exists() and not (b / "data").exists()
    pull = _run(b, sys.executable, "-m", "dvc", "pull")
    assert pull.returncode == 0, pull.stderr[-3000:]
    assert (b / "models" / "prior" / "weights.pt").read_bytes() == (a / "models" / "prior" / "weights.pt").read_bytes()
    assert (b / "reports" / "samples.png").exists()

    second = _run(b, sys.executable, "-m", "arvision.cli", "run")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _ran(b) == {s: False for s in STAGES}
    assert _run(b, sys.executable, "-m", "dvc", "status").stdout.strip().endswith("up to date.")

    # the plots page: curves and the sample grid, Vega inlined (no script from the network)
    shown = _run(b, sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert shown.returncode == 0, shown.stderr[-3000:]
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "vegaEmbed(" in page and "prior_curve.csv" in page and "samples.png" in page
    assert "<script src=" not in page and "cdn.jsdelivr" not in page


def test_sample_outside_a_repo_says_so_and_creates_nothing(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "arvision.cli", "sample", "models:/arvision-generator@champion",
                           "--out", "g.png"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "MLFLOW_TRACKING_URI" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_moved_store_logs_into_its_new_place(tmp_path):
    """mlflow.db and mlartifacts/ moved together: the stored artifact paths follow them."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from arvision.tracking import setup_mlflow, tracking_uri

    saved_env, saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None), mlflow.get_tracking_uri()
    try:
        old, new = tmp_path / "old", tmp_path / "new"
        old.mkdir()
        (tmp_path / "note.txt").write_text("logged before the move")
        client = MlflowClient(tracking_uri(old))
        before = client.create_run(setup_mlflow(old)).info.run_id
        client.log_artifact(before, str(tmp_path / "note.txt"))
        assert (old / "mlartifacts").is_dir() and not (old / "mlruns").exists()
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exported it
        shutil.move(old, new)

        exp = setup_mlflow(new)
        client = MlflowClient(tracking_uri(new))
        assert client.get_experiment(exp).artifact_location == (new / "mlartifacts").as_uri()
        assert client.get_run(before).info.artifact_uri.startswith((new / "mlartifacts").as_uri())
        got = mlflow.artifacts.download_artifacts(run_id=before, artifact_path="note.txt", dst_path=str(tmp_path / "dl"))
        assert Path(got).read_text() == "logged before the move"
        after = client.create_run(exp).info.run_id
        client.log_artifact(after, str(tmp_path / "note.txt"))
        assert (new / "mlartifacts" / after / "artifacts" / "note.txt").exists() and not old.exists()
    finally:
        mlflow.set_tracking_uri(saved_uri)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
