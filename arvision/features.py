"""The pipeline's own image encoder, which judges generated images (stage ``features``).

No pretrained weights can be downloaded, so the Fréchet distance, KID, precision/recall and
the memorisation check are computed in the space of a small conv net trained here on the
prepared train split: a classifier when the data are labelled (its penultimate layer is the
feature space, as Inception's pool layer is for FID) trained on class cross-entropy plus
``contrastive_weight`` × NT-Xent (mode ``hybrid``, what ``auto`` picks), else a SimCLR-style
contrastive encoder (NT-Xent on two random augmentations of each image). ``classifier`` is the
cross-entropy alone.

Legend: b - batch, c - channels, h w - spatial, d - feature dim, k - classes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor, nn

from arvision.errors import UserError
from arvision.images import images_to_tensor
from arvision.train.trainer import Task, Trainer, TrainerConfig

WEIGHTS = "weights.pt"
#: the training curve holds one row every LOG_EVERY steps: the mean loss over those steps
LOG_EVERY = 10
#: val images used for the contrastive retrieval figure (chance: 1 / this many)
RETRIEVAL_IMAGES = 512


class FeatureNet(nn.Module):
    """Three stride-2 conv levels (``width``·1, 2, 4 channels), one more conv at the last level,
    global average pool, a linear map to ``dim`` features.

    Lean on purpose: one conv a level costs a quarter of the usual two-conv levels' compute on
    CPU (a step of 64 images at 32×32 took ~25 ms classifier, ~55 ms contrastive on 2 cores not
    otherwise busy) and classified the emoji groups as well in the trials. ``num_classes > 0``: a linear classifier
    head on the features; ``0``: a projection head (MLP) for the contrastive loss, used in
    training only (SimCLR: the features before the projection transfer better than its output).
    ``projection`` with ``num_classes > 0`` (mode ``hybrid``): both, the MLP as ``proj``.
    """

    def __init__(self, cfg: Any, *, channels: int, num_classes: int, projection: bool = False):
        super().__init__()
        self.cfg, self.channels, self.num_classes = cfg, channels, num_classes
        self.projection = projection or num_classes == 0
        layers: list[nn.Module] = []
        c_in = channels
        for mult in (1, 2, 4):  # H → H/2 → H/4 → H/8
            c = cfg.width * mult
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers)
        self.to_feats = nn.Linear(c_in, cfg.dim)
        if num_classes > 0:
            self.head: nn.Module = nn.Linear(cfg.dim, num_classes)
        else:
            self.head = self._mlp(cfg.dim)
        # created after the other layers, so classifier and contrastive nets keep their weights for a seed
        self.proj: Optional[nn.Module] = self._mlp(cfg.dim) if num_classes > 0 and projection else None

    @staticmethod
    def _mlp(dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    @property
    def mode(self) -> str:
        if self.num_classes == 0:
            return "contrastive"
        return "hybrid" if self.proj is not None else "classifier"

    def forward(self, x_BCHW: Tensor) -> Tensor:
        """Images, float in [-1, 1] → features ``(B, dim)``."""
        h_BChw = self.trunk(x_BCHW)
        return self.to_feats(reduce(h_BChw, "b c h w -> b c", "mean"))

    def logits(self, x_BCHW: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``; classifier and hybrid modes only."""
        if self.num_classes == 0:
            raise ValueError("this feature net was trained contrastively (unlabelled data): it has no classes")
        return self.head(self(x_BCHW))

    def project(self, x_BCHW: Tensor) -> Tensor:
        """The contrastive projection ``(B, dim)`` (not normalised); contrastive and hybrid modes only."""
        if not self.projection:
            raise ValueError("this feature net is a plain classifier: it has no projection head")
        return (self.proj if self.proj is not None else self.head)(self(x_BCHW))


def resolve_mode(mode: str, labels: np.ndarray) -> str:
    """``auto`` → ``hybrid`` iff every label is >= 0 and there are at least two classes, else
    ``contrastive``. Hybrid, not the plain classifier: on emoji 32² (two seeds) it told ×4
    down-up blobs from the floor better in every sample metric (class accuracy 0.778 → 0.722 vs
    0.764 → 0.736) at a higher val accuracy; bench/results/2026-12-02-ladder-cpu-hybrid."""
    labelled = len(labels) > 0 and bool((labels >= 0).all()) and len(np.unique(labels)) > 1
    if mode == "auto":
        return "hybrid" if labelled else "contrastive"
    if mode in ("classifier", "hybrid") and not labelled:
        raise UserError(f"features.mode {mode!r} needs labelled data with 2+ classes; use 'auto' or 'contrastive'")
    return mode


def augment(x_BCHW: Tensor, g: torch.Generator) -> Tensor:
    """SimCLR's augmentations, batched in torch: random resized crop (35–100 % of the area, not
    SimCLR's 8 %: at 16–32 px a smaller crop leaves too little of the image), aspect 3/4–4/3,
    horizontal flip, colour jitter (brightness, contrast, saturation ±40 %, with probability
    0.8), grayscale with probability 0.2.

    The random numbers come from the CPU generator ``g``, so a seed gives the same views on
    any device.
    """
    B, C = x_BCHW.shape[:2]

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g).to(x_BCHW.device)

    area_B = 0.35 + 0.65 * rand(B)
    ratio_B = torch.exp((2 * rand(B) - 1) * math.log(4 / 3))
    sx_B = (area_B * ratio_B).sqrt().clamp(max=1.0)
    sy_B = (area_B / ratio_B).sqrt().clamp(max=1.0)
    tx_B = (2 * rand(B) - 1) * (1 - sx_B)
    ty_B = (2 * rand(B) - 1) * (1 - sy_B)
    flip_B = torch.where(rand(B) < 0.5, -1.0, 1.0)
    zero_B = torch.zeros_like(sx_B)
    theta_B23 = torch.stack([sx_B * flip_B, zero_B, tx_B, zero_B, sy_B, ty_B], 1).view(B, 2, 3)
    grid_BHW2 = F.affine_grid(theta_B23, list(x_BCHW.shape), align_corners=False)
    x = F.grid_sample(x_BCHW, grid_BHW2, mode="bilinear", padding_mode="reflection", align_corners=False)

    y = (x + 1) / 2  # [0, 1]
    jitter_B = (rand(B) < 0.8).float()
    b_B, c_B, s_B = (1 + jitter_B * 0.4 * (2 * rand(B) - 1) for _ in range(3))
    y = y * b_B.view(B, 1, 1, 1)
    mean_B111 = y.mean((1, 2, 3), keepdim=True)
    y = (y - mean_B111) * c_B.view(B, 1, 1, 1) + mean_B111
    if C == 3:
        gray_B1HW = y.mean(1, keepdim=True)
        y = gray_B1HW + (y - gray_B1HW) * s_B.view(B, 1, 1, 1)
        to_gray_B = (rand(B) < 0.2).view(B, 1, 1, 1)
        y = torch.where(to_gray_B, y.mean(1, keepdim=True).expand_as(y), y)
    return y.clamp(0, 1) * 2 - 1


def nt_xent(z1_BD: Tensor, z2_BD: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent: each view must pick its partner among the other 2B − 1 views (cosine)."""
    B = z1_BD.shape[0]
    z_ND = F.normalize(torch.cat([z1_BD, z2_BD]), dim=1)  # N = 2B
    sim_NN = z_ND @ z_ND.T / temperature
    sim_NN.fill_diagonal_(float("-inf"))
    partner_N = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z_ND.device)
    return F.cross_entropy(sim_NN, partner_N)


def trainer_config(cfg: Any) -> TrainerConfig:
    """The trainer's knobs of the ``features`` section: fp32 on every device, a curve row every
    :data:`LOG_EVERY` steps, no checkpoints (the net trains in seconds to minutes)."""
    return TrainerConfig(
        name="features", steps=cfg.steps, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, log_every=LOG_EVERY,
        mixed_precision=False,
    )


class FeaturesLoss(Task):
    """The feature net's step for :class:`arvision.train.trainer.Trainer` on ``(uint8 images (B, H,
    W, C), labels (B,))`` batches, augmented (:func:`augment`, views from the CPU generator ``g``):
    class cross-entropy (``classifier``), that plus ``contrastive_weight`` × NT-Xent of two views
    (``hybrid``), or NT-Xent alone (``contrastive``); stats ``loss`` and, with classes, the batch
    ``accuracy``."""

    name = "features"

    def __init__(self, net: FeatureNet, mode: str, cfg: Any, g: torch.Generator, device: torch.device) -> None:
        self.net, self.mode, self.cfg, self.g, self.device = net, mode, cfg, g, device

    def step(self, batch: tuple[Any, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        net, g, cfg = self.net, self.g, self.cfg
        x_u8, y_B = batch
        x_BCHW = images_to_tensor(x_u8).to(self.device)
        if self.mode == "classifier":
            logits_BK = net.logits(augment(x_BCHW, g))
            y_B = y_B.to(self.device)
            loss = F.cross_entropy(logits_BK, y_B)
            return loss, {"loss": loss.item(), "accuracy": float((logits_BK.argmax(1) == y_B).float().mean())}
        if self.mode == "hybrid":  # one trunk pass per view: both views classified, the pair contrasted
            y_B = y_B.to(self.device)
            v1_BD, v2_BD = net(augment(x_BCHW, g)), net(augment(x_BCHW, g))
            logits_NK = net.head(torch.cat([v1_BD, v2_BD]))  # N = 2B
            y_N = torch.cat([y_B, y_B])
            con = nt_xent(net.proj(v1_BD), net.proj(v2_BD), cfg.temperature)
            loss = F.cross_entropy(logits_NK, y_N) + cfg.contrastive_weight * con
            return loss, {"loss": loss.item(), "accuracy": float((logits_NK.argmax(1) == y_N).float().mean())}
        loss = nt_xent(net.project(augment(x_BCHW, g)), net.project(augment(x_BCHW, g)), cfg.temperature)
        return loss, {"loss": loss.item()}


def _drawn(images_u8_NHWC: np.ndarray, labels_N: Tensor, batch_size: int, g: torch.Generator) -> Iterator[tuple[Any, Tensor]]:
    """Endless batches drawn with replacement by ``g`` (drawn as each step takes its batch, so the
    draws and the augmentations share ``g`` in one order)."""
    while True:
        idx_B = torch.randint(len(images_u8_NHWC), (batch_size,), generator=g)
        yield images_u8_NHWC[idx_B.numpy()], labels_N[idx_B]


def train_features(
    train_u8_NHWC: np.ndarray,
    train_labels: np.ndarray,
    val_u8_NHWC: np.ndarray,
    val_labels: np.ndarray,
    cfg: Any,
    *,
    seed: int,
    device: str | torch.device,
    on_log: Optional[Callable[[int, dict[str, float]], None]] = None,
    batches: Optional[Iterator[tuple[np.ndarray, np.ndarray]]] = None,
) -> tuple[FeatureNet, dict[str, Any], list[dict[str, float]]]:
    """Train a :class:`FeatureNet` on the train split (``cfg``: a ``FeaturesConfig``).

    The images may be numpy arrays or lazily decoded splits
    (:class:`arvision.data.feed.ImageSplit`: the evaluation walks them a batch at a time).
    ``batches``: an endless stream of ``(uint8 images (B, H, W, C), labels (B,))`` training
    batches, drawn instead of indexing ``train_u8_NHWC`` (the stage passes a seeded shuffle
    buffer over the shards when the split is too large to hold: bounded memory); without it,
    batches are drawn from ``train_u8_NHWC`` with replacement, as below.

    Batches are drawn with replacement and augmented (:func:`augment`) in both modes: for the
    classifier too, since without it the net fits its few training images so closely that they
    embed apart from unseen ones (on 360 emoji, an FD floor of train vs val images 5× that of
    unseen vs val; 2.4× with it, and val accuracy 0.57 instead of 0.43). Trained by
    :class:`arvision.train.trainer.Trainer` on :class:`FeaturesLoss`: AdamW, the learning rate
    on a cosine from ``lr`` to ``min_lr_ratio · lr`` (0 by default) after ``warmup_steps`` (0),
    fp32. The same seed gives the same weights on CPU.

    ``on_log(step, row)`` gets each curve row (every :data:`LOG_EVERY` steps: mean ``loss`` and
    ``grad_norm`` over them, the last step's ``lr``, and for a classifier the mean batch
    ``accuracy``).

    Returns ``(net in eval mode, metrics, curve)``; metrics: ``mode``, ``num_classes``,
    ``train_seconds``, ``final_loss`` and on the val split (the train split
    when val is empty) ``val_accuracy`` (classifier) or ``val_retrieval_top1`` (contrastive:
    the share of augmented views whose nearest other view, by cosine of the features, is of
    the same image; chance 1 / min(N, :data:`RETRIEVAL_IMAGES`)).
    """
    if len(train_u8_NHWC) == 0:
        raise UserError("no training images for the feature net (data/prepared/train is empty)")
    mode = resolve_mode(cfg.mode, np.asarray(train_labels))
    all_labels = np.concatenate([np.asarray(train_labels), np.asarray(val_labels)])
    classes = mode in ("classifier", "hybrid")
    num_classes = int(all_labels.max()) + 1 if classes else 0
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(cfg, channels=train_u8_NHWC.shape[-1], num_classes=num_classes, projection=mode == "hybrid")
    net.to(device).train()
    g = torch.Generator().manual_seed(seed)
    if batches is None:
        batches = _drawn(train_u8_NHWC, torch.from_numpy(np.asarray(train_labels, np.int64)), cfg.batch_size, g)
    else:
        batches = ((x, torch.from_numpy(np.asarray(y, np.int64))) for x, y in batches)
    curve: list[dict[str, float]] = []

    def log(step: int, row: dict[str, float]) -> None:
        curve.append({"step": step, **row})
        if on_log is not None:
            on_log(step, row)

    t0 = time.time()
    Trainer(net, FeaturesLoss(net, mode, cfg, g, device), trainer_config(cfg), device=device, on_log=log,
            progress=False).fit(batches)
    train_seconds = time.time() - t0
    net.eval()
    eval_x, eval_y = (val_u8_NHWC, val_labels) if len(val_u8_NHWC) else (train_u8_NHWC, train_labels)
    metrics: dict[str, Any] = {
        "mode": mode,
        "num_classes": num_classes,
        "train_seconds": train_seconds,
        "final_loss": curve[-1]["loss"] if curve else float("nan"),
    }
    if classes:
        metrics["val_accuracy"] = float((classify(net, eval_x, device=device) == np.asarray(eval_y)).mean())
    else:
        metrics["val_retrieval_top1"] = retrieval_top1(net, eval_x[:RETRIEVAL_IMAGES], seed=seed, device=device)
    return net, metrics, curve


@torch.inference_mode()
def retrieval_top1(net: FeatureNet, images_u8_NHWC: np.ndarray, *, seed: int, device: str | torch.device) -> float:
    """Share of images whose augmented view's nearest neighbour (cosine of the features) among
    the other images' views is a view of the same image; chance is 1 / N."""
    g = torch.Generator().manual_seed(seed)
    x_NCHW = images_to_tensor(images_u8_NHWC).to(device)
    a_ND = F.normalize(net(augment(x_NCHW, g)), dim=1)
    b_ND = F.normalize(net(augment(x_NCHW, g)), dim=1)
    hit_N = (a_ND @ b_ND.T).argmax(1) == torch.arange(len(x_NCHW), device=a_ND.device)
    return float(hit_N.float().mean())


def _net_device(net: nn.Module, device: Optional[str | torch.device]) -> torch.device:
    return torch.device(device) if device is not None else next(net.parameters()).device


@torch.inference_mode()
def embed(
    net: FeatureNet, images_u8_NHWC: np.ndarray, *, batch_size: int = 256, device: Optional[str | torch.device] = None
) -> np.ndarray:
    """Features of uint8 images ``(N, H, W, C)``: float32 ``(N, dim)`` (``device``: the net's by default)."""
    device = _net_device(net, device)
    out = [
        net(images_to_tensor(images_u8_NHWC[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(images_u8_NHWC), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, net.cfg.dim), np.float32)


@torch.inference_mode()
def classify(
    net: FeatureNet, images_u8_NHWC: np.ndarray, *, batch_size: int = 256, device: Optional[str | torch.device] = None
) -> np.ndarray:
    """The classifier's predicted class of each uint8 image ``(N, H, W, C)``: int64 ``(N,)``.

    Raises ``ValueError`` for a contrastive net (check ``net.num_classes > 0`` first)."""
    device = _net_device(net, device)
    out = [
        net.logits(images_to_tensor(images_u8_NHWC[i : i + batch_size]).to(device)).argmax(1).cpu()
        for i in range(0, len(images_u8_NHWC), batch_size)
    ]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def save_features(net: FeatureNet, out_dir: str | Path, extra: dict[str, Any]) -> None:
    """``config.json`` (cfg, channels, num_classes, mode, and ``extra``) and ``weights.pt``
    (the state_dict, on CPU) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = net.cfg.model_dump() if hasattr(net.cfg, "model_dump") else dict(vars(net.cfg))
    meta = {**extra, "cfg": cfg, "channels": net.channels, "num_classes": net.num_classes, "mode": net.mode}
    if net.proj is not None:  # absent for the other modes: their config.json stays as it was
        meta["projection"] = True
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, out_dir / WEIGHTS)


def features_hash(directory: str | Path) -> str:
    """sha256 of the saved weights: which feature network (yardstick) a score was made with."""
    import hashlib

    return hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()


def load_features(directory: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """The feature net saved in ``directory``, on ``device``, in eval mode."""
    from arvision.config import FeaturesConfig

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise UserError(f"{directory}: no feature net here (config.json missing); run the features stage first")
    meta = json.loads((directory / "config.json").read_text())
    net = FeatureNet(FeaturesConfig(**meta["cfg"]), channels=meta["channels"], num_classes=meta["num_classes"],
                     projection=bool(meta.get("projection", False)))
    net.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
    return net.to(device).eval()
