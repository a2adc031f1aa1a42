"""Why a VAR prior with attention dropout went NaN on CUDA, and that the fix holds.

On an H200 (torch 2.11, bf16 autocast, regional compile) the scale-64 preset's VAR d8 with
``dropout: 0.1`` and ``drop_path: 0.1`` had a NaN loss by step 10; without dropout it trained.
VAR's split attention (``VAR.split_plan``) sends the small scales through one SDPA call *with a
mask*; with ``dropout_p > 0`` that call takes a fused kernel that accepts both. This runs:

1. **the op alone**: that masked call's shape, forward and backward with dropout 0.1, under each
   SDPA backend and a written-out softmax: whether the gradients are finite;
2. **the training loop**: var d8 at the preset's scales, dropout and drop-path 0.1, ``--steps``
   steps on random codes with the real ``train_prior`` (compiled): the step it diverged at, or
   the final loss.

Seen on an H200 (bench/results/2026-12-02-presets-emoji/var_dropout_nan.json): every backend's
gradients finite, and 60 steps trained without a NaN: the pipeline's NaN is *not* reproduced
by the op or the model alone (it needs the stage's real codes, or more steps); the scale-64
preset keeps dropout and drop-path at 0 until it is.

    PYTHONPATH=. python3 bench/var_dropout_nan.py --out $OUT/var_dropout_nan.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from arvision.train.loop import train_prior  # noqa: E402
from arvision.train.trainer import TrainingDiverged  # noqa: E402

SCALES = (1, 2, 3, 4, 6, 8, 12, 16)


def op_check(device: torch.device, plan, heads: int = 8, head_dim: int = 64, batch: int = 64) -> list[dict]:
    """The masked group of the split plan: q/k/v like VAR's (l2-normalised, temperature 4)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    masked = [(qs, qe, m) for qs, qe, m in plan if m is not None]
    if not masked:
        return [{"note": "the split plan has no masked call"}]
    qs, qe, m = masked[0]
    out = []
    for name in ("default", "cudnn", "efficient", "math", "explicit"):
        g = torch.Generator(device=device).manual_seed(0)
        q = (F.normalize(torch.randn(batch, heads, qe - qs, head_dim, device=device, generator=g), dim=-1) * 4).bfloat16()
        k = F.normalize(torch.randn(batch, heads, qe, head_dim, device=device, generator=g), dim=-1).bfloat16()
        v = torch.randn(batch, heads, qe, head_dim, device=device, generator=g).bfloat16()
        for t in (q, k, v):
            t.requires_grad_(True)
        row = {"backend": name, "q_len": qe - qs, "k_len": qe}
        try:
            if name == "explicit":
                scores = (q @ k.transpose(-2, -1)).float().masked_fill(~m, float("-inf"))
                y = F.dropout(scores.softmax(-1), p=0.1).type_as(v) @ v
            else:
                ctx = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                       "math": SDPBackend.MATH}[name]
                with (sdpa_kernel(ctx) if ctx is not None else torch.enable_grad()):
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.1, scale=1.0)
            y.float().square().mean().backward()
            row.update(out_finite=bool(torch.isfinite(y).all()),
                       grads_finite=all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v)))
        except RuntimeError as e:  # a backend that refuses the shape or dtype
            row["error"] = str(e).splitlines()[0][:200]
        out.append(row)
    return out


def train_check(device: torch.device, steps: int) -> dict:
    from arvision.priors import build_prior
    from prior import prior_config  # bench/prior.py

    torch.manual_seed(0)
    cfg = prior_config("var", "d8", compile_mode="regional", steps=steps, batch_size=64, log_every=5,
                       dropout=0.1, drop_path=0.1, lr=5e-4, warmup_steps=20)
    from arvision.priors.var import StandInScaleTokenizer

    tok = StandInScaleTokenizer(1024, 32, list(SCALES)).to(device)
    model = build_prior(cfg, vocab_size=1024, layout=[(s, s) for s in SCALES], num_classes=64, tokenizer=tok).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    pool = [(torch.randint(0, 1024, (64, model.seq_len), device=device, generator=g),
             torch.randint(0, 64, (64,), device=device, generator=g)) for _ in range(8)]

    def batches():
        i = 0
        while True:
            yield pool[i % len(pool)]
            i += 1

    logs: list[dict] = []
    t0 = time.perf_counter()
    row = {"dropout": 0.1, "drop_path": 0.1, "steps": steps}
    try:
        train_prior(model, batches(), cfg, device=device, progress=False, on_log=lambda s, m: logs.append({"step": s, **m}))
        row["final_loss"] = logs[-1]["loss"] if logs else None
    except TrainingDiverged as e:
        row["diverged"] = str(e).splitlines()[0]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["losses"] = [(m["step"], round(m["loss"], 4)) for m in logs]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from prior import var_model

    probe = var_model(device, size="d8", vocab=1024, scales=SCALES, num_classes=64)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "op": op_check(device, probe.split_plan()) if device.type == "cuda" else []}
    print(json.dumps(res["op"], indent=1), flush=True)
    del probe
    res["train"] = [train_check(device, args.steps)]
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
