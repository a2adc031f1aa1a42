"""Running one test's body in a fresh interpreter (pytest, on that test alone).

Memory measurements with ``tracemalloc`` crashed the interpreter (a segfault) where Ray had run
earlier in the same process: its threads keep running. Such a test calls :func:`run_here`."""

import os
import subprocess
import sys

_ENV = "ARVISION_ISOLATED_TEST"


def run_here(request) -> bool:
    """True inside the fresh interpreter (run the body); elsewhere run the test there, assert
    that it passed, and return False."""
    node = request.node.nodeid
    if os.environ.get(_ENV) == node:
        return True
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                          cwd=request.config.rootpath, env={**os.environ, _ENV: node}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return False
