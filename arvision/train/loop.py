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

from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from arvision.config import PriorConfig
from arvision.train.common import autocast, lr_factor
from arvision.train.trainer import Task, Trainer, TrainerConfig, is_fsdp, unwrap, world_size

__all__ = ["train_prior", "trainer_config", "PriorLoss", "compile_model", "use_compile", "val_loss", "lr_at",
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
