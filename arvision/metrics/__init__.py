"""Metrics: reconstruction (:mod:`.image`), codebook health (:mod:`.codebook`), sample quality
and memorisation in the pipeline's feature space (:mod:`.samples`)."""

from arvision.metrics.codebook import codebook_stats, perplexity, usage
from arvision.metrics.image import psnr, ssim
from arvision.metrics.samples import (
    COPY_PERCENTILE,
    CopyReference,
    CopyReport,
    class_accuracy,
    copy_reference,
    frechet_distance,
    inception_fd,
    kernel_distance,
    memorisation,
    prdc,
    sample_metrics,
)

__all__ = [
    "psnr",
    "ssim",
    "codebook_stats",
    "perplexity",
    "usage",
    "COPY_PERCENTILE",
    "CopyReference",
    "CopyReport",
    "class_accuracy",
    "copy_reference",
    "frechet_distance",
    "inception_fd",
    "kernel_distance",
    "memorisation",
    "prdc",
    "sample_metrics",
]
