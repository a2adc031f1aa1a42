"""Training and evaluating a tokenizer: one loop for every kind.

``palette`` is fitted (k-means); every other kind is trained by AdamW on L1 + MSE plus the
kind's quantiser loss, with the quantiser's state (EMA codebook, restarts, first-batch
initialisation) applied by an explicit ``tok.update_quantizer()`` after each training forward.
Deterministic on CPU for a seed: the global torch RNG is seeded here and batches come from
:func:`arvision.train.common.endless_indices` (epoch e: a permutation seeded ``seed + e``).
``cfg`` is the ``tokenizer`` section (:class:`arvision.config.TokenizerConfig`).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from arvision.config import TokenizerConfig
from arvision.metrics.codebook import codebook_stats
from arvision.metrics.image import psnr, ssim
from arvision.tokenizers import images_to_tensor, tensor_to_images
from arvision.tokenizers.interface import Tokenizer
from arvision.train.common import autocast, encode_images, endless_indices, warmup_cosine

LogFn = Callable[[int, dict[str, float]], None]


def train_tokenizer(
    tok: Tokenizer,
    train_images: np.ndarray,
    cfg: TokenizerConfig,
    *,
    seed: int,
    device: torch.device,
    log: LogFn | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train (or, for ``palette``, fit) ``tok`` in place on uint8 images ``(N, H, W, C)``.

    Returns the last logged training stats plus ``train_time_s`` and ``images_per_s``.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    tok.to(device)
    t0 = time.perf_counter()
    if tok.kind == "palette":
        stats = tok.fit(train_images, seed=seed)
        stats["train_time_s"] = time.perf_counter() - t0
        if log:
            log(0, stats)
        return stats

    from tqdm import tqdm

    cuda = device.type == "cuda"
    if cuda:
        tok.to(memory_format=torch.channels_last)
        if cfg.compile:  # in place: state_dict keys stay the same
            tok.encoder.compile()
            tok.decoder.compile()
    tok.train()
    data = torch.from_numpy(np.ascontiguousarray(train_images)).to(device)  # uint8 (N, H, W, C)
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    schedule = warmup_cosine(opt, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
    batches = endless_indices(len(data), min(cfg.batch_size, len(data)), seed)
    last: dict[str, float] = {}
    acc: dict[str, float] = {}
    n_acc = 0
    bar = tqdm(range(cfg.steps), desc=f"tokenizer/{tok.kind}", unit="step", disable=not progress, leave=False)
    for step in bar:
        lr = opt.param_groups[0]["lr"]
        idx = next(batches).to(device)
        x = data[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, C, H, W) in [-1, 1]
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            loss, stats, _ = tok.training_loss(x)
            stats.update(tok.update_quantizer())  # codebook EMA, restarts, first-batch init: before backward
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(tok.parameters(), cfg.grad_clip))
        opt.step()
        schedule.step()
        stats["loss"] = float(loss.detach())
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            last = {k: v / n_acc for k, v in acc.items()}
            last["lr"] = lr
            acc, n_acc = {}, 0
            bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last.get('psnr', 0):.2f}", usage=f"{last.get('batch_usage', 1):.2f}")
            if log:
                log(step + 1, last)
    elapsed = time.perf_counter() - t0
    tok.eval()
    return {**last, "train_time_s": elapsed, "images_per_s": cfg.steps * cfg.batch_size / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate_tokenizer(
    tok: Tokenizer,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    usage_images: np.ndarray | None = None,
) -> dict[str, float]:
    """Reconstruction and codebook metrics of ``tok`` on uint8 images ``(N, H, W, C)``.

    ``psnr`` / ``ssim``: per-image means over ``images``, on the uint8 reconstruction (what a
    user sees). Codebook metrics (see :func:`arvision.metrics.codebook.codebook_stats`):
    ``usage`` (share of the vocabulary used), ``usage_possible``, ``usage_vs_uniform``,
    ``perplexity``, ``dead_codes``; msvq adds ``usage_scale{k}``, ``usage_possible_scale{k}``,
    ``usage_vs_uniform_scale{k}`` and ``perplexity_scale{k}`` for each scale k (0 = coarsest)
    and ``usage_min_scale``, the smallest ``usage_possible_scale{k}``: the one number for
    "no scale collapsed". The codebook metrics are over the codes of ``usage_images`` when
    given (pass the training set: msvq's coarse scales have one or four codes an image, too
    few on a validation set to tell a healthy codebook from a collapsing one), else of
    ``images``; ``usage_images_n`` says how many images they were counted on.
    """
    device = torch.device(device)
    was_training = tok.training
    tok.eval().to(device)
    psnr_sum = ssim_sum = 0.0
    codes_all = []
    for i in range(0, len(images), batch_size):
        x = images_to_tensor(images[i : i + batch_size]).to(device)
        with autocast(device):
            codes = tok.encode(x)
            rec = tok.decode(codes)
        rec = images_to_tensor(tensor_to_images(rec.float()))  # what is saved and shown: uint8
        x = x.cpu()
        psnr_sum += float(psnr(rec, x)) * len(x)
        ssim_sum += float(ssim(rec, x)) * len(x)
        codes_all.append(codes.cpu())
    n = max(1, len(images))
    codes = torch.cat(codes_all) if codes_all else torch.zeros(0, tok.seq_len, dtype=torch.long)
    if usage_images is not None and len(usage_images):
        codes = encode_images(tok, usage_images, batch_size=batch_size, device=device)
    tok.train(was_training)
    out = {"psnr": psnr_sum / n, "ssim": ssim_sum / n, **codebook_stats(codes, tok.vocab_size)}
    out["usage_images_n"] = float(len(codes))
    if tok.kind == "msvq":
        start = 0
        for k, (h, w) in enumerate(tok.layout):
            st = codebook_stats(codes[:, start : start + h * w], tok.vocab_size)
            for key in ("usage", "usage_possible", "usage_vs_uniform", "perplexity"):
                out[f"{key}_scale{k}"] = st[key]
            start += h * w
        out["usage_min_scale"] = min(out[f"usage_possible_scale{k}"] for k in range(len(tok.layout)))
    return out


__all__ = ["train_tokenizer", "evaluate_tokenizer"]
