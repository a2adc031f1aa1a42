"""Data-scale benchmark: the real stages on a synthetic image folder of N images.

For each N it writes (once, cached under ``--data-root``) N 64×64 JPEGs in 100 class folders
(ImageNet's layout, each image unique), builds a project around them (this checkout's code,
``git`` + ``dvc init``, ``data.source: folder``), runs ``arvision run`` and reports per stage:
the images it handled per second, the peak RSS of the stage's whole process tree (the stage,
and Ray's processes when it starts them; sampled every 0.2 s), the disk size of its outputs;
then the no-op re-run (``arvision run`` again, nothing changed) and where its time goes.
It also measures, in the same run, the raw decode + resize rate of the machine (one process,
and one per core, both in worker processes) and ``prepare``'s rates in one process and on Ray Data
(forced) on the largest N, so its Ray rate has a yardstick.

    PYTHONPATH=. .venv/bin/python bench/data_scale.py --n 10000,200000

Writes ``bench/results/<date>-data-scale/data_scale.json`` (raw) and prints a table;
``python bench/report.py`` puts the table into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import git_commit  # noqa: E402  (bench/provenance.py)

CLASSES = 100
SIDE = 64


# --------------------------------------------------------------------------- the data


def _write_images(args: tuple[str, int, int, int]) -> int:
    """Images ``start..stop`` of the folder: class ``i % 100``; a per-class colour field with a
    per-image random blob, so no two images are alike (content-hash de-duplication keeps all)."""
    from PIL import Image

    root, start, stop, seed = args
    out = Path(root)
    for i in range(start, stop):
        c = i % CLASSES
        rng = np.random.default_rng([seed, i])
        base = np.random.default_rng([seed, c]).integers(40, 215, 3)
        yy, xx = np.mgrid[0:SIDE, 0:SIDE]
        cy, cx, r = rng.integers(8, SIDE - 8, 2).tolist() + [int(rng.integers(4, 14))]
        img = np.empty((SIDE, SIDE, 3), np.uint8)
        img[:] = (base + (xx[..., None] * rng.integers(-1, 2, 3))).clip(0, 255)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        img += rng.integers(0, 6, img.shape, dtype=np.uint8)
        d = out / f"class_{c:03d}"
        d.mkdir(exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:07d}.jpg", quality=90)
    return stop - start


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``root/n{N}``: N JPEGs in 100 class folders (written once; a marker file says it is whole)."""
    folder = root / f"n{n}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    chunks = [(str(folder), s, min(n, s + 2000), seed) for s in range(0, n, 2000)]
    t0 = time.perf_counter()
    with mp.Pool(os.cpu_count()) as pool:
        done = 0
        for k in pool.imap_unordered(_write_images, chunks):
            done += k
            print(f"\r  writing {folder}: {done}/{n}", end="", flush=True)
    (folder / ".complete").write_text(str(n))
    print(f"\r  wrote {n} images to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


# --------------------------------------------------------------------------- yardsticks


def _decode_resize(paths: list[str]) -> int:
    from arvision.data.prepare import normalise

    for p in paths:
        normalise(Path(p).read_bytes(), 32, 3)
    return len(paths)


def raw_rates(folder: Path, sample: int = 4000) -> dict[str, float]:
    """Images/s of read + decode + resize (``prepare``'s ``normalise``), no writing, on the same
    ``sample`` files (read once before, so both timings find them in the page cache): one
    process, and one process per core."""
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))[:sample]
    for p in paths:
        Path(p).read_bytes()
    cores = os.cpu_count() or 1
    rates = {}
    for procs in sorted({1, cores}):  # both in worker processes, so they differ only in their number
        chunks = [paths[i::procs] for i in range(procs)]
        with mp.Pool(procs) as pool:
            pool.map(_decode_resize, [c[:10] for c in chunks])  # start-up out of the timing
            t0 = time.perf_counter()
            pool.map(_decode_resize, chunks)
            rates[f"decode_resize_{procs}proc_img_s"] = round(len(paths) / (time.perf_counter() - t0), 1)
    return {**rates, "cores": cores}


# --------------------------------------------------------------------------- the pipeline


class TreeRSS:
    """Peak RSS per stage of a process tree, sampled every ``interval`` s: the stage is told by
    the ``stages.<name>`` in a descendant's command line; its RSS is that process's and its
    descendants' (Ray's raylet and workers when the stage starts Ray)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak, self._stop = pid, interval, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                for p in psutil.Process(self.pid).children(recursive=True):
                    cmd = " ".join(p.cmdline())
                    if " -m stages." in f" {cmd}" or cmd.startswith("python -m stages."):
                        stage = cmd.split("stages.", 1)[1].split()[0]
                        rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                        self.peak[stage] = max(self.peak.get(stage, 0), rss)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)


def _params(data_path: Path) -> dict:
    return {
        "seed": 0,
        "data": {"source": "folder", "path": str(data_path), "resolution": 32, "channels": 3, "val_fraction": 0.02,
                 "shard_size": 4096},
        "tokenizer": {"kind": "vq", "width": 32, "channel_mult": [1, 2, 2], "codebook_size": 256, "steps": 200, "warmup_steps": 20,
                      "batch_size": 64, "log_every": 50},
        "features": {"steps": 100, "batch_size": 64},
        "tokens": {"batch_size": 512, "shard_size": 16384},
        "prior": {"kind": "gpt", "size": "tiny", "steps": 100, "warmup_steps": 10, "batch_size": 64, "eval_every": 0, "log_every": 50},
        "ray": {"num_workers": 1, "cpus_per_worker": 1},
        "evaluate": {"num_samples": 200, "samples_per_class": 1, "max_val_images": 1000},
    }


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_pipeline(tmp: Path, data: Path, n: int) -> dict:
    from tests.pipeline_project import env, make_project

    proj = make_project(tmp, _params(data), name=f"proj{n}")
    e = env(tmp)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "arvision.cli", "run"], cwd=proj, env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    with TreeRSS(p.pid) as rss:
        out, _ = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"arvision run failed ({p.returncode}):\n{out[-4000:]}")
    record = json.loads((proj / ".arvision" / "last_run.json").read_text())
    metrics = {f.stem: json.loads(f.read_text()) for f in (proj / "metrics").glob("*.json")}
    manifest = json.loads((proj / "data" / "prepared" / "manifest.json").read_text())
    counts = manifest["counts"]
    handled = {  # what each stage went through, for images/s
        "prepare": manifest["images_in_source"], "tokens": counts["train"] + counts["val"],
        "tokenizer": _params(data)["tokenizer"]["steps"] * _params(data)["tokenizer"]["batch_size"],
        "features": counts["train"] + counts["val"],
    }
    stages = {}
    for r in record["stages"]:
        s = r["stage"]
        stages[s] = {"seconds": round(r["seconds"], 2), "peak_rss_mib": round(rss.peak.get(s, 0) / 2**20, 1)}
        if s in handled and r["seconds"] > 0:
            stages[s]["images_per_s"] = round(handled[s] / r["seconds"], 1)
    stages["prepare"]["output_mib"] = round(_du(proj / "data" / "prepared") / 2**20, 1)
    stages["tokens"]["output_mib"] = round(_du(proj / "data" / "tokens") / 2**20, 1)
    stages["tokenizer"]["output_mib"] = round(_du(proj / "models" / "tokenizer") / 2**20, 2)

    # the no-op re-run, and where its time goes
    t0 = time.perf_counter()
    again = subprocess.run([sys.executable, "-m", "arvision.cli", "run"], cwd=proj, env=e, capture_output=True, text=True)
    noop = time.perf_counter() - t0
    rec2 = json.loads((proj / ".arvision" / "last_run.json").read_text())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "status", "prepare"], cwd=proj, env=e, capture_output=True, text=True)
    dvc_status_prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = sum(1 for _ in _walk(data))
    walk = time.perf_counter() - t0
    return {
        "n": n, "wall_s": round(wall, 1), "stages": stages, "counts": counts, "skipped": manifest["skipped"],
        "duplicates": manifest["duplicates"], "dvc_cache_mib": round(_du(proj / ".dvc" / "cache") / 2**20, 1),
        "noop": {"arvision_run_s": round(noop, 2), "rc": again.returncode,
                 "ran": [r["stage"] for r in rec2["stages"] if r["ran"]],
                 "per_stage_s": {r["stage"]: round(r["seconds"], 2) for r in rec2["stages"]},
                 "dvc_status_prepare_s": round(dvc_status_prepare, 2),
                 "stat_walk_s": round(walk, 2), "files": files},
        "metrics": {k: v for k, v in metrics.items() if k in ("prepare", "tokens")},
    }


def _walk(root: Path):
    """Every file under ``root`` with its size and mtime (what a manifest of the folder needs)."""
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    st = e.stat(follow_symlinks=False)
                    yield e.path, st.st_size, st.st_mtime_ns


def prepare_rates(folder: Path, n_sample: int) -> dict:
    """``prepare_dataset`` on ``folder`` in one process and through Ray Data (forced), same run."""
    from arvision.config import DataConfig, RayConfig
    from arvision.data import prepare as P

    out = {}
    cfg = DataConfig(source="folder", path=str(folder), resolution=32, val_fraction=0.02, shard_size=4096)
    for mode in ("in_process", "ray"):
        if not hasattr(P, "prepare_dataset"):
            continue
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            kw = {"use_ray": mode == "ray", "ray_cfg": RayConfig()} if "use_ray" in P.prepare_dataset.__code__.co_varnames else {}
            if mode == "ray" and not kw:
                continue
            m = P.prepare_dataset(cfg, 0, Path(d) / "prepared", progress=False, **kw)
            sec = time.perf_counter() - t0
            out[f"prepare_{mode}_img_s"] = round(m["images_in_source"] / sec, 1)
            out[f"prepare_{mode}_s"] = round(sec, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="10000,200000", help="comma list of image counts")
    ap.add_argument("--data-root", default=str(Path(tempfile.gettempdir()) / "arvision-scale"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-pipeline", action="store_true", help="only the folders and the yardsticks")
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    when = dt.datetime.now(dt.timezone.utc)
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{when:%Y-%m-%d}-data-scale"
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(args.data_root)
    commit, dirty = git_commit()
    result = {"kind": "data_scale", "commit": commit, "dirty": dirty, "command": " ".join([sys.executable, *sys.argv]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "started_utc": f"{when:%Y-%m-%dT%H:%M:%SZ}",
              "runs": []}
    folders = {n: make_folder(root, n) for n in ns}
    # prepare's rates on the largest folder, where Ray's start-up weighs least
    result["yardsticks"] = {**raw_rates(folders[ns[0]]), **prepare_rates(folders[ns[-1]], ns[-1]), "prepare_rates_n": ns[-1]}
    print(json.dumps(result["yardsticks"]), flush=True)
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory(prefix="arvision-scale-") as tmp:
            for n in ns:
                print(f"--- N = {n}", flush=True)
                res = run_pipeline(Path(tmp), folders[n], n)
                result["runs"].append(res)
                print(json.dumps(res), flush=True)
                (out_dir / "data_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    result["finished_utc"] = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    (out_dir / "data_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_dir / 'data_scale.json'}")


if __name__ == "__main__":
    main()
