"""Stage ``features``: train the encoder that judges samples on ``data/prepared`` → ``models/features``.

A classifier with a contrastive term (``hybrid``) when the data are labelled, contrastive
otherwise (``features.mode``); see
:mod:`arvision.features`. Also writes ``metrics/features_curve.csv`` (DVC plots).

Bounded memory: a train split that fits a shuffle buffer
(:func:`arvision.data.feed.shuffle_buffer_rows`) is decoded whole and trained on as
always; a larger one is drawn through a seeded shuffle buffer over its shards
(:func:`arvision.data.feed.shuffled_batches`). The val metrics walk a lazily decoded
split (:class:`arvision.data.feed.ImageSplit`) a batch at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arvision.config import Params
from arvision.data.feed import ImageSplit, shuffle_buffer_rows, shuffled_batches
from arvision.data.parquet_io import load_images
from arvision.errors import UserError
from arvision.features import save_features, train_features
from arvision.tracking import Tracker
from stages.common import Paths, atomic_dir, read_json, resolve_device, stage_main, write_curve


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    cfg = params.features
    manifest = read_json(paths.prepared / "manifest.json")
    train_x = ImageSplit(paths.prepared / "train")  # decoded on demand
    val_x = ImageSplit(paths.prepared / "val")
    train_y, val_y = train_x.labels, val_x.labels
    if len(train_x) == 0:
        raise UserError("data/prepared/train is empty: nothing to train the feature net on")
    device = resolve_device(cfg.device)
    batches = None
    buffer = shuffle_buffer_rows(cfg.batch_size, int(np.prod(train_x.shape[1:])))
    if len(train_x) <= buffer:  # fits: decoded whole and drawn from as always (the same weights)
        _, train_x, train_y = load_images(paths.prepared / "train")
    else:
        batches = shuffled_batches(paths.prepared / "train", cfg.batch_size, params.seed, buffer, labels=True)

    def log(step: int, row: dict[str, float]) -> None:
        tracker.log_metrics({f"train_{k}": v for k, v in row.items()}, step=step)

    net, trained, curve = train_features(
        train_x, train_y, val_x, val_y, cfg, seed=params.seed, device=device, on_log=log, batches=batches
    )
    tracker.set_tags({"features.mode": trained["mode"]})
    with atomic_dir(paths.features) as out:
        save_features(
            net.cpu(),
            out,
            {
                "resolution": manifest["resolution"],
                "class_names": manifest.get("class_names", []),
                "data.content_hash": manifest["content_hash"],
                "metrics": {k: v for k, v in trained.items() if k != "mode"},
            },
        )
        write_curve(paths.metrics / "features_curve.csv", curve)
    return {
        **{k: v for k, v in trained.items() if k.startswith("val_")},
        "classifier": int(trained["num_classes"] > 0),  # a class head: classifier or hybrid
        "num_classes": trained["num_classes"],
        "final_loss": trained["final_loss"],
        "params": sum(p.numel() for p in net.parameters()),
        "train_seconds": round(trained["train_seconds"], 1),
    }


def main() -> None:
    stage_main("features", run, reads=["data/prepared"])


if __name__ == "__main__":
    main()
