"""A tiny project for the tests that drive the real Prefect, DVC, MLflow and Ray: a git + DVC
repo holding a copy of the code, the committed ``.dvc/config`` and a params.yaml, and the
environment that keeps each test's services to itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from arvision.dag import complete_params

ROOT = Path(__file__).resolve().parents[1]


def env(tmp: Path) -> dict:
    """This process's environment without the user's service settings, with a Prefect home of
    the test's own and this interpreter's bin first (DVC runs the stages through the shell)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_ADDRESS", "ARVISION_"))}
    out.update({
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + out.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        # DVC runs stages through $SHELL, else /bin/sh: the plain shell (dash on Debian, which
        # does not exec the command), as on a CI machine where SHELL is unset
        "SHELL": "/bin/sh",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    })
    return out


def git(proj: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=proj, env=env(proj.parent), check=True, capture_output=True,
                          text=True).stdout


def make_project(tmp: Path, params: dict, name: str = "proj") -> Path:
    """``tmp/name``: the code, dvc.yaml, ignore files, ``.dvc/config`` (the remote beside the
    repo) and ``params`` with every key written out (DVC tracks some one by one); committed."""
    proj = tmp / name
    proj.mkdir()
    for d in ["arvision", "stages", "pipelines"]:
        shutil.copytree(ROOT / d, proj / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ["dvc.yaml", ".gitignore", ".dvcignore"]:
        shutil.copy(ROOT / f, proj / f)
    (proj / "params.yaml").write_text(yaml.safe_dump(complete_params(params), sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env(tmp))
    for f in ["config", "plots_offline.html"]:  # the committed remote and the offline plots page
        shutil.copy(ROOT / ".dvc" / f, proj / ".dvc" / f)
    git(proj, "add", "-A")
    git(proj, "commit", "-q", "-m", "code")
    return proj


def run(proj: Path, *args: str, extra_env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command in ``proj``; its output is printed when it fails (pytest shows it)."""
    proc = subprocess.run(args, cwd=proj, env={**env(proj.parent), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:])
    return proc


def arvision(proj: Path, *args: str, extra_env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return run(proj, sys.executable, "-m", "arvision.cli", *args, extra_env=extra_env, timeout=timeout)


def ran(proj: Path) -> dict[str, bool]:
    """Which stages the last ``arvision run`` in ``proj`` ran (``.arvision/last_run.json``)."""
    record = json.loads((proj / ".arvision" / "last_run.json").read_text())
    return {r["stage"]: r["ran"] for r in record["stages"]}
