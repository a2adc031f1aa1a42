"""``arvision score``: any images scored against this project's val split, on evaluate's yardstick.

Another generator's samples, a baseline, a folder of photos: read, normalised exactly as
``prepare`` normalises the data set (:func:`arvision.data.prepare.normalise`: transparency
composited on white, converted to ``data.channels``, resized on the shorter side, centre-cropped
to ``data.resolution``), and scored by :meth:`arvision.judge.Yardstick.score`, the function that
scores ``evaluate``'s samples, beside the *floor* (:meth:`~arvision.judge.Yardstick.floor`: an
equal number of train images, what a perfect generator would score). The numbers are those of
``metrics/eval.json`` (``fd``, ``floor_fd``, ``precision``, ``copy_rate``, ...), so they compare
with the project's own generators'.

Inputs:

- a folder, searched recursively for image files (the extensions of ``data.source: folder``).
  Sub-folders named like one of the project's classes (``manifest.json``'s ``class_names``)
  label the images under them; every other image is unlabelled.
- an ``.npz`` with an ``images`` array, uint8 ``(N, H, W, C)`` (or ``(N, H, W)``), and optionally
  ``labels`` ``(N,)`` ints (-1: unlabelled).

Class accuracy is computed over the labelled images only, and left out when none is. A file that
cannot be decoded is skipped and counted (``skipped_images``). Memory: the normalised images are
held (``resolution² · channels`` bytes each: 3 KiB at 32² RGB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from arvision.data.sources import IMAGE_EXTENSIONS, folder_source
from arvision.errors import UserError

#: image files named in the skip message at most
SKIPPED_NAMED = 5
#: the rows of the printed table (every key is in the JSON)
TABLE_KEYS = ("fd", "kid", "precision", "recall", "density", "coverage", "copy_rate", "class_accuracy")


@dataclass
class Images:
    """Images read for scoring: uint8 ``images_NHWC`` at the project's resolution and channels,
    ``labels_N`` (-1 unlabelled), and what was skipped (``skipped_names``: the first few)."""

    images_NHWC: np.ndarray
    labels_N: np.ndarray
    skipped: int = 0
    skipped_names: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        return int((self.labels_N >= 0).sum())


def _normalised(items, resolution: int, channels: int) -> Images:
    """``(origin, data, label)`` items (bytes or uint8 arrays) → :class:`Images`; an item that
    ``normalise`` cannot decode is skipped and counted."""
    from arvision.data.prepare import normalise

    arrays, labels, skipped = [], [], []
    for origin, data, label in items:
        try:
            arrays.append(normalise(data, resolution, channels))
        except Exception:  # any undecodable input is skipped and counted, as prepare does
            skipped.append(origin)
            continue
        labels.append(label)
    images = np.stack(arrays) if arrays else np.zeros((0, resolution, resolution, channels), np.uint8)
    return Images(images, np.asarray(labels, np.int64), len(skipped), skipped[:SKIPPED_NAMED])


def read_folder(path: Path, resolution: int, channels: int, class_names: list[str]) -> Images:
    """The image files under ``path`` (recursively), labelled by the sub-folder they are in when its
    name is one of ``class_names``."""
    source = folder_source(str(path))  # sub-folder i holds class source.class_names[i]
    index = {name: c for c, name in enumerate(class_names)}
    to_project = [index.get(name, -1) for name in source.class_names]
    items = ((origin, data, to_project[lab] if lab >= 0 else -1) for origin, data, lab in source.records())
    return _normalised(items, resolution, channels)


def read_npz(path: Path, resolution: int, channels: int, num_classes: int) -> Images:
    """An ``.npz``'s ``images`` (uint8 ``(N, H, W, C)`` or ``(N, H, W)``) and optional ``labels``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise UserError(f"{path}: no `images` array (found: {', '.join(npz.files) or 'none'}); "
                                "expected uint8 images (N, H, W, C) and optionally `labels` (N,)")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
    except UserError:
        raise
    except Exception as err:  # not a zip, truncated, pickled objects
        raise UserError(f"{path}: cannot read it as an .npz ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise UserError(f"{path}: `images` must be uint8 (N, H, W, C) with C 1, 3 or 4, got {images.dtype} {images.shape}")
    if labels is None:
        labels = np.full(len(images), -1, np.int64)
    elif labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: `labels` must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    elif num_classes <= 1:
        labels = np.full(len(images), -1, np.int64)  # an unlabelled project: nothing to check them against
    elif labels.max(initial=-1) >= num_classes:
        raise UserError(f"{path}: `labels` up to {int(labels.max())}, but this project has classes 0..{num_classes - 1}")
    labels = np.maximum(labels.astype(np.int64), -1)
    return _normalised(((f"{path}[{i}]", images[i], int(labels[i])) for i in range(len(images))), resolution, channels)


def read_images(path: Path, manifest: dict[str, Any]) -> Images:
    """A folder or an ``.npz`` (module docstring), normalised to the project's data."""
    resolution, channels = int(manifest["resolution"]), int(manifest["channels"])
    class_names = list(manifest.get("class_names") or [])
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        got = read_folder(path, resolution, channels, class_names)
    elif path.suffix.lower() == ".npz":
        got = read_npz(path, resolution, channels, len(class_names))
    else:
        raise UserError(f"{path}: give a folder of images or an .npz with an `images` array")
    if not len(got.images_NHWC) and not got.skipped:
        raise UserError(f"{path}: no images found (image files: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                        if path.is_dir() else f"{path}: `images` is empty")
    return got


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("evaluate.device is 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def _evaluate_params(path: Path):
    """``path``'s evaluate section (the other sections validated too, but not ``data.path``:
    scoring reads the prepared data, never the source)."""
    import yaml

    from arvision.config import parse_params

    if not path.exists():
        raise UserError(f"{path}: no such file (run from the project root, or pass --project)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(raw, str(path)).evaluate


def score_path(root: Path, path: Path) -> tuple[dict[str, float], Images]:
    """Score the images at ``path`` against the val split of the project at ``root``, with
    ``params.yaml``'s evaluate settings (``nearest_k``, ``batch_size``, ``max_val_images``,
    ``seed``, ``device``). Returns the metrics, with ``floor_*`` beside them and the counts
    (``num_images``, ``labelled_images``, ``skipped_images``), and the images read."""
    import json

    from arvision.judge import Yardstick

    prepared, features = root / "data" / "prepared", root / "models" / "features"
    if not (prepared / "manifest.json").exists() or not (features / "weights.pt").exists():
        raise UserError(f"{root} has no val split and feature net to score against yet "
                        "(data/prepared, models/features): run `arvision run` first")
    manifest = json.loads((prepared / "manifest.json").read_text())
    cfg = _evaluate_params(root / "params.yaml")
    got = read_images(path, manifest)
    if len(got.images_NHWC) <= cfg.nearest_k:  # precision/recall need k neighbours among the images
        raise UserError(f"{path}: {len(got.images_NHWC)} image(s) could be read"
                        + (f" ({got.skipped} skipped: not decodable)" if got.skipped else "")
                        + f"; scoring needs more than evaluate.nearest_k = {cfg.nearest_k}")
    yard = Yardstick.load(prepared, features, device=_device(cfg.device), nearest_k=cfg.nearest_k,
                          batch_size=cfg.batch_size, max_val=cfg.max_val_images)
    labels = got.labels_N if got.labelled else None  # class accuracy over the labelled images only
    metrics, _ = yard.score(got.images_NHWC, labels)
    floor = yard.floor(len(got.images_NHWC), cfg.seed)  # as many train images: FD's bias depends on N
    metrics.update({f"floor_{k}": v for k, v in floor.items()})
    metrics.update(num_images=len(got.images_NHWC), labelled_images=got.labelled, skipped_images=got.skipped)
    return metrics, got


def table(metrics: dict[str, Any]) -> str:
    """The short table printed by ``arvision score``: metric, these images, floor (with a
    metric's interval where the yardstick gives one, ``{key}_ci_low`` / ``_ci_high``)."""
    def cell(key: str) -> str:
        v = metrics.get(key)
        if v is None:
            return "—"
        lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        return f"{v:.4g}" + (f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else "")

    rows = [(k, cell(k), cell(f"floor_{k}")) for k in TABLE_KEYS if k in metrics]
    width = max(len(r[1]) for r in rows) if rows else 0
    lines = [f"  {'metric':<16} {'these images':>{max(width, 12)}}  floor (train vs val)"]
    lines += [f"  {k:<16} {a:>{max(width, 12)}}  {b}" for k, a, b in rows]
    return "\n".join(lines)


def summary(path: Path, metrics: dict[str, Any], got: Images) -> str:
    """What was scored (counts, what was skipped) and the :func:`table`."""
    n, lab = int(metrics["num_images"]), int(metrics["labelled_images"])
    head = f"scored {n} images from {path} against this project's val split"
    labels = f"{lab} of them labelled: class accuracy over those" if lab else "unlabelled: no class accuracy"
    lines = [head, f"  {labels}"]
    if got.skipped:
        lines.append(f"  skipped {got.skipped} that could not be decoded, e.g. {', '.join(got.skipped_names)}")
    return "\n".join(lines + ["", table(metrics)])
