"""The whole pipeline through the real Prefect, DVC, MLflow and Ray, on a tiny configuration.

1. a first ``arvision run`` runs all six stages, judges the samples and registers the models;
2. a second run with nothing changed (but a key that cannot change a result, ``prior.log_every``)
   skips every stage;
3. after changing ``prior.lr`` only prior and evaluate run;
4. ``arvision sample models:/arvision-generator@champion`` draws images in a fresh process.

Between 1 and 2, a colleague reproduces the run from the repo alone, as the README says: the
run's ``dvc.lock`` and metrics are committed and ``dvc push``ed to the remote that the committed
``.dvc/config`` names (``../../arvision-dvcstore``, beside the repo); a ``git clone`` next to it
gets every output with ``dvc pull``, and its ``arvision run`` skips every stage. Its
``dvc plots show`` page holds the curves and the sample grid and loads nothing from the network.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pipeline_project import arvision as _arvision
from pipeline_project import env as _env
from pipeline_project import git as _git
from pipeline_project import make_project
from pipeline_project import ran as _ran
from pipeline_project import run as _run

from arvision.dag import STAGES

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


def _second_clone_skips_everything(a: Path) -> None:
    """Commit the run, push its outputs; a clone beside it pulls them and skips every stage."""
    tmp = a.parent
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "a run")
    assert "dvc.lock" in _git(a, "ls-files")
    push = _run(a, sys.executable, "-m", "dvc", "push")
    assert push.returncode == 0, push.stderr[-3000:]
    store = tmp / "arvision-dvcstore"  # the committed remote: beside the repo, not inside it
    assert store.is_dir() and any(store.rglob("*"))

    b = tmp / "b"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True, env=_env(tmp))
    assert not (b / "models").exists() and not (b / "data").exists()
    pull = _run(b, sys.executable, "-m", "dvc", "pull")
    assert pull.returncode == 0, pull.stderr[-3000:]
    assert (b / "models" / "prior" / "weights.pt").read_bytes() == (a / "models" / "prior" / "weights.pt").read_bytes()
    assert (b / "reports" / "samples.png").exists()
    second = _arvision(b, "run")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _ran(b) == {s: False for s in STAGES}
    # nothing is stale: only the source listing, which DVC re-lists on every run (always_changed)
    assert _run(b, sys.executable, "-m", "dvc", "status").stdout.split() == ["source:", "always", "changed"]

    # the plots page: curves and the sample grid, Vega inlined (no script from the network)
    shown = _run(b, sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp / "plots"))
    assert shown.returncode == 0, shown.stderr[-3000:]
    page = (tmp / "plots" / "index.html").read_text()
    assert "vegaEmbed(" in page and "prior_curve.csv" in page and "samples.png" in page
    assert "<script src=" not in page and "cdn.jsdelivr" not in page


@pytest.mark.e2e
def test_pipeline_end_to_end(tmp_path):
    proj = make_project(tmp_path, TINY)

    # 1. everything runs
    first = _arvision(proj, "run")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _ran(proj) == {s: True for s in STAGES}
    assert "report.md" in first.stdout and "val bits/dim" in first.stdout and "FD " in first.stdout
    # what a log reader sees (stdout is not a terminal here): the prior's bar as plain lines,
    # drawn by the stage from its Ray worker's state, no Ray prefixes, colour codes or redraws
    printed = first.stdout + first.stderr
    assert "pid=" not in printed and "\x1b[" not in printed and "\r" not in printed, printed[-3000:]
    assert any(ln.startswith("prior: 100% 12/12 [") for ln in printed.splitlines()), printed[-3000:]
    # dvc metrics show: the headline alone, within 100 columns
    shown = _run(proj, sys.executable, "-m", "dvc", "metrics", "show")
    assert shown.returncode == 0 and shown.stdout.split()[:2] == ["Path", "copy_rate"], shown.stdout
    assert max(len(ln) for ln in shown.stdout.splitlines()) <= 100, shown.stdout
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
    # the model page: registered from the evaluate run, its metrics those of the logged model
    from arvision.registry import logged_model_id

    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_run(gen.run_id).data.tags["arvision.stage"] == "evaluate"
    linked = {m.key: m.value for m in client.get_logged_model(logged_model_id(gen)).metrics}
    assert linked["fd"] == ev["fd"] and "champion_fd" not in linked and "fd" not in gen.tags
    assert gen.description.startswith("**token-level generator**") and f"FD {ev['fd']:.3g}" in gen.description
    assert str(client.get_model_version_by_alias("arvision-generator", "candidate").version) == str(gen.version)
    assert client.get_model_version_by_alias("arvision-tokenizer", "candidate") is not None

    # 1b. a colleague's clone: dvc pull, then nothing to run
    _second_clone_skips_everything(proj)

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
