"""Metrics: reconstruction (:mod:`.image`) and codebook health (:mod:`.codebook`)."""

from arvision.metrics.codebook import codebook_stats, perplexity, usage
from arvision.metrics.image import psnr, ssim

__all__ = ["psnr", "ssim", "codebook_stats", "perplexity", "usage"]
