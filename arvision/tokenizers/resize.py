"""Bicubic resizing of square maps as two small matmuls (msvq's upsampling, and the VAR
prior's stand-in for it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_RESIZE: dict[tuple, Tensor] = {}


def bicubic_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(n_out, n_in)``: 1D bicubic resampling as a matrix, the weights of
    ``F.interpolate(mode="bicubic", align_corners=False)`` (border clamping included), taken by
    resampling the identity once (cached per size, device and dtype)."""
    key = (n_in, n_out, str(device), dtype)
    if key not in _RESIZE:
        eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
        m = F.interpolate(eye, size=(1, n_out), mode="bicubic", align_corners=False).view(n_in, n_out)
        _RESIZE[key] = m.t().contiguous().to(device=device, dtype=dtype)
    return _RESIZE[key]


def bicubic_resize(x_BCss: Tensor, size: int) -> Tensor:
    """Bicubic resize of square maps ``(B, C, s, s)`` → ``(B, C, size, size)``, equal to
    ``F.interpolate(x, (size, size), mode="bicubic")`` up to rounding, as two small matmuls in
    the input's dtype (autocast off). PyTorch's CUDA bicubic kernel runs one thread per output
    pixel looping over batch × channels: for VAR's small maps it took 9% of a var-d16 training
    step; as matmuls it is negligible."""
    s = x_BCss.shape[-1]
    if s == size:
        return x_BCss
    a_Ss = bicubic_matrix(s, size, x_BCss.device, x_BCss.dtype)
    with torch.autocast(x_BCss.device.type, enabled=False):
        return a_Ss @ x_BCss @ a_Ss.t()
