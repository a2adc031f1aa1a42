"""arvision: reproducible training of visual autoregressive image generators."""

import os as _os

__version__ = "0.1.0"

# Offline by default: no usage reporting or update checks from the tools arvision drives
# (set before any of them is imported; a user's own setting wins).
for _k, _v in {
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}.items():
    _os.environ.setdefault(_k, _v)
