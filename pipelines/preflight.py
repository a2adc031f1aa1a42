"""Before any stage runs: every service the run was pointed at answers, or one line says which
setting to fix. Each check gives up after a few seconds, so an unreachable service costs
seconds, not the minutes of its client's retries, and no stage has yet replaced an output.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from arvision.config import Params
from arvision.errors import UserError

TIMEOUT_S = 5.0


def _http_ok(url: str) -> str | None:
    """None if ``url`` answers (any HTTP status below 500), else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return None if resp.status < 500 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return None if err.code < 500 else f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return str(reason) or type(err).__name__


def _tcp_ok(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return None
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__


def check_mlflow() -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        why = _http_ok(uri.rstrip("/") + "/health")
        if why:
            raise UserError(
                f"MLFLOW_TRACKING_URI={uri}: the MLflow server does not answer ({why}); "
                "start it, or unset MLFLOW_TRACKING_URI to use the repo's own store"
            )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UserError(f"MLFLOW_TRACKING_URI={uri}: the folder {folder} does not exist")


def check_prefect() -> None:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()  # from the environment or the active Prefect profile
    if not url:
        return
    why = _http_ok(url.rstrip("/") + "/health")
    if why:
        where = "PREFECT_API_URL" if os.environ.get("PREFECT_API_URL") else "PREFECT_API_URL (Prefect profile)"
        raise UserError(
            f"{where}={url}: the Prefect server does not answer ({why}); start it (`prefect server start`) "
            "or unset PREFECT_API_URL to use a temporary local server"
        )


def check_ray(params: Params) -> None:
    if params.ray.address:
        address, setting = params.ray.address, "ray.address in params.yaml"
    else:
        address, setting = os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"
    if not address or address == "local":
        return
    if address == "auto":  # a Ray instance started on this machine (`ray start --head`) records its address here
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if not current.exists():
            raise UserError(f"{setting}=auto: no Ray instance is running on this machine; start one (`ray start --head`) or unset it")
        address = current.read_text().strip()
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    port = parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    why = _tcp_ok(parsed.hostname or "127.0.0.1", port)
    if why:
        raise UserError(
            f"{setting}={address}: no Ray cluster answers there ({why}); start it, fix the address, "
            "or unset it to train on a local Ray instance"
        )


def preflight(root: Path, params: Params) -> None:
    """Check MLflow, Prefect and Ray (where set) answer; raise :class:`UserError` naming the setting."""
    check_mlflow()
    check_prefect()
    check_ray(params)
