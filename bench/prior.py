"""Prior benchmark: training and sampling speed of the AR priors, beside public references.

GPU (one call does the whole measurement; random weights, random codes):
  1. gpt B (vocab 16384, 256 tokens + class token, bf16 autocast): training tokens/s, step
     time, peak memory at batch 128 by compile mode (``regional``: each block + the fused loss;
     ``blocks``: each block only; ``whole``), SDPA backend order (default / cuDNN first); MFU
     against the bf16 matmul rate measured in the same run (8192³), counting 6·N·tokens
     (N: parameters that multiply, i.e. all but the embedding tables) + causal attention.
  2. gpt B sampling: 64 images × 256 tokens, guidance 2.0 (128 rows), bf16 weights, decode step
     compiled and replayed as a CUDA graph (default or max-autotune kernels).
  3. var d16, scales 1..16 (680 tokens), vocab 4096, Cvae 32: training images/s at batch 128;
     sampling images/s at batch 64, guidance 1.5, top-k 900, top-p 0.96, eager and as one CUDA
     graph, transformer only (a random stand-in for the tokenizer's next_scale_input).
  4. profiles (top CUDA kernels of a few compiled training steps) under $OUT.
Items run in order of importance; none starts after ``--budget-s`` seconds.
CPU (``--device cpu``, run on the 2-core dev machine): the tiny sizes.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/prior.py --device cuda --out $OUT
    PYTHONPATH=. .venv/bin/python bench/prior.py --device cpu --gpu-results <fetched prior_bench.md> --append

Each item runs under try/except and prints as it goes; a failure loses only that item.
Imports torch, einops and the standard library only (no pydantic / yaml / ray).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace as NS

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arvision.priors import build_prior  # noqa: E402
from arvision.priors.var import StandInScaleTokenizer  # noqa: E402
from arvision.train.loop import train_prior  # noqa: E402

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
REF = {  # public reference figures on an H200 (LlamaGen GPT-B, VAR-d16)
    "gpt_train_b128": 576e3, "gpt_train_b64": 445e3, "gpt_sample_compiled": 211.0, "gpt_sample_eager": 20.0,
    "var_train_eager_b128": 206.0, "var_train_compiled_b128": 363.0, "var_sample": 208.0,
}
GOAL = {"gpt_train": 750e3, "gpt_mfu": 0.55, "gpt_sample": 420.0, "var_train": 470.0, "var_sample": 415.0}

RESULTS: dict[str, dict] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def item(name: str):
    """Run one measurement; record its result or its error, never stop the others."""

    def deco(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            log(f"--- {name}")
            try:
                res = fn(*a, **kw)
                res["wall_s"] = round(time.perf_counter() - t0, 1)
                RESULTS[name] = res
                log(f"    {json.dumps(res)}")
            except Exception as e:  # noqa: BLE001
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                traceback.print_exc()
            finally:
                if os.environ.get("OUT"):  # partial results survive a timeout
                    Path(os.environ["OUT"], "partial.json").write_text(json.dumps(RESULTS, indent=1, default=str))
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                torch._dynamo.reset()

        return run

    return deco


def train_cfg(steps: int, log_every: int, compile_: bool) -> NS:
    return NS(steps=steps, lr=3e-4, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.05, betas=[0.9, 0.95], grad_clip=1.0,
              ema_decay=0.999, grad_accum=1, log_every=log_every, checkpoint_every=10**9, compile=compile_)


def measure_training(model, batch: int, seq: int, vocab: int, device, compile_: bool, steps: int, windows: int, num_classes=1000):
    """Train with the real loop on random on-device codes; tokens/s of the last windows."""
    g = torch.Generator(device=device).manual_seed(0)
    pool = [(torch.randint(0, vocab, (batch, seq), device=device, generator=g),
             torch.randint(0, num_classes, (batch,), device=device, generator=g)) for _ in range(4)]

    def batches():
        i = 0
        while True:
            yield pool[i % len(pool)]
            i += 1

    logs = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log_every = max(1, steps // windows)
    t0 = time.perf_counter()
    train_prior(model, batches(), train_cfg(steps, log_every, compile_), device=device, progress=False,
                on_log=lambda s, m: (logs.append(m), log(f"      step {s}: {m['tokens_per_s']:.0f} tok/s loss {m['loss']:.3f}")))
    total = time.perf_counter() - t0
    tps = sorted(m["tokens_per_s"] for m in logs[1:]) or [logs[-1]["tokens_per_s"]]
    med = tps[len(tps) // 2]  # the first window holds warm-up / compilation
    out = {"tokens_per_s": med, "step_ms": 1e3 * batch * seq / med, "total_s": round(total, 1)}
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


def gpt_b(device, vocab=16384):
    torch.manual_seed(0)
    cfg = NS(kind="gpt", size="B", dropout=0.0, class_dropout=0.1)
    return build_prior(cfg, vocab_size=vocab, layout=[(16, 16)], num_classes=1000).to(device)


def var_d16(device, size="d16", vocab=4096, scales=VAR_SCALES):
    torch.manual_seed(0)
    tok = StandInScaleTokenizer(vocab, 32, list(scales)).to(device)
    cfg = NS(kind="var", size=size, dropout=0.0, class_dropout=0.1)
    return build_prior(cfg, vocab_size=vocab, layout=[(s, s) for s in scales], num_classes=1000, tokenizer=tok).to(device)


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


# --------------------------------------------------------------------------- GPU items


def sdpa_priority(first: str):
    """A context that puts one SDPA backend first (``"default"``: leave torch's order)."""
    import contextlib

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


def profile_steps(model, batch, seq, vocab, device, compile_, path: Path, steps: int = 3) -> str:
    """The CUDA kernels of a few training steps (already compiled), top 25 by device time."""
    from torch.profiler import ProfilerActivity, profile

    measure_training(model, batch, seq, vocab, device, compile_, steps=2, windows=1)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        measure_training(model, batch, seq, vocab, device, compile_, steps=steps, windows=1)
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = ka.table(sort_by=key, row_limit=25, max_name_column_width=90)
            break
        except Exception:  # noqa: BLE001
            table = ""
    path.write_text(table)
    return table


def run_gpu(args) -> None:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    only = set(args.only.split(",")) if args.only else None
    t_start = time.perf_counter()
    out_dir = Path(args.out) if args.out else None

    def want(tag):
        if time.perf_counter() - t_start > args.budget_s:
            log(f"--- {tag}: skipped (past --budget-s {args.budget_s})")
            return False
        return only is None or tag.split(":")[0] in only or tag.split(":")[-1] in only

    @item("matmul")
    def _mm():
        return {"bf16_tflops": matmul_flops(device) / 1e12}

    _mm()
    peak = RESULTS.get("matmul", {}).get("bf16_tflops", 790.0) * 1e12

    def gpt_train(compile_, batch=128, sdpa="default", tuning=False):
        name = f"gpt_train_{compile_ or 'eager'}{'_' + sdpa if sdpa != 'default' else ''}{'_cdt' if tuning else ''}_b{batch}"
        if not want("gpt_train:" + name):
            return

        @item(name)
        def _t():
            import torch._inductor.config as ic

            model = gpt_b(device)
            ic.coordinate_descent_tuning = tuning  # Inductor tunes its pointwise/reduction launch configs
            with sdpa_priority(sdpa):
                res = measure_training(model, batch, 256, 16384, device, compile_, steps=args.gpt_steps, windows=4)
            fpt = gpt_flops_per_token(model, 256)
            res["mfu"] = res["tokens_per_s"] * fpt / peak
            res["mfu_vs_989"] = res["tokens_per_s"] * fpt / 989e12
            return res

        _t()

    def var_train(compile_, batch=128, sdpa="default", attn="split"):
        name = f"var_train_{compile_ or 'eager'}_{attn}{'_' + sdpa if sdpa != 'default' else ''}_b{batch}"
        if not want("var_train:" + name):
            return

        @item(name)
        def _v():
            model = var_d16(device)
            model.set_attention(attn)
            with sdpa_priority(sdpa):
                res = measure_training(model, batch, model.seq_len, 4096, device, compile_, steps=args.var_steps, windows=3)
            res["images_per_s"] = res["tokens_per_s"] / model.seq_len
            res["mfu"] = res["images_per_s"] * var_flops_per_image(model) / peak
            return res

        _v()

    def gpt_sample(mode):
        if not want("gpt_sample:" + mode):
            return

        @item(f"gpt_sample_{mode}")
        def _s():
            model = gpt_b(device).to(torch.bfloat16).eval()
            model.compile_sampling(mode)
            labels = torch.arange(64, device=device) % 1000
            first, best = time_sampling(model, labels, reps=3 if mode != "eager" else 1, cfg_scale=2.0)
            res = {"images_per_s": 64 / best, "s_per_batch": best, "first_call_s": first}
            if mode != "eager":
                res.update(agreement_with_eager(model, labels, cfg_scale=2.0))
            return res

        _s()

    if want("check"):

        @item("check_fused_ce")
        def _ce():  # the compiled loss equals the eager one on gpt-B's real shapes
            model = gpt_b(device).eval()
            codes = torch.randint(0, 16384, (32, 256), device=device)
            labels = torch.randint(0, 1000, (32,), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(codes, labels)
            from arvision.priors.blocks import cross_entropy, fused_cross_entropy

            a = logits.detach().requires_grad_()
            b = logits.detach().requires_grad_()
            la, lb = cross_entropy(a, codes, 16384), fused_cross_entropy(b, codes, 16384)
            la.backward()
            lb.backward()
            gerr = ((a.grad.float() - b.grad.float()).norm() / a.grad.float().norm()).item()
            return {"eager": la.item(), "fused": lb.item(), "grad_rel_err": gerr}

        _ce()

    var_train("regional")
    if want("var_sample"):
        for mode in ("cudagraph", "compile+cudagraph"):

            @item(f"var_sample_{mode}")
            def _vs(mode=mode):
                model = var_d16(device).to(torch.bfloat16).eval()
                model.tokenizer.float()
                model.compile_sampling(mode)
                labels = torch.arange(64, device=device) % 1000
                kw = dict(cfg_scale=1.5, top_k=900, top_p=0.96)
                first, best = time_sampling(model, labels, reps=3, **kw)
                res = {"images_per_s": 64 / best, "s_per_batch": best, "first_call_s": first}
                res.update(agreement_with_eager(model, labels, **kw))
                return res

            _vs()
    gpt_sample("compile+cudagraph")
    gpt_sample("compile+graph")
    var_train("regional", sdpa="flash")
    if want("profile") and out_dir is not None:

        @item("profile_gpt_decode")
        def _pd():
            table = profile_decode(gpt_b(device).to(torch.bfloat16).eval(), device, out_dir / "profile_gpt_decode.txt")
            log(table)
            return {"file": "profile_gpt_decode.txt"}

        _pd()
    var_train("regional", batch=64)
    gpt_train("regional")
    gpt_train("regional", tuning=True)
    gpt_train("regional", batch=64)
    var_train("regional", attn="sdpa")  # control: one SDPA call with the dense mask (run 2's setting)
    gpt_train("whole")
    if want("profile") and out_dir is not None:

        @item("profile_var_regional_b128")
        def _pv():
            model = var_d16(device)
            table = profile_steps(model, 128, model.seq_len, 4096, device, "regional", out_dir / "profile_var.txt", steps=2)
            log(table)
            return {"file": "profile_var.txt"}

        _pv()


# --------------------------------------------------------------------------- CPU items


def run_cpu(args) -> None:
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)

    @item("cpu_gpt_tiny_train")
    def _gt():
        torch.manual_seed(0)
        model = build_prior(NS(kind="gpt", size="tiny", dropout=0.0, class_dropout=0.1), vocab_size=512, layout=[(8, 8)], num_classes=10)
        res = measure_training(model, 64, 64, 512, device, False, steps=args.cpu_steps, windows=4, num_classes=10)
        res["params"] = sum(p.numel() for p in model.parameters())
        return res

    @item("cpu_gpt_tiny_sample")
    def _gs():
        torch.manual_seed(0)
        model = build_prior(NS(kind="gpt", size="tiny", dropout=0.0, class_dropout=0.1), vocab_size=512, layout=[(8, 8)], num_classes=10).eval()
        first, best = time_sampling(model, torch.arange(64) % 10, reps=2, cfg_scale=2.0)
        return {"images_per_s": 64 / best, "s_per_batch": best}

    scales = (1, 2, 3, 4, 6, 8)

    @item("cpu_var_tiny_train")
    def _vt():
        model = var_d16(device, size="tiny", vocab=512, scales=scales)
        res = measure_training(model, 64, model.seq_len, 512, device, False, steps=args.cpu_steps, windows=4, num_classes=10)
        res["images_per_s"] = res["tokens_per_s"] / model.seq_len
        res["params"] = sum(p.numel() for p in model.parameters())
        return res

    @item("cpu_var_tiny_sample")
    def _vs():
        model = var_d16(device, size="tiny", vocab=512, scales=scales).eval()
        first, best = time_sampling(model, torch.arange(64) % 10, reps=2, cfg_scale=2.0)
        return {"images_per_s": 64 / best, "s_per_batch": best}

    for f in (_gt, _gs, _vt, _vs):
        f()


# --------------------------------------------------------------------------- report


def fmt(x, unit="", scale=1.0, digits=0):
    return "—" if x is None else f"{x / scale:,.{digits}f}{unit}"


def ratio(x, ref):
    return "—" if x is None or not ref else f"{x / ref:.2f}×"


def get(name, key):
    return RESULTS.get(name, {}).get(key)


RUN1 = {"gpt_train": 554_224, "gpt_sample": 256.9, "var_train": 349.9, "var_sample": 258.9}  # bench/RESULTS.md, run 1


def gpu_table() -> str:
    rows = ["| item | measured | reference | ratio | vs run 1 | goal | notes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    mm = get("matmul", "bf16_tflops")
    rows.append(f"| bf16 matmul 8192³ | {fmt(mm, ' TFLOP/s')} | — | — | — | — | MFU denominator |")
    for n, r in RESULTS.items():
        err = r.get("error")
        if n.startswith("gpt_train_"):
            ref = REF["gpt_train_b128"] if n.endswith("b128") else REF["gpt_train_b64"]
            note = err or (f"step {fmt(r.get('step_ms'), ' ms', digits=1)}, peak {fmt(r.get('peak_mem_gib'), ' GiB', digits=1)}, "
                           f"MFU {fmt((r.get('mfu') or 0) * 100, '%', digits=1)} (vs 989: {fmt((r.get('mfu_vs_989') or 0) * 100, '%', digits=1)})")
            rows.append(f"| gpt-B train {n[len('gpt_train_'):]} (tok/s) | {fmt(r.get('tokens_per_s'))} | {fmt(ref)} | "
                        f"{ratio(r.get('tokens_per_s'), ref)} | {ratio(r.get('tokens_per_s'), RUN1['gpt_train'])} | {fmt(GOAL['gpt_train'])} | {note} |")
        elif n.startswith("gpt_sample_"):
            mode = n[len("gpt_sample_"):]
            ref = REF["gpt_sample_eager"] if mode == "eager" else REF["gpt_sample_compiled"]
            note = err or f"first call {fmt(r.get('first_call_s'), ' s', digits=1)}"
            rows.append(f"| gpt-B sample 64 img, cfg 2.0, {mode} (img/s) | {fmt(r.get('images_per_s'), digits=1)} | {fmt(ref)} | "
                        f"{ratio(r.get('images_per_s'), ref)} | {ratio(r.get('images_per_s'), RUN1['gpt_sample'])} | {fmt(GOAL['gpt_sample'])} | {note} |")
        elif n.startswith("var_train_"):
            ref = REF["var_train_compiled_b128"] if "eager" not in n else REF["var_train_eager_b128"]
            note = err or (f"step {fmt(r.get('step_ms'), ' ms', digits=1)}, peak {fmt(r.get('peak_mem_gib'), ' GiB', digits=1)}, "
                           f"MFU {fmt((r.get('mfu') or 0) * 100, '%', digits=1)}")
            rows.append(f"| var-d16 train {n[len('var_train_'):]} (img/s) | {fmt(r.get('images_per_s'), digits=1)} | "
                        f"{fmt(ref)} (b128) | {ratio(r.get('images_per_s'), ref)} | {ratio(r.get('images_per_s'), RUN1['var_train'])} | "
                        f"{fmt(GOAL['var_train'])} | {note} |")
        elif n.startswith("var_sample_"):
            note = err or (f"cfg 1.5 (VAR's), top-k 900, top-p 0.96; first call {fmt(r.get('first_call_s'), ' s', digits=1)}"
                           + (f"; codes equal eager: {r['codes_equal_eager']}" if "codes_equal_eager" in r else ""))
            rows.append(f"| var-d16 sample 64 img, {n[len('var_sample_'):]} (img/s) | {fmt(r.get('images_per_s'), digits=1)} | "
                        f"{fmt(REF['var_sample'])} | {ratio(r.get('images_per_s'), REF['var_sample'])} | "
                        f"{ratio(r.get('images_per_s'), RUN1['var_sample'])} | {fmt(GOAL['var_sample'])} | {note} |")
        elif n.startswith(("check_", "profile_")):
            rows.append(f"| {n} | {err or json.dumps({k: v for k, v in r.items() if k != 'wall_s'})} | | | | | |")
    return "\n".join(rows)


def cpu_table() -> str:
    rows = ["| item (CPU) | params | measured |", "| --- | --- | --- |"]
    r = RESULTS.get("cpu_gpt_tiny_train", {})
    rows.append(f"| gpt tiny train, vocab 512, 8×8, batch 64 | {fmt(r.get('params'))} | {fmt(r.get('tokens_per_s'))} tok/s ({fmt(r.get('step_ms'), ' ms/step', digits=0)}) |")
    r = RESULTS.get("cpu_gpt_tiny_sample", {})
    rows.append(f"| gpt tiny sample 64 img, cfg 2.0 | | {fmt(r.get('images_per_s'), digits=1)} img/s |")
    r = RESULTS.get("cpu_var_tiny_train", {})
    rows.append(f"| var tiny train, vocab 512, scales 1-8 (130 tok), batch 64 | {fmt(r.get('params'))} | {fmt(r.get('images_per_s'), digits=1)} img/s ({fmt(r.get('tokens_per_s'))} tok/s) |")
    r = RESULTS.get("cpu_var_tiny_sample", {})
    rows.append(f"| var tiny sample 64 img, cfg 2.0 | | {fmt(r.get('images_per_s'), digits=1)} img/s |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--only", default="", help="comma list of kinds (gpt_train, gpt_sample, var_train, var_sample, check, profile) or item names")
    ap.add_argument("--gpt-steps", type=int, default=40)
    ap.add_argument("--var-steps", type=int, default=24)
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no GPU item after this many seconds")
    ap.add_argument("--cpu-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-results", default=None, help="a prior_bench.json fetched from a GPU run, to report beside CPU figures")
    ap.add_argument("--append", action="store_true", help="append the tables to bench/RESULTS.md under '## Prior'")
    args = ap.parse_args()

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.device == "cuda":
        devname = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
        try:
            run_gpu(args)
        except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured, write the tables
            log("interrupted: reporting the items measured so far")
    else:
        load = os.getloadavg()[0]  # the dev machine is shared: a load above the core count slows every figure
        devname = (f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, "
                   f"load average {load:.1f} at start (torch {torch.__version__})")
        run_cpu(args)
    if args.gpu_results:
        gpu = json.loads(Path(args.gpu_results).read_text())
        RESULTS.update(gpu["results"])
    md = [f"### {when}: {devname}", ""]
    if any(k.startswith(("gpt_", "var_", "matmul")) for k in RESULTS):
        if args.gpu_results:
            md += [f"GPU: {gpu['device']} ({gpu['when']}); settings: {gpu['settings']}", ""]
        md += [gpu_table(), ""]
    if any(k.startswith("cpu_") for k in RESULTS):
        md += [cpu_table(), ""]
    text = "\n".join(md)
    log("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prior_bench.md").write_text(text)
        (out / "prior_bench.json").write_text(json.dumps(
            {"when": when, "device": devname, "settings": vars(args), "results": RESULTS}, indent=2, default=str))
    if args.append:
        res = ROOT / "bench" / "RESULTS.md"
        existing = res.read_text() if res.exists() else "# Benchmarks\n"
        if "## Prior" not in existing:
            existing = existing.rstrip() + "\n\n## Prior\n"
            res.write_text(existing + "\n" + text + "\n")
        else:  # insert at the end of the Prior section (before the next '## ' heading)
            head, tail = existing.split("## Prior", 1)
            nxt = tail.find("\n## ")
            body, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
            res.write_text(head + "## Prior" + body.rstrip() + "\n\n" + text + "\n" + rest)


if __name__ == "__main__":
    main()
