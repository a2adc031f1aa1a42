"""Near-duplicates across the train/val split, before and after grouping (``data.near_duplicates``).

For each data set: ``prepare`` twice (exact de-duplication only, then with grouping), and for
every val image the pixel RMS distance to its nearest train image; prints how many val images
have a train image within RMS 5/255 (and 2, 10), the groups, the share of images grouped and the
largest group. ``PYTHONPATH=. python bench/near_duplicates.py [--mnist DIR] [--max-images N]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from arvision.config import DataConfig
from arvision.data.parquet_io import load_images
from arvision.data.prepare import prepare_dataset

THRESHOLDS = (2.0, 5.0, 10.0)  # RMS, in 1/255


def nearest_rms(val_NHWC: np.ndarray, train_MHWC: np.ndarray) -> np.ndarray:
    """``(N,)``: each val image's pixel RMS distance (0-255 units) to its nearest train image."""
    v = val_NHWC.reshape(len(val_NHWC), -1).astype(np.float64)
    t = train_MHWC.reshape(len(train_MHWC), -1).astype(np.float64)
    t2, D = (t * t).sum(1), t.shape[1]
    out = np.empty(len(v))
    for a in range(0, len(v), 512):  # integer pixels: the float64 squared distances are exact
        d2 = (v[a:a + 512] ** 2).sum(1)[:, None] + t2[None] - 2.0 * v[a:a + 512] @ t.T
        out[a:a + 512] = np.sqrt(np.maximum(d2.min(1), 0.0) / D)
    return out


def measure(cfg: DataConfig, tmp: Path) -> list[str]:
    rows = []
    for near in (False, True):
        out = tmp / f"near{int(near)}"
        m = prepare_dataset(cfg.model_copy(update={"near_duplicates": near}), 0, out, progress=False, use_ray=False)
        _, x_val, _ = load_images(out / "val")
        _, x_train, _ = load_images(out / "train")
        d = nearest_rms(x_val, x_train)
        within = " | ".join(f"{int((d <= r).sum())}" for r in THRESHOLDS)
        n = m["counts"]["train"] + m["counts"]["val"]
        rows.append(f"| {cfg.source} {cfg.resolution}² | {'on' if near else 'off'} | {n} | {m['counts']['val']} | {within} | "
                    f"{m['near_duplicate_groups']} | {m['near_duplicate_images'] / n:.1%} | {m['near_duplicate_largest_group']} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mnist", default="/work/shared/datasets/mnist")
    ap.add_argument("--max-images", type=int, default=20_000)
    args = ap.parse_args()
    print("| data | grouping | images | val | val ≤2 from train | ≤5 | ≤10 | groups | images grouped | largest group |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cfgs = [DataConfig(resolution=32), DataConfig(resolution=64),
            DataConfig(source="mnist", path=args.mnist, channels=1, resolution=28, max_images=args.max_images)]
    for cfg in cfgs:
        with tempfile.TemporaryDirectory() as tmp:
            measure(cfg, Path(tmp))


if __name__ == "__main__":
    main()
