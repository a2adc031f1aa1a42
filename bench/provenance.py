"""What a benchmark result depends on: the code's commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD, whether the working tree differs from it). ``$ARVISION_COMMIT`` wins where set: a
    copied tree (the GPU machine's) may carry a stale ``.git``, or none and no git."""
    if os.environ.get("ARVISION_COMMIT"):
        return os.environ["ARVISION_COMMIT"], None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return head, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None
