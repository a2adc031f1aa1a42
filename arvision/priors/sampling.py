"""Sampling: logit filtering (temperature, top-k, top-p), classifier-free guidance, and the
sampling loops of both priors, split gpt-fast style into a prefill and one decode step.

Randomness comes only from the caller's ``torch.Generator``: each step draws standard
exponential noise ``E`` with it and picks ``argmax(logit - log E)`` (the exponential race, i.e.
Gumbel-max), which samples exactly from ``softmax(logit)`` with no host sync and no
``torch.multinomial``. The noise is drawn outside the decode step, so the step itself is a pure
static-shape function of its tensor inputs; on CUDA the whole loop is compiled and captured
as one CUDA graph (``GPT.compile_sampling`` / ``VAR.compile_sampling``).

Letter legend: B - images, R - rows (2B under guidance: conditional rows then unconditional),
V - vocabulary, l - tokens of one scale.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

NEG_INF = float("-inf")


def filter_logits(logits_NV: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (static shapes).

    ``top_k`` 0 and ``top_p`` 1 are off. The nucleus is the smallest set of most likely tokens
    whose probability reaches ``top_p``; the most likely token is always kept.
    """
    V = logits_NV.shape[-1]
    if 0 < top_k < V:
        kth_N1 = torch.topk(logits_NV, top_k, dim=-1).values[..., -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth_N1, NEG_INF)
    if top_p < 1.0:
        sorted_NV, idx_NV = torch.sort(logits_NV, dim=-1, descending=True)
        probs_NV = sorted_NV.softmax(dim=-1)
        mass_before_NV = probs_NV.cumsum(dim=-1) - probs_NV  # probability of the tokens ranked above
        sorted_NV = sorted_NV.masked_fill(mass_before_NV >= top_p, NEG_INF)
        logits_NV = torch.empty_like(logits_NV).scatter_(-1, idx_NV, sorted_NV)
    return logits_NV


def guide(logits_RV: Tensor, batch: int, cfg_scale: float) -> Tensor:
    """Classifier-free guidance ``u + s·(c − u)``, written ``c + (s − 1)·(c − u)`` so that s = 1
    returns the conditional logits bit for bit. Rows ``[:batch]`` are conditional, the rest
    unconditional; without unconditional rows the logits pass through."""
    if logits_RV.shape[0] == batch:
        return logits_RV
    c, u = logits_RV[:batch].float(), logits_RV[batch:].float()
    return c + (cfg_scale - 1.0) * (c - u)


def pick(logits_NV: Tensor, noise_NV: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """One token per row from ``softmax(filter(logits / temperature))``, ``noise`` ~ Exp(1).

    ``temperature`` 0 is greedy (argmax).
    """
    logits_NV = logits_NV.float()
    if temperature <= 0:
        return logits_NV.argmax(dim=-1)
    logits_NV = filter_logits(logits_NV / temperature, top_k, top_p)
    return (logits_NV - noise_NV.clamp_min(1e-30).log()).argmax(dim=-1)


def exp_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard exponential noise drawn with ``generator`` (on its own device), fp32 on ``device``."""
    gdev = generator.device if generator is not None else device
    noise = torch.empty(shape, dtype=torch.float32, device=gdev).exponential_(generator=generator)
    return noise.to(device, non_blocking=True)


# --------------------------------------------------------------------------- GPT: next token


def gpt_decode_and_sample(
    model: Any, tok_B: Tensor, input_pos_1: Tensor, noise_BV: Tensor,
    cfg_scale: float, temperature: float, top_k: int, top_p: float, guided: bool, kv_len: int | None = None,
) -> Tensor:
    """One decode step: feed the last token at ``input_pos``, guide, filter, pick the next token.

    Static shapes throughout (the KV cache is preallocated; ``kv_len``, the part of it read, is
    a plain int): the eager loop reads whole buckets of the cache, masked; inside the captured
    whole-run graph (:class:`GPTGraphSampler`) each step reads exactly its filled part.
    """
    B = tok_B.shape[0]
    tok_R1 = (torch.cat([tok_B, tok_B]) if guided else tok_B)[:, None]
    logits_RV = model.decode_step(tok_R1, input_pos_1, kv_len)
    return pick(guide(logits_RV, B, cfg_scale), noise_BV, temperature, top_k, top_p)


@torch.no_grad()
def sample_gpt(
    model: Any, labels_B: Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
    top_p: float = 1.0, generator: torch.Generator | None = None, force_guidance_batch: bool = False,
) -> Tensor:
    """Codes ``(B, L)`` for class ``labels_B``: prefill the class token, then L − 1 decode steps.

    Guidance batches conditional and unconditional rows (2B rows in one forward). With
    ``cfg_scale`` 1 the unconditional rows are skipped unless ``force_guidance_batch``.
    """
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    labels_B = labels_B.to(device)
    B, L, V = labels_B.shape[0], model.seq_len, model.vocab_size
    guided = force_guidance_batch or cfg_scale != 1.0
    cond_R = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B
    model.setup_caches(cond_R.shape[0])
    settings = (B, cfg_scale, temperature, top_k, top_p, guided)
    graph = getattr(model, "sample_fn", None)
    if graph is not None:  # the whole sequence as one CUDA graph: every step's noise drawn up front
        noise_LBV = torch.stack([exp_noise((B, V), generator, device) for _ in range(L)])
        codes_BL = graph(model, cond_R, noise_LBV, settings)
        model.train(was_training)
        return codes_BL
    codes_BL = torch.empty(B, L, dtype=torch.long, device=device)
    logits_RV = model.prefill(cond_R)[:, -1]  # the class token predicts x_0
    tok_B = pick(guide(logits_RV, B, cfg_scale), exp_noise((B, V), generator, device), temperature, top_k, top_p)
    codes_BL[:, 0] = tok_B
    input_pos_1 = torch.ones(1, dtype=torch.long, device=device)
    for i in range(1, L):
        noise_BV = exp_noise((B, V), generator, device)
        tok_B = gpt_decode_and_sample(model, tok_B, input_pos_1, noise_BV, cfg_scale, temperature, top_k, top_p, guided,
                                      model.decode_kv_len(i))
        codes_BL[:, i] = tok_B
        input_pos_1 += 1  # in place on the device: no host→device copy per step
    model.train(was_training)
    return codes_BL


def gpt_sample_loop(model: Any, cond_R: Tensor, noise_LBV: Tensor, settings: tuple, step: Callable[..., Tensor]) -> Tensor:
    """:func:`sample_gpt`'s loop with every step's noise given (``noise_LBV[i]`` for code i) and
    the positions as slices of one static tensor: no host sync, no host→device copy, so the
    whole sequence can be captured as one CUDA graph. Step i reads exactly ``i + 1`` cache
    entries and needs no mask (``kv_len`` exact), so the attention kernels run unmasked."""
    B, cfg_scale, temperature, top_k, top_p, guided = settings
    L = noise_LBV.shape[0]
    logits_RV = model.prefill(cond_R)[:, -1]
    tok_B = pick(guide(logits_RV, B, cfg_scale), noise_LBV[0], temperature, top_k, top_p)
    positions = torch.arange(L, device=cond_R.device)
    out = [tok_B]
    for i in range(1, L):
        tok_B = step(model, tok_B, positions[i : i + 1], noise_LBV[i], cfg_scale, temperature, top_k, top_p, guided, -(i + 1))
        out.append(tok_B)
    return torch.stack(out, dim=1)


class WholeRunGraph:
    """One sampling run captured as one CUDA graph and replayed per batch (the samplers below).

    ``fn(*static_inputs)`` is warmed up on a side stream (compiles, allocates caches), then
    captured; a replay copies the new inputs into the static ones. Re-captured when ``key``,
    taken after each capture, no longer matches (batch, settings, caches). CUDA only."""

    def __init__(self) -> None:
        self.key, self.graph = None, None

    def __call__(self, key_fn: Callable[[], tuple], inputs: list[Tensor], fn: Callable[..., Tensor]) -> Tensor:
        if key_fn() != self.key:
            self.graph = None  # free the old graph's pool before the new capture
            self.static = [t.clone() for t in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn(*self.static)
            self.key = key_fn()  # after the capture: the warm-up may have allocated the caches
        for dst, src in zip(self.static, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the graph's output


class GPTGraphSampler(WholeRunGraph):
    """The whole gpt sampling run (prefill + every decode step, guidance and picking) as one
    CUDA graph, with ``step`` (the decode step, typically ``torch.compile``d; its cache length
    becomes dynamic after the first steps) inside. Per token nothing runs on the host: no
    launches, copies or graph replays between steps."""

    def __init__(self, step: Callable[..., Tensor]) -> None:
        super().__init__()
        self.step = step

    def __call__(self, model: Any, cond_R: Tensor, noise_LBV: Tensor, settings: tuple) -> Tensor:
        def key():
            return (id(model), tuple(cond_R.shape), tuple(noise_LBV.shape), settings,
                    tuple(layer.attention.kv_cache.k_cache.data_ptr() for layer in model.layers))

        return super().__call__(key, [cond_R, noise_LBV], lambda c, n: gpt_sample_loop(model, c, n, settings, self.step))


# --------------------------------------------------------------------------- VAR: next scale


def var_guidance_scale(cfg_scale: float, k: int, num_scales: int) -> float:
    """Guidance ramps linearly over the scales (as VAR): 1 at the first scale, ``cfg_scale`` at
    the last. (VAR's own ``cfg`` argument is ``cfg_scale − 1`` in this convention.)"""
    if num_scales <= 1:
        return cfg_scale
    return 1.0 + (cfg_scale - 1.0) * k / (num_scales - 1)


@torch.no_grad()
def sample_var(
    model: Any, labels_B: Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
    top_p: float = 1.0, generator: torch.Generator | None = None, force_guidance_batch: bool = False,
) -> Tensor:
    """Codes ``(B, L)``, one whole scale per step; each scale attends to the cached keys of the
    coarser ones. The tokenizer turns each scale's codes into the next scale's input.

    With ``model.sample_fn`` set (``VAR.compile_sampling``) the whole loop runs as
    one CUDA graph replay; the noise is drawn the same way, so the codes are the same.
    """
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    labels_B = labels_B.to(device)
    B, V = labels_B.shape[0], model.vocab_size
    guided = force_guidance_batch or cfg_scale != 1.0
    cond_R = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B
    settings = (B, cfg_scale, temperature, top_k, top_p, guided)
    graph = getattr(model, "sample_fn", None)
    if graph is not None:
        # every scale's noise, drawn in the eager loop's order: (B, s_k², V) each
        noise = [exp_noise((B, s * s, V), generator, device) for s in model.scales]
        codes_BL = graph(model, cond_R, noise, settings)
    else:
        codes_BL = var_sample_loop(model, cond_R, lambda k, shape: exp_noise(shape, generator, device), settings)
    model.train(was_training)
    return codes_BL


def var_sample_loop(model: Any, cond_R: Tensor, noise_fn: Callable[[int, tuple], Tensor], settings: tuple) -> Tensor:
    """The scale loop of :func:`sample_var`: static shapes and no host sync (CUDA-graph safe).
    ``noise_fn(k, (B, s_k², V))`` gives scale k's exponential noise."""
    B, cfg_scale, temperature, top_k, top_p, guided = settings
    tok, V, K = model.tokenizer, model.vocab_size, len(model.scales)
    state = model.start_sampling(cond_R)  # sets up caches, returns (cond, first-scale input)
    x_RlC = state["x"]
    f_hat = None
    out = []
    for k, s in enumerate(model.scales):
        logits_RlV = model.scale_step(k, x_RlC, state)
        logits_BlV = guide(logits_RlV, B, var_guidance_scale(cfg_scale, k, K))
        idx_Bl = pick(logits_BlV, noise_fn(k, (B, s * s, V)), temperature, top_k, top_p)
        out.append(idx_Bl)
        if k == K - 1:
            break
        f_hat, next_BlE = tok.next_scale_input(k, f_hat, idx_Bl)
        x_BlC = model.embed_next_scale(k + 1, next_BlE, state)
        x_RlC = torch.cat([x_BlC, x_BlC]) if guided else x_BlC
    return torch.cat(out, dim=1)


class VARGraphSampler(WholeRunGraph):
    """The whole VAR scale loop (10 scales × every block, guidance, top-k/top-p, the tokenizer's
    next-scale input) as one CUDA graph: eager, the loop launches ~7000 small kernels and is
    bound by the host. The tokenizer must be capturable (no host sync)."""

    def __call__(self, model: Any, cond_R: Tensor, noise: list[Tensor], settings: tuple) -> Tensor:
        def key():
            return (id(model), tuple(cond_R.shape), settings, tuple(n.shape for n in noise),
                    tuple(blk.attn.k_cache.data_ptr() if blk.attn.k_cache is not None else 0 for blk in model.blocks))

        def run(c: Tensor, *ns: Tensor) -> Tensor:
            return var_sample_loop(model, c, lambda k, shape: ns[k], settings)

        return super().__call__(key, [cond_R, *noise], run)
