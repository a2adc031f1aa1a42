"""Train the three families of visual AR models through ``arvision run`` and compare them.

pixel (palette + gpt), token (vq + gpt) and scale (msvq + var): each is one ``arvision run`` of
the repo's ``params.yaml`` plus the family's overrides below, so the figures come from the stage
code a user runs, and every model is registered. ``prepare`` and ``features`` run once (the
data and the yardstick are shared); then ``arvision compare`` scores them on one yardstick.
``params.yaml`` is restored at the end.

    python scripts/family_compare.py --set evaluate.num_samples=200

Run it in a scratch clone (``git clone . /tmp/fam && cd /tmp/fam``) to keep your own registry clean.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

# pixel last: its sampling is slowest on a CPU (1,024 steps an image), and each evaluate also
# re-scores the champion, so the slow model is sampled once rather than at every later run
FAMILIES = {
    "token": ["tokenizer.kind=vq", "prior.kind=gpt"],
    "scale": ["tokenizer.kind=msvq", "tokenizer.steps=800", "prior.kind=var", "prior.steps=300", "prior.batch_size=16"],
    "pixel": ["tokenizer.kind=palette", "prior.kind=gpt", "prior.steps=300", "prior.batch_size=16"],
}


def apply(raw: dict, overrides: list[str]) -> dict:
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        out[section][name] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--set", action="append", default=[], help="override for every family, e.g. evaluate.num_samples=200")
    ap.add_argument("--out", default="docs/family_compare.md")
    args = ap.parse_args()
    params = Path("params.yaml")
    saved = params.read_text()
    base = yaml.safe_load(saved)
    arvision = str(Path(sys.executable).parent / "arvision")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    timings = {}
    try:
        for fam in args.families.split(","):
            params.write_text(yaml.safe_dump(apply(base, FAMILIES[fam] + args.set), sort_keys=False))
            print(f"$ arvision run   # {fam}: {' '.join(FAMILIES[fam] + args.set)}", flush=True)
            t0 = time.time()
            proc = subprocess.run([arvision, "run"], env=env, text=True)
            timings[fam] = round(time.time() - t0, 1)
            if proc.returncode != 0:
                raise SystemExit(f"family {fam}: arvision run failed (exit {proc.returncode})")
    finally:
        params.write_text(saved)
    proc = subprocess.run([arvision, "compare"], env=env, text=True, capture_output=True)
    print(proc.stdout, proc.stderr)
    if proc.returncode != 0:
        raise SystemExit("arvision compare failed")
    lines = ["# The three families on one yardstick", "",
             "Made by `python scripts/family_compare.py " + " ".join(f"--set {s}" for s in args.set) + "`; "
             "overrides per family: " + "; ".join(f"{f}: `{' '.join(FAMILIES[f])}`" for f in timings), "",
             "Wall time of each `arvision run`: " + ", ".join(f"{f} {s:.0f} s" for f, s in timings.items()), "",
             Path("reports/compare.md").read_text()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
