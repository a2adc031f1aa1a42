"""params.yaml parses; bad parameters are named with what is allowed, before any work."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arvision.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_parses():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "emoji"
    assert params.tokenizer.kind in {"palette", "vq", "rq", "fsq", "msvq"}
    assert params.prior.kind == "gpt"


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_unknown_key_names_path_and_allowed_keys():
    raw = _raw()
    raw["prior"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    msg = str(e.value)
    assert "prior.learning_rate" in msg and "unknown key" in msg and "lr" in msg


def test_unknown_section():
    raw = _raw()
    raw["trainer"] = {}
    with pytest.raises(ParamsError, match="trainer: unknown key"):
        parse_params(raw)


def test_wrong_type_names_key():
    raw = _raw()
    raw["prior"]["steps"] = "many"
    with pytest.raises(ParamsError, match=r"prior\.steps"):
        parse_params(raw)


def test_out_of_range_names_key_and_value():
    raw = _raw()
    raw["data"]["val_fraction"] = 1.5
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert "data.val_fraction" in str(e.value) and "1.5" in str(e.value)


def test_bad_choice_lists_allowed_values():
    raw = _raw()
    raw["tokenizer"]["kind"] = "vqgan"
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    msg = str(e.value)
    assert "tokenizer.kind" in msg and "'msvq'" in msg and "vqgan" in msg


def test_unknown_prior_size_lists_sizes():
    raw = _raw()
    raw["prior"]["size"] = "huge"
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert "prior.size" in str(e.value) and "tiny" in str(e.value)


def test_var_needs_msvq():
    raw = _raw()
    raw["prior"]["kind"] = "var"
    raw["prior"]["size"] = "tiny"
    raw["tokenizer"]["kind"] = "vq"
    with pytest.raises(ParamsError, match="msvq"):
        parse_params(raw)


def test_cli_reports_bad_params_without_traceback_and_does_no_work(tmp_path):
    raw = _raw()
    raw["prior"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "arvision.cli", "run"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "prior.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_fsdp_needs_gpus():
    raw = _raw()
    raw["prior"]["strategy"] = "fsdp"
    raw["ray"]["use_gpu"] = False
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert "prior.strategy" in str(e.value) and "ray.use_gpu" in str(e.value)
    raw["ray"]["use_gpu"] = True
    assert parse_params(raw).prior.strategy == "fsdp"
