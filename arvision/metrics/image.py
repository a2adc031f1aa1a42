"""PSNR and SSIM on float images ``(B, C, H, W)``, through torchmetrics; both are means over images.
Also :func:`msssim_loss`, the tokenizer's optional perceptual loss (``tokenizer.perceptual: msssim``).

``data_range`` is max − min of the value range: 2.0 for [-1, 1] tensors (the default), 1.0
for [0, 1], 255 for uint8 values. Computed in float64 so that near-identical images keep
their precision.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

#: MS-SSIM's scale weights (Wang et al. 2003), finest first; small images use the first few
MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: MS-SSIM's Gaussian window for 16–64 px images: σ 0.8 (7 wide, torchmetrics' 2·int(3.5σ + 0.5)
#: + 1), not the standard 1.5 (11 wide), which at 32² leaves the third scale (8²) narrower
#: than the window's padding
MSSSIM_SIGMA = 0.8
MSSSIM_KERNEL = 7


def psnr(a_BCHW: Tensor, b_BCHW: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, averaged over the batch; ``inf`` when every image is identical."""
    return peak_signal_noise_ratio(
        a_BCHW.double(), b_BCHW.double(), data_range=data_range, reduction="elementwise_mean", dim=(1, 2, 3)
    )


def ssim(a_BCHW: Tensor, b_BCHW: Tensor, data_range: float = 2.0, *, sigma: float = 1.5) -> Tensor:
    """Mean SSIM (Wang et al. 2004): Gaussian window σ 1.5 (11 wide), K1 0.01, K2 0.03, per channel.

    Averaged over the 'valid' windows only, those that lie wholly inside the image, as
    scikit-image's ``gaussian_weights=True`` does: torchmetrics' own mean also counts windows
    over its reflection padding, which on 16–32 px images weighs the border heavily. Images
    narrower than the window have no valid window; for them the padded map's mean is used.
    """
    _, full_BCHW = structural_similarity_index_measure(
        a_BCHW.double(), b_BCHW.double(), data_range=data_range, sigma=sigma,
        reduction="none", return_full_image=True,
    )
    pad = int(3.5 * sigma + 0.5)  # torchmetrics' Gaussian window is 2·pad + 1 wide
    h, w = full_BCHW.shape[-2:]
    if h > 2 * pad and w > 2 * pad:
        full_BCHW = full_BCHW[..., pad : h - pad, pad : w - pad]
    return full_BCHW.flatten(1).mean(1).mean()


def msssim_scales(side: int) -> int:
    """How many MS-SSIM scales ``side``² images allow (at most 5): torchmetrics needs the side
    larger than (kernel - 1) · 2^(scales - 1). 16² → 2, 32² → 3, 64² → 4, 128² and up → 5."""
    n = 1
    while n < len(MSSSIM_BETAS) and side > (MSSSIM_KERNEL - 1) * 2**n:
        n += 1
    return n


def msssim_loss(recon_BCHW: Tensor, x_BCHW: Tensor) -> Tensor:
    """1 - MS-SSIM between a reconstruction and its images (both in [-1, 1]; computed in fp32
    on [0, 1], the range SSIM's constants are set for), with gradients: a structural loss that
    weighs local contrast and structure at several scales, which L1 / MSE average away.

    Scales per :func:`msssim_scales` for the image side, their weights the first of
    :data:`MSSSIM_BETAS` renormalised to sum to 1; ``normalize="relu"`` keeps the product of
    the scales' powers defined when a contrast-structure term goes negative (early training).
    """
    n = msssim_scales(min(x_BCHW.shape[-2:]))
    betas = MSSSIM_BETAS[:n]
    betas = tuple(b / sum(betas) for b in betas)
    a, b = recon_BCHW.float().add(1).div(2), x_BCHW.float().add(1).div(2)
    # fp32 under a bf16 autocast too: SSIM's variances are differences of local means of
    # squares, which bf16's 8-bit mantissa cancels to noise (autocast would run its convs in bf16)
    with torch.autocast(device_type=a.device.type, enabled=False):
        value = multiscale_structural_similarity_index_measure(
            a, b, data_range=1.0, sigma=MSSSIM_SIGMA, kernel_size=MSSSIM_KERNEL, betas=betas, normalize="relu",
        )
    return 1.0 - value
