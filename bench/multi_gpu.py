"""Multi-GPU scaling of the prior's training step under Ray Train: DDP and FSDP, 1-8 GPUs.

Each configuration is one ``TorchTrainer`` run on N workers with one GPU each, through the
stage's own code: ``arvision.train.ray.prepare_parallel`` (DDP, or FSDP sharded per block) and
the training loop ``arvision.train.loop.train_prior`` (bf16 autocast, fused AdamW, clipping,
EMA, regional compile). Random codes (vocab 16384, 16×16 = 256 tokens + class token) are made
on each GPU, so the figures are the step's own, not the input pipeline's. Reported:
global tokens/s (median of the logging windows after the first, which holds compilation),
scaling efficiency = tokens/s at N ÷ (N × tokens/s at 1, same size/strategy/per-GPU batch),
peak memory per GPU (max over ranks of ``max_memory_allocated``), and out-of-memory as such.

    PYTHONPATH=. python3 bench/multi_gpu.py --sizes B,L --gpus 1,2,4,8 --out $OUT
    PYTHONPATH=. python3 bench/multi_gpu.py --sizes L --strategies ddp,fsdp --batches 32,64,96,128 --gpus 8   # memory probe

GPU counts above the machine's are skipped. NVLink multicast stays off in the workers
(``MULTICAST_OFF`` below, passed to every worker as ``ray.env``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

def run_config(size: str, strategy: str, n: int, batch: int, args, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"{size}-{strategy}-{n}gpu-b{batch}-{int(time.time())}"
    from bench.scaling_worker import worker  # importable: Ray pickles it by reference

    trainer = TorchTrainer(
        worker,
        train_loop_config={"size": size, "strategy": strategy, "batch": batch, "steps": args.steps, "compile": args.compile},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=True, resources_per_worker={"CPU": args.cpus_per_worker, "GPU": 1}),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        res = dict(result.metrics or {})
        if not res and result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                res = json.loads(Path(d, "result.json").read_text())
    except Exception as e:  # noqa: BLE001 — report and go on with the other configurations
        text = f"{type(e).__name__}: {e}"
        res = {"error": text[:400], "oom": "OutOfMemory" in text}
    res.update(size=size, strategy=strategy, gpus=n, batch=batch, wall_s=round(time.perf_counter() - t0, 1))
    return res


def table(rows: list[dict]) -> str:
    base = {(r["size"], r["strategy"], r["batch"]): r.get("tokens_per_s") for r in rows if r["gpus"] == 1}
    lines = ["| size | params | strategy | GPUs | per-GPU batch | global batch | tokens/s | efficiency | peak GiB / GPU | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tps, one = r.get("tokens_per_s"), base.get((r["size"], r["strategy"], r["batch"]))
        eff = f"{100 * tps / (r['gpus'] * one):.1f}%" if tps and one else "—"
        note = "out of memory" if r.get("oom") else (r.get("error", "") or "")[:120]
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "—"
        lines.append(f"| {r['size']} | {params} | {r['strategy']} | {r['gpus']} | {r['batch']} | {r['batch'] * r['gpus']} | "
                     f"{f'{tps:,.0f}' if tps else '—'} | {eff} | {r.get('peak_gib_per_gpu', '—')} | {note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="B,L")
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--batches", default="64", help="per-GPU batch sizes (comma list)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--compile", default="regional", help="regional | blocks | whole | '' (eager)")
    ap.add_argument("--cpus-per-worker", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=480, help="start no configuration after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    args.compile = args.compile or False
    if not torch.cuda.is_available():
        sys.exit("bench/multi_gpu.py needs CUDA GPUs")
    avail = torch.cuda.device_count()
    gpus = [n for n in (int(x) for x in args.gpus.split(",")) if n <= avail]
    skipped = [n for n in (int(x) for x in args.gpus.split(",")) if n > avail]

    import ray

    from arvision.cluster import init_ray

    from arvision.config import RayConfig

    # NVLink multicast off in every worker (the H200 machines here: KINDS.md)
    init_ray(RayConfig(num_workers=max(gpus), cpus_per_worker=args.cpus_per_worker, env=MULTICAST_OFF), ROOT)
    storage = tempfile.mkdtemp(prefix="arvision-scaling-")
    rows: list[dict] = []
    t_start = time.perf_counter()
    for size in args.sizes.split(","):
        for strategy in args.strategies.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for n in gpus:
                    if time.perf_counter() - t_start > args.budget_s:
                        print(f"--- {size} {strategy} {n} GPU b{batch}: skipped (past --budget-s)", flush=True)
                        continue
                    print(f"--- {size} {strategy} {n} GPU b{batch}", flush=True)
                    rows.append(run_config(size, strategy, n, batch, args, storage))
                    print("   ", json.dumps(rows[-1]), flush=True)
                    if args.out:
                        Path(args.out, "multi_gpu.json").write_text(json.dumps(rows, indent=1))
    ray.shutdown()
    head = (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {avail} × {torch.cuda.get_device_name()} "
            f"(torch {torch.__version__}, Ray {ray.__version__}); gpt vocab 16384, 256 tokens, bf16 autocast, "
            f"compile {args.compile or 'off'}, {args.steps} steps per run."
            + (f" Not run here (machine has {avail} GPU(s)): {', '.join(map(str, skipped))} GPUs." if skipped else ""))
    text = head + "\n\n" + table(rows) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out, "multi_gpu.md").write_text(text)


if __name__ == "__main__":
    main()
