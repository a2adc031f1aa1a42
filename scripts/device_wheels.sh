#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, no registry there): Ray without its Java jars (the
# 32 MB ray_dist.jar is only for Ray's Java API), plus the few pure-Python packages it lacks.
# Output: .whl/ (git-ignored), to be named in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_VERSION=$(.venv/bin/python -c "import ray; print(ray.__version__)")
mkdir -p .whl
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl "$@"; }
dl "ray==${RAY_VERSION}" jsonschema jsonschema-specifications referencing rpds-py \
  "pydantic==$(.venv/bin/python -c "import pydantic; print(pydantic.VERSION)")" "pydantic-core==$(.venv/bin/python -c "import pydantic_core; print(pydantic_core.__version__)")" \
  annotated-types typing-inspection
whl=$(ls .whl/ray-*.whl)
python3 - "$whl" <<'PY'
import sys, zipfile, os
src = sys.argv[1]; dst = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        # the device tool carries at most 64 MiB: leave out what the pipeline never imports
        # (Java jars, RLlib, Serve, LLM, the dashboard's web client)
        if item.filename.startswith(("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/")):
            continue
        # the large binaries (gcs_server, raylet, _raylet.so) LZMA-compressed: 40 -> 30 MiB;
        # pip installs such a wheel (zipfile reads LZMA members)
        zout.writestr(item, zin.read(item.filename),
                      compress_type=zipfile.ZIP_LZMA if item.file_size > 1 << 20 else zipfile.ZIP_DEFLATED)
os.replace(dst, src)
PY
du -sh .whl
