"""Judge generators by their samples: one yardstick, built once, applied to every generator.

A :class:`Yardstick` holds what every score in one evaluation is measured against: the feature
network trained by the ``features`` stage, the val split (and its features), the train split
(for memorisation) and the copy thresholds calibrated on val-to-train distances. The candidate,
the re-scored champion, the last weights and the *floor* (an equal number of train images, what
a perfect generator would score) are all scored by :meth:`Yardstick.score` with the same
labels and the same seed, so their numbers can be compared.

Lower is better for ``fd``, ``kid``, ``copy_rate``, ``val_bpd``; higher for ``precision``,
``recall``, ``density``, ``coverage``, ``class_accuracy``.

Memory: :meth:`Yardstick.load` holds neither split's pixels. The splits are lazily decoded
sequences (:class:`arvision.data.feed.ImageSplit`) and a tokenizer's reconstructions of
them are computed on demand (:class:`Reconstructions`), each with a cache of fixed size; every
consumer walks them in slices (embedding, bits per dim, the pixel-space nearest-neighbour
search of the memorisation check, which streams the training images past the few samples). What
is held is per image small: the features ``(N, dim)`` and labels of both splits, the val
images' nearest-training distances. The numbers are those of the whole arrays: every slice
walked is the one walked before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arvision.data.feed import LazyImages
from arvision.metrics.samples import copy_reference

#: image-space metrics every scored set gets (FD etc. are in the features' space)
SAMPLE_KEYS = ("fd", "kid", "precision", "recall", "density", "coverage", "copy_rate", "copy_rate_pixels")

#: the promotion metrics ``evaluate.primary`` may name, as "lower is better" values
PRIMARY_SIGN = {"fd": 1.0, "kid": 1.0, "val_bpd": 1.0, "copy_rate": 1.0, "neg_precision": -1.0, "neg_recall": -1.0}


def primary_value(metrics: dict[str, float], primary: str) -> float:
    """The value of ``primary`` in ``metrics`` as a lower-is-better number."""
    key = primary.removeprefix("neg_")
    return PRIMARY_SIGN[primary] * float(metrics[key])


def primary_resamples(detail: dict[str, np.ndarray], primary: str) -> np.ndarray | None:
    """The bootstrap values ``(B,)`` of ``primary`` in :meth:`Yardstick.score`'s ``detail``,
    lower-is-better as :func:`primary_value`; None when it has none (``val_bpd``, a val
    likelihood, is not a sample metric; ``evaluate.bootstrap: 0``)."""
    values_B = detail.get(f"boot_{primary.removeprefix('neg_')}")
    return None if values_B is None else PRIMARY_SIGN[primary] * np.asarray(values_B, np.float64)


def sample_labels(val_labels: np.ndarray, num_classes: int, n: int, seed: int) -> np.ndarray:
    """``n`` class labels in val's class proportions (a seeded shuffle of val's labels, tiled),
    so FD against val compares like with like. Unlabelled data (or a model of one class): 0s."""
    labels = np.asarray(val_labels, np.int64)
    if num_classes <= 1 or len(labels) == 0 or labels.min() < 0:
        return np.zeros(n, np.int64)
    rng = np.random.default_rng(seed)
    reps = -(-n // len(labels))
    return np.concatenate([rng.permutation(labels) for _ in range(reps)])[:n]


@dataclass
class Yardstick:
    """The fixed reference of one evaluation (see the module docstring)."""

    net: Any  # arvision.features.FeatureNet
    device: torch.device
    val_u8: Any  # (Nv, H, W, C) uint8: an array, or an ImageSplit (decoded on demand)
    val_labels: np.ndarray  # (Nv,) int, -1 unlabelled
    train_u8: Any  # (Nt, H, W, C) uint8: an array, or an ImageSplit
    train_labels: np.ndarray
    nearest_k: int = 5
    batch_size: int = 256
    val_feats: np.ndarray = field(init=False)
    train_feats: np.ndarray = field(init=False)
    memo: Any = field(init=False)  # the calibrated memorisation reference

    def __post_init__(self) -> None:
        from arvision.features import embed

        self.val_feats = embed(self.net, self.val_u8, batch_size=self.batch_size, device=self.device)
        self.train_feats = embed(self.net, self.train_u8, batch_size=self.batch_size, device=self.device)
        self.memo = copy_reference(self.train_feats, self.train_u8, self.val_feats, self.val_u8)

    @classmethod
    def load(cls, prepared: Path, features_dir: Path, *, device, nearest_k: int = 5, batch_size: int = 256,
             max_val: int | None = None, max_train: int | None = None) -> "Yardstick":
        """The yardstick of a prepared data set: both splits (the first ``max_val`` /
        ``max_train`` rows) as lazily decoded :class:`~arvision.data.feed.ImageSplit`."""
        from arvision.data.feed import ImageSplit
        from arvision.features import load_features

        val_u8 = ImageSplit(Path(prepared) / "val", limit=max_val)
        train_u8 = ImageSplit(Path(prepared) / "train", limit=max_train)
        net = load_features(Path(features_dir), device=device)
        return cls(net=net, device=torch.device(device), val_u8=val_u8, val_labels=val_u8.labels, train_u8=train_u8,
                   train_labels=train_u8.labels, nearest_k=nearest_k, batch_size=batch_size)

    @property
    def labelled(self) -> bool:
        return bool(len(self.val_labels)) and int(self.val_labels.min()) >= 0 and len(np.unique(self.val_labels)) > 1

    @property
    def is_classifier(self) -> bool:
        return bool(getattr(self.net, "num_classes", 0))

    def reconstruction_reference(self, tokenizer):
        """The copy reference as seen through ``tokenizer``: its reconstructions of the train
        images, thresholds calibrated on its reconstructions of the val images. A generator
        that replays a training image's codes draws that image's *reconstruction*, which a lossy
        tokenizer leaves farther from the original than near-duplicates in val are; against the
        reconstructions such a copy is found."""
        from arvision.features import embed

        train_rec = Reconstructions(tokenizer, self.train_u8, device=self.device, batch_size=self.batch_size)
        if not train_rec.fits_cache():  # walked three times or more: made once, kept on disk
            train_rec = materialised(train_rec, self.batch_size)
        val_rec = Reconstructions(tokenizer, self.val_u8, device=self.device, batch_size=self.batch_size)
        feats = lambda x: embed(self.net, x, batch_size=self.batch_size, device=self.device)  # noqa: E731
        return copy_reference(feats(train_rec), train_rec, feats(val_rec), val_rec)

    def reconstruction_fd(self, recon_ref) -> float:
        """rFD: the Fréchet distance between the val images' features and their reconstructions'
        (``recon_ref``'s, from :meth:`reconstruction_reference`: nothing is reconstructed or
        embedded again), in the same feature space and by the same function as the samples'
        ``fd``. A tokenizer's floor under the generator: samples decoded from perfect codes
        score about this. 0 for a lossless tokenizer; blur raises it where PSNR barely moves."""
        from arvision.metrics.samples import frechet_distance

        return frechet_distance(recon_ref.val_feats, self.val_feats)

    def score(self, images_u8: np.ndarray, intended_labels: np.ndarray | None, recon_ref=None, *,
              feats: np.ndarray | None = None, memorisation_check: bool = True, bootstrap: int = 0,
              seed: int = 0) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Sample metrics of ``images_u8`` (uint8 ``(N, H, W, C)``) against val.

        Returns ``(metrics, detail)``: metrics as in :data:`SAMPLE_KEYS`, plus ``class_accuracy``
        when the data are labelled and the feature net is a classifier; ``detail`` holds the
        per-image ``copy_score`` (>= 1: flagged) and ``nearest_train`` index (for the
        memorisation panel). A sample is a copy when it is flagged against the training images
        or, with ``recon_ref`` (:meth:`reconstruction_reference`), against their reconstructions.
        ``feats``: the images' features when already computed; ``memorisation_check=False``
        leaves the copy metrics out (and the copy entries of ``detail``).

        ``bootstrap`` > 0: that many bootstrap resamples of the samples and of val, seeded by
        ``seed`` (:func:`arvision.metrics.samples.bootstrap_resamples`, on the features made
        here: nothing embedded again) give each of ``fd``, ``kid``, precision, recall, density,
        coverage and ``copy_rate`` its 95 % interval, ``<metric>_ci_low`` / ``_ci_high``, and
        ``detail['boot_<metric>']`` its resampled values ``(B,)``: sets of one size scored with
        one seed are resampled at the same indices, so two generators' values pair up (the
        champion rule, :mod:`arvision.champion`).
        """
        from arvision.features import classify, embed
        from arvision.metrics.samples import class_accuracy, sample_metrics

        if feats is None:
            feats = embed(self.net, images_u8, batch_size=self.batch_size, device=self.device)
        metrics = dict(sample_metrics(feats, self.val_feats, nearest_k=self.nearest_k))
        if intended_labels is not None and self.labelled and self.is_classifier:
            pred = classify(self.net, images_u8, batch_size=self.batch_size, device=self.device)
            metrics["class_accuracy"] = class_accuracy(pred, np.asarray(intended_labels))
        detail: dict[str, np.ndarray] = {}
        if memorisation_check:
            detail = self._memorisation(feats, images_u8, recon_ref, metrics)
        if bootstrap:
            from arvision.metrics.samples import bootstrap_intervals, bootstrap_resamples

            flags = detail["copy_score"] >= 1 if memorisation_check else None
            resampled = bootstrap_resamples(feats, self.val_feats, nearest_k=self.nearest_k, resamples=bootstrap,
                                            seed=seed, copy_flags=flags)
            metrics.update(bootstrap_intervals(resampled, metrics))
            detail.update({f"boot_{k}": v for k, v in resampled.items()})
        return {k: float(v) for k, v in metrics.items()}, detail

    def _memorisation(self, feats: np.ndarray, images_u8: np.ndarray, recon_ref, metrics: dict[str, float]
                      ) -> dict[str, np.ndarray]:
        """The copy check of :meth:`score`: adds the copy metrics to ``metrics``; returns the
        per-image ``copy_score`` and ``nearest_train``."""
        from arvision.metrics.samples import memorisation

        reports = [memorisation(self.memo, feats, images_u8)]
        if recon_ref is not None:
            reports.append(memorisation(recon_ref, feats, images_u8))
        score_RM = np.stack([r.score for r in reports])
        score_px_RM = np.stack([r.score_pixels for r in reports])
        which_M = score_RM.argmax(0)
        copy_score = score_RM.max(0)
        metrics["copy_rate"] = float((copy_score >= 1).mean()) if len(copy_score) else 0.0
        metrics["copy_rate_pixels"] = float((score_px_RM.max(0) >= 1).mean()) if len(copy_score) else 0.0
        metrics["copy_threshold"], metrics["copy_threshold_pixels"] = reports[0].threshold, reports[0].threshold_pixels
        nearest = np.stack([r.nearest for r in reports])[which_M, np.arange(len(which_M))]
        return {"copy_score": copy_score, "nearest_train": nearest}

    def floor_pick(self, n: int, seed: int) -> np.ndarray:
        """The train rows the floor scores: a seeded choice of ``n`` (at most all), sorted.
        The calibration ladder (:mod:`arvision.ladder`) degrades these same rows."""
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(self.train_u8), size=min(n, len(self.train_u8)), replace=False))

    def floor(self, n: int, seed: int, bootstrap: int = 0) -> dict[str, float]:
        """What a perfect generator scores: ``n`` train images (:meth:`floor_pick`) against
        val, labelled with their own labels; with ``bootstrap``, intervals as in
        :meth:`score`. Memorisation is left out: these *are* training images."""
        idx = self.floor_pick(n, seed)
        metrics, _ = self.score(self.train_u8[idx], self.train_labels[idx], feats=self.train_feats[idx],
                                memorisation_check=False, bootstrap=bootstrap, seed=seed)
        return metrics


@torch.no_grad()
def reconstruct(tokenizer, images_u8: np.ndarray, *, device, batch_size: int = 256) -> np.ndarray:
    """``tokenizer``'s reconstructions (encode, then decode) of uint8 ``(N, H, W, C)`` images;
    ``tokenizer`` lives on ``device``."""
    from arvision.images import images_to_tensor, tensor_to_images

    out = [tensor_to_images(tokenizer.decode(tokenizer.encode(images_to_tensor(images_u8[i : i + batch_size]).to(device))))
           for i in range(0, len(images_u8), batch_size)]
    return np.concatenate(out) if out else images_u8.copy()


class Reconstructions(LazyImages):
    """:func:`reconstruct` of ``images`` (an array or an ImageSplit) computed on demand, one
    ``batch_size`` batch at a time, each batch the one :func:`reconstruct` of the whole would
    encode (so the same pixels), with a fixed-size cache: a lazily computed uint8 image
    sequence that the memorisation check walks in slices."""

    def __init__(self, tokenizer, images, *, device, batch_size: int = 256, cache_bytes: int | None = None):
        self.tokenizer, self.images, self.device = tokenizer, images, device
        super().__init__(len(images), tuple(images.shape[1:]), batch_size, cache_bytes)

    def _load_block(self, k: int) -> np.ndarray:
        a = k * self.block_rows
        return reconstruct(self.tokenizer, self.images[a : a + self.block_rows], device=self.device, batch_size=self.block_rows)


def materialised(images: LazyImages, batch_size: int) -> LazyImages:
    """``images`` computed once and written as lossless PNG shards to a temporary folder,
    returned as an :class:`~arvision.data.feed.ImageSplit` over them: the same pixels, but each
    later walk decodes PNGs instead of computing the images again (a tokenizer's decoder: some
    ten times the cost). The folder goes with the returned object. Memory: one batch."""
    import io
    import shutil
    import tempfile
    import weakref

    import pyarrow as pa
    from PIL import Image

    from arvision.data.feed import ImageSplit
    from arvision.data.parquet_io import PREPARED_SCHEMA, ShardWriter

    def encode_png(x: np.ndarray) -> bytes:  # lossless; the fastest zlib level (the files are temporary)
        buf = io.BytesIO()
        Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    folder = Path(tempfile.mkdtemp(prefix="arvision-reconstructions-"))
    try:
        writer = ShardWriter(folder, PREPARED_SCHEMA, 4096)
        for i in range(0, len(images), batch_size):
            block = images[i : i + batch_size]
            writer.write(pa.Table.from_arrays(
                [pa.array([f"{i + k:012d}" for k in range(len(block))], pa.string()),
                 pa.array([encode_png(x) for x in block], pa.binary()),
                 pa.array(np.full(len(block), -1, np.int32))], schema=PREPARED_SCHEMA))
        writer.close()
        split = ImageSplit(folder, block_rows=batch_size)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(split, shutil.rmtree, folder, True)
    return split


@torch.no_grad()
def bits_per_dim(gen, images_u8: np.ndarray, labels: np.ndarray, *, batch_size: int = 256) -> dict[str, float]:
    """Val likelihood of a generator's prior on its own tokenizer's codes of ``images_u8``:
    ``val_bits_per_token`` and ``val_bpd`` (bits per image dimension, H·W·C). Comparable only
    between models with the same tokenizer: the bits count what the prior models, not what
    the tokenizer loses."""
    from arvision.images import images_to_tensor

    prior, tok, device = gen.prior.eval(), gen.tokenizer.eval(), gen.device
    total_nats, n_tokens = 0.0, 0
    for i in range(0, len(images_u8), batch_size):
        x = images_to_tensor(images_u8[i : i + batch_size]).to(device)
        codes_BL = tok.encode(x).long()
        y_B = torch.as_tensor(np.maximum(labels[i : i + batch_size], 0), dtype=torch.long, device=device)  # unlabelled: 0
        y_B = y_B.clamp_max(max(0, gen.num_classes - 1))
        logits = prior(codes_BL, y_B).float()
        total_nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes_BL.flatten(), reduction="sum").item()
        n_tokens += codes_BL.numel()
    n_dims = max(1, len(images_u8)) * int(np.prod(images_u8.shape[1:]))
    return {"val_bits_per_token": total_nats / (math.log(2) * max(1, n_tokens)), "val_bpd": total_nats / (math.log(2) * n_dims)}


def generate(gen, labels: np.ndarray, cfg) -> tuple[np.ndarray, float]:
    """Sample one image per label with the evaluate config's sampling settings; returns the
    images and images per second."""
    import time

    t0 = time.perf_counter()
    images = gen.generate(
        [int(x) for x in labels], cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
    )
    return images, len(images) / max(1e-9, time.perf_counter() - t0)


def judge(gen, yard: Yardstick, cfg, recon_ref=None) -> tuple[dict[str, float], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Score one generator: ``evaluate.num_samples`` samples against val, plus val likelihood.

    ``recon_ref``: :meth:`Yardstick.reconstruction_reference` of the generator's tokenizer,
    when the caller has it already (generators sharing a tokenizer share it); else computed.
    ``evaluate.bootstrap`` resamples, seeded by ``evaluate.seed``, give the sample metrics their
    intervals (:meth:`Yardstick.score`).
    Returns ``(metrics, images, labels, detail)``; ``metrics['sample_images_per_s']`` is the
    sampling speed on this machine (not a result: it depends on the load)."""
    labels = sample_labels(yard.val_labels, gen.num_classes, cfg.num_samples, cfg.seed)
    images, speed = generate(gen, labels, cfg)
    if recon_ref is None:
        recon_ref = yard.reconstruction_reference(gen.tokenizer)
    metrics, detail = yard.score(images, labels if gen.num_classes > 1 else None, recon_ref=recon_ref,
                                 bootstrap=cfg.bootstrap, seed=cfg.seed)
    metrics.update(bits_per_dim(gen, yard.val_u8, yard.val_labels, batch_size=cfg.batch_size))
    metrics["sample_images_per_s"] = speed
    return metrics, images, labels, detail
