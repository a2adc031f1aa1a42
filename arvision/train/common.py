"""What every trainer here shares: the precision policy, the learning-rate schedule, the
seeded endless batch order and batched encoding with a tokenizer. One of each, used by the
tokenizer trainer (:mod:`arvision.train.tokenizer`), the prior loop (:mod:`arvision.train.loop`,
:mod:`arvision.train.ray`), the feature net and the ``tokens`` stage.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["autocast", "warmup_cosine", "lr_factor", "endless_indices", "encode_images"]


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (fp32 master weights), full fp32 elsewhere."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based): linear
    warm-up over ``warmup_steps``, then a cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float, last_step: int = -1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a torch scheduler: ``scheduler.step()`` after each optimizer step.
    ``last_step`` (the last step taken; -1: none) resumes the schedule where a run stopped."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio),
        last_epoch=last_step,
    )


def to_cpu(tree: Any) -> Any:
    """A copy of ``tree`` (tensors, dicts, lists, tuples, plain values) with its tensors on the CPU:
    what a checkpoint holds."""
    if isinstance(tree, Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return copy.deepcopy(tree)


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's global RNG states a resumed run restores: the CPU's, and ``device``'s on a GPU."""
    st: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def endless_indices(n: int, batch_size: int, seed: int, skip: int = 0) -> Iterator[Tensor]:
    """Endless batches of row indices into ``n`` rows: epoch ``e`` is the permutation drawn by a
    generator seeded ``seed + e``, cut into full batches (the remainder waits for the next
    epoch's order); with ``n < batch_size`` each batch is the whole permutation. ``skip``
    drops the first batches (a resumed run continues where it stopped)."""
    if n <= 0:
        raise ValueError("no rows to draw batches from")
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, max(1, n - batch_size + 1), batch_size):
            if skip > 0:
                skip -= 1
                continue
            yield order[i : i + batch_size]
        epoch += 1


@torch.no_grad()
def encode_images(
    tok, images: np.ndarray, *, batch_size: int, device: torch.device | str,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Codes ``(N, L)`` (int64, CPU) of uint8 images ``(N, H, W, C)`` by ``tok`` in eval mode,
    ``batch_size`` images at a time under :func:`autocast`; ``progress(k)`` after each batch."""
    from arvision.images import images_to_tensor

    device = torch.device(device)
    codes = []
    for i in range(0, len(images), batch_size):
        # uint8 travels (a quarter of float32's bytes) and becomes float where the model runs:
        # the same numbers on CPU, and on a GPU a channels-last input without a CPU pass
        x = images_to_tensor(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device, non_blocking=True))
        with autocast(device):
            codes.append(tok.encode(x).cpu())
        if progress is not None:
            progress(len(x))
    return torch.cat(codes) if codes else torch.zeros(0, tok.seq_len, dtype=torch.long)
