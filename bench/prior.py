"""Prior benchmark: training and sampling speed of the AR priors, as named items.

Random weights and random codes, the real training loop (``arvision.train.loop.train_prior``)
and the priors' own samplers. Each item is a function of the registry ``ITEMS`` (device, group,
the figure it reports and, where one exists, a public reference figure with its source):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/prior.py --device cuda --out $OUT   # the GPU items
    PYTHONPATH=. .venv/bin/python bench/prior.py --device cpu --cpu-steps 4          # the tiny CPU items
    PYTHONPATH=. python3 bench/prior.py --list                                       # items and groups
    PYTHONPATH=. python3 bench/prior.py --only gpt_train,var_sample_compile_cudagraph

Items run in registry order (most important first), none starts after ``--budget-s`` seconds,
and a failing item records its error without stopping the others. The raw results go to
``prior_bench.json`` in ``--out`` (default ``bench/results/<date>-prior-<device>/``), rewritten
after every item. ``bench/report.py`` (or ``--report`` here) regenerates the Prior section of
``bench/RESULTS.md`` from every ``bench/results/*/prior_bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from arvision.config import PriorConfig  # noqa: E402
from provenance import git_commit  # noqa: E402  (bench/provenance.py)
from arvision.priors import build_prior  # noqa: E402
from arvision.priors.var import StandInScaleTokenizer  # noqa: E402
from arvision.train.loop import steady_tokens_per_s, train_prior  # noqa: E402

SCHEMA = 1
GROUPS = ("matmul", "check", "gpt_train", "gpt_sample", "var_train", "var_sample", "profile")
COMPILE_MODES = ("regional",)  # arvision.train.loop.compile_model (prior.compile: true)
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DATASHEET_BF16 = 989e12  # H100/H200 dense bf16 datasheet rate, the second MFU denominator


class Ref(NamedTuple):
    """A public reference figure and where it comes from."""

    value: float
    source: str


_KEPT = ("measured on one H200 with the public reference code; the figure has been kept in bench/prior.py "
         "since a8337f4, the reference run itself is not recorded in this repository")
REF_GPT_TRAIN_B128 = Ref(576e3, f"LlamaGen GPT-B (github.com/FoundationVision/LlamaGen) training, batch 128: {_KEPT}")
REF_GPT_TRAIN_B64 = Ref(445e3, f"LlamaGen GPT-B training, batch 64: {_KEPT}")
REF_GPT_SAMPLE_COMPILED = Ref(211.0, f"LlamaGen GPT-B sampling with torch.compile, 64 images, cfg 2.0: {_KEPT}")
REF_GPT_SAMPLE_EAGER = Ref(20.0, f"LlamaGen GPT-B sampling, eager, 64 images, cfg 2.0: {_KEPT}")
REF_VAR_TRAIN_COMPILED = Ref(363.0, f"VAR-d16 (github.com/FoundationVision/VAR) training, compiled, batch 128: {_KEPT}")
REF_VAR_SAMPLE = Ref(208.0, f"VAR-d16 sampling, 64 images, cfg 1.5, top-k 900, top-p 0.96: {_KEPT}")
# the goals (no public source)
GOAL_GPT_TRAIN, GOAL_GPT_SAMPLE, GOAL_VAR_TRAIN, GOAL_VAR_SAMPLE = 750e3, 420.0, 470.0, 415.0


@dataclass(frozen=True)
class Item:
    name: str
    fn: Callable[["Ctx"], dict]
    device: str  # "cuda" | "cpu"
    group: str  # one of GROUPS
    what: str  # the row label in the report
    metric: str | None = None  # the result key the report shows as "measured"
    unit: str = ""
    ref: Ref | None = None
    goal: float | None = None
    needs: tuple[str, ...] = ()  # items run first whenever this one runs

    def meta(self) -> dict:
        return {"group": self.group, "device": self.device, "what": self.what, "metric": self.metric, "unit": self.unit,
                "reference": None if self.ref is None else self.ref._asdict(), "goal": self.goal}


@dataclass
class Ctx:
    """What an item gets: the device, the command's arguments, the output folder, and the
    records of the items run so far (``matmul_bf16``'s rate is the MFU denominator)."""

    device: torch.device
    args: argparse.Namespace
    out: Path
    records: dict[str, dict]

    def peak_flops(self) -> float | None:
        tflops = (self.records.get("matmul_bf16", {}).get("result") or {}).get("bf16_tflops")
        return None if tflops is None else tflops * 1e12


ITEMS: dict[str, Item] = {}


def item(device: str, group: str, what: str, metric: str | None = None, unit: str = "", ref: Ref | None = None,
         goal: float | None = None, needs: tuple[str, ...] = ()):
    """Register the decorated function ``fn(ctx) -> dict`` as the item ``fn.__name__``."""

    def deco(fn):
        assert device in ("cuda", "cpu") and group in GROUPS and fn.__name__ not in ITEMS, fn.__name__
        ITEMS[fn.__name__] = Item(fn.__name__, fn, device, group, what, metric, unit, ref, goal, tuple(needs))
        return fn

    return deco


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- measurement


def prior_config(kind: str, size: str, *, compile_mode: str | bool = False, **overrides: Any) -> PriorConfig:
    """The stage's ``PriorConfig`` with the bench's training settings (``overrides`` on top).

    ``compile_mode``: False (eager), or ``"regional"`` / True (``prior.compile: true``).
    """
    settings = dict(dropout=0.0, class_dropout=0.1, lr=3e-4, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.05,
                    betas=[0.9, 0.95], grad_clip=1.0, ema_decay=0.999, grad_accum=1, checkpoint_every=10**9,
                    eval_every=0, keep="last")
    settings.update(overrides)
    mode = compile_mode or False
    if mode is not False and mode is not True and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: allowed {', '.join(COMPILE_MODES)} or False")
    return PriorConfig(kind=kind, size=size, compile=mode is not False, **settings)


def measure_training(model, batch: int, seq: int, vocab: int, device, compile_mode: str | bool, steps: int, windows: int,
                     num_classes: int = 1000) -> dict:
    """Train with the real loop on random on-device codes; tokens/s of the last windows."""
    g = torch.Generator(device=device).manual_seed(0)
    pool = [(torch.randint(0, vocab, (batch, seq), device=device, generator=g),
             torch.randint(0, num_classes, (batch,), device=device, generator=g)) for _ in range(4)]

    def batches():
        i = 0
        while True:
            yield pool[i % len(pool)]
            i += 1

    cfg = prior_config(model.config["kind"], model.config["size"], compile_mode=compile_mode, steps=steps,
                       batch_size=batch, log_every=max(1, steps // windows))
    logs = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train_prior(model, batches(), cfg, device=device, progress=False,
                on_log=lambda s, m: (logs.append(m), log(f"      step {s}: {m['tokens_per_s']:.0f} tok/s loss {m['loss']:.3f}")))
    total = time.perf_counter() - t0
    med = steady_tokens_per_s(logs)  # the first window holds warm-up / compilation
    out = {"tokens_per_s": med, "step_ms": 1e3 * batch * seq / med, "total_s": round(total, 1),
           "compile": compile_mode or "eager", "batch": batch, "steps": steps}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def matmul_flops(device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def gpt_flops_per_token(model, seq: int) -> float:
    """6·N (N without the embedding tables) + causal attention (fwd 2·T·d per layer per token, ×3)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embedding" not in name)
    d = model.config["dim"]
    return 6 * n + 3 * 2 * seq * d * model.config["n_layer"]


def var_flops_per_image(model) -> float:
    """Per-token matmuls (blocks' qkv/proj/ffn, head, word_embed) ×6 per token, adaLN per image,
    block-causal attention (each token sees its own and coarser scales)."""
    n_tok = sum(p.numel() for name, p in model.named_parameters()
                if ("ada_lin" not in name and "head_ada" not in name and "class_emb" not in name and "pos" not in name
                    and "lvl_embed" not in name))
    n_img = sum(p.numel() for name, p in model.named_parameters() if "ada" in name)
    L = model.seq_len
    visible = sum(s * s * model.offsets[k + 1] for k, s in enumerate(model.scales))
    attn = 3 * 4 * visible * model.width * len(model.blocks)
    return 6 * n_tok * L + 6 * n_img + attn


def gpt_model(device, size="B", vocab=16384, side=16, num_classes=1000):
    torch.manual_seed(0)
    return build_prior(prior_config("gpt", size), vocab_size=vocab, layout=[(side, side)], num_classes=num_classes).to(device)


def var_model(device, size="d16", vocab=4096, scales=VAR_SCALES, num_classes=1000):
    torch.manual_seed(0)
    tok = StandInScaleTokenizer(vocab, 32, list(scales)).to(device)
    return build_prior(prior_config("var", size), vocab_size=vocab, layout=[(s, s) for s in scales],
                       num_classes=num_classes, tokenizer=tok).to(device)


def time_sampling(model, labels, reps: int, **kw) -> tuple[float, float]:
    """(first call s, best timed call s): the first call holds compilation / capture."""
    dev = labels.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.sample(labels, generator=torch.Generator(device=dev).manual_seed(0), **kw)
    sync()
    first = time.perf_counter() - t0
    best = float("inf")
    for r in range(reps):
        t0 = time.perf_counter()
        model.sample(labels, generator=torch.Generator(device=dev).manual_seed(r + 1), **kw)
        sync()
        best = min(best, time.perf_counter() - t0)
    return first, best


def agreement_with_eager(model, labels, **kw) -> dict:
    """The model's current (compiled / graphed) sampler against the eager loop, same seed:
    compiled kernels round differently, so under compile a share of codes may differ.
    Leaves the model in eager mode."""
    dev = labels.device
    g = model.sample(labels, generator=torch.Generator(device=dev).manual_seed(7), **kw)
    model.compile_sampling("eager")
    e = model.sample(labels, generator=torch.Generator(device=dev).manual_seed(7), **kw)
    return {"codes_equal_eager": bool(torch.equal(g, e)), "codes_agree_frac": (g == e).float().mean().item()}


def sdpa_priority(first: str):
    """A context that puts one SDPA backend first (``"default"``: leave torch's order)."""
    if first == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if first == "flash":
        order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority, only the allowed set
        return sdpa_kernel(order)


def profile_decode(model, device, path: Path, steps: int = 8) -> str:
    """The CUDA kernels of gpt decode steps (compiled, not graphed, so each kernel is listed):
    128 rows (64 images under guidance), the cache half full."""
    from torch.profiler import ProfilerActivity, profile

    from arvision.priors.sampling import exp_noise, gpt_decode_and_sample

    B, V = 64, model.vocab_size
    model.setup_caches(2 * B)
    step = torch.compile(gpt_decode_and_sample, fullgraph=True)
    tok = torch.zeros(B, dtype=torch.long, device=device)
    pos = torch.full((1,), 128, dtype=torch.long, device=device)
    noise = exp_noise((B, V), None, device)
    with torch.no_grad():
        for _ in range(3):
            step(model, tok, pos, noise, 2.0, 1.0, 0, 1.0, True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(model, tok, pos, noise, 2.0, 1.0, 0, 1.0, True)
            torch.cuda.synchronize()
    ka = prof.key_averages()
    table = ka.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
    path.write_text(f"{steps} decode steps\n" + table)
    return table


def profile_steps(model, batch, seq, vocab, device, compile_mode, path: Path, steps: int = 3) -> str:
    """The CUDA kernels of a few training steps (already compiled), top 25 by device time."""
    from torch.profiler import ProfilerActivity, profile

    measure_training(model, batch, seq, vocab, device, compile_mode, steps=2, windows=1)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        measure_training(model, batch, seq, vocab, device, compile_mode, steps=steps, windows=1)
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = ka.table(sort_by=key, row_limit=25, max_name_column_width=90)
            break
        except Exception:  # noqa: BLE001
            table = ""
    path.write_text(table)
    return table


def _mfu(ctx: Ctx, flops_per_s: float, datasheet: bool = False) -> dict:
    peak = ctx.peak_flops()
    out = {"mfu": None if peak is None else flops_per_s / peak}
    if datasheet:
        out["mfu_vs_989"] = flops_per_s / DATASHEET_BF16
    return out


def _gpt_train(ctx: Ctx, compile_mode: str | bool, batch: int, sdpa: str = "default", coordinate_tuning: bool = False) -> dict:
    import torch._inductor.config as ic

    model = gpt_model(ctx.device)
    before = ic.coordinate_descent_tuning
    ic.coordinate_descent_tuning = coordinate_tuning  # Inductor tunes its pointwise/reduction launch configs
    try:
        with sdpa_priority(sdpa):
            res = measure_training(model, batch, 256, 16384, ctx.device, compile_mode, steps=ctx.args.gpt_steps, windows=4)
    finally:
        ic.coordinate_descent_tuning = before
    res.update(_mfu(ctx, res["tokens_per_s"] * gpt_flops_per_token(model, 256), datasheet=True))
    return res


def _var_train(ctx: Ctx, compile_mode: str | bool, batch: int, sdpa: str = "default", attention: str | None = None) -> dict:
    model = var_model(ctx.device)
    if attention is not None:
        model.set_attention(attention)
    with sdpa_priority(sdpa):
        res = measure_training(model, batch, model.seq_len, 4096, ctx.device, compile_mode, steps=ctx.args.var_steps, windows=3)
    res["images_per_s"] = res["tokens_per_s"] / model.seq_len
    res["attention"] = model.attn_impl
    res.update(_mfu(ctx, res["images_per_s"] * var_flops_per_image(model)))
    return res


def _gpt_sample(ctx: Ctx, mode: str) -> dict:
    """gpt-B, bf16 weights: 64 images × 256 tokens, guidance 2.0 (128 rows)."""
    model = gpt_model(ctx.device).to(torch.bfloat16).eval()
    model.compile_sampling(mode)
    labels = torch.arange(64, device=ctx.device) % 1000
    first, best = time_sampling(model, labels, reps=3 if mode != "eager" else 1, cfg_scale=2.0)
    res = {"mode": mode, "images_per_s": 64 / best, "s_per_batch": best, "first_call_s": first}
    if mode != "eager":
        res.update(agreement_with_eager(model, labels, cfg_scale=2.0))
    return res


def _var_sample(ctx: Ctx, mode: str) -> dict:
    """var-d16, bf16: 64 images, guidance 1.5, top-k 900, top-p 0.96; the stand-in tokenizer in fp32."""
    model = var_model(ctx.device).to(torch.bfloat16).eval()
    model.tokenizer.float()
    model.compile_sampling(mode)
    labels = torch.arange(64, device=ctx.device) % 1000
    kw = dict(cfg_scale=1.5, top_k=900, top_p=0.96)
    first, best = time_sampling(model, labels, reps=3, **kw)
    res = {"mode": mode, "images_per_s": 64 / best, "s_per_batch": best, "first_call_s": first}
    if mode != "eager":
        res.update(agreement_with_eager(model, labels, **kw))
    return res


# --------------------------------------------------------------------------- CUDA items (in order of importance)

MM = ("matmul_bf16",)  # the MFU denominator: runs before any training item


@item("cuda", "matmul", "bf16 matmul 8192³ (the MFU denominator)", "bf16_tflops", "TFLOP/s")
def matmul_bf16(ctx: Ctx) -> dict:
    return {"bf16_tflops": matmul_flops(ctx.device) / 1e12}


@item("cuda", "check", "compiled (fused) cross-entropy against the eager one, gpt-B shapes")
def check_fused_ce(ctx: Ctx) -> dict:
    from arvision.priors.blocks import cross_entropy, fused_cross_entropy

    device = ctx.device
    model = gpt_model(device).eval()
    codes = torch.randint(0, 16384, (32, 256), device=device)
    labels = torch.randint(0, 1000, (32,), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(codes, labels)
    a = logits.detach().requires_grad_()
    b = logits.detach().requires_grad_()
    la, lb = cross_entropy(a, codes, 16384), fused_cross_entropy(b, codes, 16384)
    la.backward()
    lb.backward()
    gerr = ((a.grad.float() - b.grad.float()).norm() / a.grad.float().norm()).item()
    return {"eager": la.item(), "fused": lb.item(), "grad_rel_err": gerr}


@item("cuda", "var_train", "var-d16 train b128, compile `regional`", "images_per_s", "img/s", REF_VAR_TRAIN_COMPILED,
      GOAL_VAR_TRAIN, MM)
def var_train_regional_b128(ctx: Ctx) -> dict:
    return _var_train(ctx, "regional", 128)


@item("cuda", "var_sample", "var-d16 sample 64 img, `compile+cudagraph`", "images_per_s", "img/s", REF_VAR_SAMPLE,
      GOAL_VAR_SAMPLE)
def var_sample_compile_cudagraph(ctx: Ctx) -> dict:
    return _var_sample(ctx, "compile+cudagraph")


@item("cuda", "gpt_sample", "gpt-B sample 64 img, cfg 2.0, `compile+graph` (the whole sequence as one CUDA graph)",
      "images_per_s", "img/s", REF_GPT_SAMPLE_COMPILED, GOAL_GPT_SAMPLE)
def gpt_sample_compile_graph(ctx: Ctx) -> dict:
    return _gpt_sample(ctx, "compile+graph")


@item("cuda", "var_train", "var-d16 train b128, `regional`, flash SDPA backend first", "images_per_s", "img/s",
      REF_VAR_TRAIN_COMPILED, GOAL_VAR_TRAIN, MM)
def var_train_regional_flash_first_b128(ctx: Ctx) -> dict:
    return _var_train(ctx, "regional", 128, sdpa="flash")


@item("cuda", "profile", "top CUDA kernels of 8 compiled gpt-B decode steps (128 rows)")
def profile_gpt_decode(ctx: Ctx) -> dict:
    log(profile_decode(gpt_model(ctx.device).to(torch.bfloat16).eval(), ctx.device, ctx.out / "profile_gpt_decode.txt"))
    return {"file": "profile_gpt_decode.txt"}


@item("cuda", "var_train", "var-d16 train b64, `regional`", "images_per_s", "img/s", None, None, MM)
def var_train_regional_b64(ctx: Ctx) -> dict:
    return _var_train(ctx, "regional", 64)


@item("cuda", "gpt_train", "gpt-B train b128, compile `regional`", "tokens_per_s", "tok/s", REF_GPT_TRAIN_B128,
      GOAL_GPT_TRAIN, MM)
def gpt_train_regional_b128(ctx: Ctx) -> dict:
    return _gpt_train(ctx, "regional", 128)


@item("cuda", "gpt_train", "gpt-B train b128, `regional` + Inductor coordinate-descent tuning", "tokens_per_s", "tok/s",
      REF_GPT_TRAIN_B128, GOAL_GPT_TRAIN, MM)
def gpt_train_regional_coordtune_b128(ctx: Ctx) -> dict:
    return _gpt_train(ctx, "regional", 128, coordinate_tuning=True)


# The one-GPU presets' priors (configs/gpu/*.yaml), for the prior stage's steady-state tokens/s
# against the bare loop's at the same model and batch (bench/gpu_pipeline.py gives the stage's)
@item("cuda", "gpt_train", "gpt-medium train b128, 16x16 codes of 1024 (preset token-64), `regional`", "tokens_per_s", "tok/s")
def gpt_medium_train_token64(ctx: Ctx) -> dict:
    model = gpt_model(ctx.device, size="medium", vocab=1024, side=16, num_classes=64)
    return measure_training(model, 128, 256, 1024, ctx.device, "regional", steps=ctx.args.gpt_steps, windows=4, num_classes=64)


@item("cuda", "gpt_train", "gpt-small train b64, 32x32 palette indices of 16 (preset pixel-32), `regional`", "tokens_per_s", "tok/s")
def gpt_small_train_pixel32(ctx: Ctx) -> dict:
    model = gpt_model(ctx.device, size="small", vocab=16, side=32, num_classes=64)
    return measure_training(model, 64, 1024, 16, ctx.device, "regional", steps=ctx.args.gpt_steps, windows=4, num_classes=64)


@item("cuda", "var_train", "var-d8 train b128, 8 scales to 16x16, 1024 codes (preset scale-64), `regional`", "tokens_per_s", "tok/s")
def var_d8_train_scale64(ctx: Ctx) -> dict:
    model = var_model(ctx.device, size="d8", vocab=1024, scales=(1, 2, 3, 4, 6, 8, 12, 16), num_classes=64)
    res = measure_training(model, 128, model.seq_len, 1024, ctx.device, "regional", steps=ctx.args.var_steps, windows=3, num_classes=64)
    res["images_per_s"] = res["tokens_per_s"] / model.seq_len
    return res


@item("cuda", "gpt_train", "gpt-B train b64, compile `regional`", "tokens_per_s", "tok/s", REF_GPT_TRAIN_B64, None, MM)
def gpt_train_regional_b64(ctx: Ctx) -> dict:
    return _gpt_train(ctx, "regional", 64)


@item("cuda", "var_train", "var-d16 train b128, `regional`, one SDPA call with the dense mask (control)", "images_per_s",
      "img/s", REF_VAR_TRAIN_COMPILED, GOAL_VAR_TRAIN, MM)
def var_train_regional_dense_mask_b128(ctx: Ctx) -> dict:
    return _var_train(ctx, "regional", 128, attention="sdpa")


@item("cuda", "profile", "top CUDA kernels of 2 compiled (`regional`) var-d16 training steps, b128")
def profile_var_regional_b128(ctx: Ctx) -> dict:
    model = var_model(ctx.device)
    log(profile_steps(model, 128, model.seq_len, 4096, ctx.device, "regional", ctx.out / "profile_var.txt", steps=2))
    return {"file": "profile_var.txt"}


@item("cuda", "gpt_sample", "gpt-B sample 64 img, cfg 2.0, eager", "images_per_s", "img/s", REF_GPT_SAMPLE_EAGER)
def gpt_sample_eager(ctx: Ctx) -> dict:
    return _gpt_sample(ctx, "eager")


@item("cuda", "var_sample", "var-d16 sample 64 img, eager", "images_per_s", "img/s", REF_VAR_SAMPLE, GOAL_VAR_SAMPLE)
def var_sample_eager(ctx: Ctx) -> dict:
    return _var_sample(ctx, "eager")


# --------------------------------------------------------------------------- CPU items (the tiny sizes)

CPU_VAR_SCALES = (1, 2, 3, 4, 6, 8)


@item("cpu", "gpt_train", "gpt tiny train, vocab 512, 8×8 codes, batch 64, eager", "tokens_per_s", "tok/s")
def cpu_gpt_tiny_train(ctx: Ctx) -> dict:
    model = gpt_model(ctx.device, "tiny", vocab=512, side=8, num_classes=10)
    res = measure_training(model, 64, 64, 512, ctx.device, False, steps=ctx.args.cpu_steps, windows=4, num_classes=10)
    res["params"] = sum(p.numel() for p in model.parameters())
    return res


@item("cpu", "gpt_sample", "gpt tiny sample 64 img, cfg 2.0, eager", "images_per_s", "img/s")
def cpu_gpt_tiny_sample(ctx: Ctx) -> dict:
    model = gpt_model(ctx.device, "tiny", vocab=512, side=8, num_classes=10).eval()
    first, best = time_sampling(model, torch.arange(64) % 10, reps=2, cfg_scale=2.0)
    return {"mode": "eager", "images_per_s": 64 / best, "s_per_batch": best, "first_call_s": first}


@item("cpu", "var_train", "var tiny train, vocab 512, scales 1-8 (130 tokens), batch 64, eager", "images_per_s", "img/s")
def cpu_var_tiny_train(ctx: Ctx) -> dict:
    model = var_model(ctx.device, "tiny", vocab=512, scales=CPU_VAR_SCALES, num_classes=10)
    res = measure_training(model, 64, model.seq_len, 512, ctx.device, False, steps=ctx.args.cpu_steps, windows=4,
                           num_classes=10)
    res["images_per_s"] = res["tokens_per_s"] / model.seq_len
    res["attention"] = model.attn_impl
    res["params"] = sum(p.numel() for p in model.parameters())
    return res


@item("cpu", "var_sample", "var tiny sample 64 img, cfg 2.0, eager", "images_per_s", "img/s")
def cpu_var_tiny_sample(ctx: Ctx) -> dict:
    model = var_model(ctx.device, "tiny", vocab=512, scales=CPU_VAR_SCALES, num_classes=10).eval()
    first, best = time_sampling(model, torch.arange(64) % 10, reps=2, cfg_scale=2.0)
    return {"mode": "eager", "images_per_s": 64 / best, "s_per_batch": best, "first_call_s": first}


# --------------------------------------------------------------------------- runner


def select(device: str, only: str) -> list[str]:
    """The items of ``device`` named (or whose group is named) in the comma list ``only`` (all
    when empty), with what they need, in registry order."""
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    unknown = wanted - set(ITEMS) - set(GROUPS)
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))} (items: --list; groups: {', '.join(GROUPS)})")
    chosen = {n for n, it in ITEMS.items() if it.device == device and (not wanted or n in wanted or it.group in wanted)}
    chosen |= {need for n in chosen for need in ITEMS[n].needs}
    return [n for n in ITEMS if n in chosen]


def device_name(args) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0]  # the dev machine is shared: a load above the core count slows every figure
    return (f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, "
            f"load average {load:.1f} at start")


def default_out(device: str, when: dt.datetime) -> Path:
    base = ROOT / "bench" / "results" / f"{when:%Y-%m-%d}-prior-{device}"
    out, n = base, 1
    while (out / "prior_bench.json").exists():  # never overwrite an earlier run of the same day
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def utc(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def run(args) -> Path:
    """Run the selected items; returns the path of the JSON written."""
    names = select(args.device, args.only)
    start = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out) if args.out else default_out(args.device, start)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prior_bench.json"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads)
    commit, dirty = git_commit()
    record = {
        "kind": "prior_bench", "schema": SCHEMA, "history": False, "commit": commit, "dirty": dirty,
        "command": shlex.join([sys.executable, *sys.argv]), "device": device_name(args), "torch": torch.__version__,
        "python": platform.python_version(), "settings": vars(args), "started_utc": utc(start), "finished_utc": None,
        "complete": False, "items": {},
    }
    log(f"{len(names)} items on {record['device']} → {path}")
    ctx = Ctx(device, args, out, record["items"])
    t_start = time.perf_counter()
    try:
        for name in names:
            it = ITEMS[name]
            rec = record["items"][name] = it.meta()
            if time.perf_counter() - t_start > args.budget_s:
                rec.update(status="skipped", error=f"not started: past --budget-s {args.budget_s:g}")
                log(f"--- {name}: skipped (past --budget-s {args.budget_s:g})")
                continue
            run_item(it, ctx, rec)
            write_json(path, record)  # partial results survive a timeout
        record["complete"] = True
    except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured
        log("interrupted: writing the items measured so far")
        record["interrupted"] = True
        for rec in record["items"].values():
            rec.setdefault("status", "error")
            rec.setdefault("error", "interrupted")
    record["finished_utc"] = utc(dt.datetime.now(dt.timezone.utc))
    write_json(path, record)
    log(f"wrote {path}")
    return path


def run_item(it: Item, ctx: Ctx, rec: dict) -> None:
    """Run one item into ``rec``; an error is recorded, never raised."""
    t0 = time.perf_counter()
    log(f"--- {it.name}")
    try:
        rec["result"] = it.fn(ctx)
        rec["status"] = "ok"
        log(f"    {json.dumps(rec['result'], default=str)}")
    except Exception as e:  # noqa: BLE001
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    finally:
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()


def list_items() -> None:
    for device in ("cuda", "cpu"):
        print(f"{device}:")
        for it in ITEMS.values():
            if it.device == device:
                ref = f"  [ref {it.ref.value:,.0f} {it.unit}]" if it.ref else ""
                print(f"  {it.name:38s} {it.group:11s} {it.what}{ref}")
    print(f"groups: {', '.join(GROUPS)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default="", help="comma list of item names or groups (default: every item of --device)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no item after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="folder for prior_bench.json and profiles (default $OUT, else bench/results/<date>-prior-<device>)")
    ap.add_argument("--list", action="store_true", help="list the items and exit")
    ap.add_argument("--report", action="store_true", help="regenerate bench/RESULTS.md from bench/results/ and exit")
    ap.add_argument("--gpt-steps", type=int, default=40)
    ap.add_argument("--var-steps", type=int, default=24)
    ap.add_argument("--cpu-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    args = ap.parse_args(argv)
    if args.list:
        return list_items()
    if args.report:
        from bench import report

        raise SystemExit(report.main([]))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    run(args)


if __name__ == "__main__":
    main()
