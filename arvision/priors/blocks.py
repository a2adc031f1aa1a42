"""Building blocks shared by the priors: the :class:`Prior` base, RMSNorm, SwiGLU, 2D rotary
embeddings, a causal self-attention with a gpt-fast style static KV cache, and stochastic
depth (:class:`DropPath`, :func:`drop_path_rates`).

Regularisation (``dropout``, ``drop_path``) acts in training forwards only: eval mode and every
cached path (prefill, decode step, VAR's scale steps) skip it whatever the module's mode, so
sampling is deterministic given its generator.

Letter legend (shape suffixes): B - batch, R - rows (batch, doubled under classifier-free
guidance), L - sequence, T - new tokens in one call, S - cache length, H - heads, D - head dim,
C - model width, V - vocabulary.

Imports torch only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pad_vocab(vocab_size: int, multiple: int = 64) -> int:
    """The output head's width: padded to a multiple of 64 so the last matmul tiles evenly."""
    return (vocab_size + multiple - 1) // multiple * multiple


class Prior(nn.Module):
    """An autoregressive prior over integer codes, conditioned on a class label.

    Subclasses implement ``forward(codes_BL, labels_B, *, return_loss=False)`` (logits
    ``(B, L, vocab)`` or, with ``return_loss``, the mean cross-entropy in nats per token: the
    training loop asks for the loss through ``forward`` so that DDP hooks and torch.compile see
    one call), ``sample`` and ``compile_sampling(mode)`` (``fast_sampling`` names the mode the
    generator uses on CUDA). ``config`` is a JSON-able dict from which ``arvision.priors``
    rebuilds the model (see ``save_prior`` / ``load_prior``).
    """

    kind: str
    fast_sampling: str
    vocab_size: int
    num_classes: int
    seq_len: int
    config: dict[str, Any]

    @property
    def null_class(self) -> int:
        """The learned "no class" entry: used for class dropout and the unconditional CFG branch."""
        return self.num_classes

    def drop_labels(self, labels_B: Tensor, p: float) -> Tensor:
        """Replace each label by the null class with probability ``p`` (training mode only)."""
        if not self.training or p <= 0:
            return labels_B
        drop_B = torch.rand(labels_B.shape, device=labels_B.device) < p
        return torch.where(drop_B, torch.full_like(labels_B, self.null_class), labels_B)

    #: set by ``arvision.train.loop.compile_model``: the training loss uses the compiled
    #: (fused) cross-entropy on CUDA; numerics as :func:`cross_entropy`
    fused_loss: bool = False

    def _cross_entropy(self, logits_BLV: Tensor, targets_BL: Tensor) -> Tensor:
        fn = fused_cross_entropy if self.fused_loss and logits_BLV.is_cuda else cross_entropy
        return fn(logits_BLV, targets_BL, self.vocab_size)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: norms, biases, embeddings (by default: every
        parameter of fewer than two dims, and those of ``nn.Embedding`` modules)."""
        names: set[str] = set()
        for mname, module in self.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if p.ndim < 2 or isinstance(module, nn.Embedding) or "pos" in pname or "embed" in pname:
                    names.add(full)
        return names


def cross_entropy(logits_BLV: Tensor, targets_BL: Tensor, vocab_size: int) -> Tensor:
    """Mean cross-entropy in fp32 over the real vocabulary (padding columns sliced off)."""
    logits_NV = logits_BLV[..., :vocab_size].flatten(0, 1).float()
    return F.cross_entropy(logits_NV, targets_BL.flatten())


_FUSED_CE = None


def fused_cross_entropy(logits_BLV: Tensor, targets_BL: Tensor, vocab_size: int) -> Tensor:
    """:func:`cross_entropy` compiled: the fp32 upcast, log-softmax and target gather become one
    reduction over the bf16 logits, and the backward one pointwise kernel writing bf16 grads.
    Eager, the same loss moves ~20 GB a step for gpt-B at batch 128 (fp32 copies of the
    (B·L, 16384) logits, their log-softmax, and the same again backward); fused, ~4 GB."""
    global _FUSED_CE
    if _FUSED_CE is None:
        _FUSED_CE = torch.compile(cross_entropy, fullgraph=True)
    return _FUSED_CE(logits_BLV, targets_BL, vocab_size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 (bf16 under autocast loses the mean square), return the input dtype
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """LLaMA's feed-forward: ``w2(silu(w1 x) * w3 x)``; hidden = 8/3·dim rounded up to 256.

    ``w1`` and ``w3`` are stored stacked as one ``w13`` (rows ``[:hidden]`` are ``w1``): one
    matmul of twice the width reads ``x`` once and, in decoding (128 rows), fills twice as many
    multiprocessors as two half-width ones. State dicts with separate ``w1`` / ``w3`` still load.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)
        self._register_load_state_dict_pre_hook(self._stack_w1_w3)

    @staticmethod
    def _stack_w1_w3(state_dict, prefix, *args) -> None:
        if prefix + "w1.weight" in state_dict and prefix + "w13.weight" not in state_dict:
            w1, w3 = state_dict.pop(prefix + "w1.weight"), state_dict.pop(prefix + "w3.weight")
            state_dict[prefix + "w13.weight"] = torch.cat([w1, w3])

    def forward(self, x: Tensor, regularise: bool = True) -> Tensor:
        """``regularise`` False (cached decoding): no dropout, even in training mode."""
        gate, up = self.w13(x).split(self.hidden, dim=-1)  # each (…, hidden)
        y = self.w2(F.silu(gate) * up)
        return self.drop(y) if regularise else y


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# --------------------------------------------------------------------------- rotary embeddings


def rope_2d_table(rows_L: Tensor, cols_L: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """cos/sin of a 2D rotary embedding, ``(L, head_dim // 2, 2)`` in fp32.

    Half of the rotated pairs turn with the row index, half with the column (LlamaGen's 2D
    RoPE). Positions of -1 give the identity rotation (used for the class token).
    """
    assert head_dim % 4 == 0, "2D RoPE needs head_dim divisible by 4"
    quarter = head_dim // 4
    freqs_F = 1.0 / (base ** (torch.arange(0, quarter, dtype=torch.float64) * 4 / head_dim))
    ang_row = rows_L.double().clamp_min(0)[:, None] * freqs_F  # (L, D/4)
    ang_col = cols_L.double().clamp_min(0)[:, None] * freqs_F
    ang_LP = torch.cat([ang_row, ang_col], dim=1)  # (L, D/2): pairs
    ang_LP = torch.where((rows_L < 0)[:, None], torch.zeros_like(ang_LP), ang_LP)
    return torch.stack([ang_LP.cos(), ang_LP.sin()], dim=-1).float()


def apply_rope(x_BTND: Tensor, rope_TP2: Tensor) -> Tensor:
    """Rotate consecutive pairs of ``x`` ``(B, T, …, D)`` (any head dims between T and D) by the
    table's angles; fp32 math, input dtype out.

    Applied in the projection's own ``(B, T, H, D)`` layout, before the heads are transposed
    for attention: the pairs sit next to each other in memory, so the fused kernel (and its
    backward) reads and writes coalesced rows instead of transposing on the fly.
    """
    T, D = x_BTND.shape[1], x_BTND.shape[-1]
    x = x_BTND.float().reshape(*x_BTND.shape[:-1], D // 2, 2)
    extra = x_BTND.dim() - 3  # head dims between T and D
    rope = rope_TP2.view(T, *([1] * extra), D // 2, 2)
    cos, sin = rope[..., 0], rope[..., 1]  # (T, 1…, D/2)
    out = torch.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 1] * cos + x[..., 0] * sin], dim=-1)
    return out.reshape(x_BTND.shape).type_as(x_BTND)


# --------------------------------------------------------------------------- attention + KV cache


class KVCache(nn.Module):
    """Preallocated keys and values ``(R, H, S, D)`` (gpt-fast layout), written at ``input_pos``.

    Static shapes, in-place updates: a decode step that uses it can be captured in a CUDA graph.
    """

    def __init__(self, rows: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (rows, heads, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos_T: Tensor, k_RHTD: Tensor, v_RHTD: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache.index_copy_(2, input_pos_T, k_RHTD.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos_T, v_RHTD.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class CausalSelfAttention(nn.Module):
    """Multi-head attention with rotary positions, no biases; SDPA so flash kernels are used."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        assert dim % heads == 0
        self.heads, self.head_dim = heads, dim // heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x_BTC: Tensor, rope_TP2: Tensor, mask: Tensor | None = None, input_pos_T: Tensor | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        """Training (``input_pos`` None): causal over ``x``. Cached: write k/v at ``input_pos`` and
        attend over the cache's first ``kv_len`` positions (all if None) under ``mask``
        ``(1, 1, T, kv_len)`` (True = may attend)."""
        B, T, C = x_BTC.shape
        qkv_BT3HD = self.wqkv(x_BTC).view(B, T, 3, self.heads, self.head_dim)
        qk_BT2HD = apply_rope(qkv_BT3HD[:, :, :2], rope_TP2)  # q and k in one pass
        q_BHTD, k_BHTD = qk_BT2HD.transpose(1, 3).unbind(2)  # each (B, H, T, D)
        v_BHTD = qkv_BT3HD[:, :, 2].transpose(1, 2)
        if input_pos_T is None:
            y = F.scaled_dot_product_attention(
                q_BHTD, k_BHTD, v_BHTD, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
            )
        else:
            assert self.kv_cache is not None, "call setup_caches() first"
            k_BHSD, v_BHSD = self.kv_cache.update(input_pos_T, k_BHTD, v_BHTD)
            if kv_len is not None:  # decoding reads only the filled part of the cache (a bucket)
                k_BHSD, v_BHSD = k_BHSD[:, :, :kv_len], v_BHSD[:, :, :kv_len]
            y = F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask)
        y_BTC = self.wo(y.transpose(1, 2).reshape(B, T, C))
        return self.resid_drop(y_BTC) if input_pos_T is None else y_BTC  # cached: no dropout


# --------------------------------------------------------------------------- stochastic depth


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 (first block) to ``max_rate`` (last), as
    VAR and timm schedule them (``linspace(0, max_rate, depth)``): early blocks, which every
    later one builds on, are dropped least. One block: 0."""
    return [max_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, drop a residual branch for a whole
    sample with probability ``p`` and scale the kept ones by ``1 / (1 - p)``, so the branch's
    expected value is unchanged and eval (identity) needs no rescaling. ``p`` 0: identity, no
    random numbers drawn (results bit-identical to a model without it)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)
        # the rate as a tensor too: blocks differ only in it, so torch.compile's one graph serves
        # every block (a Python float is a constant that Dynamo specialises on: one recompile a
        # block, and past its recompile limit the later blocks ran eager)
        self.register_buffer("rate", torch.tensor(self.p), persistent=False)

    def forward(self, x_BLC: Tensor) -> Tensor:
        if not self.training or self.p <= 0.0:
            return x_BLC
        keep = 1.0 - self.rate
        shape = (x_BLC.shape[0],) + (1,) * (x_BLC.dim() - 1)
        mask_B11 = (torch.rand(shape, device=x_BLC.device) < keep).to(x_BLC.dtype)
        return x_BLC * (mask_B11 / keep).to(x_BLC.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class DecoderBlock(nn.Module):
    """Pre-norm LLaMA block: ``x + drop_path(attn(norm(x)))``, then ``x + drop_path(swiglu(norm(x)))``.

    Cached calls (``input_pos_T`` given: prefill, decode step) skip dropout and drop-path.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, eps: float = 1e-5, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = SwiGLU(dim, swiglu_hidden(dim), dropout)
        self.drop_path = DropPath(drop_path)  # no parameters: state dicts unchanged

    def forward(
        self, x: Tensor, rope_TP2: Tensor, mask: Tensor | None = None, input_pos_T: Tensor | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        if input_pos_T is not None:  # cached decoding: no regularisation, whatever the mode
            x = x + self.attention(self.attention_norm(x), rope_TP2, mask, input_pos_T, kv_len)
            return x + self.feed_forward(self.ffn_norm(x), regularise=False)
        x = x + self.drop_path(self.attention(self.attention_norm(x), rope_TP2, mask))
        return x + self.drop_path(self.feed_forward(self.ffn_norm(x)))


def init_linear_embedding(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, 0.02) for linears and embeddings, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def residual_scale(n_layers: int) -> float:
    """Output projections of residual branches start ``1/sqrt(2·layers)`` smaller (GPT-2)."""
    return 1.0 / math.sqrt(2 * n_layers)
