"""A small PatchGAN discriminator (pix2pix / VQGAN style) and the hinge losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchGAN(nn.Module):
    """``(B, C, H, W)`` → ``(B, 1, h, w)`` logits, one per overlapping patch."""

    def __init__(self, channels: int, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers):
            nxt = width * min(2**i, 8)
            mods += [nn.Conv2d(ch, nxt, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(min(32, nxt), nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()
