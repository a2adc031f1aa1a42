"""``gpt``: LlamaGen-style next-token prior over a code grid.

A decoder-only transformer (RMSNorm, SwiGLU, no biases, SDPA attention) whose sequence is
``[class token, x_0, …, x_{L-2}]`` and whose output at input ``i`` predicts code ``x_i``.

Positions: input ``i`` carries the grid position of the code it predicts (``x_i``), as a 2D
rotary embedding over ``(row, col)`` (half the rotated pairs per axis). For an ``rq`` layout
``(h, w, depth)`` the codes run position by position, depth innermost; all depths of one grid
cell share the cell's rotary position and a learned depth embedding says which depth is next.
A palette layout ``(H, W)`` is just a large grid.

The class embedding has ``num_classes + 1`` rows; the last is the learned null class, used
with probability ``class_dropout`` in training and for the unconditional guidance branch.

Letter legend: B - batch, R - rows, L - sequence, T - new tokens, C - width, V - vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from arvision.priors import sampling
from arvision.priors.blocks import (
    DecoderBlock, KVCache, Prior, RMSNorm, drop_path_rates, init_linear_embedding, pad_vocab, residual_scale,
    rope_2d_table,
)


@dataclass(frozen=True)
class GPTArch:
    """Everything a :class:`GPT` is built from (what ``config.json`` stores): the size's
    architecture (``arvision.sizes.SIZES``), the codes it models and ``prior.*`` settings."""

    vocab_size: int
    layout: tuple[tuple[int, ...], ...]  # one (h, w) or (h, w, depth) grid
    num_classes: int
    n_layer: int
    dim: int
    n_head: int
    dropout: float
    class_dropout: float
    drop_path: float = 0.0  # stochastic depth, the last block's rate (linear from 0); 0 in older configs


class GPT(Prior):
    kind = "gpt"
    #: the fastest sampling mode measured on an H200 (bench/RESULTS.md)
    fast_sampling = "compile+graph"

    def __init__(self, arch: GPTArch) -> None:
        super().__init__()
        layout = arch.layout
        if len(layout) != 1 or len(layout[0]) not in (2, 3):
            raise ValueError(f"gpt needs one (h, w) or (h, w, depth) grid, got layout {layout}")
        h, w = int(layout[0][0]), int(layout[0][1])
        depth = int(layout[0][2]) if len(layout[0]) == 3 else 1
        self.config: dict[str, Any] = {"kind": self.kind, **asdict(arch), "layout": [list(x) for x in layout]}
        vocab_size, num_classes, dim, n_head, n_layer, dropout = (
            arch.vocab_size, arch.num_classes, arch.dim, arch.n_head, arch.n_layer, arch.dropout)
        self.vocab_size, self.num_classes, self.class_dropout = vocab_size, num_classes, arch.class_dropout
        self.seq_len = h * w * depth
        self.n_head, self.head_dim = n_head, dim // n_head

        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.cls_embedding = nn.Embedding(num_classes + 1, dim)  # last row: the null class
        self.depth_embedding = nn.Embedding(depth, dim) if depth > 1 else None
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderBlock(dim, n_head, dropout, drop_path=rate) for rate in drop_path_rates(arch.drop_path, n_layer)
        )
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, pad_vocab(vocab_size), bias=False)

        # target position of every input index: code i sits in cell i // depth at depth i % depth
        idx_L = torch.arange(self.seq_len)
        cell_L = idx_L // depth
        self.register_buffer("rope_LP2", rope_2d_table(cell_L // w, cell_L % w, self.head_dim), persistent=False)
        self.register_buffer("depth_L", idx_L % depth, persistent=False)
        self.register_buffer("causal_LL", torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril(), persistent=False)

        self.apply(init_linear_embedding)
        for layer in self.layers:  # residual branches start small (GPT-2)
            layer.attention.wo.weight.data.mul_(residual_scale(n_layer))
            layer.feed_forward.w2.weight.data.mul_(residual_scale(n_layer))
        self.sample_fn = None  # set by compile_sampling("compile+graph")

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.rope_LP2.dtype != torch.float32 and not self.rope_LP2.is_meta:
            self.rope_LP2 = self.rope_LP2.float()  # rotary angles stay fp32 under .to(bfloat16)
        return self

    # ------------------------------------------------------------------ training / likelihood

    def _embed_inputs(self, labels_B: Tensor, codes_BT: Tensor | None, input_pos_T: Tensor) -> Tensor:
        """``[class token, codes…]`` embedded, plus the depth embedding: ``(B, T, C)``."""
        h_BTC = self.cls_embedding(labels_B)[:, None]
        if codes_BT is not None and codes_BT.shape[1] > 0:
            h_BTC = torch.cat([h_BTC, self.tok_embeddings(codes_BT)], dim=1)
        if self.depth_embedding is not None:
            h_BTC = h_BTC + self.depth_embedding(self.depth_L[input_pos_T])
        return h_BTC

    def forward(self, codes_BL: Tensor, labels_B: Tensor, *, return_loss: bool = False) -> Tensor:
        """Logits ``(B, L, vocab)`` for every code (teacher forcing), or the mean loss in nats."""
        B, L = codes_BL.shape
        labels_B = self.drop_labels(labels_B, self.class_dropout)
        pos_L = torch.arange(L, device=codes_BL.device)
        h_BLC = self.drop(self._embed_inputs(labels_B, codes_BL[:, :-1], pos_L))
        rope_LP2 = self.rope_LP2[:L]
        for layer in self.layers:
            h_BLC = layer(h_BLC, rope_LP2)
        logits_BLV = self.output(self.norm(h_BLC))
        if return_loss:
            return self._cross_entropy(logits_BLV, codes_BL)
        return logits_BLV[..., : self.vocab_size]

    # ------------------------------------------------------------------ cached decoding

    def setup_caches(self, rows: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate every layer's KV cache for ``rows`` rows (kept if already that shape)."""
        dtype = dtype or self.output.weight.dtype
        device = self.output.weight.device
        for layer in self.layers:
            c = layer.attention.kv_cache
            if c is None or c.k_cache.shape[0] != rows or c.k_cache.dtype != dtype or c.k_cache.device != device:
                layer.attention.kv_cache = KVCache(rows, self.n_head, self.seq_len, self.head_dim, dtype, device)

    def _cached(self, h_RTC: Tensor, input_pos_T: Tensor, kv_len: int | None = None) -> Tensor:
        if kv_len is not None and kv_len < 0:  # exact: one token at position -kv_len - 1, no mask
            kv_len, mask_11TS = -kv_len, None
        else:
            mask_11TS = self.causal_LL[input_pos_T][None, None, :, :kv_len]
        rope_TP2 = self.rope_LP2[input_pos_T]
        for layer in self.layers:
            h_RTC = layer(h_RTC, rope_TP2, mask_11TS, input_pos_T, kv_len)
        return self.output(self.norm(h_RTC))[..., : self.vocab_size]

    def prefill(self, labels_R: Tensor, codes_RT: Tensor | None = None) -> Tensor:
        """Fill the caches with the class token (and an optional code prefix); logits ``(R, 1+T, V)``."""
        T = 1 + (codes_RT.shape[1] if codes_RT is not None else 0)
        pos_T = torch.arange(T, device=labels_R.device)
        return self._cached(self._embed_inputs(labels_R, codes_RT, pos_T), pos_T)

    #: decoding attends to the cache in buckets of this many positions: a step at position p
    #: reads the first ``decode_kv_len(p)`` keys (masked beyond p), not the whole cache. The
    #: cache read is most of a decode step's memory traffic (gpt-B, 128 rows: 1.2 GB full);
    #: bucketed, on average a little over half of it. None: always the whole cache.
    decode_bucket: int | None = 32

    def decode_kv_len(self, pos: int) -> int | None:
        """The cache length a decode step at position ``pos`` reads (None: all of it)."""
        if not self.decode_bucket:
            return None
        return min(self.seq_len, -(-(pos + 1) // self.decode_bucket) * self.decode_bucket)

    def decode_step(self, tok_R1: Tensor, input_pos_1: Tensor, kv_len: int | None = None) -> Tensor:
        """Feed one code at ``input_pos`` (static shapes); logits ``(R, V)`` for the next code.
        ``kv_len`` (≥ input_pos + 1): how much of the cache to read, masked beyond
        ``input_pos``; negative, ``-(input_pos + 1)``: exactly the filled part, with no mask."""
        h_R1C = self.tok_embeddings(tok_R1)
        if self.depth_embedding is not None:
            h_R1C = h_R1C + self.depth_embedding(self.depth_L[input_pos_1])
        return self._cached(h_R1C, input_pos_1, kv_len)[:, -1]

    def compile_sampling(self, mode: str = "compile+graph") -> None:
        """Speed up sampling on CUDA: ``"compile+graph"`` captures the whole sequence (prefill
        and every decode step, each ``torch.compile``d and reading exactly its filled cache
        without a mask) as one CUDA graph, replayed per batch; ``"eager"`` undoes it."""
        if mode == "eager":
            self.sample_fn = None
        elif mode == "compile+graph":
            self.sample_fn = sampling.GPTGraphSampler(torch.compile(sampling.gpt_decode_and_sample, fullgraph=True))
        else:
            raise ValueError(f"gpt sampling mode '{mode}': allowed compile+graph, eager")

    @torch.no_grad()
    def sample(
        self, labels_B: Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, generator: torch.Generator | None = None,
    ) -> Tensor:
        """Codes ``(B, L)`` for class ``labels_B``; see :func:`arvision.priors.sampling.sample_gpt`."""
        return sampling.sample_gpt(
            self, labels_B, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
