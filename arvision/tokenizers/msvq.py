"""``msvq``: VAR's multi-scale residual quantiser (Tian et al. 2024), one shared codebook.

At scale k (side s_k) the residual ``f - f_hat`` is area-downsampled to (s_k, s_k), looked up,
the codes' vectors upsampled back (bicubic) to the latent side S, refined by a small conv
``phi_k`` (VAR's partial residual, ratio 0.5) and added to ``f_hat``. Codes: scales coarse to
fine, each row-major.

The residual lives in code space: the encoder's latent is projected (1x1) to ``code_dim``
channels (``embed_dim``, what the VAR prior sees) and, with ``l2_norm``, put on the unit
sphere position by position, so it stays bounded (unchecked, it grew all through training
and the loss crept up). The lookup is Euclidean (as VAR): a residual shrinks scale by scale.

What keeps every scale using the codebook (a coarse scale has one or four vectors an image,
large ones, all near the mean image; left alone, scale 0 used ~20% of the codes):

- per-scale whitening: scale k looks up ``L_k⁻¹ (r - mean_k)``, with ``mean_k`` and
  ``L_k L_kᵀ = cov_k`` EMAs of its residuals' statistics, and adds ``L_k e + mean_k`` for the
  code ``e``; every scale's vectors are then alike, and the shared codebook fits them all;
- the quantiser's EMA counts weigh every scale equally (not every vector), so codes serving
  the coarse scales are not restarted as dead; dead-code restarts draw from every scale
  equally often; k-means init on whitened vectors of every scale.

The whitening statistics and the codebook change only in :meth:`MSVQTokenizer.update_quantizer`:
a training forward records the batch's residual moments (and, on the first batch, the initial
statistics and k-means centres, which forwards use until the update writes them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arvision.errors import UserError
from arvision.tokenizers.conv import Z_CHANNELS, ConvTokenizer, flatten_latent
from arvision.tokenizers.interface import Reduce, quantiser_fp32
from arvision.tokenizers.quantizer import VectorQuantizer, replica_mean
from arvision.tokenizers.resize import bicubic_resize

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig


class Phi(nn.Module):
    """VAR's refinement: ``h * (1 - r) + conv(h) * r``, r = 0.5."""

    def __init__(self, dim: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.conv, self.ratio = nn.Conv2d(dim, dim, 3, padding=1), ratio

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


class MSVQTokenizer(ConvTokenizer):
    kind = "msvq"

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int) -> None:
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
        # per-scale whitening: the mean and covariance of scale k's residual vectors, EMAs over
        # training. The lookup sees L_k⁻¹ (residual - mean_k) (L_k L_kᵀ = cov_k), so every
        # scale's vectors are about zero-mean and white and one codebook serves them all
        # (without it the coarse scales, whose residuals are large and all near the mean image,
        # get a handful of codes); a code e is mapped back to L_k e + mean_k.
        d = self.embed_dim
        self.register_buffer("res_mean", torch.zeros(len(self.scales), d))
        self.register_buffer("res_cov", torch.eye(d).repeat(len(self.scales), 1, 1))
        self.register_buffer("whiten_initted", torch.tensor(False))
        # recorded by training forwards, applied by update_quantizer: the first batch's
        # (res_mean, res_cov), and each forward's per-scale moments
        self._init_whitening: tuple[Tensor, Tensor] | None = None
        self._pending_moments: list[tuple[Tensor, Tensor]] = []
        self.vocab_size = cfg.codebook_size
        self.layout = [(s, s) for s in self.scales]

    # helpers --------------------------------------------------------------
    def _down(self, f_BZSS: Tensor, s: int) -> Tensor:
        return f_BZSS if s == f_BZSS.shape[-1] else F.interpolate(f_BZSS, size=(s, s), mode="area")

    def _up(self, h_BdSS: Tensor) -> Tensor:
        S = self.latent_side
        return bicubic_resize(h_BdSS, S)

    def _scale_vectors(self, k: int, codes_Bl: Tensor) -> Tensor:
        """Scale k's codes ``(B, s_k²)`` → its contribution ``h (B, embed_dim, S, S)`` to f_hat."""
        s = self.scales[k]
        e_Nd = F.embedding(codes_Bl.reshape(-1), self.quantizer.codebook()).float()
        v = e_Nd @ self._chol(k).t() + self._whitening()[0][k]
        h = rearrange(v, "(b h w) d -> b d h w", b=codes_Bl.shape[0], h=s, w=s)
        return self.phis[k](self._up(h))

    def _whitening(self) -> tuple[Tensor, Tensor]:
        """``(mean (K, d), cov (K, d, d))``: the buffers, or the first batch's statistics until
        :meth:`update_quantizer` writes them."""
        return self._init_whitening if self._init_whitening is not None else (self.res_mean, self.res_cov)

    def _chol(self, k: int) -> Tensor:
        """``L_k (d, d)``: lower Cholesky factor of scale k's residual covariance."""
        eye = torch.eye(self.embed_dim, device=self.res_cov.device)
        return torch.linalg.cholesky(self._whitening()[1][k] + 1e-6 * eye)

    def _whiten(self, k: int, r_Nd: Tensor) -> Tensor:
        """Scale k's residual vectors → whitened ``(N, d)``."""
        x = (r_Nd - self._whitening()[0][k]).t()  # (d, N)
        return torch.linalg.solve_triangular(self._chol(k), x, upper=False).t()

    @staticmethod
    def _moments(r_Nd: Tensor) -> tuple[Tensor, Tensor]:
        mean = r_Nd.mean(0)
        x = r_Nd - mean
        return mean, x.t() @ x / max(1, len(x) - 1)

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
    def _plan_init(self, f_BdSS: Tensor) -> None:
        """Whitening statistics and k-means codebook from the first training batch, recorded for
        :meth:`update_quantizer` (and used by forwards until then). The residual chain is
        approximated without quantisation error (scale k removes the exact area mean of the
        residual), which gives each scale's residual statistics closely enough to start."""
        mean, cov = self.res_mean.clone(), self.res_cov.clone()
        self._init_whitening = (mean, cov)  # filled scale by scale: _whiten(k) reads scale k's
        rest, units = f_BdSS.float(), []
        for k, s in enumerate(self.scales):
            r = self._down(rest, s)
            r_Nd = flatten_latent(r)
            mean[k], cov[k] = self._moments(r_Nd)
            units.append(self._whiten(k, r_Nd))
            rest = rest - self._up(r)
        q = self.quantizer
        if q.needs_init:
            # scales drawn equally often, so the coarse scales are not drowned out by the fine
            n = min(len(u) for u in units[1:]) if len(units) > 1 else len(units[0])
            pick = [u[torch.randperm(len(u), device=u.device)[:n]] for u in units]
            q.plan_init(torch.cat(pick))

    def _quantize(self, z_BZSS: Tensor):
        q = self.quantizer
        B = z_BZSS.shape[0]
        f = self._to_code_space(z_BZSS)  # (B, d, S, S)
        if self.training and not bool(self.whiten_initted) and self._init_whitening is None:
            self._plan_init(f)
        f_rest = f.detach()
        f_hat = None
        codes, moments = [], []
        for k, s in enumerate(self.scales):
            r_Nd = flatten_latent(self._down(f_rest, s))
            u_Nd = self._whiten(k, r_Nd)
            c_N = q.lookup(u_Nd)
            if self.training:
                q.record(u_Nd, c_N)
                moments.append(self._moments(r_Nd))
            c_Bl = rearrange(c_N, "(b l) -> b l", b=B)
            h = self._scale_vectors(k, c_Bl)
            f_hat = h if f_hat is None else f_hat + h  # same order of sums as _dequantize
            f_rest = f_rest - h.detach()
            codes.append(c_Bl)
        # VAR's loss: phi (and, without EMA, the codebook) chase f; the encoder commits to f_hat
        aux = F.mse_loss(f_hat, f.detach()) + q.commitment * F.mse_loss(f, f_hat.detach())
        stats = {}
        if self.training:
            self._pending_moments.append((torch.stack([m for m, _ in moments]), torch.stack([c for _, c in moments])))
            stats["latent_rms"] = float(f.detach().pow(2).sum(1).mean().sqrt())
        if torch.is_grad_enabled():
            f_hat = f + (f_hat - f).detach()  # straight-through
        return self._from_code_space(f_hat), torch.cat(codes, 1), aux, stats

    @torch.no_grad()
    def update_quantizer(self, reduce: Reduce | None = None) -> dict[str, float]:
        """The first batch's whitening statistics, the quantiser's update (see
        :meth:`VectorQuantizer.update`), then one EMA step of each scale's residual mean and
        covariance towards the recorded moments (their average, when several forwards ran since
        the last call). ``reduce`` averages the moments over replicas."""
        if self._init_whitening is not None:
            mean, cov = self._init_whitening
            self._init_whitening = None
            if reduce is not None:
                mean, cov = replica_mean(reduce, mean), replica_mean(reduce, cov)
            self.res_mean.copy_(mean)
            self.res_cov.copy_(cov)
            self.whiten_initted.fill_(True)
        stats = self.quantizer.update(reduce)
        if self._pending_moments:
            ms, self._pending_moments = self._pending_moments, []
            mean, cov = ms[0] if len(ms) == 1 else (torch.stack([m for m, _ in ms]).mean(0), torch.stack([c for _, c in ms]).mean(0))
            if reduce is not None:
                mean, cov = replica_mean(reduce, mean), replica_mean(reduce, cov)
            self.res_mean.lerp_(mean, 1 - self.quantizer.decay)
            self.res_cov.lerp_(cov, 1 - self.quantizer.decay)
        return stats

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
        with quantiser_fp32(codes_BL):  # the prior trains under bf16 autocast; the code space is fp32
            for k, c in enumerate(self._split(codes_BL.long())[:-1]):
                f_hat, nxt = self.next_scale_input(k, f_hat, c)
                outs.append(nxt)
        return torch.cat(outs, 1)

    def next_scale_input(self, k: int, f_hat: Tensor | None, codes_k: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add scale k's codes ``(B, s_k²)`` into ``f_hat (B, embed_dim, S, S)`` (None = zeros);
        return ``(f_hat, next)`` with ``next (B, s_{k+1}², embed_dim)`` the input for scale k+1,
        or None after the last scale."""
        with quantiser_fp32(codes_k):  # the VAR prior samples and trains under bf16 autocast
            h = self._scale_vectors(k, codes_k.long())
            f_hat = h if f_hat is None else f_hat.float() + h
            if k + 1 >= len(self.scales):
                return f_hat, None
            return f_hat, rearrange(self._down(f_hat, self.scales[k + 1]), "b z h w -> b (h w) z")

    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` in [-1, 1] from the final f_hat ``(B, embed_dim, S, S)``."""
        return self.decoder(self._from_code_space(f_hat)).float().clamp(-1, 1)
