"""params.yaml parses; bad parameters are named with what is allowed, before any work."""

import re
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


@pytest.mark.parametrize("value", ["auto", True, False])
def test_prior_compile_is_auto_true_or_false(value):
    """``auto`` (the default: compile on CUDA only) and the booleans of older params files."""
    raw = _raw()
    raw["prior"]["compile"] = value
    assert parse_params(raw).prior.compile == value
    del raw["prior"]["compile"]
    assert parse_params(raw).prior.compile == "auto"


@pytest.mark.parametrize("value", ["yes", "on", "1", 1, 0, "Auto", None])
def test_prior_compile_rejects_anything_else(value):
    raw = _raw()
    raw["prior"]["compile"] = value
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    msg = str(e.value)
    assert "prior.compile" in msg and "auto, true or false" in msg


@pytest.mark.parametrize("value,ok", [(0.0, True), (0.1, True), (0.99, True), (1.0, False), (-0.1, False)])
def test_prior_drop_path_is_a_rate_below_one(value, ok):
    raw = _raw()
    raw["prior"]["drop_path"] = value
    if ok:
        assert parse_params(raw).prior.drop_path == value
    else:
        with pytest.raises(ParamsError, match=r"prior\.drop_path"):
            parse_params(raw)


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


# --------------------------------------------------------------------------- what `arvision check` must catch


def _write(tmp_path, raw) -> Path:
    (tmp_path / "params.yaml").write_text("" if raw is None else yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def _full(tmp_path):
    raw = _raw()
    raw["data"]["path"] = str(ROOT / raw["data"]["path"])  # the project's emoji set, wherever the test runs
    return raw


def test_empty_params_yaml_is_an_error(tmp_path):
    with pytest.raises(ParamsError, match="is empty; it needs the sections seed, data, tokenizer"):
        load_params(_write(tmp_path, None))


def test_missing_section_is_named(tmp_path):
    raw = _full(tmp_path)
    del raw["features"]
    with pytest.raises(ParamsError, match="missing section features"):
        load_params(_write(tmp_path, raw))


@pytest.mark.parametrize("key,value", [("prior.steps", True), ("tokenizer.batch_size", False), ("prior.lr", True),
                                       ("tokenizer.ema", 1), ("ray.use_gpu", "yes")])
def test_booleans_and_numbers_do_not_pass_for_each_other(key, value):
    raw = _raw()
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(raw)


def test_yaml_exponent_without_dot_still_a_float():
    raw = _raw()
    raw["prior"]["lr"] = "1e-3"  # YAML 1.1 reads this as a string
    assert parse_params(raw).prior.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("section", ["tokenizer", "prior"])
def test_warmup_must_end_inside_training(section):
    raw = _raw()
    raw[section]["warmup_steps"] = raw[section]["steps"]
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert f"{section}.warmup_steps / {section}.steps" in str(e.value)


def test_cross_section_errors_name_their_keys_without_a_dump():
    raw = _raw()
    raw["prior"]["kind"] = "var"
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    msg = str(e.value)
    assert "prior.kind / tokenizer.kind:" in msg
    assert "(top level)" not in msg and "'seed'" not in msg and len(msg.splitlines()) == 2


@pytest.mark.parametrize("source,path,expected", [
    ("folder", "no/such/dir", "does not exist"),
    ("folder", "params.yaml", "is a file; data.source 'folder' reads a folder"),
    ("mnist", "params.yaml", "is a file; data.source 'mnist' reads a folder"),
    ("parquet", "params.yaml", "is not a .parquet file"),
])
def test_data_path_missing_or_wrong_kind(tmp_path, source, path, expected):
    raw = _full(tmp_path)
    raw["data"].update(source=source, path=path)
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, raw))
    assert str(e.value).startswith("data.path: ") and expected in str(e.value)


def test_batch_larger_than_the_data_is_caught(tmp_path):
    import json

    from arvision.data.checks import check_batches

    raw = _full(tmp_path)
    raw["data"]["max_images"] = 50
    raw["prior"]["batch_size"] = 64
    params = load_params(_write(tmp_path, raw))
    with pytest.raises(ParamsError, match=r"prior.batch_size / data: a batch of 64 per worker is larger than the 45"):
        check_batches(params, tmp_path)  # estimate: 50 images, 90% for training
    manifest = tmp_path / "data" / "prepared" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"counts": {"train": 70, "val": 10},
                                    "params": {"seed": params.seed, "data": params.data.model_dump(mode="json")}}))
    check_batches(params, tmp_path)  # the prepared data hold 70: the batch fits
    raw["ray"]["num_workers"] = 2  # 35 each
    params = load_params(_write(tmp_path, raw))
    with pytest.raises(ParamsError, match=r"the 35 each of ray.num_workers=2 workers gets"):
        check_batches(params, tmp_path)


def test_check_command_catches_what_the_run_would_fail_on(tmp_path):
    raw = _full(tmp_path)
    raw["prior"]["steps"] = True
    _write(tmp_path, raw)
    proc = subprocess.run([sys.executable, "-m", "arvision.cli", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "prior.steps" in proc.stderr and "Traceback" not in proc.stderr


def test_check_refuses_a_split_too_small_for_the_pipeline(tmp_path):
    from arvision.data.checks import check_batches

    raw = _full(tmp_path)
    raw["data"]["max_images"] = 40  # about 4 val images: evaluate needs 6
    raw["prior"]["batch_size"] = 8
    params = load_params(_write(tmp_path, raw))
    with pytest.raises(ParamsError) as e:
        check_batches(params, tmp_path)
    assert str(e.value).startswith("data.val_fraction / data.path: the split gives 4 val and 36 train images "
                                   "(about: data.max_images 40, 10% of them for val); evaluate needs at least 6 in each")
    raw["evaluate"]["nearest_k"] = 3  # k-NN radii need 4, KID 4
    check_batches(load_params(_write(tmp_path, raw)), tmp_path)


@pytest.mark.parametrize("betas", [[0.9, 0.95, 0.99], [1.5, -2], [0.9], [0.9, 1.0]])
def test_prior_betas_two_numbers_in_0_1(tmp_path, betas):
    raw = _full(tmp_path)
    raw["prior"]["betas"] = betas
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, raw))
    assert f"prior.betas: expected [beta1, beta2]: exactly two numbers, each in [0, 1) (AdamW's betas) (got {betas!r})" \
        in str(e.value)


@pytest.mark.parametrize("key, text", [("prior.lr", "nan"), ("prior.lr", ".nan"), ("prior.lr", ".inf"),
                                       ("tokenizer.disc_lr", "-.inf"), ("evaluate.temperature", "inf"),
                                       ("tokens.crop_scale", "[0.8, .nan]")])
def test_nan_and_infinity_refused_as_such(tmp_path, key, text):
    raw = _full(tmp_path)
    section, name = key.split(".")
    raw[section][name] = yaml.safe_load(text)
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, raw))
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith(f"  {key}: expected ") and "finite number" in lines[0] \
        and "NaN or infinity" in lines[0], lines


@pytest.mark.parametrize("change, expected", [
    ({"data": {"resolution": 33}}, "data.resolution / tokenizer.channel_mult: 33 is not divisible by 4, the downsampling "
     "of 3 levels (2**(len(tokenizer.channel_mult)-1)); use data.resolution 32 or 36, or another number of levels"),
    ({"tokenizer": {"channel_mult": [1] * 12}}, "tokenizer.channel_mult / data.resolution: 12 levels downsample 2048x, "
     "more than the 32-pixel side of the images; use at most 6 levels for data.resolution 32"),
    ({"tokenizer": {"kind": "msvq", "scales": [1, 2, 4]}, "prior": {"kind": "var"}},
     "tokenizer.scales / data.resolution: msvq's last scale must be the latent side 8"),
])
def test_resolution_and_tokenizer_levels_checked_in_params(tmp_path, change, expected):
    raw = _full(tmp_path)
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(ParamsError, match=re.escape(expected)):
        load_params(_write(tmp_path, raw))
    raw["tokenizer"]["kind"], raw["prior"]["kind"] = "palette", "gpt"  # no downsampling: any resolution
    load_params(_write(tmp_path, raw))


def test_cpus_per_worker_checked_against_a_local_instance(tmp_path, monkeypatch):
    from arvision.data.checks import check_local_ray

    monkeypatch.setattr("arvision.cluster.usable_cores", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raw = _full(tmp_path)
    raw["ray"]["cpus_per_worker"] = 64
    params = load_params(_write(tmp_path, raw))
    with pytest.raises(ParamsError) as e:
        check_local_ray(params)
    assert str(e.value) == ("ray.cpus_per_worker: 64 CPUs per worker, but this machine has 2 cores for the local Ray "
                            "instance (no ray.address or RAY_ADDRESS); use at most 2, or set ray.address to a cluster")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster's nodes: not this machine's cores
    check_local_ray(params)
    monkeypatch.delenv("RAY_ADDRESS")
    raw["ray"]["address"] = "ray://head:10001"
    check_local_ray(load_params(_write(tmp_path, raw)))


def test_missing_params_yaml_advice_names_no_option_that_does_not_exist(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(tmp_path / "params.yaml")
    assert str(e.value) == (f"{tmp_path / 'params.yaml'}: no such file; run arvision in the project root, the folder "
                            "holding params.yaml and dvc.yaml")
    assert "--params" not in str(e.value)


def test_missing_sections_advice_is_what_check_then_accepts(tmp_path):
    """The advice for each missing section, pasted in as given, passes: `{}` only where DVC tracks
    the section whole; a section it tracks key by key gets those keys."""
    raw = _full(tmp_path)
    for section in ("seed", "features", "ray", "prior"):
        del raw[section]
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, raw))
    msg = str(e.value)
    assert "missing sections seed, prior, ray, features; every section must be written out: add `seed: 0`; `prior: {" in msg
    assert "`features: {}` (its defaults)" in msg and "`ray: {\"num_workers\": 1, \"use_gpu\": false}`" in msg
    for fragment in re.findall(r"`([^`]+)`", msg.split("add ", 1)[1]):
        raw.update(yaml.safe_load(fragment))
    params = load_params(_write(tmp_path, raw))
    assert params.features == type(params.features)() and params.ray.num_workers == 1
