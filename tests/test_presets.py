"""Presets (configs/gpu/*.yaml) merged into params.yaml: comments kept, bad keys refused before
anything is written, every shipped preset valid."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from arvision.cli import main
from arvision.config import parse_params
from arvision.errors import UserError
from arvision.presets import _merge, apply_preset, read_preset

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_shipped_preset_is_valid(preset: Path):
    raw = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), read_preset(preset))
    params = parse_params(raw, preset.name)
    if preset.name != "base.yaml":
        assert params.ray.use_gpu and params.tokenizer.device == "cuda"  # through extends: base.yaml
        assert "about" in yaml.safe_load(preset.read_text()), "a preset says what it is for"


def test_apply_keeps_comments_and_other_keys(tmp_path: Path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    preset = tmp_path / "p.yaml"
    preset.write_text("about: test\nprior:\n  steps: 777\n  betas: [0.8, 0.9]\ndata:\n  resolution: 64\n")
    changed = apply_preset(params, preset)
    assert ("prior.steps", 1200, 777) in changed and ("data.resolution", 32, 64) in changed
    text = params.read_text()
    assert "# arvision parameters: one section per stage" in text  # the file's comments survive
    assert "# gpt | var" in text
    new = yaml.safe_load(text)
    assert new["prior"]["steps"] == 777 and new["prior"]["betas"] == [0.8, 0.9]
    assert new["prior"]["lr"] == yaml.safe_load((REPO / "params.yaml").read_text())["prior"]["lr"]
    assert "about" not in new
    assert apply_preset(params, preset) == []  # applied twice: nothing more changes


def test_bad_preset_leaves_params_untouched(tmp_path: Path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("prior:\n  stepz: 10\n")
    with pytest.raises(UserError, match=r"prior\.stepz: unknown key; allowed keys in prior: kind, size"):
        apply_preset(params, bad)
    out_of_range = tmp_path / "range.yaml"
    out_of_range.write_text("data:\n  resolution: 4\n")
    with pytest.raises(UserError, match=r"data\.resolution"):
        apply_preset(params, out_of_range)
    with pytest.raises(UserError, match="no such file; presets there: bad.yaml, params.yaml, range.yaml"):
        apply_preset(params, tmp_path / "missing.yaml")
    assert params.read_bytes() == before


def test_extends_applies_the_base_first(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("prior:\n  steps: 10\n  lr: 0.01\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nprior:\n  steps: 20\n")
    assert read_preset(tmp_path / "b.yaml") == {"prior": {"steps": 20, "lr": 0.01}}


def test_cli_run_with_a_bad_preset_names_the_key(tmp_path: Path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "bad.yaml").write_text("tokenizer:\n  kind: vqq\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", "bad.yaml"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "tokenizer.kind" in err and "Traceback" not in err
