"""``fsq``: finite scalar quantisation (Mentzer et al. 2023). Each of ``len(fsq_levels)``
projected channels is bounded and rounded to its number of levels; the code is the
mixed-radix number of the digits, so the codebook is implicit (vocab = prod(levels)) and
needs no codebook loss, EMA or restarts (``update_quantizer`` is the interface's no-op).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

from arvision.tokenizers.conv import Z_CHANNELS, ConvTokenizer
from arvision.tokenizers.quantizer import counts_perplexity

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig


class FSQTokenizer(ConvTokenizer):
    kind = "fsq"

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        levels = list(cfg.fsq_levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        self.proj_in = nn.Conv2d(Z_CHANNELS, len(levels), 1)
        self.proj_out = nn.Conv2d(len(levels), Z_CHANNELS, 1)
        self.vocab_size = math.prod(levels)
        self.layout = [(self.latent_side, self.latent_side)]

    def _bound_round(self, z_BDhw: Tensor) -> Tensor:
        """Digits as centred integers (float), e.g. L=5 → {-2..2}, L=8 → {-4..3}."""
        lv = self.levels.view(1, -1, 1, 1).float()
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels.view(1, -1, 1, 1) % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        bounded = torch.tanh(z_BDhw + shift) * half_l - offset
        rounded = bounded.round()
        if torch.is_grad_enabled():
            rounded = bounded + (rounded - bounded).detach()  # straight-through
        return rounded

    def _scale(self) -> Tensor:
        return (self.levels // 2).view(1, -1, 1, 1).float()

    def _quantize(self, z_BZhw: Tensor):
        digits = self._bound_round(self.proj_in(z_BZhw))  # (b, d, h, w) centred integers
        idx = (digits.detach().round().long() + self.levels.view(1, -1, 1, 1) // 2)
        codes = (idx * self.basis.view(1, -1, 1, 1)).sum(1)  # (b, h, w)
        zq = self.proj_out(digits / self._scale())
        stats = {}
        if self.training:
            counts = torch.bincount(codes.reshape(-1), minlength=self.vocab_size).float()
            stats = {
                "batch_usage": float((counts > 0).float().mean()),
                "batch_perplexity": counts_perplexity(counts),
            }
        return zq, rearrange(codes, "b h w -> b (h w)"), z_BZhw.new_zeros(()), stats

    def _dequantize(self, codes_BL: Tensor) -> Tensor:
        s = self.latent_side
        codes = rearrange(codes_BL, "b (h w) -> b 1 h w", h=s, w=s)
        idx = (codes // self.basis.view(1, -1, 1, 1)) % self.levels.view(1, -1, 1, 1)
        digits = (idx - self.levels.view(1, -1, 1, 1) // 2).float()
        return self.proj_out(digits / self._scale())
