"""Train the tokenizer on several Ray Train workers (``tokenizer.num_workers`` > 0): DDP.

The loop is :func:`arvision.train.tokenizer.train_tokenizer`, the one the stage runs in its own
process; here every Ray Train worker runs it with

- the same initial weights (the same seed on every rank; DDP also copies rank 0's at wrap time);
- the model wrapped in DDP (:class:`arvision.train.tokenizer.TrainingLoss`, since DDP hooks
  ``forward`` only), so each backward averages the gradients over the replicas;
  ``broadcast_buffers=False``: the quantiser's buffers are kept identical by the next point;
- ``update_quantizer(reduce=all-reduce sum)``: the EMA code counts and vector sums follow the
  global batch, k-means centres and restart vectors are averaged, so every replica keeps the
  same codebook;
- with ``tokenizer.adv_weight`` / ``perceptual: disc_features``, the discriminator outside DDP
  (:class:`arvision.train.tokenizer.Adversary`: built from the same seed on every rank, its
  gradients averaged over the replicas by ``reduce`` before each of its steps), so it stays
  identical too; its weights and optimizer travel in the checkpoints;
- its own part of the train split (:func:`arvision.data.feed.shuffled_batches` with
  ``part=(rank, world)``: the rows whose index is ``rank`` modulo ``world``, seed ``seed +
  rank``), ``tokenizer.batch_size / num_workers`` images a step: reproducible on CPU.

Rank 0 logs to the stage's MLflow run and reports the trained state (weights and buffers on
CPU, the training curve, the final stats, and a hash of every rank's state) as a Ray Train
checkpoint, which :func:`fit_tokenizer` returns; it refuses a result whose replicas differ.

Resumable: every ``tokenizer.checkpoint_every`` steps rank 0 reports a checkpoint (weights and
codebook, optimizer, step, RNG, curve); a lost worker (``ray.max_failures``) restarts the group
from it, and so does a re-run of the stage with the same params and data (the same run name in
the same storage). Each rank's stream then skips the batches it had consumed, so the result is
the one a run never stopped gives. A run that had finished reports its result again without
training. Workers read the prepared Parquet
shards from their path, so on a cluster of several machines it must be on shared storage
(as for the prior's validation split).

Kept apart from :mod:`arvision.train.ray` (the prior's glue), so that the tokenizer stage does
not depend on the prior's code.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from arvision.cluster import TrainRun, init_ray
from arvision.config import RayConfig, TokenizerConfig

STATE_FILE = "state.pt"
log = logging.getLogger("arvision")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict: every entry's name, dtype, shape and bytes (on CPU)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def per_worker_batch(cfg: TokenizerConfig, train_rows: int) -> int:
    """Images a worker draws a step: its share of the global ``tokenizer.batch_size``, at most
    the rows of the smallest part of the split (as the in-process stage draws at most the split)."""
    n = cfg.num_workers
    if train_rows < n:
        from arvision.errors import UserError

        raise UserError(f"tokenizer.num_workers: {n} workers need at least {n} training images, the train split has {train_rows}")
    return min(cfg.batch_size // n, train_rows // n)


def use_gpu(cfg: TokenizerConfig, ray_cfg: RayConfig) -> bool:
    """Whether each worker takes a GPU: ``tokenizer.device`` when it names one (``cuda`` /
    ``cpu``), else (``auto``) ``ray.use_gpu``."""
    return cfg.device == "cuda" or (cfg.device == "auto" and ray_cfg.use_gpu)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option not to broadcast rank 0's buffers at every forward (``update_quantizer``'s
    reduce keeps them identical): ``forward_sync_buffers`` where torch has it (2.13 deprecates
    ``broadcast_buffers``), else ``broadcast_buffers``. Either way the buffers, like the
    weights, are copied from rank 0 once, when DDP wraps the model."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from arvision.data.feed import shuffled_batches
    from arvision.tokenizers import build_tokenizer
    from arvision.train.common import to_cpu
    from arvision.train.tokenizer import TrainingLoss, train_tokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["cpus_per_worker"])
    cfg: TokenizerConfig = config["tokenizer"]
    seed = config["seed"]
    device = ray.train.torch.get_device()
    torch.manual_seed(seed)  # identical initial weights on every rank, as the stage builds them
    tok = build_tokenizer(cfg, channels=config["channels"], resolution=config["resolution"]).to(device)
    cuda = device.type == "cuda"
    if cuda:  # before DDP registers the parameters (train_tokenizer's own call is then a no-op)
        tok.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(TrainingLoss(tok), device_ids=[device.index] if cuda else None, **_no_buffer_sync())

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)  # sum
        return t

    def report(metrics: dict[str, Any], saved: dict[str, Any]) -> None:
        """Every rank reports; rank 0 with ``saved`` as the checkpoint."""
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(saved, Path(tmp) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from arvision.tracking import MlflowTracker

        tracker = MlflowTracker(config["mlflow_run_id"], config["mlflow_uri"])
    curve: list[dict[str, float]] = []

    def on_log(step: int, metrics: dict[str, float]) -> None:  # metrics: means over the replicas
        if rank == 0:
            curve.append({"step": step, **metrics})
            if tracker is not None:
                tracker.log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step)

    resumed = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted group, or the stage re-run: go on from the last checkpoint
        with ckpt.as_directory() as d:
            resumed = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        for row in resumed["curve"]:  # the stage's MLflow run and curve hold the whole curve
            on_log(row["step"], {k: v for k, v in row.items() if k != "step"})
        if resumed.get("done"):  # the run had finished: its result again, no training
            report({"step": cfg.steps}, resumed)
            return

    def on_checkpoint(step: int, st: dict[str, Any]) -> None:
        report({"step": step}, {**st, "curve": curve})

    skip = int(resumed["step"]) if resumed else 0
    if skip and rank == 0:
        print(f"tokenizer: resuming from the checkpoint at step {skip} of {cfg.steps}", flush=True)
    batches = shuffled_batches(config["split_dir"], config["batch"], seed, config["buffer"], part=(rank, world), skip=skip)
    stats = train_tokenizer(tok, batches, cfg, seed=seed, device=device, log=on_log, progress=rank == 0, model=model,
                            reduce=reduce, state=resumed, on_checkpoint=on_checkpoint)
    batches.close()
    state = to_cpu(tok.state_dict())
    hashes: list[Any] = [None] * world
    dist.all_gather_object(hashes, state_hash(state))
    metrics = {"step": cfg.steps, **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}
    report(metrics, {"model": state, "curve": curve, "stats": stats, "replica_hashes": hashes, "world": world, "done": True,
                     "resumed_from": skip})


def fit_tokenizer(
    *,
    tokenizer_cfg: TokenizerConfig,
    ray_cfg: RayConfig,
    seed: int,
    split_dir: Path,
    channels: int,
    resolution: int,
    run: TrainRun,
) -> dict[str, Any]:
    """Train a tokenizer on ``tokenizer_cfg.num_workers`` Ray Train workers from the prepared
    train split ``split_dir``; return ``{"model": state dict (CPU), "curve": [{"step", ...}],
    "stats": train_tokenizer's result, "replica_hashes": [one a rank], "world", "resumed_from": the
    step its last start resumed from (0: none)}``. Resources:
    ``ray.cpus_per_worker``, a GPU a worker per :func:`use_gpu`, ``ray.address``; a lost worker
    restarts the run ``ray.max_failures`` times from its last checkpoint. ``run``'s folder (Ray's
    run folder) is kept: the same run again resumes there (the stage removes it once its
    outputs are saved)."""
    import numpy as np
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from arvision.data.feed import shuffle_buffer_rows, split_rows

    workers = tokenizer_cfg.num_workers
    if workers < 1 or tokenizer_cfg.kind == "palette":
        raise ValueError("fit_tokenizer trains a kind other than palette on tokenizer.num_workers >= 1 workers "
                         "(palette, or num_workers 0: train_tokenizer in-process)")
    split_dir = Path(split_dir).resolve()
    batch = per_worker_batch(tokenizer_cfg, split_rows(split_dir))
    buffer = shuffle_buffer_rows(batch, int(np.prod((resolution, resolution, channels))))
    gpu = use_gpu(tokenizer_cfg, ray_cfg)
    init_ray(ray_cfg.model_copy(update={"num_workers": workers}), run.root)  # sized for these workers
    resources: dict[str, float] = {"CPU": ray_cfg.cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "tokenizer": tokenizer_cfg, "seed": seed, "split_dir": str(split_dir), "batch": batch, "buffer": buffer,
            "channels": channels, "resolution": resolution, "cpus_per_worker": ray_cfg.cpus_per_worker,
            "mlflow_run_id": run.mlflow_run_id, "mlflow_uri": run.mlflow_uri,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run.name, storage_path=str(Path(run.storage).resolve()), checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
        ),
    )
    log.info("tokenizer: training on %d Ray Train workers (%s), %d images a worker a step", workers, "GPU" if gpu else "CPU", batch)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    if len(set(state["replica_hashes"])) != 1:
        raise RuntimeError(
            f"tokenizer: the {state['world']} replicas ended with different weights or codebooks "
            f"(state hashes {state['replica_hashes']}): the data-parallel training is broken"
        )
    return state
