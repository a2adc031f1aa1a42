"""The tokenizer's resume on a GPU: a run stopped after its checkpoint and resumed, against a run
never stopped (bf16 autocast, channels-last; cuDNN may pick other kernels, so the figures are
the largest differences, not a bit-for-bit check as on CPU).

    PYTHONPATH=. python3 bench/gpu_tokenizer_resume.py --out $OUT

Writes ``gpu_tokenizer_resume.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--stop-at", type=int, default=100)
    ap.add_argument("--device", default="cuda", help="cpu: a quick check of this script (bit-for-bit there)")
    ap.add_argument("--n", type=int, default=20000, help="synthetic training images")
    args = ap.parse_args()
    from gpu_tokens import prepared_split  # bench/gpu_tokens.py: synthetic prepared PNG shards

    from arvision.config import TokenizerConfig
    from arvision.data.feed import shuffled_batches
    from arvision.tokenizers import build_tokenizer
    from arvision.train.tokenizer import train_tokenizer

    cfg = TokenizerConfig(kind="vq", width=32, channel_mult=[1, 2, 2], codebook_size=256, steps=args.steps, batch_size=128,
                          checkpoint_every=args.stop_at, log_every=10, device=args.device)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        split = Path(d) / "train"
        prepared_split(split, args.n, 32)

        def fresh():
            torch.manual_seed(0)
            return build_tokenizer(cfg, channels=3, resolution=32)

        curves: dict[str, list] = {"whole": [], "whole_again": [], "resumed": []}
        runs = {}
        for name in ("whole", "whole_again"):  # twice: how far two runs never stopped differ here
            runs[name] = fresh()
            train_tokenizer(runs[name], shuffled_batches(split, cfg.batch_size, 0, 4096), cfg, seed=0, device=device, progress=False,
                            log=lambda s, m, name=name: curves[name].append((s, m["loss"])))
        saved = {}

        class Stop(Exception):
            pass

        def keep_and_stop(step, st):
            saved.update(st)
            raise Stop

        cut = fresh()
        try:
            train_tokenizer(cut, shuffled_batches(split, cfg.batch_size, 0, 4096), cfg, seed=0, device=device, progress=False,
                            log=lambda s, m: curves["resumed"].append((s, m["loss"])), on_checkpoint=keep_and_stop)
        except Stop:
            pass
        resumed = fresh()
        train_tokenizer(resumed, shuffled_batches(split, cfg.batch_size, 0, 4096, skip=saved["step"]), cfg, seed=0, device=device,
                        progress=False, log=lambda s, m: curves["resumed"].append((s, m["loss"])), state=saved)
    def compare(x, y, cx, cy) -> dict:
        a, b = x.state_dict(), y.state_dict()
        diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point()}
        top = sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
        la, lb = np.array([v for _, v in cx]), np.array([v for _, v in cy])
        return {"bitwise_equal": all(torch.equal(a[k], b[k]) for k in a), "largest_weight_diffs": dict(top),
                "max_loss_diff": float(np.abs(la - lb).max()), "last_loss": [float(la[-1]), float(lb[-1])],
                "curve_steps_equal": [t for t, _ in cx] == [t for t, _ in cy]}

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "commit": os.environ.get("ARVISION_COMMIT"), "steps": args.steps, "stopped_at": saved["step"],
        "resumed_vs_whole": compare(runs["whole"], resumed, curves["whole"], curves["resumed"]),
        "whole_again_vs_whole": compare(runs["whole"], runs["whole_again"], curves["whole"], curves["whole_again"]),
    }
    print(json.dumps(result), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_tokenizer_resume.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
