"""``rq``: residual quantisation (RQ-VAE): ``rq_depth`` lookups per position on the running
residual, one shared codebook. Layout ``[(h, w, depth)]``; codes position by position, depth
within position.

The lookup is Euclidean (``l2_norm`` is ignored): the residual shrinks with depth, and unit
vectors on one sphere could not follow it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from arvision.tokenizers.conv import Z_CHANNELS, ConvTokenizer, flatten_latent, unflatten_latent
from arvision.tokenizers.interface import Reduce
from arvision.tokenizers.quantizer import VectorQuantizer

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig


class RQTokenizer(ConvTokenizer):
    kind = "rq"

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        self.depth = cfg.rq_depth
        self.quantizer = VectorQuantizer(Z_CHANNELS, cfg, l2_norm=False)
        self.vocab_size = cfg.codebook_size
        self.layout = [(self.latent_side, self.latent_side, self.depth)]

    def _quantize(self, z_BZhw: Tensor):
        b, _, h, w = z_BZhw.shape
        q = self.quantizer
        e_Nd = q.proj_in(flatten_latent(z_BZhw))  # residual lives in code space
        if self.training and q.needs_init:
            q.plan_init(e_Nd)
        residual, qsum = e_Nd, torch.zeros_like(e_Nd)
        codes, aux = [], e_Nd.new_zeros(())
        for _ in range(self.depth):
            c = q.lookup(residual.detach())
            v = torch.nn.functional.embedding(c, q.codebook())
            aux = aux + q.commitment * torch.nn.functional.mse_loss(residual, v.detach())
            if not q.use_ema:
                aux = aux + torch.nn.functional.mse_loss(v, residual.detach())
            if self.training:
                q.record(residual, c)
            qsum = qsum + v
            residual = residual - v.detach()
            codes.append(c)
        if torch.is_grad_enabled():
            qsum = e_Nd + (qsum - e_Nd).detach()  # straight-through
        codes_BL = rearrange(torch.stack(codes, 1), "(b l) d -> b (l d)", b=b)
        return unflatten_latent(q.proj_out(qsum), b, h, w), codes_BL, aux / self.depth, {}

    def _dequantize(self, codes_BL: Tensor) -> Tensor:
        b, s, q = codes_BL.shape[0], self.latent_side, self.quantizer
        codes_Nd = rearrange(codes_BL, "b (l d) -> (b l) d", d=self.depth)
        qsum = torch.zeros(codes_Nd.shape[0], q.d, device=codes_BL.device)
        for i in range(self.depth):  # same order of additions as _quantize
            qsum = qsum + torch.nn.functional.embedding(codes_Nd[:, i], q.codebook())
        return unflatten_latent(q.proj_out(qsum), b, s, s)

    def update_quantizer(self, reduce: Reduce | None = None) -> dict[str, float]:
        return self.quantizer.update(reduce)
