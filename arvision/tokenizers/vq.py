"""``vq``: VQGAN-style tokenizer, one code per latent position (layout ``[(h, w)]``)."""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor

from arvision.tokenizers.base import Z_CHANNELS, ConvTokenizer, VectorQuantizer, flatten_latent, unflatten_latent


class VQTokenizer(ConvTokenizer):
    kind = "vq"

    def __init__(self, cfg: Any, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        self.quantizer = VectorQuantizer(Z_CHANNELS, cfg)
        self.vocab_size = cfg.codebook_size
        self.layout = [(self.latent_side, self.latent_side)]

    def _quantize(self, z_BZhw: Tensor):
        b, _, h, w = z_BZhw.shape
        zq_NZ, codes_N, aux = self.quantizer(flatten_latent(z_BZhw))
        stats = self.quantizer.update() if self.training else {}
        codes_BL = rearrange(codes_N, "(b l) -> b l", b=b)  # row-major over (h, w)
        return unflatten_latent(zq_NZ, b, h, w), codes_BL, aux, stats

    def _dequantize(self, codes_BL: Tensor) -> Tensor:
        b, s = codes_BL.shape[0], self.latent_side
        return unflatten_latent(self.quantizer.vectors(codes_BL.reshape(-1)), b, s, s)
