"""Codebook health from integer codes: usage, perplexity, dead codes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from arvision.tokenizers.quantizer import counts_perplexity


def _counts(codes: Tensor, vocab_size: int) -> Tensor:
    return torch.bincount(codes.reshape(-1).long().cpu(), minlength=vocab_size).double()


def usage(codes: Tensor, vocab_size: int) -> float:
    """Share of the vocabulary that occurs at least once in ``codes``."""
    return float((_counts(codes, vocab_size) > 0).double().mean())


def perplexity(codes: Tensor, vocab_size: int) -> float:
    """exp(entropy) of the code histogram: the number of equally used codes it is worth."""
    return counts_perplexity(_counts(codes, vocab_size))


def codebook_stats(codes: Tensor, vocab_size: int) -> dict[str, float]:
    """``usage``, ``perplexity``, ``dead_codes`` (codes never used), and two usages that allow
    for a small sample: ``usage_possible``, used codes over ``min(vocab, number of codes)``
    (what could have been used at all), and ``usage_vs_uniform``, used codes over the number a
    perfectly balanced codebook would show on this many codes (1.0: as good as uniform; it
    can exceed 1 slightly). On few codes (msvq's coarse scales on a validation set: 364 codes
    against 512 entries) even a uniform codebook repeats codes, so ``usage_possible`` stays
    well under 1 there and ``usage_vs_uniform`` is the fair one."""
    c = _counts(codes, vocab_size)
    used = int((c > 0).sum())
    n = int(c.sum())
    return {
        "usage": used / vocab_size,
        "perplexity": perplexity(codes, vocab_size),
        "dead_codes": float(vocab_size - used),
        "usage_possible": used / max(1, min(vocab_size, n)),
        "usage_vs_uniform": used / max(1e-12, vocab_size * expected_uniform_usage(n, vocab_size)) if n else 0.0,
    }


def expected_uniform_usage(n_codes: int, vocab_size: int) -> float:
    """Expected usage if ``n_codes`` were drawn uniformly: 1 − (1 − 1/V)^n (the ceiling a
    perfectly balanced codebook reaches on a small sample)."""
    if vocab_size <= 1:
        return 1.0 if n_codes > 0 else 0.0
    return 1 - math.exp(n_codes * math.log1p(-1 / vocab_size))
