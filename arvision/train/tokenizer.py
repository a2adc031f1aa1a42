"""Training and evaluating a tokenizer: one loop for every kind.

``palette`` is fitted (k-means); every other kind is trained by AdamW on L1 + MSE plus the
kind's quantiser loss, with the quantiser's state (EMA codebook, restarts, first-batch
initialisation) applied by an explicit ``tok.update_quantizer()`` after each training forward.
Optionally (``tokenizer.adv_weight`` > 0, ``tokenizer.perceptual``) the VQGAN recipe on top: a
perceptual loss, and a PatchGAN discriminator trained by the hinge loss, whose adversarial
loss the decoder gets under taming's adaptive weight (:class:`Adversary`).
Deterministic on CPU for a seed: the global torch RNG is seeded here and batches come from
:func:`arvision.train.common.endless_indices` (epoch e: a permutation seeded ``seed + e``) over
an in-memory array, or from a seeded batch stream (the ``tokenizer`` stage's
:func:`arvision.data.feed.shuffled_batches`, which for a split that fits its shuffle
buffer draws exactly those batches). ``cfg`` is the ``tokenizer`` section
(:class:`arvision.config.TokenizerConfig`).

Data-parallel training (``tokenizer.num_workers`` > 0: :func:`fit_tokenizer`, :func:`tokenizer_job`
through the one Ray shell :mod:`arvision.train.ray`) runs this same loop on every replica, given the DDP-wrapped :class:`TrainingLoss` as ``model`` (so
gradients are averaged) and a sum over replicas as ``reduce`` (so the quantiser's state stays
identical on every replica, see :meth:`arvision.tokenizers.interface.Tokenizer.update_quantizer`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from arvision.config import RayConfig, TokenizerConfig
from arvision.data.feed import shuffle_buffer_rows, shuffled_batches, split_rows
from arvision.metrics.codebook import expected_uniform_usage
from arvision.metrics.image import msssim_loss, psnr, ssim
from arvision.tokenizers import discriminator as disc_losses
from arvision.tokenizers import images_to_tensor, tensor_to_images
from arvision.tokenizers.interface import Reduce, Tokenizer
from arvision.tokenizers.quantizer import counts_perplexity
from arvision.train.common import autocast, encode_images, endless_indices, to_cpu
from arvision.train.trainer import Task, Trainer, TrainerConfig

logger = logging.getLogger("arvision")
LogFn = Callable[[int, dict[str, float]], None]

#: a palette given a batch stream is fitted on this many images drawn from it (the fit samples
#: 200,000 pixels of them)
PALETTE_FIT_IMAGES = 4096


class TrainingLoss(torch.nn.Module):
    """``forward(x) = tok.training_loss(x)``: what DDP wraps (it hooks ``forward`` only), so
    that the backward of that loss averages the gradients over the replicas."""

    def __init__(self, tok: Tokenizer):
        super().__init__()
        self.tok = tok

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        return self.tok.training_loss(x_BCHW)


class Adversary:
    """The discriminator side of a tokenizer's training (``cfg.uses_discriminator``), and the
    perceptual loss (``cfg.perceptual``): what :func:`train_tokenizer` adds to each step.

    In a step, :meth:`generator_terms` extends the tokenizer's loss before its backward (the
    perceptual term from the start; from ``cfg.disc_start`` on, ``adv_weight · λ · -E[D(x̂)]``
    with λ taming's adaptive weight at the decoder's last layer), and after the tokenizer's
    optimizer step :meth:`discriminator_step` trains D on the hinge loss (from ``disc_start``
    on) with its own AdamW (``disc_lr`` or ``lr``, betas (0.5, 0.9) as VQGAN, no weight decay,
    constant lr). The feature-matching loss reads the current D: a fixed random-feature
    network until ``disc_start``, then the training one.

    Data-parallel replicas keep D identical: it is built from the same seed on every replica,
    and its gradients are averaged over them with ``reduce`` before its step (one all-reduce
    of the flattened gradients), so it needs no DDP wrapper. λ is each replica's own (its
    batch's gradients), as under taming's DDP; the tokenizer's gradients of the weighted
    loss are then averaged by DDP as usual.

    Stats (per step, so they land in the training curve and MLflow): ``d_loss``,
    ``logits_real``, ``logits_fake`` (means of D's logits), ``g_adv`` (-E[D(x̂)]),
    ``adv_lambda`` (``adv_weight · λ``, the weight the adversarial loss had), and
    ``perceptual_loss``; 0 before ``disc_start``.
    """

    def __init__(self, cfg: TokenizerConfig, *, channels: int, resolution: int, device: torch.device) -> None:
        self.cfg = cfg
        self.disc: disc_losses.PatchDiscriminator | None = None
        self.opt: torch.optim.Optimizer | None = None
        if cfg.uses_discriminator:
            self.disc = disc_losses.PatchDiscriminator(channels, cfg.disc_width, cfg.disc_layers, resolution=resolution)
            self.disc.to(device)
            if device.type == "cuda":
                self.disc.to(memory_format=torch.channels_last)
            self.opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)

    @staticmethod
    def wanted(cfg: TokenizerConfig) -> bool:
        """Whether ``cfg`` asks for anything beyond the plain loss (else: no :class:`Adversary`,
        and training is the plain recipe bit for bit)."""
        return cfg.uses_discriminator or cfg.perceptual != "none"

    def generator_terms(self, tok: Tokenizer, x_BCHW: torch.Tensor, recon_BCHW: torch.Tensor, loss: torch.Tensor,
                        step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The tokenizer's loss with the perceptual and adversarial terms added, and their stats.
        ``loss`` is the tokenizer's own (reconstruction + quantiser); the quantiser's part does
        not reach the decoder, so at the last layer its gradient is the reconstruction's."""
        cfg, stats = self.cfg, {}
        active = self.disc is not None and step >= cfg.disc_start
        logits_fake = None
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the tokenizer's loss trains the tokenizer only
        try:
            if cfg.perceptual == "msssim":
                p_loss = msssim_loss(recon_BCHW, x_BCHW)
            elif cfg.perceptual == "disc_features":
                with torch.no_grad():
                    _, feats_real = self.disc.forward_features(x_BCHW)
                logits_fake, feats_fake = self.disc.forward_features(recon_BCHW)
                p_loss = disc_losses.feature_matching_loss(feats_real, feats_fake)
            if cfg.perceptual != "none":
                loss = loss + cfg.perceptual_weight * p_loss
                stats["perceptual_loss"] = float(p_loss.detach())
            if cfg.adv_weight > 0:
                g_adv, lam = torch.zeros((), device=loss.device), torch.zeros((), device=loss.device)
                if active:
                    if logits_fake is None:
                        logits_fake = self.disc(recon_BCHW)
                    g_adv = disc_losses.generator_adv_loss(logits_fake)
                    lam = cfg.adv_weight * disc_losses.adaptive_weight(loss, g_adv, tok.last_layer)
                    loss = loss + lam * g_adv
                stats["g_adv"], stats["adv_lambda"] = float(g_adv.detach()), float(lam)
        finally:
            if self.disc is not None:
                self.disc.requires_grad_(True)
        return loss, stats

    def discriminator_step(self, x_BCHW: torch.Tensor, recon_BCHW: torch.Tensor, step: int, device: torch.device,
                           reduce: Reduce | None) -> dict[str, float]:
        """One hinge-loss step of D on the images and their (detached) reconstructions, from
        ``disc_start`` on; its stats (zeros before). Call under the step's autocast."""
        if self.disc is None:
            return {}
        if step < self.cfg.disc_start:
            return {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        both = torch.cat([x_BCHW, recon_BCHW.detach().to(x_BCHW.dtype)])  # GroupNorm: per-sample, one forward for both
        logits_real, logits_fake = self.disc(both).float().chunk(2)
        d_loss = disc_losses.hinge_d_loss(logits_real, logits_fake)
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        if reduce is not None:
            _average_grads(self.disc, reduce, device)
        self.opt.step()
        return {"d_loss": float(d_loss.detach()), "logits_real": float(logits_real.detach().mean()),
                "logits_fake": float(logits_fake.detach().mean())}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries: D's weights and its optimizer (``{}`` without a D)."""
        if self.disc is None:
            return {}
        return {"disc": to_cpu(self.disc.state_dict()), "disc_optimizer": to_cpu(self.opt.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.disc is None:
            return
        if "disc" not in state:
            raise ValueError("the checkpoint holds no discriminator (saved by a run without tokenizer.adv_weight or "
                             "perceptual disc_features): it cannot resume this run")
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["disc_optimizer"])


def _average_grads(module: torch.nn.Module, reduce: Reduce, device: torch.device) -> None:
    """``module``'s gradients replaced by their mean over the replicas ``reduce`` sums over: one
    all-reduce of the flattened gradients and a count."""
    params = [p for p in module.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [torch.ones(1, device=device)])
    flat = reduce(flat)
    flat = flat[:-1] / flat[-1]
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def trainer_config(cfg: TokenizerConfig) -> TrainerConfig:
    """The trainer's knobs of the ``tokenizer`` section (no EMA of the weights: the section's
    ``ema_decay`` is the codebook's)."""
    return TrainerConfig(
        name="tokenizer", steps=cfg.steps, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
    )


class TokenizerLoss(Task):
    """A tokenizer's step for :class:`arvision.train.trainer.Trainer`: L1 + MSE plus the kind's
    quantiser loss (``forward(x)``: ``tok.training_loss`` or its DDP wrapper), the quantiser's
    update (``reduce``: over the replicas), and with an :class:`Adversary` its perceptual and
    adversarial terms before the backward and the discriminator's own step after the
    tokenizer's. The discriminator travels in the checkpoints."""

    def __init__(self, tok: Tokenizer, forward: Callable, adversary: "Adversary | None", reduce: Reduce | None,
                 device: torch.device) -> None:
        self.tok, self.forward, self.adversary, self.reduce, self.device = tok, forward, adversary, reduce, device
        self.name = f"tokenizer/{tok.kind}"
        self._images: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (x, reconstruction)

    def step(self, x_u8: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = x_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, C, H, W) in [-1, 1]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        loss, stats, recon = self.forward(x)
        stats.update(self.tok.update_quantizer(self.reduce))  # codebook EMA, restarts, first-batch init: before backward
        if self.adversary is not None:
            loss, more = self.adversary.generator_terms(self.tok, x, recon, loss, step)
            stats.update(more)
            self._images = (x, recon)
        stats["loss"] = float(loss.detach())
        return loss, stats

    def after_step(self, step: int) -> dict[str, float]:
        if self.adversary is None:
            return {}
        (x, recon), self._images = self._images, None
        with autocast(self.device):  # after the tokenizer's step, on this step's reconstructions
            return self.adversary.discriminator_step(x, recon, step, self.device, self.reduce)

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "psnr": f"{row.get('psnr', 0):.2f}", "usage": f"{row.get('batch_usage', 1):.2f}"}

    def state_dict(self) -> dict[str, Any]:
        return self.adversary.state_dict() if self.adversary is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adversary is not None:
            self.adversary.load_state_dict(state)


def train_tokenizer(
    tok: Tokenizer,
    train_images: np.ndarray | Iterable[np.ndarray],
    cfg: TokenizerConfig,
    *,
    seed: int,
    device: torch.device,
    log: LogFn | None = None,
    progress: bool = True,
    model: torch.nn.Module | None = None,
    reduce: Reduce | None = None,
    state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """Train (or, for ``palette``, fit) ``tok`` in place on uint8 images: an array ``(N, H, W, C)``
    (held on the device; batches drawn by :func:`endless_indices`) or an endless iterable of
    uint8 batches ``(B, H, W, C)`` (one batch a step, one batch on the device: memory does not
    grow with the data set). A palette given a stream is fitted on its first
    :data:`PALETTE_FIT_IMAGES` images. The other kinds train by
    :class:`arvision.train.trainer.Trainer` on :class:`TokenizerLoss`.

    Data-parallel replicas pass ``model``, a module whose ``forward(x)`` returns
    ``tok.training_loss(x)`` (:class:`TrainingLoss` wrapped in DDP; default: ``tok.training_loss``
    itself), and ``reduce``, a sum over the replicas (an all-reduce): the quantiser's update
    takes it, and the logged stats are averaged over the replicas with it. Each replica's
    stream then holds its share of the global batch; ``cfg.batch_size`` stays the global batch
    (``images_per_s`` counts every replica's images).

    Resuming: every ``cfg.checkpoint_every`` steps and at the end ``on_checkpoint(step, state)``
    gets what a resumed run needs (:func:`arvision.train.trainer.checkpoint_state`: weights and
    codebook, optimizer, step, RNG, the half-accumulated log window, the discriminator). Given
    back as ``state``, training goes on from that step; an array's batches skip the consumed
    ones here, a stream must come already advanced (:func:`arvision.data.feed.shuffled_batches`'s
    ``skip``). Resumed or not, the same steps give the same weights on CPU.

    Returns the last logged training stats plus ``train_time_s`` and ``images_per_s``.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    tok.to(device)
    t0 = time.perf_counter()
    in_memory = isinstance(train_images, np.ndarray)
    if tok.kind == "palette":
        stats = tok.fit(train_images if in_memory else _take_images(train_images, PALETTE_FIT_IMAGES), seed=seed)
        stats["train_time_s"] = time.perf_counter() - t0
        if log:
            log(0, stats)
        return stats

    cuda = device.type == "cuda"
    if cuda:
        tok.to(memory_format=torch.channels_last)
        if cfg.compile:  # in place: state_dict keys stay the same
            tok.encoder.compile()
            tok.decoder.compile()
    tok.train()
    forward = tok.training_loss if model is None else model.train()
    start = int(state["step"]) if state else 0
    if in_memory:
        data = torch.from_numpy(np.ascontiguousarray(train_images)).to(device)  # uint8 (N, H, W, C)
        indices = endless_indices(len(data), min(cfg.batch_size, len(data)), seed, skip=start)
        batches: Iterator[torch.Tensor] = (data[idx.to(device)] for idx in indices)
    else:
        stream = iter(train_images)
        if cuda:  # the next batches decode on a CPU thread while the GPU trains on this one
            from arvision.data.feed import prefetched

            stream = prefetched(stream)
        batches = (torch.from_numpy(np.ascontiguousarray(b)).to(device) for b in stream)  # uint8 (B, H, W, C)
    if cfg.hflip:
        batches = random_hflips(batches, seed, start)
    # built only when asked for: building a discriminator draws from the seeded RNG
    adversary = Adversary(cfg, channels=tok.channels, resolution=tok.resolution, device=device) if Adversary.wanted(cfg) else None
    trainer = Trainer(tok, TokenizerLoss(tok, forward, adversary, reduce, device), trainer_config(cfg), device=device,
                      state=state, reduce=reduce, on_log=log, on_checkpoint=on_checkpoint, progress=progress)
    try:
        trainer.fit(batches)
    finally:
        if not in_memory and hasattr(stream, "close"):
            stream.close()  # stops a prefetching thread
    elapsed = time.perf_counter() - t0
    tok.eval()
    done = cfg.steps - start  # this run's steps: a resumed run's rate counts only its own
    return {**trainer.window["last"], "train_time_s": elapsed, "images_per_s": done * cfg.batch_size / max(elapsed, 1e-9)}


def random_hflips(batches: Iterable[torch.Tensor], seed: int, start: int = 0) -> Iterator[torch.Tensor]:
    """``batches`` of uint8 ``(B, H, W, C)`` with each image mirrored left-right with probability
    1/2 (``tokenizer.hflip``). Step ``start + k``'s flips come from a CPU generator seeded
    ``(seed, step)``, not the global RNG, so they are the same on CPU and GPU and a resumed run
    (``start``) flips what the uninterrupted one did."""
    for step, x_BHWC in enumerate(batches, start=start):
        flip_B = torch.from_numpy(np.random.default_rng([int(seed), step]).random(len(x_BHWC)) < 0.5).to(x_BHWC.device)
        yield torch.where(flip_B[:, None, None, None], x_BHWC.flip(2), x_BHWC)


def _take_images(batches: Iterable[np.ndarray], n: int) -> np.ndarray:
    """The first ``n`` images (or all, if fewer) of a stream of uint8 batches, as one array."""
    got, count = [], 0
    for b in batches:
        got.append(np.asarray(b)[: n - count])
        count += len(got[-1])
        if count >= n:
            break
    if not got:
        raise ValueError("no training images")
    return np.concatenate(got)


def image_batches(images: Any, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 batches ``(b, H, W, C)`` of ``images``: an array-like with ``shape`` (a numpy array,
    or a lazily decoded :class:`arvision.data.feed.ImageSplit`) cut into ``batch_size``
    slices, or an iterable of batches passed on as they come."""
    if hasattr(images, "shape"):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images


def codebook_stats_from_counts(counts: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """:func:`arvision.metrics.codebook.codebook_stats` from the code histogram (``counts``, one
    entry per code) instead of the codes: the same numbers, without holding every code."""
    c = counts.double()
    used = int((c > 0).sum())
    n = int(c.sum())
    return {
        "usage": used / vocab_size,
        "perplexity": counts_perplexity(c),
        "dead_codes": float(vocab_size - used),
        "usage_possible": used / max(1, min(vocab_size, n)),
        "usage_vs_uniform": used / max(1e-12, vocab_size * expected_uniform_usage(n, vocab_size)) if n else 0.0,
    }


class _CodeCounts:
    """Code histograms, over all positions and per msvq scale, accumulated batch by batch."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.images = tok, 0
        self.spans = []
        start = 0
        for shape in tok.layout if tok.kind == "msvq" else []:
            self.spans.append((start, start + int(np.prod(shape))))
            start = self.spans[-1][1]
        self.all = torch.zeros(tok.vocab_size, dtype=torch.long)
        self.scales = [torch.zeros(tok.vocab_size, dtype=torch.long) for _ in self.spans]

    def add(self, codes: torch.Tensor) -> None:
        codes = codes.cpu().long()
        self.images += len(codes)
        self.all += torch.bincount(codes.reshape(-1), minlength=self.tok.vocab_size)
        for (a, b), c in zip(self.spans, self.scales):
            c += torch.bincount(codes[:, a:b].reshape(-1), minlength=self.tok.vocab_size)


@torch.no_grad()
def evaluate_tokenizer(
    tok: Tokenizer,
    images: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    usage_images: Any = None,
) -> dict[str, float]:
    """Reconstruction and codebook metrics of ``tok`` on uint8 images ``(N, H, W, C)``: an array,
    an :class:`arvision.data.feed.ImageSplit` (decoded a batch at a time) or an iterable of
    uint8 batches; the same for ``usage_images``. Memory: one batch, and the code histograms.

    ``psnr`` / ``ssim``: per-image means over ``images``, on the uint8 reconstruction (what a
    user sees). Codebook metrics (see :func:`arvision.metrics.codebook.codebook_stats`):
    ``usage`` (share of the vocabulary used), ``usage_possible``, ``usage_vs_uniform``,
    ``perplexity``, ``dead_codes``; msvq adds ``usage_scale{k}``, ``usage_possible_scale{k}``,
    ``usage_vs_uniform_scale{k}`` and ``perplexity_scale{k}`` for each scale k (0 = coarsest)
    and ``usage_min_scale``, the smallest ``usage_possible_scale{k}``: the one number for
    "no scale collapsed". The codebook metrics are over the codes of ``usage_images`` when
    given (pass the training set: msvq's coarse scales have one or four codes an image, too
    few on a validation set to tell a healthy codebook from a collapsing one), else of
    ``images``; ``usage_images_n`` says how many images they were counted on.
    """
    device = torch.device(device)
    was_training = tok.training
    tok.eval().to(device)
    psnr_sum = ssim_sum = 0.0
    n = 0
    counts = _CodeCounts(tok)
    for batch in image_batches(images, batch_size):
        x = images_to_tensor(batch).to(device)
        with autocast(device):
            codes = tok.encode(x)
            rec = tok.decode(codes)
        rec = images_to_tensor(tensor_to_images(rec.float()))  # what is saved and shown: uint8
        x = x.cpu()
        psnr_sum += float(psnr(rec, x)) * len(x)
        ssim_sum += float(ssim(rec, x)) * len(x)
        n += len(x)
        counts.add(codes)
    if usage_images is not None:
        usage = _CodeCounts(tok)
        for batch in image_batches(usage_images, batch_size):
            usage.add(encode_images(tok, batch, batch_size=batch_size, device=device))
        if usage.images:
            counts = usage
    tok.train(was_training)
    out = {"psnr": psnr_sum / max(1, n), "ssim": ssim_sum / max(1, n), **codebook_stats_from_counts(counts.all, tok.vocab_size)}
    out["usage_images_n"] = float(counts.images)
    if tok.kind == "msvq":
        for k, c in enumerate(counts.scales):
            st = codebook_stats_from_counts(c, tok.vocab_size)
            for key in ("usage", "usage_possible", "usage_vs_uniform", "perplexity"):
                out[f"{key}_scale{k}"] = st[key]
        out["usage_min_scale"] = min(out[f"usage_possible_scale{k}"] for k in range(len(tok.layout)))
    return out


# ---------------------------------------------------------------- the tokenizer's job: here or on workers


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict: every entry's name, dtype, shape and bytes (on CPU)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def per_worker_batch(cfg: TokenizerConfig, train_rows: int) -> int:
    """Images a worker draws a step: its share of the global ``tokenizer.batch_size``, at most
    the rows of the smallest part of the split (as the in-process stage draws at most the split)."""
    n = cfg.num_workers
    if train_rows < n:
        from arvision.errors import UserError

        raise UserError(f"tokenizer.num_workers: {n} workers need at least {n} training images, the train split has {train_rows}")
    return min(cfg.batch_size // n, train_rows // n)


def use_gpu(cfg: TokenizerConfig, ray_cfg: RayConfig) -> bool:
    """Whether each worker takes a GPU: ``tokenizer.device`` when it names one (``cuda`` /
    ``cpu``), else (``auto``) ``ray.use_gpu``."""
    return cfg.device == "cuda" or (cfg.device == "auto" and ray_cfg.use_gpu)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option not to broadcast rank 0's buffers at every forward (``update_quantizer``'s
    reduce keeps them identical): ``forward_sync_buffers`` where torch has it (2.13 deprecates
    ``broadcast_buffers``), else ``broadcast_buffers``. Either way the buffers, like the
    weights, are copied from rank 0 once, when DDP wraps the model."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def tokenizer_job(worker, config: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer's training on one worker (:func:`arvision.train.ray.fit`'s job). Under Ray
    Train (``worker.distributed``) every replica has

    - the same initial weights (the same seed on every rank; DDP also copies rank 0's at wrap time);
    - the model wrapped in DDP (:class:`TrainingLoss`, since DDP hooks ``forward`` only), so each
      backward averages the gradients over the replicas; no buffer broadcast
      (:func:`_no_buffer_sync`): the quantiser's buffers are kept identical by the next point;
    - ``update_quantizer(reduce=all-reduce sum)``: the EMA code counts and vector sums follow the
      global batch, k-means centres and restart vectors are averaged, so every replica keeps the
      same codebook;
    - with ``tokenizer.adv_weight`` / ``perceptual: disc_features``, the discriminator outside DDP
      (:class:`Adversary`: built from the same seed on every rank, its gradients averaged over the
      replicas by ``reduce`` before each of its steps), so it stays identical too;
    - its own part of the train split (:func:`arvision.data.feed.shuffled_batches` with
      ``part=(rank, world)``, seed ``seed + rank``), ``config["batch"]`` images a step.

    In this process it is :func:`train_tokenizer` on the whole split. Returns the trained state
    (weights and buffers on CPU), the final stats, and a hash of every rank's state."""
    import torch.distributed as dist

    from arvision.tokenizers import build_tokenizer

    rank, world, device = worker.rank, worker.world, worker.device
    cfg: TokenizerConfig = config["tokenizer"]
    seed = config["seed"]
    torch.manual_seed(seed)  # identical initial weights on every rank, as the stage builds them
    tok = build_tokenizer(cfg, channels=config["channels"], resolution=config["resolution"]).to(device)
    model = reduce = None
    if worker.distributed:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":  # before DDP registers the parameters (train_tokenizer's own call is then a no-op)
            tok.to(memory_format=torch.channels_last)
        model = DistributedDataParallel(TrainingLoss(tok), device_ids=[device.index] if device.type == "cuda" else None,
                                        **_no_buffer_sync())

        def reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)  # sum
            return t

    def on_checkpoint(step: int, st: dict[str, Any]) -> None:
        if not st["done"]:  # the finished state is the job's result, reported with its stats
            worker.checkpoint(step, st)

    skip = int(worker.state["step"]) if worker.state else 0
    batches = shuffled_batches(config["split_dir"], config["batch"], seed, config["buffer"], part=(rank, world), skip=skip)
    try:
        stats = train_tokenizer(tok, batches, cfg, seed=seed, device=device, log=worker.on_log, progress=worker.is_main,
                                model=model, reduce=reduce, state=worker.state, on_checkpoint=on_checkpoint)
    finally:
        batches.close()
    state = to_cpu(tok.state_dict())
    hashes: list[Any] = [state_hash(state)]
    if worker.distributed:
        hashes = [None] * world
        dist.all_gather_object(hashes, state_hash(state))
    return {"model": state, "stats": stats, "replica_hashes": hashes, "world": world, "resumed_from": skip,
            "step": cfg.steps}


def fit_tokenizer(
    *, tokenizer_cfg: TokenizerConfig, ray_cfg: RayConfig, seed: int, split_dir: str | Path, channels: int, resolution: int, run: Any,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train a tokenizer (a kind other than palette) from the prepared train split ``split_dir``
    on ``tokenizer.num_workers`` Ray Train workers, or in this process (0, on ``device``): see
    :func:`arvision.train.ray.fit`. Returns ``{"model": state dict (CPU), "curve": [{"step", ...}],
    "stats": train_tokenizer's result, "replica_hashes": [one a rank], "world", "resumed_from": the
    step its last start resumed from (0: none)}``; refuses a result whose replicas differ.
    Resources: ``ray.cpus_per_worker``, a GPU a worker per :func:`use_gpu`, ``ray.address``; a
    lost worker restarts the run ``ray.max_failures`` times from its last checkpoint. ``run``'s
    folder is kept: the same run again resumes there (the stage removes it once its outputs are
    saved). Workers read the Parquet shards from their path, so on a cluster of several
    machines it must be on shared storage."""
    from arvision.train.ray import fit

    if tokenizer_cfg.kind == "palette":
        raise ValueError("fit_tokenizer trains a kind other than palette (a palette is fitted: train_tokenizer)")
    workers = tokenizer_cfg.num_workers
    split_dir = Path(split_dir).resolve()
    rows = split_rows(split_dir)
    image_bytes = int(np.prod((resolution, resolution, channels)))
    if workers:
        batch = per_worker_batch(tokenizer_cfg, rows)
        buffer = shuffle_buffer_rows(batch, image_bytes)
        logger.info("tokenizer: training on %d Ray Train workers (%s), %d images a worker a step", workers,
                    "GPU" if use_gpu(tokenizer_cfg, ray_cfg) else "CPU", batch)
    else:  # the whole split, at most the split a step
        batch, buffer = min(tokenizer_cfg.batch_size, rows), shuffle_buffer_rows(tokenizer_cfg.batch_size, image_bytes)
    config = {"tokenizer": tokenizer_cfg, "seed": seed, "split_dir": str(split_dir), "batch": batch, "buffer": buffer,
              "channels": channels, "resolution": resolution}
    state = fit(tokenizer_job, config, workers=workers, gpu=use_gpu(tokenizer_cfg, ray_cfg), ray_cfg=ray_cfg, run=run,
                device=torch.device(device))
    if len(set(state["replica_hashes"])) != 1:
        raise RuntimeError(
            f"tokenizer: the {state['world']} replicas ended with different weights or codebooks "
            f"(state hashes {state['replica_hashes']}): the data-parallel training is broken"
        )
    return state


__all__ = ["train_tokenizer", "fit_tokenizer", "tokenizer_job", "trainer_config", "TokenizerLoss", "Adversary", "TrainingLoss", "evaluate_tokenizer",
           "image_batches", "codebook_stats_from_counts"]
