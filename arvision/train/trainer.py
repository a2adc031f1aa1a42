"""The one training skeleton: every trained stage (prior, tokenizer, feature net) plugs its loss
into :class:`Trainer`, which knows nothing of the model it trains (minGPT's trainer).

A stage's part is a :class:`Task`: ``step(batch, step) -> (loss, stats)`` for a micro-batch,
optionally ``after_step`` (e.g. the tokenizer's discriminator), and ``state_dict`` /
``load_state_dict`` for what else a checkpoint must carry. The trainer owns the rest, the same
for every stage (knobs: :class:`TrainerConfig`, built from the stage's params section):

- AdamW with configurable betas (fused on CUDA); no weight decay on what the model's
  ``no_weight_decay()`` names (the priors: norms, biases, embeddings), every parameter decayed
  for a model without one; linear warm-up, then cosine down to ``min_lr_ratio · lr``
  (:func:`arvision.train.common.warmup_cosine`, a torch ``LambdaLR``).
- ``grad_accum`` micro-batches per optimizer step, each loss scaled by 1/k, gradient sync only
  on the last micro-batch (``no_sync``), so k micro-batches of b equal one batch of k·b.
- Gradient clipping at ``grad_clip`` (0: none; the norm is measured and logged either way);
  an EMA of the weights (``ema_decay``, 0 = off, with the usual warm-up
  ``min(decay, (1 + step) / (10 + step))``): the EMA weights are what gets saved and sampled
  (:func:`final_weights`, :func:`ema_model`). The shadow weights follow ``model.parameters()``,
  FSDP shards included, and are updated by ``torch.optim.swa_utils.get_ema_multi_avg_fn``;
  ``AveragedModel`` would deep-copy the wrapped model instead.
- bf16 autocast around each ``Task.step`` on CUDA (fp32 master weights; ``mixed_precision``
  off: fp32), fp32 on CPU.
- A log window: every ``log_every`` steps and at the end, ``on_log(step, row)`` with the means
  over the window of the task's stats and of ``grad_norm``, the ``lr`` of the last step, and
  with a task ``unit`` the throughput ``{unit}_per_s`` (validation time excluded). A NaN or
  infinite loss stops the run there (:class:`TrainingDiverged`).
- Validation every ``eval_every`` steps and at the end (0 = off): ``evaluate`` scores the
  weights that get saved (the EMA when on) in eval mode; the trainer keeps the val curve, the
  best val loss and its step, and with ``keep: best`` a copy of the best weights
  (:func:`kept_weights`); with ``early_stop_patience`` p > 0 it stops after p evals without
  improvement. Under DDP / FSDP every rank evaluates and rank 0's value is broadcast, so all
  ranks take the same decisions.
- A checkpoint (:func:`checkpoint_state`) every ``checkpoint_every`` steps and at the end holds
  model, EMA, optimizer, step, RNG states, the log window, the validation bookkeeping and the
  task's own state; resuming from it continues exactly as the uninterrupted run would,
  provided ``batches`` continues where the checkpointed run left off (the state records
  ``micro_batches`` consumed; the trainer itself never skips data).
- Full state dicts (weights, optimizer) through ``torch.distributed.checkpoint.state_dict``:
  the same code for a plain, DDP, FSDP or compiled model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from arvision.errors import UserError
from arvision.train.common import autocast, rng_state, set_rng_state, to_cpu, warmup_cosine

__all__ = [
    "Trainer", "TrainerConfig", "Task", "TrainingDiverged", "EMA", "checkpoint_state", "final_weights", "kept_weights",
    "ema_model", "make_optimizer", "unwrap", "CHECKPOINT_FORMAT",
]

#: ``format`` of a :func:`checkpoint_state`: a checkpoint without it (or of another) was written by
#: a trainer this one cannot resume
CHECKPOINT_FORMAT = 1

Reduce = Callable[[Tensor], Tensor]


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: every later step would train garbage, so the
    run stops at the log line that saw it, naming the step and what to change."""


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """The trainer's knobs; each stage builds one from its params section (``name``: the section,
    used in the progress bar and in messages)."""

    name: str
    steps: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0: no clipping
    grad_accum: int = 1
    ema_decay: float = 0.0  # 0: no EMA of the weights
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: no validation
    keep: str = "last"  # best | last: which weights kept_weights gives
    early_stop_patience: int = 0  # 0: off
    mixed_precision: bool = True  # bf16 autocast on CUDA


class Task:
    """What a stage plugs into :class:`Trainer`: the loss of a micro-batch and what else a step
    does. Override :meth:`step`; the rest is optional."""

    #: the progress bar's label
    name = "train"
    #: what :meth:`count` counts (``"tokens"``: a ``tokens_per_s`` in the log); None: no throughput
    unit: str | None = None
    #: appended to the :class:`TrainingDiverged` message
    diverged_hint = ""

    def step(self, batch: Any, step: int) -> tuple[Tensor, dict[str, float | Tensor]]:
        """The loss of ``batch`` (to backpropagate) and stats to log (floats or 0-dim tensors,
        averaged over the log window; tensors stay on the device: no sync a step). Called
        under the trainer's autocast, ``grad_accum`` times a step (``step``: 0-based)."""
        raise NotImplementedError

    def after_step(self, step: int) -> dict[str, float]:
        """After the optimizer step (and before the EMA's): more stats of this step."""
        return {}

    def count(self, batch: Any) -> int:
        """Items in ``batch`` for the throughput (all ranks together)."""
        return 0

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows of a log row."""
        return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}"}

    def state_dict(self) -> dict[str, Any]:
        """What else a checkpoint carries (top-level keys beside the trainer's)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""


def unwrap(model: nn.Module) -> nn.Module:
    """The raw model under DDP / FSDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def make_optimizer(model: nn.Module, cfg: TrainerConfig | Any, *, fused: bool) -> torch.optim.AdamW:
    """AdamW with two groups: decayed, and undecayed (the names ``model.no_weight_decay()``
    gives; none for a model without it). ``cfg``: anything with ``lr``, ``betas``, ``weight_decay``."""
    raw = unwrap(model)
    names = {id(p): n for n, p in raw.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    exempt = raw.no_weight_decay() if hasattr(raw, "no_weight_decay") else set()
    wd = cfg.weight_decay
    if all(id(p) in names for p in params):
        decay = [p for p in params if names[id(p)] not in exempt]
        no_decay = [p for p in params if names[id(p)] in exempt]
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # a model without exemptions: one group
    else:  # FSDP flat parameters: names are gone, one group
        groups = [{"params": params, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


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


def _ema_state_dict(model: nn.Module, ema: EMA) -> dict[str, Tensor]:
    """The raw model's state dict (CPU) with the EMA weights in place of the parameters."""
    if is_fsdp(model):
        with ema.swapped_in():
            return _full_state_dict(model)
    sd = _full_state_dict(model)
    for (name, _), e in zip(unwrap(model).named_parameters(), ema.shadow):
        sd[name] = e.detach().cpu().clone().to(sd[name].dtype)
    return sd


def _new_validation() -> dict[str, Any]:
    """The validation bookkeeping a run carries (and its checkpoints): ``val_curve`` as
    ``[step, val_loss]`` pairs, the best val loss and its step (None before the first eval),
    evals since the best, whether the run stopped early, and the best weights (raw state dict
    on CPU; kept only with ``keep: best``)."""
    return {"val_curve": [], "best_val_loss": None, "best_step": None, "evals_since_best": 0, "stopped_early": False,
            "best_weights": None}


def _copy_validation(val: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of the bookkeeping: the curve copied; ``best_weights`` shared (the trainer only
    ever replaces it, never writes into it)."""
    return {**val, "val_curve": [list(point) for point in val["val_curve"]]}


def _new_window() -> dict[str, Any]:
    """The log window: sums of each stat over ``n`` steps since the last log row, and the last row."""
    return {"sums": {}, "n": 0, "last": {}}


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, step: int, device: torch.device, micro_batches: int,
    validation: dict[str, Any] | None = None, window: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
    done: bool = False,
) -> dict[str, Any]:
    """Everything a resumed run needs: ``model`` and ``ema`` (raw state dicts, CPU; ``ema`` None
    when off), ``optimizer``, ``step``, ``rng``, ``micro_batches`` consumed, the validation
    bookkeeping (keys of :func:`_new_validation`; empty curve when validation is off), the log
    ``window`` (CPU), the task's ``extra`` state (top-level keys), ``done`` (the run finished:
    nothing left to train) and ``format`` (:data:`CHECKPOINT_FORMAT`)."""
    ema_sd = None if ema is None else _ema_state_dict(model, ema)
    opt_sd = to_cpu(get_optimizer_state_dict(model, optimizer, options=_FULL))
    return {
        **(extra or {}), "format": CHECKPOINT_FORMAT, "done": done,
        "model": _full_state_dict(model), "ema": ema_sd, "optimizer": opt_sd, "step": step,
        "rng": rng_state(device), "micro_batches": micro_batches, **_copy_validation(validation or _new_validation()),
        "window": to_cpu(window or _new_window()),
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


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agree(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a no-op without a process group): every rank then takes
    the same best-weights and early-stop decisions even if float rounding differed."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def _replica_means(stats: dict[str, float], reduce: Reduce, device: torch.device) -> dict[str, float]:
    """``stats`` (the same keys on every replica) averaged over the replicas ``reduce`` sums over."""
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys] + [1.0], dtype=torch.float64, device=device)
    values = reduce(values)
    means = dict(zip(keys, (values[:-1] / values[-1]).tolist()))
    return {k: means[k] for k in stats}


class Trainer:
    """Trains ``model`` (its parameters; possibly DDP/FSDP-wrapped) on the loss ``task`` gives,
    for ``cfg.steps`` optimizer steps; see the module's docstring for what a step does.

    ``state``: a :func:`checkpoint_state` to resume from. ``evaluate(m)``: the val loss of ``m``
    (the weights that get saved, in eval mode under ``no_grad``; every rank calls it, rank 0's
    value counts). ``reduce``: a sum over data-parallel replicas (an all-reduce): the log rows
    are then means over the replicas. ``on_log(step, row)``, ``on_eval(step, val_loss)``,
    ``on_checkpoint(step, checkpoint_state)``: the run's outputs. ``progress``: a bar, on the
    main rank (``is_main``) only."""

    def __init__(
        self, model: nn.Module, task: Task, cfg: TrainerConfig, *, device: torch.device, state: dict | None = None,
        evaluate: Callable[[nn.Module], float] | None = None, reduce: Reduce | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_eval: Callable[[int, float], None] | None = None,
        on_checkpoint: Callable[[int, dict], None] | None = None,
        progress: bool = True, is_main: bool = True,
    ) -> None:
        self.model, self.task, self.cfg = model, task, cfg
        self.device = torch.device(device)
        self.evaluate, self.reduce = evaluate, reduce
        self.on_log, self.on_eval, self.on_checkpoint = on_log, on_eval, on_checkpoint
        self.progress, self.is_main = progress, is_main
        self.optimizer = make_optimizer(model, cfg, fused=self.device.type == "cuda")
        for group in self.optimizer.param_groups:  # the schedule's base: also in checkpoints, so they load alike
            group["initial_lr"] = cfg.lr
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.micro_batches = 0
        self.val = _new_validation()
        self.window = _new_window()
        if state is not None:
            self._restore(state)
        self.scheduler = warmup_cosine(self.optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                       min_lr_ratio=cfg.min_lr_ratio, last_step=self.step - 1)

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"a checkpoint of format {state.get('format')} (this trainer writes {CHECKPOINT_FORMAT}): "
                             "written by another version of the trainer, it cannot be resumed")
        opts = StateDictOptions(full_state_dict=True)
        if self.ema is not None and state.get("ema") is not None:
            set_model_state_dict(self.model, state["ema"], options=opts)
            self.ema.shadow = [p.detach().float().clone() for p in self.ema.params]
        set_model_state_dict(self.model, state["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        self.task.load_state_dict(state)
        set_rng_state(state["rng"], self.device)
        self.step = int(state["step"])
        self.micro_batches = int(state.get("micro_batches", self.step * self.cfg.grad_accum))
        self.val = _copy_validation({**self.val, **{k: state[k] for k in self.val if k in state}})
        window = state.get("window") or _new_window()
        self.window = {"sums": {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in window["sums"].items()},
                       "n": int(window["n"]), "last": dict(window["last"])}

    def state_dict(self) -> dict[str, Any]:
        """:func:`checkpoint_state` of the run as it stands."""
        return checkpoint_state(self.model, self.optimizer, self.ema, self.step, self.device, self.micro_batches,
                                self.val, self.window, self.task.state_dict(), done=self._done())

    def _done(self) -> bool:
        return self.step >= self.cfg.steps or bool(self.val["stopped_early"])

    def _validate(self) -> None:
        """Score the weights that get saved; update the best / patience bookkeeping."""
        model, ema, val, cfg = self.model, self.ema, self.val, self.cfg
        eval_model = model if is_fsdp(model) else unwrap(model)  # FSDP must gather shards; DDP's raw model needs no collective
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            model.eval()
            try:
                with torch.no_grad():
                    loss = _agree(float(self.evaluate(eval_model)), self.device)
            finally:
                model.train()
        val["val_curve"].append([self.step, loss])
        if val["best_val_loss"] is None or loss < val["best_val_loss"]:
            val.update(best_val_loss=loss, best_step=self.step, evals_since_best=0)
            if cfg.keep == "best":
                val["best_weights"] = _full_state_dict(model) if ema is None else _ema_state_dict(model, ema)
        else:
            val["evals_since_best"] += 1
            val["stopped_early"] = cfg.early_stop_patience > 0 and val["evals_since_best"] >= cfg.early_stop_patience
        if self.on_eval is not None:
            self.on_eval(self.step, loss)

    def _add(self, stats: dict[str, float | Tensor], scale: float = 1.0) -> None:
        sums = self.window["sums"]
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + (v / scale if scale != 1.0 else v)

    def _log(self, lr: float, count: int, seconds: float, bar) -> None:
        """Close the log window: its row (the means of the stats, over the replicas too with
        ``reduce``; the lr; the throughput of ``count`` items in ``seconds``) to the bar and
        ``on_log``; a loss that is not finite stops the run."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        cfg, task, n = self.cfg, self.task, self.window["n"]
        row = {k: float(v) / n for k, v in self.window["sums"].items()}
        if self.reduce is not None:
            row = _replica_means(row, self.reduce, self.device)
        row["lr"] = lr
        if task.unit:
            row[f"{task.unit}_per_s"] = count / max(seconds, 1e-9)
        self.window.update(sums={}, n=0, last=row)
        if bar is not None:
            bar.set_postfix(**task.postfix(row))
        if self.on_log is not None:
            self.on_log(self.step, dict(row))
        if not math.isfinite(row["loss"]):
            raise TrainingDiverged(
                f"{cfg.name}: the training loss is {row['loss']} in the {n} steps up to step {self.step} "
                f"(lr {lr:.2e}, grad norm {row['grad_norm']:.3g}): training diverged. Lower {cfg.name}.lr or raise "
                f"{cfg.name}.warmup_steps{task.diverged_hint}")

    def fit(self, batches: Iterator[Any]) -> dict[str, float]:
        """Train on ``batches`` (``grad_accum`` a step) up to ``cfg.steps`` or an early stop.
        Returns the last log row plus ``step`` and ``stopped_early`` (0/1)."""
        model, task, cfg, opt = self.model, self.task, self.cfg, self.optimizer
        model.train()
        accum = cfg.grad_accum
        eval_every = cfg.eval_every if self.evaluate is not None else 0
        can_skip_sync = hasattr(model, "no_sync") and model is not unwrap(model)
        precision = autocast(self.device) if cfg.mixed_precision else contextlib.nullcontext()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        bar = None
        if self.progress and self.is_main:  # on a terminal, in a log, or relayed from a Ray worker (arvision.progress)
            from arvision.progress import bar as progress_bar

            bar = progress_bar(cfg.steps, task.name, "step", initial=self.step)
        count, t0 = 0, time.perf_counter()
        while not self._done():
            lr = opt.param_groups[0]["lr"]
            for micro in range(accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise ValueError(f"{cfg.name}: the training batches ran out after {self.step} of {cfg.steps} steps") from None
                sync = model.no_sync() if can_skip_sync and micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    with precision:
                        loss, stats = task.step(batch, self.step)
                    (loss / accum if accum > 1 else loss).backward()
                self._add(stats, accum)
                count += task.count(batch)
                self.micro_batches += 1
            if hasattr(model, "clip_grad_norm_"):  # FSDP: norm over all shards
                grad_norm = model.clip_grad_norm_(max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            self.scheduler.step()
            opt.zero_grad(set_to_none=True)
            self._add({"grad_norm": grad_norm.detach().double()})
            self._add(task.after_step(self.step))
            if self.ema is not None:
                self.ema.update(self.step)
            self.step += 1
            self.window["n"] += 1
            if bar is not None:
                bar.update(1)

            if eval_every > 0 and (self.step % eval_every == 0 or self.step == cfg.steps):
                t_eval = time.perf_counter()
                self._validate()
                t0 += time.perf_counter() - t_eval  # keep validation out of the throughput
            done = self._done()
            if self.step % cfg.log_every == 0 or done:
                self._log(lr, count, time.perf_counter() - t0, bar)
                count, t0 = 0, time.perf_counter()
            every = cfg.checkpoint_every
            if self.on_checkpoint is not None and ((every > 0 and self.step % every == 0) or done):
                self.on_checkpoint(self.step, self.state_dict())
        if bar is not None:
            bar.close()
        return {**self.window["last"], "step": float(self.step), "stopped_early": float(self.val["stopped_early"])}
