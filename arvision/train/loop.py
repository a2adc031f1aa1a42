"""The prior's part of training (both kinds; plain, DDP or FSDP; CPU or CUDA): its loss plugged
into :class:`arvision.train.trainer.Trainer`, which does the rest (AdamW, warm-up cosine,
accumulation, clipping, the EMA that gets saved, validation and keep-best, early stop, exact
resume; see there).

It knows nothing of Ray, MLflow or files: batches come in through an iterator, metrics and
checkpoints leave through callbacks (``on_log``, ``on_eval``, ``on_checkpoint``), and the
validation loss comes from a callable (``evaluate``, e.g. :func:`val_loss` over held-out batches).

``cfg`` is the ``prior`` section (:class:`arvision.config.PriorConfig`). What is the prior's own:
regional ``torch.compile`` (``cfg.compile``, ``auto``: on CUDA only, :func:`use_compile`,
:func:`compile_model`), FSDP wrapping per block (:func:`fsdp_wrap`), the teacher-forced val loss
(:func:`val_loss`) and the throughput in tokens/s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor, nn

from arvision.config import PriorConfig
from arvision.data.parquet_io import shard_paths
from arvision.train.common import autocast, endless_indices, lr_factor
from arvision.train.trainer import Task, Trainer, TrainerConfig, is_fsdp, unwrap, world_size

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("arvision")

__all__ = ["fit_prior", "prior_job", "train_prior", "trainer_config", "PriorLoss", "compile_model", "use_compile", "val_loss", "lr_at",
           "steady_tokens_per_s", "fsdp_wrap"]


def trainer_config(cfg: PriorConfig) -> TrainerConfig:
    """The trainer's knobs of the ``prior`` section: all of them are the prior's."""
    return TrainerConfig(
        name="prior", steps=cfg.steps, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum,
        ema_decay=cfg.ema_decay, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
        keep=cfg.keep, early_stop_patience=cfg.early_stop_patience,
    )


class PriorLoss(Task):
    """Teacher-forced cross-entropy of ``(codes (B, L) long, labels (B,) long)`` micro-batches, in
    nats per token; ``forward`` is the model to call (compiled or not), counted in tokens of
    every rank."""

    name = "prior"
    unit = "tokens"
    diverged_hint = ("; on CUDA, a var prior with prior.dropout or prior.drop_path > 0 was seen to do this "
                     "(README, 'Training on a GPU'): set them to 0")

    def __init__(self, forward: nn.Module, device: torch.device, world: int) -> None:
        self.forward, self.device, self.world = forward, device, world

    def step(self, batch: tuple[Tensor, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        codes_BL, labels_B = (t.to(self.device, non_blocking=True) for t in batch)
        loss = self.forward(codes_BL, labels_B, return_loss=True)
        return loss, {"loss": loss.detach()}  # a tensor: summed on the device, no sync a step

    def count(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel() * self.world


def compile_model(model: nn.Module) -> nn.Module:
    """Compile ``model`` for training, regionally: each transformer block (``layers`` /
    ``blocks``) is compiled in place, so one compiled graph serves every identical block
    (compiles in seconds, not minutes, and state-dict keys stay plain), and the loss uses the
    compiled cross-entropy (``Prior.fused_loss``), which fuses the upcast, log-softmax and
    gather over the ``(B·L, V)`` logits. Models without blocks are compiled whole. Returns
    what to call."""
    raw = unwrap(model)
    blocks = getattr(raw, "layers", None) or getattr(raw, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return torch.compile(model)
    for blk in blocks:  # under FSDP each block is wrapped: compile what it wraps, keep its hooks eager
        (blk.module if is_fsdp(blk) else blk).compile()
    if hasattr(raw, "fused_loss"):
        raw.fused_loss = True
    return model


def steady_tokens_per_s(logs: list[dict[str, Any]]) -> float | None:
    """The training's steady-state rate: the median ``tokens_per_s`` of its log windows after the
    first (which holds warm-up and compilation); the only window's when there is one; None
    without any. What the prior stage reports and ``bench/prior.py`` compares it with."""
    rates = [float(m["tokens_per_s"]) for m in logs if "tokens_per_s" in m]
    pick = sorted(rates[1:] or rates)
    return pick[len(pick) // 2] if pick else None


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """Whether ``prior.compile`` (``"auto"``, true, false) compiles on ``device``: ``"auto"``
    compiles on CUDA, where the fused blocks and loss pay for their compile within the first
    few hundred steps, and not on CPU, where the compile (a C++ toolchain, minutes) costs more
    than the short CPU runs it would speed up. true / false force it either way."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def fsdp_wrap(model: nn.Module) -> nn.Module:
    """Shard ``model`` (on the current CUDA device, process group initialised) with FSDP: one
    unit per transformer block (``layers`` / ``blocks``) plus the root, so only one block's
    full weights exist at a time; original parameters kept (``use_orig_params``) so the blocks
    can be compiled and the EMA follows the shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = getattr(model, "layers", None) or getattr(model, "blocks", None)
    policy = ModuleWrapPolicy({type(b) for b in blocks}) if isinstance(blocks, nn.ModuleList) else None
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.cuda.current_device(),
                limit_all_gathers=True)


def lr_at(step: int, cfg: PriorConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    return cfg.lr * lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)


@torch.no_grad()
def val_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
    """Teacher-forced mean cross-entropy of ``model`` over ``batches`` of ``(codes (B, L) long,
    labels (B,) long)``, in nats per token (each batch weighted by its token count). The caller
    puts the model in eval mode (no class dropout, no dropout)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for codes_BL, labels_B in batches:
        codes_BL, labels_B = codes_BL.to(device, non_blocking=True), labels_B.to(device, non_blocking=True)
        with autocast(device):
            loss = model(codes_BL, labels_B, return_loss=True)
        total += loss.double() * codes_BL.numel()
        tokens += codes_BL.numel()
    return float(total.item()) / max(1, tokens)


def train_prior(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    cfg: PriorConfig,
    *,
    device: torch.device,
    state: dict | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    progress: bool = True,
    is_main: bool = True,
) -> dict[str, float]:
    """Train ``model`` (a prior, possibly DDP/FSDP-wrapped) for ``cfg.steps`` optimizer steps.

    ``batches`` yields ``(codes (B, L) long, labels (B,) long)`` micro-batches, ``grad_accum``
    per step. ``on_log(step, {loss, lr, grad_norm, tokens_per_s})`` every ``log_every`` steps
    (loss, grad_norm: means over the window, loss in nats/token; tokens/s: all ranks together,
    validation time excluded); ``on_checkpoint(step, checkpoint_state)`` every
    ``checkpoint_every`` steps and at the end (also an early stop).

    Validation (``evaluate`` given and ``cfg.eval_every`` > 0): every ``eval_every`` steps and at
    the end, ``evaluate(m)`` returns the val loss in nats/token of ``m`` (:func:`val_loss`), the
    weights that get saved; ``on_eval(step, val_loss)`` follows; ``keep`` and
    ``early_stop_patience`` as :class:`arvision.train.trainer.Trainer` does them. Returns the
    final metrics (last window's loss, lr, grad_norm, tokens_per_s; step; stopped_early 0/1).
    """
    device = torch.device(device)
    if model is unwrap(model):
        model.to(device)
    forward = compile_model(model) if use_compile(cfg.compile, device) else model
    trainer = Trainer(model, PriorLoss(forward, device, world_size()), trainer_config(cfg), device=device, state=state,
                      evaluate=evaluate, on_log=on_log, on_eval=on_eval, on_checkpoint=on_checkpoint,
                      progress=progress, is_main=is_main)
    return trainer.fit(batches)


# ---------------------------------------------------------------- the prior's data and its job


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


def prior_job(worker, config: dict[str, Any]) -> None:
    """The prior's training on one worker (:func:`arvision.train.ray.fit`'s job): the same
    initial weights on every rank, its part of the token data (seed ``seed + rank``), the val
    split, :func:`train_prior` reporting through ``worker``. Its last checkpoint is the result."""
    from arvision.priors import build_prior

    cfg: PriorConfig = config["prior"]
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    tokenizer = None
    if cfg.kind == "var":
        from arvision.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(Path(config["tokenizer_dir"]))
    model = build_prior(cfg, vocab_size=config["vocab_size"], layout=config["layout"], num_classes=config["num_classes"],
                        tokenizer=tokenizer)
    model = worker.prepare(model, fsdp_wrap if cfg.strategy == "fsdp" else None)
    device = worker.device
    torch.manual_seed(config["seed"] + 1000 * worker.rank)  # different dropout / class-drop per rank
    evaluate = None
    if config["val_dir"] is not None:
        val_batches = _val_batches(config["val_dir"], cfg.batch_size)

        def evaluate(m: nn.Module) -> float:
            return val_loss(m, val_batches, device)

    state = worker.state
    skip = int((state or {}).get("micro_batches", 0))
    batches = _batches(worker.dataset("train"), cfg.batch_size, config["seed"] + worker.rank, skip=skip)
    train_prior(model, batches, cfg, device=device, state=state, on_log=worker.on_log, on_checkpoint=worker.checkpoint,
                evaluate=evaluate, on_eval=worker.on_eval, progress=worker.is_main, is_main=worker.is_main)


def fit_prior(
    *, prior_cfg: PriorConfig, ray_cfg: Any, seed: int, token_dir: Path, tokenizer_dir: Path, vocab_size: int,
    layout: list[list[int]], num_classes: int, run: Any,
) -> dict[str, Any]:
    """Train the prior on ``ray.num_workers`` Ray Train workers (0: in this process; see
    :func:`arvision.train.ray.fit`), in ``run``'s folder, logging to its MLflow run; return the
    final training state (weights, EMA, train curve and the validation bookkeeping of
    :func:`arvision.train.trainer.checkpoint_state`). Validation runs when ``prior_cfg.eval_every``
    > 0 and ``token_dir/val`` holds rows."""
    import pyarrow.parquet as pq

    from arvision.data.parquet_io import split_rows
    from arvision.train.ray import fit

    # the view column of augmented token data (old shards have none): the feed draws a view per image
    has_view = "view" in pq.read_schema(shard_paths(token_dir / "train")[0]).names
    validate = prior_cfg.eval_every > 0 and split_rows(token_dir / "val") > 0
    if not validate and prior_cfg.eval_every > 0:
        log.info("prior: no validation: %s is missing or empty (no val curve)", token_dir / "val")
    gpu = ray_cfg.use_gpu
    config = {
        "prior": prior_cfg, "seed": seed, "vocab_size": vocab_size, "layout": layout, "num_classes": num_classes,
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "val_dir": str((token_dir / "val").resolve()) if validate else None,
    }
    return fit(prior_job, config, workers=ray_cfg.num_workers, gpu=gpu, ray_cfg=ray_cfg, run=run,
               device=torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu"),
               datasets={"train": ((token_dir / "train").resolve(), ["codes", "label"] + (["view"] if has_view else []))})
