"""Results leave the machine they were made on: the MLflow store moves with the repo, and
``arvision sample`` outside a repo says so instead of creating an empty store. (The second
clone that ``dvc pull``s every output and skips every stage is part of
``tests/test_pipeline_e2e.py``.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline_project import env as _env


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
