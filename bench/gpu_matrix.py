"""Several ``bench/gpu_pipeline.py`` runs at once on one GPU machine: presets × data sets × ablations.

A matrix file (YAML) lists runs; each is a tag, the presets it applies and ``--set`` overrides::

    runs:
      - tag: token64-emoji
        config: [configs/gpu/token-64.yaml]
      - tag: token64-mnist
        config: [configs/gpu/token-64.yaml]
        set: [data.source=mnist, data.path=data/mnist10k]

    PYTHONPATH=. python3 bench/gpu_matrix.py bench/matrices/presets.yaml --parallel 6 --deadline-s 540 --out $OUT

Up to ``--parallel`` runs share the GPU (small models leave most of it idle; separate
processes, each with its own local Ray instance and output root). A run still going at
``--deadline-s`` is stopped (its whole process group) and keeps what it wrote after each stage.
A run with ``seed: <tag>`` starts when that run has finished, from its outputs (e.g. one
``prepare`` and ``features`` per data set, shared by every family trained on it: the seed run
says ``stages: [prepare, features]``). Everything a run wrote goes under ``--out/<tag>/``; ``matrix.json`` says per run its exit
status, seconds and the stages it finished. With ``--tar``, the result is one
``matrix.tar.gz`` under ``--out`` (the device tool brings back few files).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def load(path: Path, only: set[str]) -> list[dict]:
    runs = yaml.safe_load(path.read_text())["runs"]
    # a run that seeds another comes along when only the other is asked for
    seeds = {r["seed"] for r in runs if r.get("seed") and (not only or r["tag"] in only)}
    only = only | seeds if only else only
    tags = [r["tag"] for r in runs]
    if len(set(tags)) != len(tags):
        sys.exit(f"{path}: tags repeat: {sorted({t for t in tags if tags.count(t) > 1})}")
    unknown = only - set(tags)
    if unknown:
        sys.exit(f"--only: no run tagged {', '.join(sorted(unknown))}; tags: {', '.join(tags)}")
    return [r for r in runs if not only or r["tag"] in only]


def command(run: dict, out: Path, root: Path, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, str(REPO / "bench" / "gpu_pipeline.py"), "--root", str(root / run["tag"]),
           "--out", str(out / run["tag"]), "--tag", run["tag"]]
    if run.get("stages"):
        cmd += ["--stages", ",".join(run["stages"])]
    if run.get("seed"):
        cmd += ["--seed", str(root / run["seed"])]
    for c in run.get("config", []):
        cmd += ["--config", str(REPO / c)]
    sets = [*run.get("set", []), *extra]  # one --set: gpu_pipeline keeps only the last one given
    # a relative data.path is the repository's (the runs' roots are elsewhere)
    sets = [f"data.path={REPO / v[len('data.path='):]}" if v.startswith("data.path=") else v for v in sets]
    return cmd + (["--set", *sets] if sets else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("matrix", type=Path)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_matrix")))
    ap.add_argument("--root", type=Path, default=Path("/tmp/gpu_matrix_runs"))
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--deadline-s", type=float, default=540.0)
    ap.add_argument("--only", default="", help="comma list of tags")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every run, after the run's own")
    ap.add_argument("--tar", action="store_true", help="pack --out into --out/matrix.tar.gz")
    args = ap.parse_args()
    runs = load(args.matrix, {t for t in args.only.split(",") if t})
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    pending, live, done = list(runs), {}, {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while pending or live:
        while pending and len(live) < args.parallel:
            ready = [r for r in pending if not r.get("seed") or done.get(r["seed"], {}).get("status") == "ok"]
            for r in [r for r in pending if r.get("seed") and r["seed"] in done and done[r["seed"]]["status"] != "ok"]:
                pending.remove(r)
                done[r["tag"]] = {"status": f"not started: its seed {r['seed']} did not finish", "seconds": 0, "stages": []}
            if not ready:
                break
            run = ready[0]
            pending.remove(run)
            (args.out / run["tag"]).mkdir(parents=True, exist_ok=True)
            log = open(args.out / run["tag"] / "log.txt", "w")
            proc = subprocess.Popen(command(run, args.out, args.root, args.set), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO, start_new_session=True)
            live[run["tag"]] = (proc, log, time.monotonic())
            print(f"[{time.monotonic() - t0:5.0f} s] start {run['tag']}", flush=True)
        time.sleep(2)
        for tag, (proc, log, started) in list(live.items()):
            over = time.monotonic() - t0 > args.deadline_s
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:  # past the deadline: stop the run's whole process group (Ray included)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                status = "stopped at the deadline"
            else:
                status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
            log.close()
            res = args.out / tag / f"{tag}_pipeline.json"
            stages = list(json.loads(res.read_text())["stages"]) if res.exists() else []
            done[tag] = {"status": status, "seconds": round(time.monotonic() - started, 1), "stages": stages}
            del live[tag]
            print(f"[{time.monotonic() - t0:5.0f} s] {tag}: {status}, {done[tag]['seconds']} s, stages {', '.join(stages)}",
                  flush=True)
        if time.monotonic() - t0 > args.deadline_s:
            for run in pending:
                done[run["tag"]] = {"status": "not started (deadline)", "seconds": 0, "stages": []}
            pending = []
    (args.out / "matrix.json").write_text(json.dumps({"matrix": str(args.matrix), "parallel": args.parallel,
                                                      "runs": done}, indent=2))
    if args.tar:
        tar_path = args.out / "matrix.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar:
            for p in sorted(args.out.iterdir()):
                if p != tar_path:
                    tar.add(p, arcname=p.name)
    print(json.dumps(done, indent=1))


if __name__ == "__main__":
    main()
