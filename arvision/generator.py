"""A trained generator: tokenizer + prior, labels in, images out."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class Generator:
    """Bundles a tokenizer and a prior; :meth:`generate` turns class labels into images."""

    def __init__(self, tokenizer, prior, *, class_names: Sequence[str] | None = None, device="cpu"):
        self.tokenizer = tokenizer.eval().to(device)
        self.prior = prior.eval().to(device)
        self.class_names = list(class_names or [])
        self.device = torch.device(device)

    @classmethod
    def load(cls, tokenizer_dir: str | Path, prior_dir: str | Path, device: str = "cpu") -> "Generator":
        """From the stage outputs (``models/tokenizer``, ``models/prior``)."""
        import json

        from arvision.priors import load_prior
        from arvision.tokenizers import load_tokenizer

        tok = load_tokenizer(Path(tokenizer_dir), device=device)
        prior = load_prior(Path(prior_dir), tokenizer=tok, device=device)
        meta_path = Path(prior_dir) / "meta.json"
        names = json.loads(meta_path.read_text()).get("class_names") if meta_path.exists() else None
        return cls(tok, prior, class_names=names, device=device)

    def compile_sampling(self) -> bool:
        """On CUDA, switch the prior to its fastest sampler (compiled kernels in CUDA graphs; the
        first batch pays the compile, ~20-30 s). Returns whether it did (not on CPU)."""
        if self.device.type != "cuda":
            return False
        self.prior.compile_sampling(self.prior.fast_sampling)
        return True

    @property
    def num_classes(self) -> int:
        return int(self.prior.num_classes)

    @torch.no_grad()
    def generate(
        self,
        labels: Sequence[int],
        *,
        cfg_scale: float = 2.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 256,
        progress: bool = False,
    ) -> np.ndarray:
        """Sample one image per label: uint8 ``(B, H, W, C)``. Same seed → same images.
        ``progress``: a bar on stderr, a step a batch of ``batch_size``."""
        from arvision.tokenizers import tensor_to_images

        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        bad = [int(l) for l in labels_t if not 0 <= int(l) < self.num_classes]
        if bad:
            from arvision.errors import UserError

            raise UserError(f"labels {bad} out of range: this model knows classes 0..{self.num_classes - 1}")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        starts: Sequence[int] = range(0, len(labels_t), batch_size)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm  # only here: the served model's code does not need tqdm

            starts = tqdm(starts, desc=f"sampling {len(labels_t)} images", unit="batch")
        for i in starts:
            lab = labels_t[i : i + batch_size].to(self.device)
            codes = self.prior.sample(lab, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            out.append(tensor_to_images(self.tokenizer.decode(codes).float().cpu()))
        return np.concatenate(out) if out else np.zeros((0,), np.uint8)
