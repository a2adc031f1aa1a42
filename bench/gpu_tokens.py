"""The ``tokens`` stage's own code on a GPU, against the tokenizer's bare encode rate.

For each resolution (64², 256²): a prepared split of N synthetic images (PNG, as ``prepare``
writes them), a ``vq`` tokenizer of ``bench/tokenizer.py``'s size for that resolution (random
weights: the encode cost does not depend on training), then
  - ``bare``: ``bench/tokenizer.py``'s encode rate (a batch already on the GPU, CUDA events);
  - ``stage_ray``: ``stages.tokens.encode_split_ray`` (Ray Data: parallel PNG decoding, a GPU
    actor encoding, the driver writing shards), images/s over the whole split, the actor's
    start-up (tokenizer load, CUDA context) included, Ray's own start-up not;
  - ``stage_in_process``: ``stages.tokens.encode_split`` (one process), for comparison.

    PYTHONPATH=. python3 bench/gpu_tokens.py --out $OUT

Writes ``gpu_tokens.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def prepared_split(split_dir: Path, n: int, res: int, distinct: int = 256) -> None:
    """``n`` rows of the prepared schema: ``distinct`` smooth random images (PNG), repeated with
    unique ids."""
    from PIL import Image

    from arvision.data.parquet_io import PREPARED_SCHEMA, write_shards

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(distinct):
        small = rng.integers(0, 256, (res // 8, res // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((res, res), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=6)
        pngs.append(buf.getvalue())
    ids = [f"{i:032x}" for i in range(n)]
    table = pa.Table.from_arrays([pa.array(ids), pa.array([pngs[i % distinct] for i in range(n)], pa.binary()),
                                  pa.array(np.arange(n) % 10, pa.int32())], schema=PREPARED_SCHEMA)
    write_shards(table, split_dir, 4096)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--res", default="64,256")
    ap.add_argument("--n64", type=int, default=200000)
    ap.add_argument("--n256", type=int, default=8000)
    args = ap.parse_args()

    import tokenizer as tb  # bench/tokenizer.py

    from arvision.config import Params
    from arvision.data.parquet_io import ShardWriter
    from arvision.tokenizers import save_tokenizer
    from stages.common import Paths
    from stages.tokens import encode_split, encode_split_ray, token_schema

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "commit": os.environ.get("ARVISION_COMMIT"), "command": " ".join([sys.executable, *sys.argv]), "runs": []}
    for res in (int(r) for r in args.res.split(",")):
        n = args.n64 if res <= 64 else args.n256
        _, _, batch = tb.CONFIGS[res]
        bare, _ = tb.bench_encode(res, iters=20)
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            paths = Paths(root)
            prepared_split(paths.prepared / "train", n, res)
            tok = tb.make(res).eval()
            save_tokenizer(tok, paths.tokenizer)
            params = Params.model_validate({"tokens": {"batch_size": batch, "shard_size": 16384, "device": "cuda"}})
            schema = token_schema(tok.vocab_size, tok.seq_len, {})
            row = {"res": res, "n": n, "batch": batch, "bare_encode_img_s": round(bare, 1)}
            from arvision.cluster import init_ray

            init_ray(params.ray, ROOT)  # Ray's start-up out of the timing (the actors' own start is in it)
            for name in ("stage_ray", "stage_in_process"):
                writer = ShardWriter(root / f"out_{name}", schema, 16384)
                t0 = time.perf_counter()
                if name == "stage_ray":
                    encode_split_ray(params, paths, paths.prepared / "train", writer)
                else:
                    encode_split(tok.cuda(), paths.prepared / "train", writer, batch_size=batch, device=torch.device("cuda"))
                writer.close()
                sec = time.perf_counter() - t0
                row[f"{name}_img_s"] = round(n / sec, 1)
                row[f"{name}_s"] = round(sec, 1)
                print(f"  {res}² {name}: {n / sec:,.0f} img/s ({sec:.1f} s)", flush=True)
            row["stage_ray_vs_bare"] = round(row["stage_ray_img_s"] / bare, 3)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_tokens.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
