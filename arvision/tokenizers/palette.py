"""``palette``: iGPT-style colour palette, no spatial compression. Every pixel becomes the index
of its nearest palette colour (k-means over sampled pixels; for 1-channel data, intensity
levels by 1-D k-means). Layout ``[(H, W)]``. Fitted, not trained: see :meth:`fit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from arvision.tokenizers.interface import Tokenizer

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig


class PaletteTokenizer(Tokenizer):
    kind = "palette"

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        self.vocab_size = cfg.palette_size
        self.layout = [(resolution, resolution)]
        # until fitted: evenly spaced greys, so the tokenizer is usable (and testable) at once
        grey = torch.linspace(-1, 1, self.vocab_size).unsqueeze(1).repeat(1, channels)
        self.register_buffer("palette", grey)  # (K, C) in [-1, 1]

    @torch.no_grad()
    def fit(self, images_NHWC: np.ndarray, *, seed: int, max_pixels: int = 200_000, iters: int = 30) -> dict[str, float]:
        """k-means on up to ``max_pixels`` pixels sampled with ``seed``; deterministic (numpy, float64)."""
        rng = np.random.default_rng(seed)
        px = images_NHWC.reshape(-1, images_NHWC.shape[-1]).astype(np.float64) / 127.5 - 1.0
        if len(px) > max_pixels:
            px = px[rng.choice(len(px), max_pixels, replace=False)]
        k = self.vocab_size
        uniq = np.unique(px, axis=0)
        if len(uniq) <= k:  # fewer colours than palette slots: use them all, pad by repeating
            centres = uniq[np.arange(k) % len(uniq)]
        else:
            if px.shape[1] == 1:  # intensity levels: Lloyd-Max from evenly spaced levels
                # (not quantiles: on MNIST most quantiles are the black background, and the
                # duplicate levels would stay unused)
                centres = np.linspace(px.min(), px.max(), k)[:, None]
            else:  # k-means++ seeding on a subsample
                sub = px[rng.choice(len(px), min(len(px), 20_000), replace=False)]
                centres = [sub[rng.integers(len(sub))]]
                d2 = ((sub - centres[0]) ** 2).sum(1)
                for _ in range(1, k):
                    centres.append(sub[rng.choice(len(sub), p=d2 / d2.sum())] if d2.sum() > 0 else sub[rng.integers(len(sub))])
                    d2 = np.minimum(d2, ((sub - centres[-1]) ** 2).sum(1))
                centres = np.stack(centres)
            for _ in range(iters):
                assign = _nearest(px, centres)
                for j in range(k):
                    m = assign == j
                    if m.any():
                        centres[j] = px[m].mean(0)
        assign = _nearest(px, centres)
        mse = float(((px - centres[assign]) ** 2).mean())
        self.palette.copy_(torch.from_numpy(centres).to(self.palette))
        return {"fit_mse": mse, "fit_psnr": float(10 * np.log10(4.0 / max(mse, 1e-10)))}

    def encode(self, x_BCHW: Tensor) -> Tensor:
        b = x_BCHW.shape[0]
        px = rearrange(x_BCHW.float(), "b c h w -> (b h w) c")
        d = (self.palette.float().pow(2).sum(1) - 2 * px @ self.palette.float().t())  # ||p||² - 2<x, p>
        return rearrange(d.argmin(1), "(b l) -> b l", b=b)

    def decode(self, codes_BL: Tensor) -> Tensor:
        s = self.resolution
        px = F.embedding(codes_BL.long(), self.palette.float())  # (b, l, c)
        return rearrange(px, "b (h w) c -> b c h w", h=s, w=s).clamp(-1, 1)

    def reconstruct(self, x_BCHW: Tensor) -> Tensor:
        return self.decode(self.encode(x_BCHW))

    def training_loss(self, x_BCHW: Tensor) -> tuple[Tensor, dict[str, float], Tensor]:
        recon = self.reconstruct(x_BCHW)
        mse = F.mse_loss(recon, x_BCHW.float())
        return mse, {"mse": float(mse), "psnr": float(10 * torch.log10(4.0 / mse.clamp_min(1e-10)))}, recon


def _nearest(px: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    out = np.empty(len(px), dtype=np.int64)
    c2 = (centres**2).sum(1)
    for i in range(0, len(px), chunk):
        out[i : i + chunk] = (c2 - 2 * px[i : i + chunk] @ centres.T).argmin(1)
    return out
