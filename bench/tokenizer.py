"""GPU benchmark of the ``vq`` tokenizer: training and encoding throughput, and peak memory.

    PYTHONPATH=. python3 bench/tokenizer.py [--quick]

For each resolution (32, 64, 256) it times training steps (bf16 autocast, channels_last,
AdamW, grad clip: the same step as ``arvision.train.tokenizer``) eager and under
``torch.compile``, and ``encode`` in eval mode. Prints a markdown table, and writes it to
``$OUT/tokenizer_bench.md`` when ``$OUT`` is set. Imports only torch, numpy and arvision's
tokenizer modules; the config is the stage's ``TokenizerConfig``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arvision.config import TokenizerConfig  # noqa: E402
from arvision.tokenizers import build_tokenizer  # noqa: E402

BASE = dict(
    kind="vq", num_res_blocks=1, codebook_size=512, code_dim=8, l2_norm=True, ema=True, ema_decay=0.99,
    kmeans_init=True, dead_code_restart=True, dead_code_threshold=1.0, commitment=0.25, rq_depth=4,
    fsq_levels=[8, 5, 5, 5], scales=[1, 2, 3, 4, 6, 8], palette_size=16, lr=3e-4,
)

# resolution -> (tokenizer settings, train batch, encode batch)
CONFIGS = {
    32: (dict(width=32, channel_mult=[1, 2, 2], num_res_blocks=1), 256, 1024),  # 4x down: 8x8 codes (emoji default)
    64: (dict(width=64, channel_mult=[1, 2, 2, 2], num_res_blocks=1), 128, 512),  # 8x down: 8x8 codes
    # 16x down, LlamaGen-VQ-16-sized (~70M params): 256x256 -> 16x16 codes, 16384 codes
    256: (dict(width=128, channel_mult=[1, 2, 2, 4, 4], num_res_blocks=2, codebook_size=16384), 32, 128),
}


def make(res: int) -> torch.nn.Module:
    over, _, _ = CONFIGS[res]
    cfg = TokenizerConfig(**{**BASE, **over})
    torch.manual_seed(0)
    return build_tokenizer(cfg, channels=3, resolution=res)


def timed(fn, iters: int, warmup: int) -> float:
    """Seconds per call (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def bench_train(res: int, compile_: bool, iters: int) -> tuple[float, float, float]:
    """(images/s, peak GiB, compile+warm-up s) for training steps at ``res``."""
    _, batch, _ = CONFIGS[res]
    tok = make(res).cuda().to(memory_format=torch.channels_last).train()
    if compile_:
        tok.encoder.compile()
        tok.decoder.compile()
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-4, betas=(0.9, 0.99), fused=True)
    x = (torch.rand(batch, 3, res, res, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = tok.training_loss(x)
            tok.update_quantizer()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(), step()  # k-means init, compilation
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    dt = timed(step, iters, warmup=2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del tok, opt, x
    torch.cuda.empty_cache()
    return batch / dt, peak, warm


@torch.no_grad()
def bench_encode(res: int, iters: int) -> tuple[float, float]:
    _, _, batch = CONFIGS[res]
    tok = make(res).cuda().to(memory_format=torch.channels_last).eval()
    x = (torch.rand(batch, 3, res, res, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)

    def enc():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tok.encode(x)

    torch.cuda.reset_peak_memory_stats()
    dt = timed(enc, iters, warmup=3)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del tok, x
    torch.cuda.empty_cache()
    return batch / dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--budget-s", type=float, default=420, help="skip compiled runs once past this many seconds")
    ap.add_argument("--res", default="", help="comma list of resolutions to run (default: all of %s)" % list(CONFIGS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/tokenizer.py needs CUDA")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    iters = 5 if args.quick else 20
    t_start = time.perf_counter()
    dev = torch.cuda.get_device_name()
    rows = []
    todo = [int(r) for r in args.res.split(",")] if args.res else list(CONFIGS)
    for res in todo:
        if res not in CONFIGS:
            sys.exit(f"--res {res}: allowed {list(CONFIGS)}")
        over, tb, eb = CONFIGS[res]
        n_params = sum(p.numel() for p in make(res).parameters())
        tok = make(res)
        eager = bench_train(res, False, iters)
        if time.perf_counter() - t_start < args.budget_s:
            try:
                comp = bench_train(res, True, iters)
            except Exception as err:  # report, don't lose the rest of the table
                print(f"compile failed at {res}: {type(err).__name__}: {err}", file=sys.stderr)
                comp = (float("nan"),) * 3
        else:
            comp = (float("nan"),) * 3
        enc = bench_encode(res, iters)
        rows.append(
            f"| {res}×{res} | {over['width']}, {over['channel_mult']}, {over['num_res_blocks']} | "
            f"{tok.layout[0][0]}×{tok.layout[0][1]} | {tok.vocab_size} | {n_params / 1e6:.1f}M | {tb} | "
            f"{eager[0]:,.0f} | {eager[1]:.2f} | {comp[0]:,.0f} | {comp[1]:.2f} | {comp[2]:.0f} | {eb} | {enc[0]:,.0f} | {enc[1]:.2f} |"
        )
        print(rows[-1], flush=True)
    header = [
        f"Device: {dev}; torch {torch.__version__}; bf16 autocast, channels_last, fused AdamW, grad clip 1.0; "
        f"{iters} timed steps after warm-up (CUDA events); random inputs. Peak = max_memory_allocated.",
        "",
        "| res | width, channel_mult, res blocks | codes | vocab | params | train batch | train img/s (eager) | peak GiB | "
        "train img/s (compile) | peak GiB | compile+warm-up s | encode batch | encode img/s | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = "\n".join(header + rows) + "\n"
    print("\n" + table)
    print(f"total {time.perf_counter() - t_start:.0f}s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tokenizer_bench.md").write_text(table)


if __name__ == "__main__":
    main()
