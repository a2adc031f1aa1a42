"""Augmented views of a prepared image, whose codes the ``tokens`` stage stores next to the
image's own (LlamaGen precomputes the codes of augmented crops): a prior trained on a few
thousand images sees several sequences per image instead of memorising one.

View 0 is the image itself; with ``hflip`` view 1 is its horizontal mirror; then ``crops``
random resized crops (a square of ``crop_scale`` of the area, resized back to the image's size
with bicubic resampling, which is what ``prepare`` enlarges with). A crop's box is seeded by the
image id and the view index only, so the same image gives the same views in any batch, on any
worker, in any run.

Legend: b - images, v - views, h w c - pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ViewSpec:
    """Which views of each image are encoded: the image (always), its mirror, ``crops`` crops."""

    hflip: bool = False
    crops: int = 0
    crop_scale: tuple[float, float] = (0.8, 1.0)  # share of the area a crop keeps, lowest and highest

    @classmethod
    def of(cls, cfg) -> "ViewSpec":
        """The spec of a ``tokens`` config section (:class:`arvision.config.TokensConfig`)."""
        return cls(hflip=bool(cfg.hflip), crops=int(cfg.crops), crop_scale=(float(cfg.crop_scale[0]), float(cfg.crop_scale[1])))

    @property
    def names(self) -> list[str]:
        """One name a view, in view order: ``image``, ``hflip``, ``crop1``, ``crop2``, ..."""
        return ["image"] + (["hflip"] if self.hflip else []) + [f"crop{k + 1}" for k in range(self.crops)]

    @property
    def n_views(self) -> int:
        return len(self.names)

    def metadata(self) -> str:
        """The views as recorded in the token shards' schema metadata (``arvision.tokens.views``)."""
        return json.dumps({"names": self.names, "crop_scale": list(self.crop_scale)})


def crop_box(image_id: str, view: int, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of view ``view``'s crop of image ``image_id``: a square
    (of the shorter side) keeping a share of the area uniform in ``scale``, at a uniform place.
    Seeded by ``sha256(id/view)`` alone: independent of batch, worker and run."""
    digest = hashlib.sha256(f"{image_id}/{view}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    area = rng.uniform(scale[0], scale[1])
    side = max(1, min(height, width, round(min(height, width) * float(np.sqrt(area)))))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return left, top, left + side, top + side


def _crop_resized(image_HWC: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``box`` of the image resized back to its size (bicubic, as ``prepare`` enlarges)."""
    h, w, c = image_HWC.shape
    img = Image.fromarray(image_HWC[..., 0] if c == 1 else image_HWC)
    out = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def view_images(ids: list[str], images_BHWC: np.ndarray, view: int, spec: ViewSpec) -> np.ndarray:
    """View ``view`` (an index of ``spec.names``) of each uint8 image ``(b, H, W, C)``."""
    name = spec.names[view]
    if name == "image":
        return images_BHWC
    if name == "hflip":
        return np.ascontiguousarray(images_BHWC[:, :, ::-1])
    _, h, w, _ = images_BHWC.shape
    return np.stack([_crop_resized(x, crop_box(i, view, h, w, spec.crop_scale)) for i, x in zip(ids, images_BHWC)])


def expand_views(ids: list[str], images_BHWC: np.ndarray, labels_B: np.ndarray, spec: ViewSpec,
                 ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every view of every image, image by image (the rows of image ``i`` are ``i·v .. i·v + v - 1``,
    views in order): ``(ids, images uint8 (b·v, H, W, C), labels (b·v,), view int32 (b·v,))``."""
    v = spec.n_views
    if v == 1 or not len(ids):
        return list(ids), images_BHWC, np.asarray(labels_B), np.zeros(len(ids), np.int32)
    views_VBHWC = np.stack([view_images(ids, images_BHWC, k, spec) for k in range(v)])
    images_BVHWC = views_VBHWC.swapaxes(0, 1)
    out_ids = [i for i in ids for _ in range(v)]
    return (out_ids, np.ascontiguousarray(images_BVHWC.reshape(-1, *images_BHWC.shape[1:])),
            np.repeat(np.asarray(labels_B), v), np.tile(np.arange(v, dtype=np.int32), len(ids)))


# ----------------------------------------------------------------------------------------------
# Reading views back: the prior draws one view of each image an epoch.


def image_rows(view_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images of token rows laid out as :func:`expand_views` writes them (each image's views
    together, in order): ``(first row int64 (G,), views int64 (G,))`` of each of the G images. An
    image starts where the view index does not rise; rows of data without views (all 0) are one
    image each. A worker's share that begins in the middle of an image's views starts an image there."""
    n = len(view_N)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    v = np.asarray(view_N, np.int64)
    starts_G = np.flatnonzero(np.concatenate([[True], v[1:] <= v[:-1]]))
    counts_G = np.diff(np.append(starts_G, n))
    return starts_G.astype(np.int64), counts_G.astype(np.int64)


def view_picks(counts_G: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Which of its ``counts_G[g]`` views image ``g`` contributes in ``epoch``: int64 ``(G,)``, drawn
    by a generator seeded ``(seed, epoch)`` (image g takes the g-th draw), so a run and its resume
    see the same views and each epoch others."""
    return np.random.default_rng([int(seed), int(epoch)]).integers(0, np.asarray(counts_G, np.int64)).astype(np.int64)
