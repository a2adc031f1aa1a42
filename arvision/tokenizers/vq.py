"""``vq``: VQGAN-style tokenizer, one code per latent position (layout ``[(h, w)]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from einops import rearrange
from torch import Tensor

from arvision.tokenizers.conv import Z_CHANNELS, ConvTokenizer, flatten_latent, unflatten_latent
from arvision.tokenizers.interface import Reduce
from arvision.tokenizers.quantizer import VectorQuantizer

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig


class VQTokenizer(ConvTokenizer):
    kind = "vq"

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        self.quantizer = VectorQuantizer(Z_CHANNELS, cfg)
        self.vocab_size = cfg.codebook_size
        self.layout = [(self.latent_side, self.latent_side)]

    def _quantize(self, z_BZhw: Tensor):
        b, _, h, w = z_BZhw.shape
        zq_NZ, codes_N, aux = self.quantizer(flatten_latent(z_BZhw))
        codes_BL = rearrange(codes_N, "(b l) -> b l", b=b)  # row-major over (h, w)
        return unflatten_latent(zq_NZ, b, h, w), codes_BL, aux, {}

    def _dequantize(self, codes_BL: Tensor) -> Tensor:
        b, s = codes_BL.shape[0], self.latent_side
        return unflatten_latent(self.quantizer.vectors(codes_BL.reshape(-1)), b, s, s)

    def update_quantizer(self, reduce: Reduce | None = None) -> dict[str, float]:
        return self.quantizer.update(reduce)
