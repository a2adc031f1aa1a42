"""The adversarial half of the VQGAN recipe (Esser et al. 2021; LlamaGen, VAR's VQVAE): a
PatchGAN discriminator and the losses around it.

An L1 + MSE tokenizer regresses to the mean of what a code could stand for: blur. A
discriminator that scores each patch as real or reconstructed gives the decoder a loss that
prefers one sharp plausible patch to the average of several. Here:

- :class:`PatchDiscriminator`: pix2pix's ``NLayerDiscriminator`` (strided 4×4 convs, LeakyReLU),
  with GroupNorm instead of BatchNorm: per-sample statistics, so a batch of real and
  reconstructed images can go through in one forward, DDP needs no synchronised batch
  statistics and bf16 autocast is safe;
- :func:`hinge_d_loss` (the discriminator's loss), :func:`generator_adv_loss` (the decoder's),
  :func:`adaptive_weight` (taming's balance of the two gradients at the decoder's last layer),
  :func:`feature_matching_loss` (a perceptual loss from the discriminator's own features: no
  downloaded network).

Every loss here is computed in fp32 (logits and features are cast), whatever the autocast.
Imports only torch.

Letter legend: b - batch, c - channels, h/w - the patch-logit grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: LeakyReLU slope of pix2pix / taming
LEAKY_SLOPE = 0.2
#: taming's bounds on the adaptive weight: 0 below, 1e4 above (a vanishing adversarial gradient
#: must not blow it up)
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_WEIGHT_EPS = 1e-4


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(32, ch), num_channels=ch, eps=1e-6)


def patch_side(resolution: int, layers: int) -> int:
    """Side of the discriminator's logit map for ``resolution``² images: each of the ``layers``
    strided convs (4×4, stride 2, pad 1) halves the side (rounding down), the two last (4×4,
    stride 1, pad 1) take one pixel each."""
    side = resolution
    for _ in range(layers):
        side = (side + 2 - 4) // 2 + 1
    return side - 2


class PatchDiscriminator(nn.Module):
    """``(B, C, H, W)`` images in [-1, 1] → patch logits ``(B, 1, h, w)``, one per receptive field
    (70×70 pixels for 3 layers, so at 32² every logit sees nearly the whole image; that is fine:
    the logit map is still 2×2 and the decoder is pushed towards realistic detail).

    ``width`` channels in the first conv, doubled at each strided layer up to 8×; ``layers``
    strided convs (pix2pix's ``n_layers``). :func:`patch_side` must be at least 1.
    """

    def __init__(self, channels: int, width: int = 64, layers: int = 3, *, resolution: int | None = None) -> None:
        super().__init__()
        if resolution is not None and patch_side(resolution, layers) < 1:
            raise ValueError(f"a discriminator of {layers} strided layers leaves no logit for {resolution}² images; "
                             f"use at most {max_layers(resolution)} layers")
        chs = [width * min(2**i, 8) for i in range(layers + 1)]
        blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(channels, chs[0], 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE))]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1  # the last hidden conv keeps the side, as pix2pix's
            blocks.append(nn.Sequential(nn.Conv2d(chs[i - 1], chs[i], 4, stride=stride, padding=1, bias=False), _norm(chs[i]),
                                        nn.LeakyReLU(LEAKY_SLOPE)))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(chs[-1], 1, 4, stride=1, padding=1)
        self.apply(_init_weights)

    def forward_features(self, x_BCHW: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(logits (B, 1, h, w), features)``: the output of every hidden block, finest first."""
        feats, h = [], x_BCHW
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return self.head(h), feats

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.forward_features(x_BCHW)[0]


def max_layers(resolution: int) -> int:
    """The most strided layers that leave a logit map for ``resolution``² images (0: none do)."""
    n = 0
    while patch_side(resolution, n + 1) >= 1:
        n += 1
    return n


def _init_weights(m: nn.Module) -> None:
    """pix2pix / taming's init: conv weights N(0, 0.02), norm scales N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss, ½ (E[relu(1 - D(x))] + E[relu(1 + D(x̂))]): 0 once real
    patches score ≥ 1 and reconstructed ones ≤ -1, so a winning discriminator stops pushing."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """The decoder's adversarial loss, -E[D(x̂)] (taming's non-saturating hinge generator loss)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor) -> Tensor:
    """taming's λ = ‖∇_last rec_loss‖ / (‖∇_last adv_loss‖ + 1e-4), clamped to [0, 1e4], detached:
    the adversarial gradient at the decoder's last layer scaled to the reconstruction's, so one
    ``adv_weight`` means the same whatever the two losses' scales. ``retain_graph``: the
    backward of the total loss follows on the same graph."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    lam = g_rec.float().norm() / (g_adv.float().norm() + ADAPTIVE_WEIGHT_EPS)
    return lam.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


def feature_matching_loss(feats_real: list[Tensor], feats_fake: list[Tensor]) -> Tensor:
    """Mean over the discriminator's blocks of the L1 distance between the features of the
    images and of their reconstructions (pix2pixHD's feature matching; ``feats_real`` are the
    targets and should carry no gradient)."""
    terms = [F.l1_loss(f.float(), r.detach().float()) for r, f in zip(feats_real, feats_fake)]
    return torch.stack(terms).mean()


__all__ = ["PatchDiscriminator", "patch_side", "max_layers", "hinge_d_loss", "generator_adv_loss", "adaptive_weight",
           "feature_matching_loss"]
