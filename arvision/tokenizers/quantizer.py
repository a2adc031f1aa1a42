"""The vector quantiser of ``vq``, ``rq`` and ``msvq`` (:class:`VectorQuantizer`), and the
k-means that initialises its codebook.

A forward never changes the quantiser's state. In training mode it records what the state
update needs (:meth:`VectorQuantizer.plan_init`, :meth:`VectorQuantizer.record`), and
:meth:`VectorQuantizer.update`, called once a step through
:meth:`arvision.tokenizers.interface.Tokenizer.update_quantizer`, applies it.

Letter legend: n - vectors, d - code_dim, k - codebook entries, z - the latent width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arvision.tokenizers.interface import Reduce

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig


def counts_perplexity(counts: Tensor) -> float:
    """exp(entropy) of a code histogram: the number of equally used codes it is worth (the one
    definition, also behind :func:`arvision.metrics.codebook.perplexity`)."""
    p = counts.double() / counts.sum().double().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


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


def replica_mean(reduce: Reduce, x: Tensor) -> Tensor:
    """``x`` averaged over the replicas ``reduce`` sums over: ``reduce(x) / reduce(1)``."""
    return reduce(x.clone()) / reduce(torch.ones(1, device=x.device))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup in a low-dimensional (optionally l2-normalised) space.

    ``z (N, Z)`` is projected to ``code_dim``, normalised (cosine lookup, as ViT-VQGAN /
    improved VQGAN: keeps codes on one sphere, so no code drifts out of reach), looked up, and
    the code projected back to ``Z``. The codebook follows EMA cluster means (or gradients
    when ``ema`` is off), is k-means initialised from the first training batch, and codes whose
    EMA count drops under ``dead_code_threshold`` are restarted at random encoder outputs.

    Training-mode calls record their vectors and codes, and the first one plans the k-means
    initialisation; :meth:`update` applies both, once a step.
    """

    def __init__(self, z_dim: int, cfg: TokenizerConfig, *, l2_norm: bool | None = None) -> None:
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
        self._pending: list[tuple[Tensor, Tensor]] = []  # (vectors, codes) per call since the last update
        self._init: Tensor | None = None  # k-means centres planned by a training call, until update()

    @property
    def needs_init(self) -> bool:
        """Whether the codebook still waits for its k-means initialisation (none planned yet)."""
        return self.kmeans_init and not bool(self.initted) and self._init is None

    def codebook(self) -> Tensor:
        """``(K, d)`` lookup vectors (normalised when l2): the planned k-means centres until
        :meth:`update` writes them into ``embed``."""
        embed = self.embed
        if self._init is not None:
            # without EMA the codebook is a parameter: its gradient flows as if it held the centres
            embed = self._init if self.use_ema else (self.embed - self.embed.detach()) + self._init
        return F.normalize(embed, dim=1) if self.l2 else embed

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
    def plan_init(self, e_Nd: Tensor) -> None:
        """k-means centres of the projected vectors ``e_Nd`` as the initial codebook, once (while
        :attr:`needs_init`): lookups use them at once, :meth:`update` writes them into the state."""
        if not self.needs_init:
            return
        self._init = kmeans(e_Nd.detach().float(), self.k, spherical=self.l2)

    def forward(self, z_NZ: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(z_q (N, Z) straight-through, codes (N,), aux loss)``. Each training call is one
        restart group (rq: a depth, msvq: a scale)."""
        e_Nd = self.project(z_NZ)
        if self.training and self.needs_init:
            self.plan_init(e_Nd)
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
    def _apply_init(self, reduce: Reduce | None) -> None:
        c = self._init
        if c is None:
            return
        self._init = None
        if reduce is not None:
            c = replica_mean(reduce, c)
        self.embed.data.copy_(c)
        self.embed_sum.copy_(c * self.threshold * 2)
        self.cluster_size.fill_(self.threshold * 2)
        self.initted.fill_(True)

    @torch.no_grad()
    def update(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Apply the planned k-means initialisation, then the EMA update and dead-code restarts
        of the calls recorded since the last update; returns their batch usage stats (``{}``
        when nothing was recorded). ``reduce``: see :meth:`Tokenizer.update_quantizer`; it sums
        the code counts and vector sums over replicas, and averages the k-means centres and
        restart vectors (the stats stay this replica's).

        Groups (rq: depths, msvq: scales) count equally: a vector of a group of n vectors
        weighs (N / G) / n. Without this, msvq's coarsest scale (one vector per image against
        64 at the finest) leaves its codes with EMA counts under the dead-code threshold, so
        they are restarted again and again and scale 0 collapses onto a few codes.
        """
        self._apply_init(reduce)
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
            if reduce is not None:  # one call for both
                both = reduce(torch.cat([wcounts.unsqueeze(1), sums], 1))
                wcounts, sums = both[:, 0], both[:, 1:]
            self.cluster_size.mul_(self.decay).add_(wcounts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + 1e-5) / (n + self.k * 1e-5) * n  # Laplace smoothing
            self.embed.data.copy_(self.embed_sum / smoothed.unsqueeze(1))
        else:
            if reduce is not None:
                wcounts = reduce(wcounts)
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
                if reduce is not None:
                    pick = replica_mean(reduce, pick)
                self.embed.data[dead] = pick
                self.embed_sum[dead] = pick * self.threshold
                self.cluster_size[dead] = self.threshold
        return {
            "batch_usage": float((counts > 0).float().mean()),
            "batch_perplexity": counts_perplexity(counts),
            "restarted": float(restarted),
        }
