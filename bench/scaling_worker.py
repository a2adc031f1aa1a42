"""The Ray Train worker of ``bench/multi_gpu.py`` (a module of its own so that Ray pickles it
by reference: a function defined in the ``__main__`` script is pickled by value, with globals
that do not pickle)."""

from __future__ import annotations

import time

import torch


def worker(config: dict) -> None:
    """One Ray Train worker: build, wrap, train on random codes, report figures (rank 0)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from arvision.priors import build_prior
    from arvision.train.loop import fsdp_wrap, train_prior
    from arvision.train.ray import prepare_parallel
    from bench.prior import prior_config

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    steps, b = config["steps"], config["batch"]
    # the stage's PriorConfig with bench/prior.py's training settings; compile: regional | False
    cfg = prior_config("gpt", config["size"], compile_mode=config["compile"], steps=steps, batch_size=b,
                       log_every=max(1, steps // 4), strategy=config["strategy"])
    model = build_prior(cfg, vocab_size=16384, layout=[(16, 16)], num_classes=1000)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"params": n_params, "world": world, "oom": False}
    try:
        model = prepare_parallel(model, fsdp_wrap if config["strategy"] == "fsdp" else None)
        device = ray.train.torch.get_device()
        g = torch.Generator(device=device).manual_seed(rank)
        pool = [(torch.randint(0, 16384, (b, 256), device=device, generator=g),
                 torch.randint(0, 1000, (b,), device=device, generator=g)) for _ in range(4)]

        def batches():
            i = 0
            while True:
                yield pool[i % 4]
                i += 1

        def on_checkpoint(step: int, st: dict) -> None:  # the stage's checkpoint path, once at the end
            n = sum(v.numel() for v in st["model"].values())
            out.update(checkpoint_params=n, checkpoint_ema=st["ema"] is not None, checkpoint_ok=n == n_params)

        logs: list[dict] = []
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_prior(model, batches(), cfg, device=device, progress=False, is_main=rank == 0,
                    on_log=lambda s, m: logs.append(m), on_checkpoint=on_checkpoint)
        tps = sorted(m["tokens_per_s"] for m in logs[1:]) or [logs[-1]["tokens_per_s"]]
        out.update(tokens_per_s=tps[len(tps) // 2], total_s=round(time.perf_counter() - t0, 1), loss=logs[-1]["loss"])
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    except torch.cuda.OutOfMemoryError:
        out["oom"] = True
        peak = torch.tensor([float("nan")], device=torch.device("cuda", torch.cuda.current_device()))
    if dist.is_initialized() and world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    out["peak_gib_per_gpu"] = round(float(peak.item()), 2)
    # Ray Train V2 keeps a run's metrics in its Result only together with a checkpoint
    if rank == 0:
        import json
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "result.json").write_text(json.dumps(out))
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(out, checkpoint=None)
