"""The only Ray glue: train the prior with Ray Train's ``TorchTrainer`` fed by Ray Data.

The training loop itself (:func:`arvision.train.loop.train_prior`) knows nothing of Ray; here
we connect it: a Ray Data ``read_parquet`` of the token shards, one shard per worker, DDP (or
FSDP) through ``prepare_model``, checkpoints through ``ray.train.report``, and rank 0 logging
to the stage's MLflow run.

Resume: the run is named after a hash of everything the result depends on (params, seed,
token data). Ray Train restores the latest checkpoint of a run of the same name in the same
storage, so an interrupted run retried with the same params resumes; changed params give a
new name and so a fresh start.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np

from arvision.cluster import TrainRun, init_ray
from arvision.config import PriorConfig, RayConfig
from arvision.data.parquet_io import shard_paths, split_rows
from arvision.train.common import endless_indices

STATE_FILE = "state.pt"
log = logging.getLogger("arvision")


def _read_shard(shard) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """All rows of a Ray Data shard as ``codes (N, L)``, ``labels (N,)`` and ``view (N,)`` numpy
    arrays in the narrowest dtype they arrive in (codes as stored: uint16, or int32 past 65,536
    codes; labels, view int32; view 0 for shards without a ``view`` column), unlabelled rows
    (label -1) as class 0: a quarter of int64's memory. :func:`_batches` widens each batch to
    int64 as it goes."""
    import numpy as np

    codes_parts, label_parts, view_parts = [], [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        codes = batch["codes"]
        if codes.dtype == object:  # fixed-size lists may arrive as arrays of arrays
            codes = np.stack(codes)
        codes_parts.append(codes)
        label_parts.append(batch["label"])
        view_parts.append(batch["view"].astype(np.int32) if "view" in batch else np.zeros(len(codes), np.int32))
    codes = np.concatenate(codes_parts) if codes_parts else np.zeros((0, 0), np.int64)
    labels = np.maximum(np.concatenate(label_parts), 0) if label_parts else np.zeros(0, np.int32)  # unlabelled (-1) → 0
    view = np.concatenate(view_parts) if view_parts else np.zeros(0, np.int32)
    return codes, labels, view


def _batches(shard, batch_size: int, seed: int, skip: int = 0):
    """Endless (codes, labels) batches from this worker's Ray Data shard, reshuffled each epoch.

    An epoch is one pass over the images, not the rows: with augmented token data (a row per
    (image, view), ``tokens.hflip`` / ``tokens.crops``) each image contributes one of its views,
    drawn by :func:`arvision.data.views.view_picks` seeded ``(seed, epoch)``, so ``prior.steps``
    means as many passes as without views and a resumed run (``skip``) draws the same views. The
    images are permuted as rows were (:func:`endless_indices` over the images); data without
    views gives the batches it always gave.

    The shard is streamed once through Ray Data and kept in memory as compact integer arrays
    (token data is small: 1M images × 256 uint16 codes is 512 MB; the dtype as stored, each
    batch widened to int64 only when drawn); every later epoch is a seeded permutation of it.
    Re-executing the Ray Data pipeline each epoch cost 3-8 s per epoch, most of the prior's time
    on the demo data set. ``skip`` drops the batches a resumed run has already consumed, so it
    sees the same data as an uninterrupted one.
    """
    import numpy as np

    from arvision.data.views import image_rows, view_picks

    codes, labels, view = _read_shard(shard)
    starts_G, counts_G = image_rows(view)
    n = len(starts_G)  # images
    if n < batch_size:
        raise RuntimeError(f"the token shard holds {n} images, fewer than one batch ({batch_size}); lower prior.batch_size")
    one_view = bool((counts_G == 1).all())
    per_epoch = len(range(0, max(1, n - batch_size + 1), batch_size))  # batches endless_indices cuts an epoch into
    epoch, pick_G = -1, None
    for k, idx in enumerate(endless_indices(n, batch_size, seed, skip=skip), start=skip):
        g = idx.numpy()
        if one_view:
            i = starts_G[g]
        else:
            if k // per_epoch != epoch:  # a new epoch: each image's view for it
                epoch = k // per_epoch
                pick_G = view_picks(counts_G, seed, epoch)
            i = starts_G[g] + pick_G[g]
        yield torch.from_numpy(codes[i].astype(np.int64)), torch.from_numpy(labels[i].astype(np.int64))


def _val_batches(split_dir: str, batch_size: int):
    """The whole val split as in-order batches of at most ``batch_size`` rows (unlabelled rows,
    label -1, become class 0), kept in memory (codes as stored, uint16 or int32; each batch
    widened to int64 when evaluated) for every evaluation. Every worker reads all of it with
    pyarrow: it is small, and a Ray Data pipeline per worker cost seconds of start-up. Only view 0
    (the images themselves) is scored when the split has a ``view`` column."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    has_view = "view" in pq.read_schema(shard_paths(split_dir)[0]).names
    table = pq.read_table(split_dir, columns=["codes", "label"] + (["view"] if has_view else []))
    if has_view:
        table = table.filter(pc.equal(table.column("view"), 0))
    codes = table.column("codes").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    labels = np.maximum(table.column("label").to_numpy(), 0).astype(np.int32)

    class NarrowBatches:
        """Iterable as often as :func:`val_loss` needs: int64 tensors made one batch at a time."""

        def __len__(self) -> int:
            return -(-len(codes) // batch_size)

        def __iter__(self):
            for i in range(0, len(codes), batch_size):
                yield (torch.from_numpy(codes[i : i + batch_size].astype(np.int64)),
                       torch.from_numpy(labels[i : i + batch_size].astype(np.int64)))

    return NarrowBatches()


def prepare_parallel(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
    """On a Ray Train worker: move ``model`` to the worker's device and wrap it for data-parallel
    training: DDP (Ray's ``prepare_model``; no wrapper for one worker), or with ``"fsdp"`` FSDP
    sharded per block (:func:`arvision.train.loop.fsdp_wrap`; also for one worker, so the path
    is the same at every scale). FSDP needs CUDA (the params check refuses it on CPU)."""
    import ray.train.torch

    if strategy != "fsdp":
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    if not torch.cuda.is_available():
        raise RuntimeError("prior.strategy 'fsdp' needs GPUs (ray.use_gpu: true)")
    from arvision.train.loop import fsdp_wrap

    return fsdp_wrap(ray.train.torch.prepare_model(model, parallel_strategy=None))


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from arvision.priors import build_prior
    from arvision.train.loop import train_prior, val_loss

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["cpus_per_worker"])
    cfg: PriorConfig = config["prior"]
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    tokenizer = None
    if cfg.kind == "var":
        from arvision.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(Path(config["tokenizer_dir"]))
    model = build_prior(cfg, vocab_size=config["vocab_size"], layout=config["layout"], num_classes=config["num_classes"], tokenizer=tokenizer)

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    model = prepare_parallel(model, cfg.strategy)
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] + 1000 * rank)  # different dropout / class-drop per rank

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from arvision.tracking import MlflowTracker

        tracker = MlflowTracker(config["mlflow_run_id"], config["mlflow_uri"])
    curve: list[dict[str, float]] = list((state or {}).get("curve", []))

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if rank == 0:
            curve.append({"step": step, **metrics})
            if tracker is not None:
                tracker.log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step)

    def on_eval(step: int, loss: float) -> None:
        if tracker is not None:
            tracker.log_metrics({"val_loss": loss}, step=step)

    def on_checkpoint(step: int, st: dict[str, Any]) -> None:
        metrics = {"step": step, **({k: v for k, v in curve[-1].items() if k != "step"} if curve else {})}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({**st, "curve": curve}, Path(tmp) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)

    shard = ray.train.get_dataset_shard("train")
    evaluate = None
    if config["val_dir"] is not None:
        val_batches = _val_batches(config["val_dir"], cfg.batch_size)

        def evaluate_val(m: torch.nn.Module) -> float:
            return val_loss(m, val_batches, device)

        evaluate = evaluate_val

    train_prior(
        model, _batches(shard, cfg.batch_size, config["seed"] + rank, skip=int((state or {}).get("micro_batches", 0))), cfg, device=device, state=state,
        on_log=on_log, on_checkpoint=on_checkpoint, evaluate=evaluate, on_eval=on_eval, progress=rank == 0, is_main=rank == 0,
    )


def fit_prior(
    *,
    prior_cfg: PriorConfig,
    ray_cfg: RayConfig,
    seed: int,
    token_dir: Path,
    tokenizer_dir: Path,
    vocab_size: int,
    layout: list[list[int]],
    num_classes: int,
    run: TrainRun,
) -> dict[str, Any]:
    """Train under Ray Train (in ``run``'s folder, logging to its MLflow run); return the final training state (weights, EMA, train curve and the
    validation bookkeeping of :func:`arvision.train.loop.checkpoint_state`). Validation runs when
    ``prior_cfg.eval_every`` > 0 and ``token_dir/val`` holds rows."""
    import pyarrow.parquet as pq
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(ray_cfg, run.root)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # deterministic order → reproducible on CPU
    # the view column of augmented token data (old shards have none): the feed draws a view per image
    has_view = "view" in pq.read_schema(shard_paths(token_dir / "train")[0]).names
    train_ds = ray.data.read_parquet(str(token_dir / "train"), columns=["codes", "label"] + (["view"] if has_view else []))
    validate = prior_cfg.eval_every > 0 and split_rows(token_dir / "val") > 0
    if not validate and prior_cfg.eval_every > 0:
        log.info("prior: no validation: %s is missing or empty (no val curve)", token_dir / "val")
    resources = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "prior": prior_cfg, "seed": seed, "vocab_size": vocab_size, "layout": layout,
            "num_classes": num_classes, "tokenizer_dir": str(tokenizer_dir.resolve()),
            "cpus_per_worker": ray_cfg.cpus_per_worker, "mlflow_run_id": run.mlflow_run_id, "mlflow_uri": run.mlflow_uri,
            "val_dir": str((token_dir / "val").resolve()) if validate else None,
        },
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run.name, storage_path=str(Path(run.storage).resolve()), checkpoint_config=CheckpointConfig(num_to_keep=2),
            # a lost worker restarts the group from the last checkpoint, ray.max_failures times (-1: always)
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
        ),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    return state
