"""PSNR and SSIM on float images ``(B, C, H, W)``, through torchmetrics; both are means over images.

``data_range`` is max − min of the value range: 2.0 for [-1, 1] tensors (the default), 1.0
for [0, 1], 255 for uint8 values. Computed in float64 so that near-identical images keep
their precision.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


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
