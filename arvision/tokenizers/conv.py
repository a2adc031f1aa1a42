"""The convolutional tokenizers' shared part: encoder and decoder nets, and
:class:`ConvTokenizer` (encoder → quantiser → decoder), the base of ``vq``, ``rq``, ``fsq`` and
``msvq``, with the helpers that turn its latent grid into vectors and back.

Letter legend: b - batch, c - channels, h/w - latent grid, n - flattened vectors,
z - latent width (``Z_CHANNELS``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arvision.errors import UserError
from arvision.tokenizers.interface import Tokenizer, quantiser_fp32, recon_loss

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig

# Latent width between encoder and quantiser (VAR's Cvae). The lookup itself happens in the
# smaller code_dim; this is the width the decoder (and the VAR prior, for msvq) sees.
Z_CHANNELS = 32


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(32, ch), num_channels=ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(ch_in), nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(ch_out), nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """``(B, C, H, W)`` → ``(B, z_channels, H/f, W/f)`` with f = 2**(len(channel_mult)-1)."""

    def __init__(self, channels: int, width: int, channel_mult: list[int], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        chs = [width * m for m in channel_mult]
        self.conv_in = nn.Conv2d(channels, chs[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = chs[0]
        for i, ch_level in enumerate(chs):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, ch_level))
                ch = ch_level
            if i < len(chs) - 1:  # strided conv halves the side, widens to the next level
                layers.append(nn.Conv2d(ch, chs[i + 1], 3, stride=2, padding=1))
                ch = chs[i + 1]
        layers.append(ResBlock(ch, ch))  # middle
        self.body = nn.Sequential(*layers)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: nearest-neighbour upsampling then a conv at each level."""

    def __init__(self, channels: int, width: int, channel_mult: list[int], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        chs = [width * m for m in reversed(channel_mult)]
        ch = chs[0]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch)]  # middle
        for i, ch_level in enumerate(chs):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, ch_level))
                ch = ch_level
            if i < len(chs) - 1:  # doubles the side, narrows to the next level
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, chs[i + 1], 3, padding=1)]
                ch = chs[i + 1]
        self.body = nn.Sequential(*layers)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class ConvTokenizer(Tokenizer):
    """Encoder → quantiser → decoder. Subclasses implement ``_quantize`` and ``_dequantize``,
    and, when their quantiser keeps state, :meth:`Tokenizer.update_quantizer`."""

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        self.downsample = 2 ** (len(cfg.channel_mult) - 1)
        if resolution % self.downsample:
            raise UserError(
                f"tokenizer.channel_mult has {len(cfg.channel_mult)} levels ({self.downsample}x downsampling), "
                f"which does not divide the resolution {resolution}"
            )
        self.latent_side = resolution // self.downsample
        args = (channels, cfg.width, list(cfg.channel_mult), cfg.num_res_blocks, Z_CHANNELS)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)

    # subclasses -----------------------------------------------------------
    def _quantize(self, z_BZhw: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """``(z_q (B, Z, h, w) straight-through, codes (B, L), aux loss, stats)``. Changes no
        state; in training mode it records what :meth:`update_quantizer` applies."""
        raise NotImplementedError

    def _dequantize(self, codes_BL: Tensor) -> Tensor:
        """Codes → ``z_q (B, Z, h, w)``, the same values ``_quantize`` gives in eval mode."""
        raise NotImplementedError

    def _quantize_fp32(self, z_BZhw: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """:meth:`_quantize` with autocast off: encoder and decoder may run in bf16, the
        quantiser never does (see :func:`quantiser_fp32`)."""
        with quantiser_fp32(z_BZhw):
            return self._quantize(z_BZhw.float())

    def _dequantize_fp32(self, codes_BL: Tensor) -> Tensor:
        with quantiser_fp32(codes_BL):
            return self._dequantize(codes_BL.long())

    @property
    def last_layer(self) -> Tensor:
        """The weight of the decoder's last conv (the one that outputs pixels): where the
        adversarial loss's adaptive weight compares the gradients of the reconstruction and
        adversarial losses (:func:`arvision.tokenizers.discriminator.adaptive_weight`)."""
        return self.decoder.conv_out.weight

    # interface ------------------------------------------------------------
    def encode(self, x_BCHW: Tensor) -> Tensor:
        return self._quantize_fp32(self.encoder(x_BCHW))[1]

    def decode(self, codes_BL: Tensor) -> Tensor:
        return self.decoder(self._dequantize_fp32(codes_BL)).float().clamp(-1, 1)

    def reconstruct(self, x_BCHW: Tensor) -> Tensor:
        z_q = self._quantize_fp32(self.encoder(x_BCHW))[0]
        return self.decoder(z_q).float().clamp(-1, 1)

    def training_loss(self, x_BCHW: Tensor) -> tuple[Tensor, dict[str, float], Tensor]:
        z_q, codes, aux, stats = self._quantize_fp32(self.encoder(x_BCHW))
        recon = self.decoder(z_q)
        loss, rstats = recon_loss(recon, x_BCHW)
        return loss + aux, {**rstats, **stats, "aux_loss": float(aux.detach())}, recon


def flatten_latent(z_BZhw: Tensor) -> Tensor:
    """Latent grid ``(B, Z, h, w)`` → vectors ``(B·h·w, Z)``, row-major per image."""
    return rearrange(z_BZhw, "b z h w -> (b h w) z")


def unflatten_latent(z_NZ: Tensor, b: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`flatten_latent`."""
    return rearrange(z_NZ, "(b h w) z -> b z h w", b=b, h=h, w=w)
