"""The one training loop for the priors (both kinds; plain, DDP or FSDP; CPU or CUDA).

It knows nothing of Ray, MLflow or files: batches come in through an iterator, metrics and
checkpoints leave through callbacks (``on_log``, ``on_eval``, ``on_checkpoint``), and the
validation loss comes from a callable (``evaluate``, e.g. :func:`val_loss` over held-out batches).

``cfg`` is the ``prior`` section (:class:`arvision.config.PriorConfig`).

- AdamW (fused on CUDA); no weight decay on norms, biases and embeddings
  (``model.no_weight_decay()``); linear warm-up, then cosine down to ``min_lr_ratio · lr``
  (:func:`arvision.train.common.warmup_cosine`, a torch ``LambdaLR``).
- ``grad_accum`` micro-batches per optimizer step, each loss scaled by 1/k, gradient sync only
  on the last micro-batch (``no_sync``), so k micro-batches of b equal one batch of k·b.
- Gradient clipping; an EMA of the weights (``ema_decay``, 0 = off, with the usual warm-up
  ``min(decay, (1 + step) / (10 + step))``): the EMA weights are what gets saved and sampled
  (:func:`final_weights`, :func:`ema_model`). The shadow weights follow ``model.parameters()``,
  FSDP shards included, and are updated by ``torch.optim.swa_utils.get_ema_multi_avg_fn``;
  ``AveragedModel`` would deep-copy the wrapped model instead.
- bf16 autocast on CUDA (fp32 master weights), fp32 on CPU; ``cfg.compile`` (``auto``: on
  CUDA only, :func:`use_compile`): regional ``torch.compile`` (:func:`compile_model`).
- Full state dicts (weights, optimizer) through ``torch.distributed.checkpoint.state_dict``:
  the same code for a plain, DDP, FSDP or compiled model.
- Validation every ``eval_every`` steps and at the end (0 = off): ``evaluate`` scores the
  weights that get saved (the EMA when on) in eval mode; the loop keeps the val curve, the best
  val loss and its step, and with ``keep: best`` a copy of the best weights
  (:func:`kept_weights`); with ``early_stop_patience`` p > 0 it stops after p evals without
  improvement. Under DDP / FSDP every rank evaluates and rank 0's value is broadcast, so all
  ranks take the same decisions.
- A checkpoint (:func:`checkpoint_state`) holds model, EMA, optimizer, step, RNG states and the
  validation bookkeeping; resuming from it continues exactly as the uninterrupted run would,
  provided ``batches`` continues where the checkpointed run left off (the state records
  ``micro_batches`` consumed; the loop itself never skips data).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from arvision.config import PriorConfig
from arvision.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: every later step would train garbage, so the
    run stops at the log line that saw it, naming the step and what to change."""
from arvision.train.common import autocast, lr_factor, rng_state, set_rng_state, to_cpu, warmup_cosine

__all__ = [
    "train_prior", "compile_model", "use_compile", "checkpoint_state", "final_weights", "kept_weights", "ema_model",
    "val_loss", "lr_at", "unwrap", "make_optimizer",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The raw model under DDP / FSDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


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
        (blk.module if _is_fsdp(blk) else blk).compile()
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


def _is_fsdp(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


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


def make_optimizer(model: nn.Module, cfg: PriorConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW with two groups: decayed matrices, and undecayed norms / biases / embeddings."""
    raw = unwrap(model)
    names = {id(p): n for n, p in raw.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    exempt = raw.no_weight_decay() if hasattr(raw, "no_weight_decay") else {n for n, p in raw.named_parameters() if p.ndim < 2}
    wd = cfg.weight_decay
    if all(id(p) in names for p in params):
        decay = [p for p in params if names[id(p)] not in exempt]
        no_decay = [p for p in params if names[id(p)] in exempt]
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    else:  # FSDP flat parameters: names are gone, one group
        groups = [{"params": params, "weight_decay": wd}]
    betas = tuple(cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused or None)


class EMA:
    """fp32 shadow copies aligned with ``model.parameters()`` (works on FSDP shards too).

    The update is torch's own (``swa_utils.get_ema_multi_avg_fn``); its ``AveragedModel`` is not
    used because it deep-copies the module it is given, here a DDP-, FSDP- or compile-wrapped one."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: the average forgets the first steps quickly
        get_ema_multi_avg_fn(d)(self.shadow, [p.detach().float() for p in self.params], None)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the model."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, e in zip(self.params, self.shadow):
                p.copy_(e)
            try:
                yield
            finally:
                for p, b in zip(self.params, backup):
                    p.copy_(b)


# every rank gets the full dicts (DCP's cpu_offload would leave all but rank 0 empty); moved to CPU here
_FULL = StateDictOptions(full_state_dict=True)


def _full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The raw model's full state dict on CPU (plain keys: no DDP / compile prefixes). Under
    FSDP every rank must call it (the shards are gathered)."""
    return to_cpu(get_model_state_dict(model, options=_FULL))


def _load_full_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def _ema_state_dict(model: nn.Module, ema: EMA) -> dict[str, Tensor]:
    """The raw model's state dict (CPU) with the EMA weights in place of the parameters."""
    if _is_fsdp(model):
        with ema.swapped_in():
            return _full_state_dict(model)
    sd = _full_state_dict(model)
    for (name, _), e in zip(unwrap(model).named_parameters(), ema.shadow):
        sd[name] = e.detach().cpu().clone().to(sd[name].dtype)
    return sd


def _new_validation() -> dict[str, Any]:
    """The validation bookkeeping a run carries (and its checkpoints): ``val_curve`` as
    ``[step, val_loss]`` pairs (nats/token), the best val loss and its step (None before the
    first eval), evals since the best, whether the run stopped early, and the best weights
    (raw state dict on CPU; kept only with ``keep: best``)."""
    return {"val_curve": [], "best_val_loss": None, "best_step": None, "evals_since_best": 0, "stopped_early": False,
            "best_weights": None}


def _copy_validation(val: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of the bookkeeping: the curve copied; ``best_weights`` shared (the loop only
    ever replaces it, never writes into it)."""
    return {**val, "val_curve": [list(point) for point in val["val_curve"]]}


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, step: int, device: torch.device, micro_batches: int,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a resumed run needs: ``model`` and ``ema`` (raw state dicts, CPU; ``ema`` None
    when off), ``optimizer``, ``step``, ``rng``, ``micro_batches`` consumed, and the validation
    bookkeeping (keys of :func:`_new_validation`; empty curve when validation is off)."""
    ema_sd = None if ema is None else _ema_state_dict(model, ema)
    opt_sd = to_cpu(get_optimizer_state_dict(model, optimizer, options=_FULL))
    return {
        "model": _full_state_dict(model), "ema": ema_sd, "optimizer": opt_sd, "step": step,
        "rng": rng_state(device), "micro_batches": micro_batches, **_copy_validation(validation or _new_validation()),
    }


def final_weights(state: dict[str, Any]) -> dict[str, Tensor]:
    """The last weights to save and sample from: the EMA if the run kept one, else the model's."""
    return state["ema"] if state.get("ema") is not None else state["model"]


def kept_weights(state: dict[str, Any], keep: str) -> dict[str, Tensor]:
    """The weights ``keep`` asks for: ``"best"`` the lowest-val-loss weights when the run
    validated, else (``"last"``, or no validation) :func:`final_weights`."""
    if keep == "best" and state.get("best_weights") is not None:
        return state["best_weights"]
    return final_weights(state)


def ema_model(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """A copy of the raw ``model`` holding :func:`final_weights` of ``state`` (eval mode)."""
    out = copy.deepcopy(unwrap(model))
    out.load_state_dict(final_weights(state))
    return out.eval()


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, state: dict[str, Any], device) -> None:
    if ema is not None and state.get("ema") is not None:
        _load_full_state_dict(model, state["ema"])
        ema.shadow = [p.detach().float().clone() for p in ema.params]
    _load_full_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    set_rng_state(state["rng"], device)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def _agree(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a no-op without a process group): every rank then takes
    the same best-weights and early-stop decisions even if float rounding differed."""
    if _world_size() == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


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
    (loss: mean nats/token over the window; tokens/s: all ranks together, validation time
    excluded); ``on_checkpoint(step, checkpoint_state)`` every ``checkpoint_every`` steps and at
    the end (also an early stop).

    Validation (``evaluate`` given and ``cfg.eval_every`` > 0): every ``eval_every`` steps and at
    the end, ``evaluate(m)`` returns the val loss in nats/token of ``m``, the model holding the
    weights that get saved (EMA when on), in eval mode under ``no_grad``; every rank calls it
    (FSDP gathers inside) and rank 0's value counts. ``on_eval(step, val_loss)`` follows. With
    ``cfg.keep == "best"`` the lowest-val-loss weights are kept in the state
    (:func:`kept_weights`); with ``cfg.early_stop_patience`` p > 0 training stops after p evals
    without a new best. Returns the final metrics (last window's loss, lr, grad_norm,
    tokens_per_s; step; stopped_early 0/1).
    """
    device = torch.device(device)
    raw = unwrap(model)
    if model is raw:
        model.to(device)
    model.train()
    accum, clip, patience = cfg.grad_accum, cfg.grad_clip, cfg.early_stop_patience
    log_every, ckpt_every = cfg.log_every, cfg.checkpoint_every
    eval_every = cfg.eval_every if evaluate is not None else 0
    keep_best = cfg.keep == "best"
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    for group in optimizer.param_groups:  # the schedule's base: also in checkpoints, so they load alike
        group["initial_lr"] = cfg.lr
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step = 0
    val = _new_validation()
    if state is not None:
        _restore(model, optimizer, ema, state, device)
        step = int(state["step"])
        val = _copy_validation({**val, **{k: state[k] for k in val if k in state}})
    micro_batches = int(state.get("micro_batches", step * accum)) if state else 0
    scheduler = warmup_cosine(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                              min_lr_ratio=cfg.min_lr_ratio, last_step=step - 1)
    fwd = compile_model(model) if use_compile(cfg.compile, device) else model
    eval_model = model if _is_fsdp(model) else raw  # FSDP must gather shards; DDP's raw model needs no collective
    can_skip_sync = hasattr(model, "no_sync") and model is not raw
    world = _world_size()

    def validate(step: int) -> None:
        """Score the weights that get saved; update the best / patience bookkeeping in ``val``."""
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            model.eval()
            try:
                with torch.no_grad():
                    loss = _agree(float(evaluate(eval_model)), device)
            finally:
                model.train()
        val["val_curve"].append([step, loss])
        if val["best_val_loss"] is None or loss < val["best_val_loss"]:
            val.update(best_val_loss=loss, best_step=step, evals_since_best=0)
            if keep_best:
                val["best_weights"] = _full_state_dict(model) if ema is None else _ema_state_dict(model, ema)
        else:
            val["evals_since_best"] += 1
            val["stopped_early"] = patience > 0 and val["evals_since_best"] >= patience
        if on_eval is not None:
            on_eval(step, loss)

    bar = None
    if progress and is_main:  # on a terminal, in a log, or relayed from a Ray worker (arvision.progress)
        from arvision.progress import bar as progress_bar

        bar = progress_bar(cfg.steps, "prior", "step", initial=step)

    metrics: dict[str, float] = {}
    window_loss = torch.zeros((), device=device)
    window_steps, window_tokens, t0 = 0, 0, time.perf_counter()
    grad_norm = torch.zeros((), device=device)
    while step < cfg.steps and not val["stopped_early"]:
        lr = optimizer.param_groups[0]["lr"]
        for micro in range(accum):
            codes_BL, labels_B = next(batches)
            codes_BL = codes_BL.to(device, non_blocking=True)
            labels_B = labels_B.to(device, non_blocking=True)
            sync = model.no_sync() if can_skip_sync and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(device):
                    loss = fwd(codes_BL, labels_B, return_loss=True)
                (loss / accum).backward()
            window_loss += loss.detach() / accum
            window_tokens += codes_BL.numel() * world
            micro_batches += 1
        max_norm = clip if clip > 0 else float("inf")
        if hasattr(model, "clip_grad_norm_"):  # FSDP: norm over all shards
            grad_norm = model.clip_grad_norm_(max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(step)
        step += 1
        window_steps += 1
        if bar is not None:
            bar.update(1)

        if eval_every > 0 and (step % eval_every == 0 or step == cfg.steps):
            t_eval = time.perf_counter()
            validate(step)
            t0 += time.perf_counter() - t_eval  # keep validation out of tokens/s
        done = step == cfg.steps or val["stopped_early"]
        if step % log_every == 0 or done:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            metrics = {
                "loss": float(window_loss.item()) / window_steps, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": window_tokens / max(dt, 1e-9),
            }
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
            if on_log is not None:
                on_log(step, metrics)
            if not math.isfinite(metrics["loss"]):
                raise TrainingDiverged(
                    f"prior: the training loss is {metrics['loss']} in the {window_steps} steps up to step {step} "
                    f"(lr {lr:.2e}, grad norm {metrics['grad_norm']:.3g}): training diverged. Lower prior.lr or raise "
                    "prior.warmup_steps; on CUDA, a var prior with prior.dropout or prior.drop_path > 0 was seen to do "
                    "this (README, 'Training on a GPU'): set them to 0")
            window_loss.zero_()
            window_steps, window_tokens, t0 = 0, 0, time.perf_counter()
        if on_checkpoint is not None and (step % ckpt_every == 0 or done):
            on_checkpoint(step, checkpoint_state(model, optimizer, ema, step, device, micro_batches, val))
    if bar is not None:
        bar.close()
    return {**metrics, "step": float(step), "stopped_early": float(val["stopped_early"])}
