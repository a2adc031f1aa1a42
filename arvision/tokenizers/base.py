"""What every tokenizer shares: the :class:`Tokenizer` interface, the conv encoder/decoder,
and the vector quantiser used by ``vq``, ``rq`` and ``msvq``.

Images cross this boundary as float tensors ``(B, C, H, W)`` in ``[-1, 1]``; codes as
``LongTensor (B, L)`` in ``[0, vocab_size)``.

Letter legend: b - batch, c - channels, h/w - latent grid, n - flattened vectors, d - code_dim,
k - codebook entries, z - latent width (``Z_CHANNELS``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# Latent width between encoder and quantiser (VAR's Cvae). The lookup itself happens in the
# smaller code_dim; this is the width the decoder (and the VAR prior, for msvq) sees.
Z_CHANNELS = 32


class Tokenizer(nn.Module):
    """Images ↔ integer codes. Subclasses set the attributes and implement the four methods."""

    kind: str
    vocab_size: int
    channels: int
    resolution: int
    layout: list[tuple[int, ...]]

    def __init__(self, cfg: Any, *, channels: int, resolution: int) -> None:
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


def recon_loss(recon: Tensor, x: Tensor) -> tuple[Tensor, dict[str, float]]:
    """L1 + MSE: MSE is what PSNR scores, L1 keeps edges sharper than MSE alone."""
    recon = recon.float()
    l1 = F.l1_loss(recon, x)
    mse = F.mse_loss(recon, x)
    # PSNR on [-1, 1] images (data range 2), clamped as decode clamps
    mse_c = F.mse_loss(recon.detach().clamp(-1, 1), x).clamp_min(1e-10)
    psnr = 10 * torch.log10(4.0 / mse_c)
    return l1 + mse, {"l1": l1.item(), "mse": mse.item(), "psnr": psnr.item()}


# --------------------------------------------------------------------------- conv nets


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(32, ch), num_channels=ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(ch_in), nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(ch_out), nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """``(B, C, H, W)`` → ``(B, z_channels, H/f, W/f)`` with f = 2**(len(channel_mult)-1)."""

    def __init__(self, channels: int, width: int, channel_mult: list[int], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        chs = [width * m for m in channel_mult]
        self.conv_in = nn.Conv2d(channels, chs[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = chs[0]
        for i, ch_level in enumerate(chs):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, ch_level))
                ch = ch_level
            if i < len(chs) - 1:  # strided conv halves the side, widens to the next level
                layers.append(nn.Conv2d(ch, chs[i + 1], 3, stride=2, padding=1))
                ch = chs[i + 1]
        layers.append(ResBlock(ch, ch))  # middle
        self.body = nn.Sequential(*layers)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: nearest-neighbour upsampling then a conv at each level."""

    def __init__(self, channels: int, width: int, channel_mult: list[int], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        chs = [width * m for m in reversed(channel_mult)]
        ch = chs[0]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch)]  # middle
        for i, ch_level in enumerate(chs):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, ch_level))
                ch = ch_level
            if i < len(chs) - 1:  # doubles the side, narrows to the next level
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, chs[i + 1], 3, padding=1)]
                ch = chs[i + 1]
        self.body = nn.Sequential(*layers)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class ConvTokenizer(Tokenizer):
    """Encoder → quantiser → decoder. Subclasses implement ``_quantize`` and ``_dequantize``."""

    def __init__(self, cfg: Any, *, channels: int, resolution: int) -> None:
        super().__init__(cfg, channels=channels, resolution=resolution)
        self.downsample = 2 ** (len(cfg.channel_mult) - 1)
        if resolution % self.downsample:
            from arvision.errors import UserError

            raise UserError(
                f"tokenizer.channel_mult has {len(cfg.channel_mult)} levels ({self.downsample}x downsampling), "
                f"which does not divide the resolution {resolution}"
            )
        self.latent_side = resolution // self.downsample
        args = (channels, cfg.width, list(cfg.channel_mult), cfg.num_res_blocks, Z_CHANNELS)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)

    # subclasses -----------------------------------------------------------
    def _quantize(self, z_BZhw: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """``(z_q (B, Z, h, w) straight-through, codes (B, L), aux loss, stats)``."""
        raise NotImplementedError

    def _dequantize(self, codes_BL: Tensor) -> Tensor:
        """Codes → ``z_q (B, Z, h, w)``, the same values ``_quantize`` gives in eval mode."""
        raise NotImplementedError

    # interface ------------------------------------------------------------
    def encode(self, x_BCHW: Tensor) -> Tensor:
        return self._quantize(self.encoder(x_BCHW).float())[1]

    def decode(self, codes_BL: Tensor) -> Tensor:
        return self.decoder(self._dequantize(codes_BL.long())).float().clamp(-1, 1)

    def reconstruct(self, x_BCHW: Tensor) -> Tensor:
        z_q = self._quantize(self.encoder(x_BCHW).float())[0]
        return self.decoder(z_q).float().clamp(-1, 1)

    def training_loss(self, x_BCHW: Tensor) -> tuple[Tensor, dict[str, float], Tensor]:
        z_q, codes, aux, stats = self._quantize(self.encoder(x_BCHW).float())
        recon = self.decoder(z_q)
        loss, rstats = recon_loss(recon, x_BCHW)
        return loss + aux, {**rstats, **stats, "aux_loss": float(aux.detach())}, recon


# --------------------------------------------------------------------------- quantiser


def kmeans(x_ND: Tensor, k: int, iters: int = 10, *, spherical: bool = False) -> Tensor:
    """k-means (cosine when ``spherical``) on ``x (N, D)``; seeds drawn with the global torch RNG."""
    n = x_ND.shape[0]
    idx = torch.randperm(n, device=x_ND.device)[:k] if n >= k else torch.randint(0, n, (k,), device=x_ND.device)
    c_KD = x_ND[idx].clone()
    for _ in range(iters):
        if spherical:
            assign = (x_ND @ c_KD.t()).argmax(1)
        else:
            assign = torch.cdist(x_ND, c_KD).argmin(1)
        sums = torch.zeros_like(c_KD).index_add_(0, assign, x_ND)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        new = sums / counts.clamp_min(1)
        if spherical:
            new = F.normalize(new, dim=1)
        c_KD = torch.where(counts > 0, new, c_KD)  # empty clusters keep their seed
    return c_KD


class VectorQuantizer(nn.Module):
    """Nearest-code lookup in a low-dimensional (optionally l2-normalised) space.

    ``z (N, Z)`` is projected to ``code_dim``, normalised (cosine lookup, as ViT-VQGAN /
    improved VQGAN: keeps codes on one sphere, so no code drifts out of reach), looked up, and
    the code projected back to ``Z``. The codebook follows EMA cluster means (or gradients
    when ``ema`` is off), is k-means initialised from the first training batch, and codes whose
    EMA count drops under ``dead_code_threshold`` are restarted at random encoder outputs.
    Training calls accumulate statistics; :meth:`update` applies them once a step.
    """

    def __init__(self, z_dim: int, cfg: Any, *, l2_norm: bool | None = None) -> None:
        super().__init__()
        self.k, self.d = cfg.codebook_size, cfg.code_dim
        self.l2 = cfg.l2_norm if l2_norm is None else l2_norm
        self.use_ema, self.decay = cfg.ema, cfg.ema_decay
        self.kmeans_init, self.restart = cfg.kmeans_init, cfg.dead_code_restart
        self.threshold, self.commitment = cfg.dead_code_threshold, cfg.commitment
        self.proj_in, self.proj_out = nn.Linear(z_dim, self.d), nn.Linear(self.d, z_dim)
        embed = torch.randn(self.k, self.d)
        embed = F.normalize(embed, dim=1) if self.l2 else embed * 0.1
        if self.use_ema:
            self.register_buffer("embed", embed)
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.ones(self.k))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        self._pending: list[tuple[Tensor, Tensor]] = []  # (vectors, codes) per call this step

    def codebook(self) -> Tensor:
        """``(K, d)`` lookup vectors (normalised when l2)."""
        return F.normalize(self.embed, dim=1) if self.l2 else self.embed

    def project(self, z_NZ: Tensor) -> Tensor:
        e = self.proj_in(z_NZ)
        return F.normalize(e, dim=1) if self.l2 else e

    def lookup(self, e_Nd: Tensor) -> Tensor:
        cb_Kd = self.codebook()
        if self.l2:
            return (e_Nd @ cb_Kd.t()).argmax(1)
        # ||e - c||² without the ||e||² term
        return (cb_Kd.pow(2).sum(1) - 2 * e_Nd @ cb_Kd.t()).argmin(1)

    def vectors(self, codes_N: Tensor) -> Tensor:
        """Codes → ``(N, Z)`` vectors (what the decoder side sees)."""
        return self.proj_out(F.embedding(codes_N, self.codebook()))

    @torch.no_grad()
    def init_from(self, e_Nd: Tensor) -> None:
        """k-means initialise the codebook from projected vectors, once."""
        if bool(self.initted):
            return
        c = kmeans(e_Nd.detach().float(), self.k, spherical=self.l2)
        self.embed.data.copy_(c)
        self.embed_sum.copy_(c * self.threshold * 2)
        self.cluster_size.fill_(self.threshold * 2)
        self.initted.fill_(True)

    def forward(self, z_NZ: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(z_q (N, Z) straight-through, codes (N,), aux loss)``. Each training call is one
        restart group (rq: a depth, msvq: a scale)."""
        e_Nd = self.project(z_NZ)
        if self.training and self.kmeans_init and not bool(self.initted):
            self.init_from(e_Nd)
        codes = self.lookup(e_Nd.detach())
        q_Nd = F.embedding(codes, self.codebook())
        aux = self.commitment * F.mse_loss(e_Nd, q_Nd.detach())
        if not self.use_ema:
            aux = aux + F.mse_loss(q_Nd, e_Nd.detach())
        if self.training:
            self.record(e_Nd, codes)
        if torch.is_grad_enabled():
            q_Nd = e_Nd + (q_Nd - e_Nd).detach()  # straight-through
        return self.proj_out(q_Nd), codes, aux

    def record(self, e_Nd: Tensor, codes_N: Tensor) -> None:
        """Queue one restart group's vectors and codes (training only) for :meth:`update`."""
        self._pending.append((e_Nd.detach(), codes_N))

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """Apply this step's EMA update and dead-code restarts; returns batch usage stats.

        Groups (rq: depths, msvq: scales) count equally: a vector of a group of n vectors
        weighs (N / G) / n. Without this, msvq's coarsest scale (one vector per image against
        64 at the finest) leaves its codes with EMA counts under the dead-code threshold, so
        they are restarted again and again and scale 0 collapses onto a few codes.
        """
        if not self._pending:
            return {}
        groups = [p[0].float() for p in self._pending]
        e_Nd = torch.cat(groups)
        codes = torch.cat([p[1] for p in self._pending])
        sizes = [len(g) for g in groups]
        w_N = torch.cat([torch.full((n,), len(e_Nd) / (len(groups) * n), device=e_Nd.device) for n in sizes])
        self._pending = []
        counts = torch.bincount(codes, minlength=self.k).float()
        wcounts = torch.bincount(codes, weights=w_N, minlength=self.k).float()
        if self.use_ema:
            sums = torch.zeros(self.k, self.d, device=e_Nd.device).index_add_(0, codes, e_Nd * w_N.unsqueeze(1))
            self.cluster_size.mul_(self.decay).add_(wcounts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + 1e-5) / (n + self.k * 1e-5) * n  # Laplace smoothing
            self.embed.data.copy_(self.embed_sum / smoothed.unsqueeze(1))
        else:
            self.cluster_size.mul_(self.decay).add_(wcounts, alpha=1 - self.decay)
        restarted = 0
        if self.restart:
            dead = (self.cluster_size < self.threshold).nonzero().squeeze(1)
            restarted = int(dead.numel())
            if restarted:
                # sample each group (msvq: each scale) equally often, so coarse scales get codes too
                g = torch.randint(0, len(groups), (restarted,), device=e_Nd.device)
                pick = torch.empty(restarted, self.d, device=e_Nd.device)
                for gi, grp in enumerate(groups):
                    m = g == gi
                    pick[m] = grp[torch.randint(0, len(grp), (int(m.sum()),), device=e_Nd.device)]
                self.embed.data[dead] = pick
                self.embed_sum[dead] = pick * self.threshold
                self.cluster_size[dead] = self.threshold
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return {
            "batch_usage": float((counts > 0).float().mean()),
            "batch_perplexity": float(perplexity),
            "restarted": float(restarted),
        }


def flatten_latent(z_BZhw: Tensor) -> Tensor:
    return rearrange(z_BZhw, "b z h w -> (b h w) z")


def unflatten_latent(z_NZ: Tensor, b: int, h: int, w: int) -> Tensor:
    return rearrange(z_NZ, "(b h w) z -> b z h w", b=b, h=h, w=w)


_RESIZE: dict[tuple, Tensor] = {}


def bicubic_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(n_out, n_in)``: 1D bicubic resampling as a matrix, the weights of
    ``F.interpolate(mode="bicubic", align_corners=False)`` (border clamping included), taken by
    resampling the identity once."""
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
