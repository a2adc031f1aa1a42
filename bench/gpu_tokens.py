"""The ``tokens`` stage's own code on a GPU, against the tokenizer's bare encode rate.

For each resolution (64², 256²): a prepared split of N synthetic images (PNG, as ``prepare``
writes them), a ``vq`` tokenizer of ``bench/tokenizer.py``'s size for that resolution (random
weights: the encode cost does not depend on training), then
  - ``bare``: ``bench/tokenizer.py``'s encode rate (a batch already on the GPU, CUDA events);
  - ``stage_ray``: ``arvision.data.tokens.encode_split_ray`` (Ray Data: parallel PNG decoding, a GPU
    actor encoding, the driver writing shards), images/s over the whole split, the actor's
    start-up (tokenizer load, CUDA context) included, Ray's own start-up not;
  - ``stage_in_process``: ``arvision.data.tokens.encode_split`` (one process), for comparison.

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
    ap.add_argument("--variants", default="", help="Ray runs AxK (A encoder actors a GPU, K batches a call), "
                    "comma-separated; default: the stage's own setting")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--stats", action="store_true", help="print Ray Data's per-operator statistics")
    args = ap.parse_args()

    import tokenizer as tb  # bench/tokenizer.py

    from arvision.config import Params
    from arvision.data.parquet_io import ShardWriter
    from arvision.tokenizers import save_tokenizer
    from stages.common import Paths
    from arvision.data.tokens import ACTORS_PER_GPU, batches_per_call, encode_split, encode_split_ray, inference_ready, token_schema

    args.variants = args.variants or f"{ACTORS_PER_GPU}xauto"

    class FirstWrite(ShardWriter):
        """Notes when the first batch of codes arrives."""

        first: float = 0.0
        first_rows: int = 0

        def write(self, table):
            if not self.first:
                self.first, self.first_rows = time.perf_counter(), table.num_rows
            super().write(table)

    import logging

    torch.backends.cudnn.benchmark = True  # as bench/tokenizer.py's main sets them
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.stats:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("arvision").setLevel(logging.DEBUG)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "commit": os.environ.get("ARVISION_COMMIT"), "command": " ".join([sys.executable, *sys.argv]), "runs": []}
    variants = []
    for v in args.variants.split(","):  # AxK: A actors a GPU, K batches an actor call (auto: the stage's own)
        a, k = v.split("x")
        a, k = int(a), (None if k == "auto" else int(k))
        name = "stage_ray" if v == "default" or (a, k) == (ACTORS_PER_GPU, None) else f"stage_ray_{a}x{k}"
        while name in [n for n, _ in variants]:  # a repeat (the first run also starts Ray's workers)
            name += "_again"
        variants.append((name, {"actors_per_gpu": a, "calls_of": k}))
    if args.in_process:
        variants.append(("stage_in_process", {}))
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
            row = {"res": res, "n": n, "batch": batch, "bare_encode_img_s": round(bare, 1),
                   "stage_ray_settings": {"actors_per_gpu": ACTORS_PER_GPU, "batches_per_call": batches_per_call(batch, 3 * res * res)}}
            from arvision.cluster import init_ray

            init_ray(params.ray, ROOT)  # Ray's start-up out of the timing (the actors' own start is in it)
            for name, options in variants:
                writer = FirstWrite(root / f"out_{name}", schema, 16384)
                t0 = time.perf_counter()
                if name.startswith("stage_ray"):
                    encode_split_ray(params, paths.tokenizer, paths.root, paths.prepared / "train", writer, **options)
                else:
                    encode_split(inference_ready(tok, "cuda"), paths.prepared / "train", writer, batch_size=batch, device=torch.device("cuda"))
                writer.close()
                sec = time.perf_counter() - t0
                first = writer.first - t0
                row[f"{name}_img_s"] = round(n / sec, 1)
                row[f"{name}_s"] = round(sec, 1)
                row[f"{name}_first_batch_s"] = round(first, 2)
                # after the first batch came back: the rate once start-up (actor, CUDA, cuDNN autotuning) is over
                row[f"{name}_steady_img_s"] = round((n - writer.first_rows) / max(1e-9, sec - first), 1)
                print(f"  {res}² {name}: {n / sec:,.0f} img/s ({sec:.1f} s; first batch after {first:.1f} s, "
                      f"then {row[f'{name}_steady_img_s']:,.0f} img/s)", flush=True)
            for name, _ in variants:
                row[f"{name}_vs_bare"] = round(row[f"{name}_img_s"] / bare, 3)
                row[f"{name}_steady_vs_bare"] = round(row[f"{name}_steady_img_s"] / bare, 3)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_tokens.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
