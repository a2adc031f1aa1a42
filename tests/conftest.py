"""Settings for the whole suite (this process and the pipelines it starts, which inherit them)."""

import os

# Ray Train's controller takes up the workers' reports at its health checks, every 2 s by
# default, and a report with a checkpoint waits for it. The test runs train a few steps between
# checkpoints, so every report would wait up to 2 s: check every 0.2 s instead.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
