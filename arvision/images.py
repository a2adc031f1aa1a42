"""The one uint8 ↔ tensor convention for images crossing a model boundary (docs/architecture.md, "Images and tensors"):
uint8 ``(B, H, W, C)`` arrays outside, float ``(B, C, H, W)`` tensors in [-1, 1] inside."""

from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images_uint8_BHWC: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, C)`` (array or tensor, on any device) → float ``(B, C, H, W)`` in
    [-1, 1] on the same device (channels-last strides)."""
    x = images_uint8_BHWC if isinstance(images_uint8_BHWC, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images_uint8_BHWC))
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x_BCHW: torch.Tensor) -> np.ndarray:
    """float ``(B, C, H, W)`` in [-1, 1] → uint8 ``(B, H, W, C)`` (rounded, clipped)."""
    x = ((x_BCHW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()
