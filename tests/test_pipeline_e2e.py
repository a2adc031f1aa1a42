"""The whole pipeline through the real Prefect, DVC, MLflow and Ray, on a tiny configuration.

1. a first ``arvision run`` runs all six stages, judges the samples and registers the models;
2. a second run with nothing changed (but a key that cannot change a result, ``prior.log_every``)
   skips every stage;
3. after changing ``prior.lr`` only prior and evaluate run;
4. ``arvision sample models:/arvision-generator@champion`` draws images in a fresh process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from arvision.dag import STAGES, complete_params  # noqa: E402

TINY = {
    "seed": 0,
    "data": {"source": "emoji", "path": "arvision/data/emoji", "resolution": 16, "channels": 3,
             "val_fraction": 0.2, "max_images": 240, "shard_size": 128},
    "tokenizer": {"kind": "vq", "width": 16, "channel_mult": [1, 2], "num_res_blocks": 0, "codebook_size": 32,
                  "code_dim": 4, "steps": 20, "batch_size": 16, "log_every": 5, "warmup_steps": 2},
    "tokens": {"batch_size": 64, "shard_size": 128},
    "prior": {"kind": "gpt", "size": "tiny", "steps": 12, "batch_size": 16, "lr": 0.001, "warmup_steps": 2,
              "log_every": 4, "checkpoint_every": 6, "eval_every": 4},
    "ray": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
    "features": {"width": 8, "dim": 16, "steps": 20, "batch_size": 32},
    "evaluate": {"samples_per_class": 2, "max_val_images": 32, "batch_size": 64, "num_samples": 32, "nearest_k": 3},
}


def _project(tmp: Path) -> Path:
    proj = tmp / "proj"
    proj.mkdir()
    for name in ["arvision", "stages", "pipelines"]:
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ["dvc.yaml", ".gitignore", ".dvcignore"]:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, proj / name)
    (proj / "params.yaml").write_text(yaml.safe_dump(complete_params(TINY), sort_keys=False))
    env = _env(tmp)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env)
    return proj


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


def _arvision(proj: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "arvision.cli", *args], cwd=proj, env=_env(proj.parent),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:])
    return proc


def _ran(proj: Path) -> dict[str, bool]:
    record = json.loads((proj / ".arvision" / "last_run.json").read_text())
    return {r["stage"]: r["ran"] for r in record["stages"]}


@pytest.mark.e2e
def test_pipeline_end_to_end(tmp_path):
    proj = _project(tmp_path)

    # 1. everything runs
    first = _arvision(proj, "run")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _ran(proj) == {s: True for s in STAGES}
    assert "sample grid" in first.stdout and "val bits/dim" in first.stdout
    manifest = json.loads((proj / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 240
    ev = json.loads((proj / "metrics/eval.json").read_text())
    assert np.isfinite(ev["val_bpd"]) and ev["val_bpd"] > 0
    assert 0 < ev["tokenizer_usage"] <= 1
    # judged by its samples, beside the floor (train images against val)
    assert ev["fd"] > ev["floor_fd"] >= 0 and 0 <= ev["copy_rate"] <= 1 and 0 <= ev["floor_precision"] <= 1
    assert "sample_images_per_s" not in ev  # a machine-load figure: reports/speed.json, not dvc metrics
    assert "floor" in (proj / "reports/report.md").read_text()
    grid = Image.open(proj / "reports/samples.png")
    assert grid.size[1] > manifest["num_classes"] * 16  # one row per class
    assert (proj / "metrics/prior_curve.csv").read_text().startswith("step")

    # MLflow: one parent run with a nested run per stage, models registered with aliases
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("arvision")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("arvision.stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["arvision.stage"] for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    gen = client.get_model_version_by_alias("arvision-generator", "champion")
    assert str(client.get_model_version_by_alias("arvision-generator", "candidate").version) == str(gen.version)
    assert client.get_model_version_by_alias("arvision-tokenizer", "candidate") is not None

    # 2. nothing changed that can change a result: everything skipped
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prior"]["log_every"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = _arvision(proj, "run")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _ran(proj) == {s: False for s in STAGES}

    # 3. a prior param changed: only prior and evaluate run
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prior"]["lr"] = 0.002
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _arvision(proj, "run")
    assert third.returncode == 0, third.stderr[-3000:]
    assert _ran(proj) == {"prepare": False, "tokenizer": False, "features": False, "tokens": False, "prior": True,
                          "evaluate": True}
    versions = client.search_model_versions("name='arvision-generator'")
    assert len(versions) == 2
    assert str(client.get_model_version_by_alias("arvision-generator", "candidate").version) == "2"

    # 4. sample from the registered champion, in a fresh process
    out = proj / "grid.png"
    proc = _arvision(proj, "sample", "models:/arvision-generator@champion", "--labels", "0,1,2", "--n", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    img = np.asarray(Image.open(out))
    assert img.shape[0] >= 3 * 16 and img.std() > 0

    # a user's mistake: a clear message, no traceback
    bad = _arvision(proj, "sample", "models:/arvision-generator@nope", "--out", str(out))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "cannot load" in bad.stderr
