"""The registered generator is a self-contained MLflow model, and it serves.

A tiny untrained tokenizer and prior are registered through the real registry code into a
temporary sqlite store, then:

1. the version carries its code, pinned requirements, an input example, tags and a description;
2. it loads and predicts in a process that cannot import the working tree's ``arvision``;
3. ``mlflow models serve`` answers labels with PNGs, and a bad request with a clean HTTP 400.

How (2) hides this checkout: the venv installs arvision in editable mode through a ``.pth`` file
in site-packages, which the ``site`` module runs at start-up. The child is started with ``-I``
(no current directory, ``PYTHONPATH`` or user site on ``sys.path``) and ``-S`` (``site`` is not
imported, so no ``.pth`` file runs), and appends only the venv's site-packages directory itself
to ``sys.path``: torch, mlflow and the rest import, ``arvision`` does not until the model's own
copy is put on the path by MLflow. The child checks both.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A registered ``arvision-generator`` version, downloaded to a plain local model directory."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from arvision.config import PriorConfig, TokenizerConfig
    from arvision.priors import build_prior, save_prior
    from arvision.registry import GeneratorPyfunc, _log_and_register, logged_model_id
    from arvision.tokenizers import build_tokenizer, save_tokenizer
    from arvision.tracking import GENERATOR_MODEL, setup_mlflow, tracking_uri

    tmp = tmp_path_factory.mktemp("serving")
    tok = build_tokenizer(TokenizerConfig(kind="vq", width=16, channel_mult=[1, 2], num_res_blocks=0, codebook_size=32,
                                          code_dim=4), channels=3, resolution=16)
    save_tokenizer(tok, tmp / "tokenizer")
    prior = build_prior(PriorConfig(kind="gpt", size="tiny"), vocab_size=tok.vocab_size, layout=tok.layout, num_classes=3)
    save_prior(prior, tmp / "prior")
    (tmp / "prior" / "meta.json").write_text(json.dumps({"class_names": ["a", "b", "c"]}))

    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        exp = setup_mlflow(tmp / "repo")
        client = MlflowClient(tracking_uri(tmp / "repo"))
        run = client.create_run(exp, tags={"git.commit": "abc123"})
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param("prior.lr", "0.001")])
        # what register_generator does before its champion decision
        _, number, _ = _log_and_register(
            run.info.run_id, GENERATOR_MODEL, GeneratorPyfunc(), {"tokenizer": str(tmp / "tokenizer"), "prior": str(tmp / "prior")},
            {"data.content_hash": "d4t4"}, metrics={"val_bpd": 0.5, "val_bits_per_token": 3.25},
        )
        version = client.get_model_version(GENERATOR_MODEL, number)
        logged = client.get_logged_model(logged_model_id(version))
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{GENERATOR_MODEL}@candidate", dst_path=str(tmp / "model")))
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
    assert (tmp / "repo" / "mlartifacts").is_dir() and not (tmp / "repo" / "mlruns").exists()
    return {"dir": local, "version": version, "logged": logged}


def test_model_is_self_contained(model_dir):
    local, version = model_dir["dir"], model_dir["version"]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    assert (local / "code" / "arvision" / "generator.py").exists()
    assert not (local / "code" / "arvision" / "train").exists()  # only what loading needs
    reqs = (local / "requirements.txt").read_text().split()
    from importlib.metadata import version as installed

    for dist in ("torch", "einops", "numpy", "pillow", "pandas", "pydantic", "pyyaml"):
        assert f"{dist}=={installed(dist).split('+')[0]}" in reqs
    assert not any(r.startswith("arvision") for r in reqs)
    assert json.loads((local / "serving_input_example.json").read_text())["dataframe_split"]["columns"] == ["label"]
    assert mlmodel["signature"]["inputs"] and mlmodel["signature"]["params"]

    # the version: lineage in tags, no metric twice; the metrics and params: its logged model's (MLflow 3)
    tags, logged = version.tags, model_dir["logged"]
    assert tags["tokenizer.kind"] == "vq" and tags["prior.kind"] == "gpt" and tags["prior.size"] == "tiny"
    assert tags["family"] == "token-level" and tags["data.content_hash"] == "d4t4" and tags["git.commit"] == "abc123"
    assert len(tags["params.hash"]) == 12 and "val_bpd" not in tags and "params" not in tags
    assert {m.key: m.value for m in logged.metrics} == {"val_bpd": 0.5, "val_bits_per_token": 3.25}
    assert logged.params["prior.lr"] == "0.001" and logged.params["tokenizer.kind"] == "vq"
    assert logged.source_run_id == version.run_id
    assert version.description.startswith("**token-level generator**: vq tokenizer + gpt prior (tiny)")
    assert "`d4t4`" in version.description and "`abc123`" in version.description


ISOLATED = """
import importlib.util, io, json, sys
sys.path.append(sys.argv[2])  # the venv's site-packages, without running its .pth files
assert importlib.util.find_spec("arvision") is None, "the working tree's arvision is importable"
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"label": [0, 2, 1]}), params={"seed": 3})
from PIL import Image
shapes = [list(Image.open(io.BytesIO(b)).size) for b in out["image"]]
print(json.dumps({"arvision": sys.modules["arvision"].__file__, "shapes": shapes}))
"""


def test_loads_where_the_working_tree_is_not_importable(model_dir, tmp_path):
    site_packages = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", ISOLATED, str(model_dir["dir"]), site_packages],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["arvision"]).is_relative_to(model_dir["dir"] / "code")
    assert not Path(got["arvision"]).is_relative_to(ROOT)
    assert got["shapes"] == [[16, 16]] * 3


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve(model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir["dir"]), "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)

        status, body = _post(base + "/invocations", {"inputs": {"label": [0, 1, 2]}, "params": {"seed": 1, "temperature": 0.9}})
        assert status == 200, body
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image"])))) for p in body["predictions"]]
        assert [im.shape for im in images] == [(16, 16, 3)] * 3
        status, again = _post(base + "/invocations", {"dataframe_split": {"columns": ["label"], "data": [[0], [1], [2]]},
                                                      "params": {"seed": 1, "temperature": 0.9}})
        assert status == 200 and again == body  # same seed, same images, either request format

        for bad, words in [
            ({"inputs": {"label": [7]}}, "out of range"),
            ({"inputs": {"label": [0]}, "params": {"temperature": 0.0}}, "temperature must be > 0"),
            ({"inputs": {"label": [0]}, "params": {"top_p": 1.5}}, "top_p"),
            ({"inputs": {"label": list(range(3)) * 100}}, "labels per request"),
            ({"inputs": {"colour": [1]}}, "label"),
            ({"inputs": {"label": ["x"]}}, "Invalid input"),  # refused by MLflow's own schema check
        ]:
            status, err = _post(base + "/invocations", bad)
            text = json.dumps(err)
            assert status == 400, (bad, err)
            assert words in err["message"], (bad, err)
            assert "stack_trace" not in err and "Traceback" not in text, (bad, err)
            assert str(ROOT) not in text and str(tmp_path) not in text and "site-packages" not in text, (bad, err)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.parametrize("labels, words", [([0, 1.5], "label 1 is 1.5"), ([True], "label 0 is True"),
                                           (["2"], "label 0 is '2'"), ([float("nan")], "label 0 is nan")])
def test_served_model_refuses_labels_that_are_not_integers(labels, words):
    """``int(1.5)`` would silently draw class 1: the request is refused (HTTP 400 when served)."""
    import mlflow
    import pandas as pd

    from arvision.registry import GeneratorPyfunc

    model = GeneratorPyfunc()
    model.generator = type("Gen", (), {"num_classes": 3})()
    with pytest.raises(mlflow.exceptions.MlflowException) as err:
        model._labels(pd.DataFrame({"label": pd.Series(labels, dtype=object)}))
    assert str(err.value) == f"labels must be integers in 0..2; {words}"
    assert model._labels(pd.DataFrame({"label": [0.0, 2.0]})) == [0, 2]  # JSON's 2.0 is the integer 2
