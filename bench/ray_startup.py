"""Where the Ray paths' start-up goes, on the machine it runs on (a GPU machine for ``actor``).

    PYTHONPATH=. python3 bench/ray_startup.py imports        # each module imported in a fresh process
    PYTHONPATH=. python3 bench/ray_startup.py actor          # torch import; EncodeActor construction (CUDA)
    PYTHONPATH=. python3 bench/ray_startup.py prepare DIR    # prepare on Ray Data: its phases and Ray's statistics

``prepare`` prints one JSON line of seconds: ``ray_init`` (a local instance, outside ``total``),
``first_table_s`` (from the pipeline's start to the first processed table), pass 1 (``_spill``),
the plan, the writing, the content hash, and ``total``; Ray Data's per-operator statistics come
before it (the ``arvision`` logger at DEBUG).
"""
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def imports() -> None:
    for mod in ("arvision.data.tokens", "arvision.data.prepare", "arvision.data.parquet_io", "torch"):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {mod}"], check=True, cwd=ROOT)
        print(f"import {mod}: {time.perf_counter() - t:.2f} s", flush=True)


def actor() -> None:
    t = time.perf_counter()
    import torch

    print(f"torch import: {time.perf_counter() - t:.2f} s", flush=True)
    import tokenizer as tb  # bench/tokenizer.py

    from arvision.tokenizers import save_tokenizer

    d = Path(tempfile.mkdtemp())
    for res in (64, 256):
        save_tokenizer(tb.make(res).eval(), d / f"t{res}")
    from arvision.data.tokens import EncodeActor

    for res, batch in ((64, 512), (256, 128), (64, 512)):  # the first also makes the CUDA context
        t = time.perf_counter()
        EncodeActor(str(d / f"t{res}"), "cuda", batch)
        torch.cuda.synchronize()
        print(f"EncodeActor {res}²: {time.perf_counter() - t:.2f} s", flush=True)


def prepare(folder: str) -> None:
    from arvision.cluster import init_ray
    from arvision.config import DataConfig, RayConfig
    from arvision.data import prepare as P

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("arvision").setLevel(logging.DEBUG)
    took: dict[str, float] = {}

    def timed(name, f):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                took[name] = took.get(name, 0.0) + time.perf_counter() - t
        return g

    ray_tables = P._ray_tables

    def first_noted(*a, **k):
        t = time.perf_counter()
        for i, table in enumerate(ray_tables(*a, **k)):
            if i == 0:
                took["first_table_s"] = time.perf_counter() - t
            yield table

    P._ray_tables = first_noted
    for name in ("_spill", "_plan", "_write_splits", "_content_hash"):
        setattr(P, name, timed(name, getattr(P, name)))
    t = time.perf_counter()
    init_ray(RayConfig(), ROOT)
    took["ray_init"] = time.perf_counter() - t
    cfg = DataConfig(source="folder", path=folder, resolution=32, val_fraction=0.02, shard_size=4096)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        m = P.prepare_dataset(cfg, 0, Path(d) / "prepared", progress=False, use_ray=True, ray_cfg=RayConfig())
        took["total"] = time.perf_counter() - t
    print(json.dumps({k: round(v, 2) for k, v in took.items()}), round(m["images_in_source"] / took["total"]), "img/s", flush=True)


if __name__ == "__main__":
    {"imports": imports, "actor": actor, "prepare": prepare}[sys.argv[1]](*sys.argv[2:])
