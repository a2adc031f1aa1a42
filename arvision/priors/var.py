"""``var``: next-scale prediction (VAR, Tian et al. 2024) over multi-scale residual codes.

The sequence is every scale's codes, coarse to fine: ``L = Σ s_k²`` for layout
``[(s_1, s_1), …, (s_K, s_K)]``. The first scale is predicted from the class ("start") tokens;
scale ``k + 1`` from the tokenizer's view of everything sampled so far
(``tokenizer.next_scale_input``: the running reconstruction ``f_hat`` downsampled to
``s_{k+1}``), embedded by a linear ``word_embed``. Attention is block-causal: a token sees
its own scale and every coarser one. Classes condition every block through AdaLN.

The tokenizer (``arvision.tokenizers.msvq``) provides ``embed_dim`` (Cvae), ``scales``,
``teacher_forcing_input(codes_BL) -> (B, L - s_1², Cvae)`` and
``next_scale_input(k, f_hat | None, codes_k (B, s_k²)) -> (f_hat, (B, s_{k+1}², Cvae) | None)``.
It is *not* a submodule: its weights are frozen, never saved with the prior, and never seen
by the optimizer. A saved prior stores ``embed_dim`` and the scales (so it can be rebuilt);
pass the tokenizer at load (``load_prior(dir, tokenizer=tok)``) or set ``prior.tokenizer``.

Letter legend: B - batch, R - rows (2B under guidance), L - all tokens, l - tokens of one
scale, C - width, D - head dim, E - tokenizer embed dim (Cvae), V - vocabulary, K - scales.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arvision.priors import sampling
from arvision.priors.blocks import DropPath, Prior, drop_path_rates, pad_vocab


class VARAttention(nn.Module):
    """Self-attention with l2-normalised queries/keys and a learned per-head temperature (VAR's
    ``attn_l2_norm``), q/v biases; block-causal in training, KV-cached per scale in sampling."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width), persistent=False)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)
        self.attn_dropout = dropout
        self.proj_drop = nn.Dropout(dropout)
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None

    def forward(self, x_BlC: Tensor, mask: Any = None, cache_span: tuple[int, int] | None = None) -> Tensor:
        B, l, C = x_BlC.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x_BlC, self.qkv.weight, bias).view(B, l, 3, self.heads, self.head_dim)
        q_BHlD, k_BHlD, v_BHlD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        temp_1H11 = self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
        q_BHlD = (F.normalize(q_BHlD.float(), dim=-1) * temp_1H11).type_as(v_BHlD)
        k_BHlD = F.normalize(k_BHlD.float(), dim=-1).type_as(v_BHlD)
        if cache_span is not None:  # sampling: this scale's tokens see the cache up to their end
            start, end = cache_span
            self.k_cache[:, :, start:end] = k_BHlD
            self.v_cache[:, :, start:end] = v_BHlD
            y = F.scaled_dot_product_attention(q_BHlD, self.k_cache[:, :, :end], self.v_cache[:, :, :end], scale=1.0)
        elif isinstance(mask, list):  # split block-causal: see VAR.split_plan
            p = self.attn_dropout if self.training else 0.0
            y = torch.cat([
                F.scaled_dot_product_attention(
                    q_BHlD[:, :, qs:qe], k_BHlD[:, :, :qe], v_BHlD[:, :, :qe], attn_mask=m, dropout_p=p, scale=1.0
                )
                for qs, qe, m in mask
            ], dim=2)
        else:
            p = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q_BHlD, k_BHlD, v_BHlD, attn_mask=mask, dropout_p=p, scale=1.0)
        y_BlC = self.proj(y.transpose(1, 2).reshape(B, l, C))
        return self.proj_drop(y_BlC) if cache_span is None else y_BlC  # sampling: no dropout


class AdaLNBlock(nn.Module):
    """VAR's block: LayerNorm without affine, modulated by the class: 6 vectors per block
    (gates γ₁ γ₂, scales, shifts); gates start near zero (adaLN-zero). Drop-path acts on the
    gated branches (as VAR's ``drop_path(attn(…) · γ₁)``); the cached sampling path
    (``cache_span`` given) skips it and dropout, whatever the mode."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.width = width
        self.ln = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = VARAttention(width, heads, dropout)
        hidden = round(width * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width), nn.Dropout(dropout))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.drop_path = DropPath(drop_path)  # no parameters: state dicts unchanged

    def modulation(self, cond_BC: Tensor) -> Tensor:
        return self.ada_lin(cond_BC).view(-1, 1, 6, self.width)  # (B, 1, 6, C)

    def forward(self, x_BlC: Tensor, ada_B16C: Tensor, mask: Any = None, cache_span: tuple[int, int] | None = None) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)  # each (B, 1, C)
        attn_BlC = self.attn(self.ln(x_BlC) * (scale1 + 1) + shift1, mask, cache_span) * gamma1
        if cache_span is not None:  # sampling: no drop-path, and the FFN without its dropout
            x_BlC = x_BlC + attn_BlC
            fc1, act, fc2, _ = self.ffn
            return x_BlC + fc2(act(fc1(self.ln(x_BlC) * (scale2 + 1) + shift2))) * gamma2
        x_BlC = x_BlC + self.drop_path(attn_BlC)
        return x_BlC + self.drop_path(self.ffn(self.ln(x_BlC) * (scale2 + 1) + shift2) * gamma2)


@dataclass(frozen=True)
class VARArch:
    """Everything a :class:`VAR` is built from (what ``config.json`` stores): the size's
    architecture (``arvision.sizes.SIZES``), the scales and codes it models, the tokenizer's
    latent width (``embed_dim``) and ``prior.*`` settings."""

    vocab_size: int
    layout: tuple[tuple[int, ...], ...]  # square scales (s, s), coarse to fine
    num_classes: int
    embed_dim: int
    depth: int
    width: int
    heads: int
    dropout: float
    class_dropout: float
    mlp_ratio: float = 4.0  # VAR's; not a size setting
    drop_path: float = 0.0  # stochastic depth, the last block's rate (linear from 0); 0 in older configs


class VAR(Prior):
    kind = "var"
    #: the fastest sampling mode measured on an H200 (bench/RESULTS.md)
    fast_sampling = "compile+cudagraph"

    def __init__(self, arch: VARArch, tokenizer: Any = None) -> None:
        super().__init__()
        layout = arch.layout
        if any(len(x) != 2 or x[0] != x[1] for x in layout):
            raise ValueError(f"var needs square scales [(s, s), …], got layout {layout}")
        self.scales = [int(x[0]) for x in layout]
        self.config: dict[str, Any] = {"kind": self.kind, **asdict(arch), "layout": [[s, s] for s in self.scales]}
        vocab_size, num_classes, embed_dim, depth, width, heads, mlp_ratio, dropout = (
            arch.vocab_size, arch.num_classes, arch.embed_dim, arch.depth, arch.width, arch.heads, arch.mlp_ratio, arch.dropout)
        self.vocab_size, self.num_classes, self.class_dropout = vocab_size, num_classes, arch.class_dropout
        self.width, self.heads = width, heads
        self.offsets = [0]
        for s in self.scales:
            self.offsets.append(self.offsets[-1] + s * s)
        self.seq_len, self.first_l = self.offsets[-1], self.scales[0] ** 2
        self.tokenizer = tokenizer
        self.attn_impl = "split"  # or "sdpa" (one call, dense mask): see set_attention()
        self.sample_fn = None  # set by compile_sampling()
        self.sample_blocks: list[Any] | None = None  # compiled blocks for sampling (compile_sampling)

        init_std = math.sqrt(1 / width / 3)
        self.word_embed = nn.Linear(embed_dim, width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.seq_len, width))
        self.lvl_embed = nn.Embedding(len(self.scales), width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, heads, mlp_ratio, dropout, drop_path=rate) for rate in drop_path_rates(arch.drop_path, depth)
        )
        self.head_ln = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, pad_vocab(vocab_size))

        lvl_L = torch.cat([torch.full((s * s,), k) for k, s in enumerate(self.scales)])
        self.register_buffer("lvl_L", lvl_L, persistent=False)
        # block-causal: query at level a may attend keys at levels ≤ a
        self.register_buffer("mask_11LL", (lvl_L[:, None] >= lvl_L[None, :])[None, None], persistent=False)
        self._init_weights(init_std, depth)

    # ------------------------------------------------------------------ set-up

    @property
    def tokenizer(self) -> Any:
        return self._tok[0]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tokenizer":  # nn.Module would register a module value as a submodule
            self._set_tokenizer(value)
        else:
            super().__setattr__(name, value)

    def _set_tokenizer(self, tok: Any) -> None:
        # kept out of the module tree (a list hides it): frozen, not saved, not optimised
        object.__setattr__(self, "_tok", [tok])
        if tok is not None:
            if list(getattr(tok, "scales", self.scales)) != self.scales:
                raise ValueError(f"tokenizer scales {list(tok.scales)} != prior scales {self.scales}")
            tok.requires_grad_(False)

    def _tokenizer_on(self, device: torch.device) -> Any:
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError("the var prior needs its msvq tokenizer: load_prior(dir, tokenizer=tok) or prior.tokenizer = tok")
        p = next(tok.parameters(), None)
        if p is not None and p.device != device:
            tok.to(device)
        return tok.eval()

    @torch.no_grad()
    def _init_weights(self, init_std: float, depth: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        nn.init.trunc_normal_(self.pos_1LC, std=init_std)
        self.head.weight.mul_(0.02)
        self.head_ada[-1].weight.mul_(0.5)
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * depth))
            blk.ffn[2].weight.div_(math.sqrt(2 * depth))
            blk.ada_lin[-1].weight[2 * self.width :].mul_(0.5)  # scales, shifts
            blk.ada_lin[-1].weight[: 2 * self.width].mul_(1e-5)  # gates start ≈ 0

    #: scales of at least this many tokens get an attention call of their own (see split_plan)
    split_min_tokens = 64

    def set_attention(self, impl: str) -> None:
        """How training attends block-causally (the same result each way):

        - ``"split"`` (default): the block-causal pattern as a few SDPA calls without a mask: each
          scale of ``split_min_tokens`` or more tokens attends, unmasked, to every key up to its
          own end; the small scales before them share one masked call. No dense (L, L) mask
          reaches the kernels, so the flash/cuDNN kernels run unmasked, and only the ~60% of
          query-key pairs the pattern allows are computed (VAR's 10 scales);
        - ``"sdpa"``: one SDPA call with the dense boolean ``(L, L)`` mask (as VAR ships).
        """
        if impl not in ("split", "sdpa"):
            raise ValueError(f"var attention '{impl}': allowed split, sdpa")
        self.attn_impl = impl

    def split_plan(self) -> list[tuple[int, int, Tensor | None]]:
        """``[(q_start, q_end, mask | None)]``: query rows ``[q_start, q_end)`` attend to keys
        ``[0, q_end)``. Groups are whole scales, so the unmasked ones are exact."""
        plan: list[tuple[int, int, Tensor | None]] = []
        k_big = next((k for k, s in enumerate(self.scales) if s * s >= self.split_min_tokens), len(self.scales))
        if k_big > 0:
            e = self.offsets[k_big]
            plan.append((0, e, self.mask_11LL[:, :, :e, :e] if k_big > 1 else None))
        plan += [(self.offsets[k], self.offsets[k + 1], None) for k in range(k_big, len(self.scales))]
        return plan

    def _train_mask(self) -> list[tuple[int, int, Tensor | None]] | Tensor:
        return self.split_plan() if self.attn_impl == "split" else self.mask_11LL

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay()
        return names | {n for n, _ in self.named_parameters() if "scale_mul" in n or "bias" in n}

    # ------------------------------------------------------------------ training / likelihood

    def _head(self, x_BlC: Tensor, cond_BC: Tensor) -> Tensor:
        scale_B1C, shift_B1C = self.head_ada(cond_BC).view(-1, 1, 2, self.width).unbind(2)
        return self.head(self.head_ln(x_BlC) * (scale_B1C + 1) + shift_B1C)

    def _level_pos(self) -> Tensor:
        return self.lvl_embed(self.lvl_L)[None] + self.pos_1LC  # (1, L, C)

    def forward(self, codes_BL: Tensor, labels_B: Tensor, *, return_loss: bool = False) -> Tensor:
        """Logits ``(B, L, vocab)`` for every scale's codes (teacher forcing), or the mean loss."""
        B = codes_BL.shape[0]
        tok = self._tokenizer_on(codes_BL.device)
        with torch.no_grad():
            in_BlE = tok.teacher_forcing_input(codes_BL)  # (B, L - first_l, E)
        labels_B = self.drop_labels(labels_B, self.class_dropout)
        cond_BC = self.class_emb(labels_B)
        sos_BlC = cond_BC[:, None].expand(B, self.first_l, self.width) + self.pos_start
        x_BLC = torch.cat([sos_BlC, self.word_embed(in_BlE.to(self.word_embed.weight.dtype))], dim=1) + self._level_pos()
        x_BLC = self.drop(x_BLC)
        mask = self._train_mask()
        for blk in self.blocks:
            x_BLC = blk(x_BLC, blk.modulation(cond_BC), mask)
        logits_BLV = self._head(x_BLC, cond_BC)
        if return_loss:
            return self._cross_entropy(logits_BLV, codes_BL)
        return logits_BLV[..., : self.vocab_size]

    # ------------------------------------------------------------------ cached, scale by scale

    def start_sampling(self, cond_R: Tensor) -> dict[str, Any]:
        """Allocate per-block KV caches for ``len(cond_R)`` rows, precompute the modulations;
        return the state ``scale_step`` uses, with ``x``: the first scale's input ``(R, s_1², C)``."""
        R, dtype, device = cond_R.shape[0], self.head.weight.dtype, self.head.weight.device
        for blk in self.blocks:
            a = blk.attn
            if a.k_cache is None or a.k_cache.shape[0] != R or a.k_cache.dtype != dtype or a.k_cache.device != device:
                shape = (R, self.heads, self.seq_len, self.width // self.heads)
                a.k_cache = torch.zeros(shape, dtype=dtype, device=device)
                a.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        cond_RC = self.class_emb(cond_R)
        lvl_pos_1LC = self._level_pos()
        x_RlC = cond_RC[:, None].expand(R, self.first_l, self.width) + self.pos_start + lvl_pos_1LC[:, : self.first_l]
        return {
            "cond": cond_RC, "ada": [blk.modulation(cond_RC) for blk in self.blocks], "lvl_pos": lvl_pos_1LC, "x": x_RlC,
        }

    def scale_step(self, k: int, x_RlC: Tensor, state: dict[str, Any]) -> Tensor:
        """Run scale ``k``'s inputs against the cache; logits ``(R, s_k², vocab)``."""
        span = (self.offsets[k], self.offsets[k + 1])
        for blk, ada in zip(self.sample_blocks or self.blocks, state["ada"]):
            x_RlC = blk(x_RlC, ada, None, span)
        return self._head(x_RlC, state["cond"])[..., : self.vocab_size]

    def embed_next_scale(self, k: int, next_BlE: Tensor, state: dict[str, Any] | None = None) -> Tensor:
        """Scale ``k``'s input tokens ``(B, s_k², C)`` from the tokenizer's ``(B, s_k², E)``."""
        lvl_pos = state["lvl_pos"] if state is not None else self._level_pos()
        x = self.word_embed(next_BlE.to(self.word_embed.weight.dtype))
        return x + lvl_pos[:, self.offsets[k] : self.offsets[k + 1]]

    @torch.no_grad()
    def cached_logits(self, codes_BL: Tensor, labels_B: Tensor) -> Tensor:
        """Teacher-forced logits computed scale by scale through the KV cache (equals ``forward``
        in eval mode; the tests check it)."""
        tok = self._tokenizer_on(codes_BL.device)
        in_BlE = tok.teacher_forcing_input(codes_BL)
        state = self.start_sampling(labels_B)
        out, x = [], state["x"]
        for k in range(len(self.scales)):
            if k > 0:
                a, b = self.offsets[k] - self.first_l, self.offsets[k + 1] - self.first_l
                x = self.embed_next_scale(k, in_BlE[:, a:b], state)
            out.append(self.scale_step(k, x, state))
        return torch.cat(out, dim=1)

    def compile_sampling(self, mode: str = "cudagraph") -> None:
        """Speed up sampling on CUDA: ``"cudagraph"`` replays the whole scale loop (every scale,
        guidance, filtering, the tokenizer's next-scale input) as one CUDA graph;
        ``"compile+cudagraph"`` does the same with each block ``torch.compile``d for the scales'
        static shapes (fused norm/modulation/GELU kernels inside the graph; one compile per
        scale, shared by every block); ``"eager"`` undoes both. Same codes for the same
        generator up to the compiled kernels' rounding."""
        self.sample_blocks = None
        if mode == "eager":
            self.sample_fn = None
        elif mode == "cudagraph":
            self.sample_fn = sampling.VARGraphSampler()
        elif mode == "compile+cudagraph":
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):  # one graph per scale
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 4 * len(self.scales)))
            self.sample_blocks = [torch.compile(blk, dynamic=False) for blk in self.blocks]
            self.sample_fn = sampling.VARGraphSampler()
        else:
            raise ValueError(f"var sampling mode '{mode}': allowed cudagraph, compile+cudagraph, eager")

    @torch.no_grad()
    def sample(
        self, labels_B: Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, generator: torch.Generator | None = None,
    ) -> Tensor:
        """Codes ``(B, L)``; guidance ramps from 1 at the first scale to ``cfg_scale`` at the last.
        See :func:`arvision.priors.sampling.sample_var`."""
        self._tokenizer_on(self.head.weight.device)
        return sampling.sample_var(
            self, labels_B, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )


class StandInScaleTokenizer(nn.Module):
    """A minimal stand-in for the msvq tokenizer's prior-facing interface (tests, benchmarks):
    a random codebook and VAR's residual logic without the φ convolutions.

    ``f_hat`` is the running sum of every sampled scale's code vectors, upsampled to the last
    scale; the next scale's input is ``f_hat`` area-downsampled to that scale.
    """

    def __init__(self, vocab_size: int, embed_dim: int, scales: list[int]) -> None:
        super().__init__()
        self.vocab_size, self.embed_dim, self.scales = vocab_size, embed_dim, list(scales)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.layout = [(s, s) for s in self.scales]

    def next_scale_input(self, k: int, f_hat_BEhw: Tensor | None, codes_Bl: Tensor) -> tuple[Tensor, Tensor | None]:
        from arvision.tokenizers.resize import bicubic_resize

        s, S = self.scales[k], self.scales[-1]
        h_BEss = self.embedding(codes_Bl).transpose(1, 2).reshape(codes_Bl.shape[0], self.embed_dim, s, s)
        h_BEss = bicubic_resize(h_BEss, S)
        f_hat_BEhw = h_BEss if f_hat_BEhw is None else f_hat_BEhw + h_BEss
        if k == len(self.scales) - 1:
            return f_hat_BEhw, None
        nxt = self.scales[k + 1]
        return f_hat_BEhw, F.interpolate(f_hat_BEhw, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)

    def teacher_forcing_input(self, codes_BL: Tensor) -> Tensor:
        f_hat, out, start = None, [], 0
        for k, s in enumerate(self.scales[:-1]):
            f_hat, nxt_BlE = self.next_scale_input(k, f_hat, codes_BL[:, start : start + s * s])
            out.append(nxt_BlE)
            start += s * s
        return torch.cat(out, dim=1)
