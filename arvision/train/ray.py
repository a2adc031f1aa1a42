"""The only Ray glue: one shell that runs a trained stage's job in this process or under Ray
Train's ``TorchTrainer``, the same for every stage (the prior, the tokenizer).

The rule, everywhere: ``workers`` 0 runs the job here, in the stage's process; ``workers`` N >= 1
runs it on N Ray Train workers (DDP through ``prepare_model``, Ray Data shards, a GPU a worker
with ``gpu``). Either way the job is the same function ``job(worker, config)``, given a
:class:`Worker`: its rank and world, its device, the checkpoint it resumes from
(``worker.state``), ``on_log`` / ``on_eval`` (rank 0 keeps the training curve and logs to the
stage's MLflow run), ``checkpoint(step, state)`` (the trainer's ``on_checkpoint``: reported to
Ray Train, or written atomically to the run's folder here), ``dataset(name)`` (this worker's
part of a Parquet data set) and ``prepare(model)`` (the model wrapped for data-parallel
training). The job trains with :class:`arvision.train.trainer.Trainer` and knows nothing of Ray.

Run naming and resume: the run lives in ``run.storage / run.name``, its name a hash of
everything the result depends on (:meth:`arvision.cluster.TrainRun.name_for`). A run stopped
part-way and started again under the same name in the same storage resumes from its last
checkpoint (Ray Train restores it; here: ``checkpoint.pt`` in the run's folder); a lost Ray
worker restarts the group from it ``ray.max_failures`` times. The curve comes back with the
checkpoint and is replayed through ``on_log``, so the stage's MLflow run and curve hold all of
it. A run that had finished (``done``) reports its result again without training.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from arvision.cluster import TrainRun, init_ray
from arvision.config import RayConfig

STATE_FILE = "state.pt"
#: the in-process run's checkpoint, in the run's folder
CHECKPOINT = "checkpoint.pt"
log = logging.getLogger("arvision")

Job = Callable[["Worker", dict[str, Any]], "dict[str, Any] | None"]


@dataclass
class Worker:
    """What a job sees of where it runs (see the module's docstring). ``distributed``: under Ray
    Train (a process group, even of one); ``state``: the checkpoint to resume from, or None."""

    rank: int
    world: int
    device: torch.device
    distributed: bool
    state: dict[str, Any] | None
    report: Callable[[dict[str, Any], dict[str, Any] | None], None]
    tracker: Any = None
    curve: list[dict[str, float]] = field(default_factory=list)
    datasets: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """A training log row: into the curve and the MLflow run (rank 0)."""
        if self.rank == 0:
            self.curve.append({"step": step, **metrics})
            if self.tracker is not None:
                self.tracker.log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step)

    def on_eval(self, step: int, loss: float) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics({"val_loss": loss}, step=step)

    def checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """Report ``state`` (with the curve) as the run's checkpoint; every rank calls it."""
        last = {k: v for k, v in self.curve[-1].items() if k != "step"} if self.curve else {}
        self.report({"step": step, **last}, {**state, "curve": list(self.curve)})

    def dataset(self, name: str) -> Any:
        """This worker's part of data set ``name`` (iterable by ``iter_batches``)."""
        return self.datasets[name]

    def prepare(self, model: torch.nn.Module, shard: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                ) -> torch.nn.Module:
        """``model`` on this worker's device, wrapped for data-parallel training under Ray Train
        (:func:`prepare_parallel`; ``shard``: the model's own FSDP wrapper); as it is in this process."""
        if not self.distributed:
            return model.to(self.device)
        return prepare_parallel(model, shard)


def _replay(worker: Worker) -> None:
    """A resumed run's curve back into this run's curve and MLflow run."""
    for row in (worker.state or {}).get("curve", []):
        worker.on_log(row["step"], {k: v for k, v in row.items() if k != "step"})


def _tracker(config: dict[str, Any]):
    if not config.get("mlflow_run_id"):
        return None
    from arvision.tracking import MlflowTracker

    return MlflowTracker(config["mlflow_run_id"], config["mlflow_uri"])


def _usable(state: dict[str, Any] | None, name: str, where: Any) -> dict[str, Any] | None:
    """``state``, or None (with a warning) when another version of the trainer wrote it."""
    from arvision.train.trainer import CHECKPOINT_FORMAT

    if state is None or state.get("format") == CHECKPOINT_FORMAT:
        return state
    log.warning("%s: dropping the checkpoint at %s, which this trainer cannot load (written by another version of the "
                "trainer, format %s); training from the start", name, where, state.get("format"))
    return None


def _run_job(worker: Worker, config: dict[str, Any]) -> None:
    """Replay, then the job, then its result (what it returns; None: its last checkpoint is the result)."""
    _replay(worker)
    if worker.state is not None and worker.is_main and not worker.state.get("done"):
        print(f"{config['name']}: resuming from the checkpoint at step {worker.state['step']}", flush=True)
    if worker.state is not None and worker.state.get("done"):  # the run had finished: its result again
        worker.report({"step": int(worker.state.get("step", 0))}, worker.state)
        return
    result = config["job"](worker, config["config"])
    if result is not None:
        worker.report({k: v for k, v in result.items() if isinstance(v, (int, float))},
                      {**result, "curve": list(worker.curve), "done": True})


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["cpus_per_worker"])
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted group, or the stage re-run: go on from the last checkpoint
        with ckpt.as_directory() as d:
            state = _usable(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False), config["name"], ckpt)

    def report(metrics: dict[str, Any], saved: dict[str, Any] | None) -> None:
        """Every rank reports; rank 0 with ``saved`` as the checkpoint."""
        if rank == 0 and saved is not None:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(saved, Path(tmp) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)

    shards = {name: ray.train.get_dataset_shard(name) for name in config["datasets"]}
    worker = Worker(rank, ctx.get_world_size(), ray.train.torch.get_device(), True, state, report,
                    tracker=_tracker(config) if rank == 0 else None, datasets=shards)
    _run_job(worker, config)


def prepare_parallel(model: torch.nn.Module, shard: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                     ) -> torch.nn.Module:
    """On a Ray Train worker: move ``model`` to the worker's device and wrap it for data-parallel
    training: DDP (Ray's ``prepare_model``; no wrapper for one worker), or with ``shard`` (e.g.
    :func:`arvision.train.loop.fsdp_wrap`, FSDP sharded per block; also for one worker, so the
    path is the same at every scale) that wrapper. FSDP needs CUDA (the params check refuses it
    on CPU)."""
    import ray.train.torch

    if shard is None:
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    if not torch.cuda.is_available():
        raise RuntimeError("prior.strategy 'fsdp' needs GPUs (ray.use_gpu: true)")
    return shard(ray.train.torch.prepare_model(model, parallel_strategy=None))


class ParquetPart:
    """A Parquet data set read in this process, in file order: what a Ray Data shard is to a
    Ray Train worker (``iter_batches`` of numpy columns)."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = Path(path), columns

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        import pyarrow.parquet as pq

        from arvision.data.parquet_io import shard_paths

        for f in shard_paths(self.path):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=self.columns):
                yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in self.columns}


def _fit_here(job: Job, config: dict[str, Any], *, run: TrainRun, device: torch.device,
              datasets: dict[str, tuple[Path, list[str]]]) -> dict[str, Any]:
    """The job in this process, checkpointing to ``run``'s folder (atomically) and resuming from it."""
    ckpt = run.storage / run.name / CHECKPOINT
    state = None
    if ckpt.exists():
        try:  # a file this code cannot read (damaged) is dropped, not fatal
            state = _usable(torch.load(ckpt, map_location="cpu", weights_only=False), config["name"], ckpt)
        except Exception as e:
            log.warning("%s: dropping the checkpoint at %s, which this trainer cannot load (%s); training from the start",
                        config["name"], ckpt, str(e).splitlines()[0])
    saved: dict[str, Any] = {}

    def report(metrics: dict[str, Any], st: dict[str, Any] | None) -> None:
        if st is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(f".{CHECKPOINT}.tmp")
        torch.save(st, tmp)
        tmp.replace(ckpt)  # whole or not at all
        saved["state"] = st

    worker = Worker(0, 1, device, False, state, report, tracker=_tracker(config),
                    datasets={name: ParquetPart(path, cols) for name, (path, cols) in datasets.items()})
    _run_job(worker, config)
    if "state" not in saved:
        raise RuntimeError(f"{run.name}: the training job finished without a checkpoint")
    return saved["state"]


def fit(
    job: Job, config: dict[str, Any], *, workers: int, gpu: bool, ray_cfg: RayConfig, run: TrainRun,
    device: torch.device | None = None, datasets: dict[str, tuple[Path, list[str]]] | None = None,
) -> dict[str, Any]:
    """Run ``job(worker, config)`` here (``workers`` 0, on ``device``) or on ``workers`` Ray Train
    workers (a GPU each with ``gpu``; ``ray.cpus_per_worker`` CPUs each, ``ray.address``,
    ``ray.max_failures``), logging to ``run``'s MLflow run; ``datasets``: name → (Parquet
    directory, columns), one part a worker. Returns the run's final state: the job's result,
    or (a job that returns None) its last checkpoint, with the ``curve``."""
    datasets = datasets or {}
    config = {"name": run.name.split("-")[0], "job": job, "config": config, "mlflow_run_id": run.mlflow_run_id, "mlflow_uri": run.mlflow_uri,
              "cpus_per_worker": ray_cfg.cpus_per_worker, "datasets": list(datasets)}
    if workers == 0:
        return _fit_here(job, config, run=run, device=torch.device(device or "cpu"), datasets=datasets)

    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(ray_cfg.model_copy(update={"num_workers": workers}), run.root)  # sized for these workers
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # deterministic order → reproducible on CPU
    resources: dict[str, float] = {"CPU": ray_cfg.cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run.name, storage_path=str(Path(run.storage).resolve()), checkpoint_config=CheckpointConfig(num_to_keep=2),
            # a lost worker restarts the group from the last checkpoint, ray.max_failures times (-1: always)
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
        ),
        datasets={name: ray.data.read_parquet(str(path), columns=cols) for name, (path, cols) in datasets.items()},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
