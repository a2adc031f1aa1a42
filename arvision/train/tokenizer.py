"""Training and evaluating a tokenizer: one loop for every kind.

``palette`` is fitted (k-means), every other kind trained by AdamW on L1 + MSE plus the
kind's quantiser loss, optionally with a PatchGAN hinge loss after ``disc_start`` steps.
Deterministic on CPU for a seed: the global torch RNG is seeded here and batches are drawn
by a seeded ``torch.Generator`` (epochs of a fixed permutation).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch


from arvision.metrics.codebook import codebook_stats
from arvision.metrics.image import psnr, ssim
from arvision.tokenizers import images_to_tensor, tensor_to_images
from arvision.tokenizers.base import Tokenizer

LogFn = Callable[[int, dict[str, float]], None]


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to 10% of it at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless batches of indices: a fresh seeded permutation each epoch."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i : i + batch_size]


def train_tokenizer(
    tok: Tokenizer,
    train_images: np.ndarray,
    cfg: Any,
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
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    disc = d_opt = None
    if cfg.adversarial:
        from arvision.tokenizers.disc import PatchGAN, hinge_d_loss, hinge_g_loss

        disc = PatchGAN(tok.channels).to(device)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    batches = _batches(len(data), min(cfg.batch_size, len(data)), gen)
    last: dict[str, float] = {}
    acc: dict[str, float] = {}
    n_acc = 0
    bar = tqdm(range(cfg.steps), desc=f"tokenizer/{tok.kind}", unit="step", disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = next(batches).to(device)
        x = data[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, C, H, W) in [-1, 1]
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            loss, stats, recon = tok.training_loss(x)
            gan_on = disc is not None and step >= cfg.disc_start
            if gan_on:
                g_loss = hinge_g_loss(disc(recon))
                loss = loss + cfg.disc_weight * g_loss
                stats["g_loss"] = float(g_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(tok.parameters(), cfg.grad_clip))
        opt.step()
        if gan_on:
            with _autocast(device):
                d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            stats["d_loss"] = float(d_loss)
        stats["loss"] = float(loss.detach())
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            last = {k: v / n_acc for k, v in acc.items()}
            last["lr"] = lr_at(step, cfg)
            acc, n_acc = {}, 0
            bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last.get('psnr', 0):.2f}", usage=f"{last.get('batch_usage', 1):.2f}")
            if log:
                log(step + 1, last)
    elapsed = time.perf_counter() - t0
    tok.eval()
    return {**last, "train_time_s": elapsed, "images_per_s": cfg.steps * cfg.batch_size / max(elapsed, 1e-9)}


@torch.no_grad()
def _encode_all(tok: Tokenizer, images: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    codes = []
    for i in range(0, len(images), batch_size):
        with _autocast(device):
            codes.append(tok.encode(images_to_tensor(images[i : i + batch_size]).to(device)).cpu())
    return torch.cat(codes) if codes else torch.zeros(0, tok.seq_len, dtype=torch.long)


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
        with _autocast(device):
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
        codes = _encode_all(tok, usage_images, batch_size, device)
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


__all__ = ["train_tokenizer", "evaluate_tokenizer", "lr_at"]
