"""Stage ``prepare``: images from ``data.source`` → ``data/prepared/{train,val}`` Parquet + manifest."""

from __future__ import annotations

from typing import Any

from arvision.config import Params
from arvision.data.checks import min_split_images
from arvision.data.prepare import prepare_dataset
from arvision.tracking import Tracker
from stages.common import Paths, stage_main


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    manifest = prepare_dataset(params.data, params.seed, paths.prepared, ray_cfg=params.ray, root=paths.root,
                               min_split=min_split_images(params))
    tracker.set_tags({"data.content_hash": manifest["content_hash"], "data.source": manifest["source"]})
    tracker.log_artifact(paths.prepared / "manifest.json")
    counts = manifest["counts"]
    return {
        "train_images": counts["train"],
        "val_images": counts["val"],
        "skipped_images": manifest.get("skipped", 0),
        "num_classes": manifest["num_classes"],
    }


def main() -> None:
    stage_main("prepare", run, reads=[])


if __name__ == "__main__":
    main()
