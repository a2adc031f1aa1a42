"""The tokenizer stage's data-parallel training (``tokenizer.num_workers``) on GPUs.

On a prepared split of synthetic 64² images (``bench/gpu_tokens.py``'s), a ``vq`` tokenizer of
``bench/tokenizer.py``'s 64² size (EMA codebook, k-means init, dead-code restarts) trains
``--steps`` steps of a global batch ``--batch``:

  - ``in_process``: :func:`arvision.train.tokenizer.train_tokenizer` in this process, one GPU,
    fed by :func:`arvision.data.feed.shuffled_batches` (what the stage runs with ``num_workers: 0``);
  - ``ray_N``: :func:`arvision.train.tokenizer.fit_tokenizer` on N Ray Train workers, a GPU
    each (DDP over NCCL, the quantiser's statistics all-reduced), for each N in ``--workers``.

Reports images/s of training (the loop's own clock: ``train_time_s``), the last logged loss and
PSNR, and whether every replica ended with the same weights and codebook (a hash of each rank's
state dict; ``fit_tokenizer`` refuses a run whose replicas differ).

    PYTHONPATH=. python3 bench/gpu_tokenizer_ddp.py --out $OUT --workers 1,2

Writes ``gpu_tokenizer_ddp.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: NVLink multicast stays off on shared GPU hosts (bench/multi_gpu.py sets the same)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--n", type=int, default=20000, help="training images")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256, help="the global batch")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()

    import tokenizer as tb  # bench/tokenizer.py
    from gpu_tokens import prepared_split

    from arvision.cluster import TrainRun
    from arvision.config import RayConfig, TokenizerConfig
    from arvision.data.feed import shuffle_buffer_rows, shuffled_batches
    from arvision.tokenizers import build_tokenizer
    from arvision.train.tokenizer import fit_tokenizer
    from arvision.train.tokenizer import train_tokenizer

    gpus = torch.cuda.device_count()
    res = 64
    over, _, _ = tb.CONFIGS[res]
    cfg = TokenizerConfig(**{**tb.BASE, **over, "steps": args.steps, "batch_size": args.batch, "log_every": 50,
                             "warmup_steps": 20, "device": "cuda"})
    out = {"device": torch.cuda.get_device_name(), "gpus": gpus, "torch": torch.__version__,
           "commit": os.environ.get("ARVISION_COMMIT"), "command": " ".join([sys.executable, *sys.argv]),
           "n": args.n, "steps": args.steps, "global_batch": args.batch, "tokenizer": cfg.model_dump(mode="json"), "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        split = Path(d) / "prepared" / "train"
        prepared_split(split, args.n, res)
        buffer = shuffle_buffer_rows(args.batch, res * res * 3)

        torch.manual_seed(0)
        tok = build_tokenizer(cfg, channels=3, resolution=res)
        t0 = time.perf_counter()
        stats = train_tokenizer(tok, shuffled_batches(split, args.batch, 0, buffer), cfg, seed=0, device=torch.device("cuda"), progress=False)
        out["runs"]["in_process"] = {"images_per_s": round(stats["images_per_s"], 1), "wall_s": round(time.perf_counter() - t0, 1),
                                     "loss": stats.get("loss"), "psnr": stats.get("psnr")}
        print("in_process", json.dumps(out["runs"]["in_process"]), flush=True)
        del tok
        torch.cuda.empty_cache()

        for n in (int(w) for w in args.workers.split(",")):
            if n > gpus:
                print(f"ray_{n}: skipped, {gpus} GPU(s) here", flush=True)
                continue
            wcfg = cfg.model_copy(update={"num_workers": n})
            t0 = time.perf_counter()
            state = fit_tokenizer(tokenizer_cfg=wcfg, ray_cfg=RayConfig(use_gpu=True, env=NO_MULTICAST), seed=0, split_dir=split, channels=3,
                                  resolution=res, run=TrainRun(Path(d) / "ray", f"ddp{n}", root=ROOT))
            st = state["stats"]
            out["runs"][f"ray_{n}"] = {
                "images_per_s": round(st["images_per_s"], 1), "wall_s_with_startup": round(time.perf_counter() - t0, 1),
                "loss": st.get("loss"), "psnr": st.get("psnr"), "replicas_identical": len(set(state["replica_hashes"])) == 1,
                "replica_hashes": state["replica_hashes"],
            }
            print(f"ray_{n}", json.dumps(out["runs"][f"ray_{n}"]), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_tokenizer_ddp.json").write_text(json.dumps(out, indent=2) + "\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_tokenizer_ddp.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
