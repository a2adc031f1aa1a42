"""``msvq``: VAR's multi-scale residual quantiser (Tian et al. 2024), one shared codebook.

At scale k (side s_k) the residual ``f - f_hat`` is area-downsampled to (s_k, s_k), looked up,
the codes' vectors upsampled back (bicubic) to the latent side S, refined by a small conv
``phi_k`` and added to ``f_hat``. Codes: scales coarse to fine, each row-major.

The residual lives in code space: the encoder's latent is projected (1x1) to ``code_dim``
channels (``embed_dim``, what the VAR prior sees), quantised there by Euclidean lookup (as
VAR; ``l2_norm`` is ignored: a residual shrinks scale by scale, which unit-norm codes cannot
follow), and ``f_hat`` is projected back for the decoder.

Coarse-scale collapse (scale 1 has one vector per image, all near the image mean) is fought
by k-means init on the vectors of every scale, dead-code restarts that draw from every scale
equally often, and a phi per scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arvision.errors import UserError
from arvision.tokenizers.base import Z_CHANNELS, ConvTokenizer, VectorQuantizer, flatten_latent


class Phi(nn.Module):
    """VAR's refinement: ``h * (1 - r) + conv(h) * r``, r = 0.5."""

    def __init__(self, dim: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.conv, self.ratio = nn.Conv2d(dim, dim, 3, padding=1), ratio

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


class MSVQTokenizer(ConvTokenizer):
    kind = "msvq"

    def __init__(self, cfg: Any, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        self.scales = list(cfg.scales)
        if self.scales[-1] != self.latent_side:
            raise UserError(
                f"tokenizer.scales must end at the latent side {self.latent_side} "
                f"(resolution {resolution} / {self.downsample}), got {self.scales}"
            )
        self.quantizer = VectorQuantizer(Z_CHANNELS, cfg, l2_norm=False)
        self.l2_latent = bool(cfg.l2_norm)
        self.embed_dim = self.quantizer.d
        self.phis = nn.ModuleList(Phi(self.embed_dim) for _ in self.scales)
        # per-scale gain: the RMS norm of scale k's residual vectors (EMA over training). The
        # lookup sees residual / gain_k, so every scale's vectors have about unit norm and one
        # codebook serves them all; the code's vector is multiplied back by gain_k.
        self.register_buffer("gain", torch.ones(len(self.scales)))
        self.register_buffer("gain_initted", torch.tensor(False))
        self.vocab_size = cfg.codebook_size
        self.layout = [(s, s) for s in self.scales]

    # helpers --------------------------------------------------------------
    def _down(self, f_BZSS: Tensor, s: int) -> Tensor:
        return f_BZSS if s == f_BZSS.shape[-1] else F.interpolate(f_BZSS, size=(s, s), mode="area")

    def _up(self, h_BdSS: Tensor) -> Tensor:
        S = self.latent_side
        return h_BdSS if h_BdSS.shape[-1] == S else F.interpolate(h_BdSS, size=(S, S), mode="bicubic")

    def _scale_vectors(self, k: int, codes_Bl: Tensor) -> Tensor:
        """Scale k's codes ``(B, s_k²)`` → its contribution ``h (B, embed_dim, S, S)`` to f_hat."""
        s = self.scales[k]
        v = F.embedding(codes_Bl.reshape(-1), self.quantizer.codebook()).float() * self.gain[k]
        h = rearrange(v, "(b h w) d -> b d h w", b=codes_Bl.shape[0], h=s, w=s)
        return self.phis[k](self._up(h))

    def _split(self, codes_BL: Tensor) -> list[Tensor]:
        return list(torch.split(codes_BL, [s * s for s in self.scales], dim=1))

    # quantiser ------------------------------------------------------------
    def _to_code_space(self, z_BZSS: Tensor) -> Tensor:
        f = rearrange(self.quantizer.proj_in(rearrange(z_BZSS, "b z h w -> b h w z")), "b h w d -> b d h w")
        # l2_norm: every latent vector on the unit sphere, so the latent cannot grow unchecked
        # (the lookup itself stays Euclidean: residuals shrink scale by scale)
        return F.normalize(f, dim=1) if self.l2_latent else f

    def _from_code_space(self, f_BdSS: Tensor) -> Tensor:
        return rearrange(self.quantizer.proj_out(rearrange(f_BdSS, "b d h w -> b h w d")), "b h w z -> b z h w")

    @torch.no_grad()
    def _init_from(self, f_BdSS: Tensor) -> None:
        """Gains and k-means codebook from the first training batch. The residual chain is
        approximated without quantisation error (scale k removes the exact area mean of the
        residual), which gives each scale's residual statistics closely enough to start."""
        rest, units = f_BdSS.float(), []
        for k, s in enumerate(self.scales):
            r = self._down(rest, s)
            rms = flatten_latent(r).pow(2).sum(1).mean().sqrt().clamp_min(1e-6)
            self.gain[k] = rms
            units.append(flatten_latent(r) / rms)
            rest = rest - self._up(r)
        q = self.quantizer
        if q.kmeans_init and not bool(q.initted):
            # scales drawn equally often, so the coarse scales are not drowned out by the fine
            n = min(len(u) for u in units[1:]) if len(units) > 1 else len(units[0])
            pick = [u[torch.randperm(len(u), device=u.device)[:n]] for u in units]
            q.init_from(torch.cat(pick))
        self.gain_initted.fill_(True)

    def _quantize(self, z_BZSS: Tensor):
        q = self.quantizer
        B = z_BZSS.shape[0]
        f = self._to_code_space(z_BZSS)  # (B, d, S, S)
        if self.training and not bool(self.gain_initted):
            self._init_from(f)
        f_rest = f.detach()
        f_hat = None
        codes, rms = [], []
        for k, s in enumerate(self.scales):
            r_Nd = flatten_latent(self._down(f_rest, s))
            u_Nd = r_Nd / self.gain[k]
            c_N = q.lookup(u_Nd)
            if self.training:
                q.record(u_Nd, c_N)
                rms.append(r_Nd.pow(2).sum(1).mean().sqrt())
            c_Bl = rearrange(c_N, "(b l) -> b l", b=B)
            h = self._scale_vectors(k, c_Bl)
            f_hat = h if f_hat is None else f_hat + h  # same order of sums as _dequantize
            f_rest = f_rest - h.detach()
            codes.append(c_Bl)
        # VAR's loss: phi (and, without EMA, the codebook) chase f; the encoder commits to f_hat
        aux = F.mse_loss(f_hat, f.detach()) + q.commitment * F.mse_loss(f, f_hat.detach())
        stats = {}
        if self.training:
            stats = q.update()
            with torch.no_grad():
                self.gain.mul_(q.decay).add_(torch.stack(rms).clamp_min(1e-6), alpha=1 - q.decay)
            stats["latent_rms"] = float(f.detach().pow(2).sum(1).mean().sqrt())
        if torch.is_grad_enabled():
            f_hat = f + (f_hat - f).detach()  # straight-through
        return self._from_code_space(f_hat), torch.cat(codes, 1), aux, stats

    def _dequantize(self, codes_BL: Tensor) -> Tensor:
        f_hat = None
        for k, c in enumerate(self._split(codes_BL)):
            f_hat, _ = self.next_scale_input(k, f_hat, c)
        return self._from_code_space(f_hat)

    # the VAR prior's interface --------------------------------------------
    def teacher_forcing_input(self, codes_BL: Tensor) -> Tensor:
        """``(B, L - scales[0]², embed_dim)``: for each scale k ≥ 1, f_hat after the scales < k,
        area-downsampled to (s_k, s_k), flattened row-major; concatenated over k."""
        f_hat, outs = None, []
        for k, c in enumerate(self._split(codes_BL.long())[:-1]):
            f_hat, nxt = self.next_scale_input(k, f_hat, c)
            outs.append(nxt)
        return torch.cat(outs, 1)

    def next_scale_input(self, k: int, f_hat: Tensor | None, codes_k: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add scale k's codes ``(B, s_k²)`` into ``f_hat (B, embed_dim, S, S)`` (None = zeros);
        return ``(f_hat, next)`` with ``next (B, s_{k+1}², embed_dim)`` the input for scale k+1,
        or None after the last scale."""
        h = self._scale_vectors(k, codes_k.long())
        f_hat = h if f_hat is None else f_hat + h
        if k + 1 >= len(self.scales):
            return f_hat, None
        return f_hat, rearrange(self._down(f_hat, self.scales[k + 1]), "b z h w -> b (h w) z")

    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` in [-1, 1] from the final f_hat ``(B, embed_dim, S, S)``."""
        return self.decoder(self._from_code_space(f_hat)).float().clamp(-1, 1)
