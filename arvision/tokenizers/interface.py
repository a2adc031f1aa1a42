"""The :class:`Tokenizer` interface every kind implements, and :func:`recon_loss`, the
reconstruction loss of the trained kinds.

Images cross this boundary as float tensors ``(B, C, H, W)`` in ``[-1, 1]``; codes as
``LongTensor (B, L)`` in ``[0, vocab_size)``, in the order ``layout`` describes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # only for the hints: the tokenizer modules import without pydantic
    from arvision.config import TokenizerConfig

#: A sum over data-parallel replicas, ``Tensor -> Tensor`` (e.g. an all-reduce with SUM that
#: returns its tensor); see :meth:`Tokenizer.update_quantizer`.
Reduce = Callable[[Tensor], Tensor]


def quantiser_fp32(x: Tensor) -> torch.autocast:
    """A region where autocast is off on ``x``'s device: the quantiser's lookup, its recorded
    statistics (EMA counts, residual moments, whitening) and its codes are computed in fp32
    whatever the caller's autocast (bf16 training on CUDA). Distances in bf16 pick other codes,
    and an fp32 buffer updated from a bf16 tensor fails (``lerp_``) or loses its precision."""
    return torch.autocast(x.device.type, enabled=False)


class Tokenizer(nn.Module):
    """Images ↔ integer codes. Subclasses set the attributes and implement ``encode``,
    ``decode``, ``reconstruct`` and ``training_loss``; kinds whose quantiser keeps state
    (``vq``, ``rq``, ``msvq``) also implement :meth:`update_quantizer`."""

    kind: str
    vocab_size: int
    channels: int
    resolution: int
    layout: list[tuple[int, ...]]

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.channels = channels
        self.resolution = resolution

    @property
    def seq_len(self) -> int:
        return sum(math.prod(entry) for entry in self.layout)

    def encode(self, x_BCHW: Tensor) -> Tensor:
        """Images (float in [-1, 1]) → codes ``(B, L)`` int64 in ``[0, vocab_size)``."""
        raise NotImplementedError

    def decode(self, codes_BL: Tensor) -> Tensor:
        """Codes ``(B, L)`` → images ``(B, C, H, W)`` float, clamped to [-1, 1]."""
        raise NotImplementedError

    def reconstruct(self, x_BCHW: Tensor) -> Tensor:
        """The tokenizer's own reconstruction, clamped to [-1, 1]; equals ``decode(encode(x))`` in eval mode."""
        raise NotImplementedError

    def training_loss(self, x_BCHW: Tensor) -> tuple[Tensor, dict[str, float], Tensor]:
        """``(loss, stats, recon)`` for one batch; ``recon`` is unclamped and carries gradients."""
        raise NotImplementedError

    def update_quantizer(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Apply to the quantiser's state what the training-mode forwards since the last call
        recorded; return batch statistics for the training log (``{}`` here: kinds without
        quantiser state, ``palette`` and ``fsq``, keep this no-op).

        No forward changes a buffer: in training mode (``training_loss``, or ``encode`` /
        ``reconstruct`` after ``train()``) it only records what the update needs. This call
        applies it: the k-means initialisation of the codebook (and msvq's whitening
        statistics) from the first batch, the EMA of code counts and vector sums, dead-code
        restarts, msvq's whitening EMAs. The trainer calls it once a step, right after
        ``training_loss`` and before ``backward``. Until it is called, forwards see the
        recorded initialisation (a first batch is looked up in the initialised codebook), and
        the recordings of several forwards accumulate into one update.

        ``reduce`` keeps data-parallel replicas identical: a sum over the replicas (e.g.
        ``def reduce(t): dist.all_reduce(t); return t``), applied before the state changes to
        the summed statistics (code counts and vector sums, whose EMA then follows the global
        batch) and to what each replica draws from its own batch (k-means centres, restart
        vectors, whitening moments), which are averaged over the replicas
        (``reduce(t) / reduce(ones)``). With ``None`` this process's statistics alone count.
        """
        return {}


def recon_loss(recon: Tensor, x: Tensor) -> tuple[Tensor, dict[str, float]]:
    """L1 + MSE: MSE is what PSNR scores, L1 keeps edges sharper than MSE alone."""
    recon = recon.float()
    l1 = F.l1_loss(recon, x)
    mse = F.mse_loss(recon, x)
    # PSNR on [-1, 1] images (data range 2), clamped as decode clamps
    mse_c = F.mse_loss(recon.detach().clamp(-1, 1), x).clamp_min(1e-10)
    psnr = 10 * torch.log10(4.0 / mse_c)
    return l1 + mse, {"l1": l1.item(), "mse": mse.item(), "psnr": psnr.item()}
