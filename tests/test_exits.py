"""Every row of the README's table of exit statuses, exercised: 0 done, 1 a failed run (here DVC
refusing, whose own 255 must not come through), 2 the user's mistake, 130 interrupted.

The pipeline-level cases of rows 1 and 2 are also in ``test_failures.py`` (a stage that fails on
the user's data: 2) and ``test_pipeline_e2e.py`` (a whole run: 0); these are the quick ones."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline_project import arvision as _arvision
from pipeline_project import env as _env
from pipeline_project import make_project
from pipeline_project import run as _run
from test_pipeline_e2e import TINY

ROOT = Path(__file__).resolve().parents[1]


def _readme_statuses() -> dict[int, str]:
    """``{status: meaning}`` from the README's "Exit statuses" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Exit statuses\n", 1)[1].split("\n## ", 1)[0]
    return {int(m.group(1)): m.group(2).strip() for m in re.finditer(r"^\| `?(\d+)`? \| ([^|]+) \|", section, re.M)}


def test_the_readme_table_is_the_one_these_tests_exercise():
    statuses = _readme_statuses()
    assert set(statuses) == {0, 1, 2, 130}, statuses
    tested = {int(name.split("_")[2]) for name in globals() if re.match(r"test_exit_\d+_", name)}
    assert tested == set(statuses)


def test_exit_0_done(tmp_path):
    proj = make_project(tmp_path, TINY)
    proc = _arvision(proj, "check")
    assert proc.returncode == 0 and "params.yaml is valid" in proc.stdout


def test_exit_2_user_mistake(tmp_path):
    missing = tmp_path / "models"
    proc = _run(tmp_path, sys.executable, "-m", "arvision.cli", "sample", str(missing), "-n", "2", "--out", "g.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{missing}: does not exist" in proc.stderr and "models:/arvision-generator@champion" in proc.stderr
    proc = _run(tmp_path, sys.executable, "-m", "arvision.cli", "sample", str(missing), "--nmu", "2")  # argparse's own
    assert proc.returncode == 2 and "unrecognized arguments: --nmu" in proc.stderr


def test_exit_1_failed_run_dvc_refusing_is_not_255(tmp_path):
    proj = make_project(tmp_path, TINY)
    dvc_yaml = proj / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("    cmd: python -m stages.source\n", "    cmd: python -m stages.source\n    nonsense: 1\n"))
    repro = _run(proj, sys.executable, "-m", "dvc", "repro")
    assert repro.returncode == 255  # DVC's own status for any failure
    proc = _arvision(proj, "run")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "source FAILED" in proc.stderr and "nonsense" in proc.stderr and "Traceback" not in proc.stderr
    record = json.loads((proj / ".arvision" / "last_run.json").read_text())
    assert record["stages"][0]["failed"] and record["stages"][0]["exit_code"] is None  # DVC's, not a stage's


def _tiny_models(root: Path, classes: int) -> Path:
    """models/ with an untrained vq tokenizer (16², 8×8 codes) and tiny gpt prior: slow enough to
    sample 256 images of each of ``classes`` classes that a signal arrives mid-way."""
    from arvision.config import PriorConfig, TokenizerConfig
    from arvision.priors import build_prior, save_prior
    from arvision.tokenizers import build_tokenizer, save_tokenizer

    tok = build_tokenizer(TokenizerConfig(kind="vq", width=16, channel_mult=[1, 2], num_res_blocks=0, codebook_size=32,
                                          code_dim=4), channels=3, resolution=16)
    save_tokenizer(tok, root / "models" / "tokenizer")
    prior = build_prior(PriorConfig(kind="gpt", size="tiny"), vocab_size=tok.vocab_size, layout=tok.layout, num_classes=classes)
    save_prior(prior, root / "models" / "prior")
    (root / "models" / "prior" / "meta.json").write_text(json.dumps({"class_names": [f"c{i}" for i in range(classes)]}))
    return root / "models"


def test_exit_130_interrupted(tmp_path):
    models = _tiny_models(tmp_path, classes=32)
    p = subprocess.Popen([sys.executable, "-m", "arvision.cli", "sample", str(models), "-n", "256", "--images-dir",
                          str(tmp_path / "out")], cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    seen = ""
    while "sampling" not in seen:  # its bar's first line: sampling has begun
        line = p.stderr.readline()
        assert line, f"sample ended (status {p.wait()}) before sampling"
        seen += line
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)  # Ctrl-C
    t0 = time.time()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert time.time() - t0 < 30 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
