"""PSNR and SSIM in torch, on float images ``(B, C, H, W)``; both are means over images.

``data_range`` is max − min of the value range: 2.0 for [-1, 1] tensors (the default), 1.0
for [0, 1], 255 for uint8 values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(a_BCHW: Tensor, b_BCHW: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, averaged over the batch; ``inf`` when every image is identical."""
    mse_B = (a_BCHW.double() - b_BCHW.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse_B)).mean()  # mse 0 → inf


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a_BCHW: Tensor, b_BCHW: Tensor, data_range: float = 2.0, *, win_size: int = 11, sigma: float = 1.5
) -> Tensor:
    """Mean SSIM (Wang et al. 2004): Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, per channel,
    over 'valid' windows only (as scikit-image's ``gaussian_weights=True``, except that the
    variances here are the biased ones). Images smaller than the window use a window of their side."""
    a, b = a_BCHW.double(), b_BCHW.double()
    c = a.shape[1]
    win = min(win_size, a.shape[-1], a.shape[-2])
    g = _gaussian_window(win, sigma, a.dtype, a.device)
    kx = g.view(1, 1, 1, win).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, win, 1).repeat(c, 1, 1, 1)

    def blur(x: Tensor) -> Tensor:  # separable, depthwise, valid
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).mean()
