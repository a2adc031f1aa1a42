"""The calibration ladder (:mod:`arvision.ladder`) on real data sets, on CPU, through the real
stage code: which sample metrics are monotone along each family of degradation, and which tell
×4 down-up blobs from the floor.

For each data set, ``stages.prepare.run`` and ``stages.features.run`` (the ``params.yaml``
features settings) in a fresh root with a do-nothing tracker, then the yardstick
``stages.evaluate`` builds (:meth:`arvision.judge.Yardstick.load`) and every rung scored by its
``score``. No tokenizer is trained, so the ladder has no reconstruction rung here.

    PYTHONPATH=. python bench/ladder.py --out bench/results/2026-12-02-ladder-cpu [--only emoji32 mnist]
        [--features mode=hybrid contrastive_weight=1] [--seed 1]  # over params.yaml's

Writes ``ladder.md`` (every metric at every rung, per data set; the monotone table) and
``ladder.json`` (the ladders as :func:`arvision.ladder.score_ladder` returns them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: name -> data overrides over params.yaml's data section
DATASETS = {
    "emoji32": {"source": "emoji", "path": str(REPO / "arvision" / "data" / "emoji"), "resolution": 32},
    "emoji64": {"source": "emoji", "path": str(REPO / "arvision" / "data" / "emoji"), "resolution": 64},
    "mnist": {"source": "mnist", "path": "/work/shared/datasets/mnist", "resolution": 28, "channels": 1,
              "max_images": 10000},
}


def run_one(name: str, root: Path, features_over: dict | None = None, seed: int | None = None) -> dict:
    import torch

    from arvision.config import parse_params
    from arvision.judge import Yardstick
    from arvision.ladder import score_ladder
    from arvision.tracking import NullTracker
    from stages import features, prepare
    from stages.common import Paths

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(DATASETS[name])
    raw["features"].update(features_over or {})
    if seed is not None:
        raw["seed"] = seed
    params = parse_params(raw, "bench")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = Paths(root)
    t0 = time.perf_counter()
    prepare.run(params, paths, NullTracker())
    feats = features.run(params, paths, NullTracker())
    t_stages = time.perf_counter() - t0
    cfg = params.evaluate
    yard = Yardstick.load(paths.prepared, paths.features, device=torch.device("cpu"), nearest_k=cfg.nearest_k,
                          batch_size=cfg.batch_size, max_val=cfg.max_val_images)
    ladder = score_ladder(yard, cfg.num_samples, cfg.seed)
    ladder.update({"data": {k: v for k, v in DATASETS[name].items() if k != "path"},
                   "n_val": len(yard.val_u8), "n_train": len(yard.train_u8),
                   "features_val_accuracy": feats.get("val_accuracy"), "stage_seconds": round(t_stages, 1),
                   "features": {k: v for k, v in raw["features"].items() if k in (features_over or {})}})
    print(f"{name}: stages {t_stages:.0f} s, ladder {ladder['seconds']} s", flush=True)
    return ladder


def markdown(ladders: dict[str, dict]) -> str:
    from arvision.ladder import LADDER_KEYS, families, ladder_table, trust, untrusted_lines

    lines = ["# Calibration ladder on CPU", "",
             f"`PYTHONPATH=. python bench/ladder.py` (one call per data set); features as in params.yaml, "
             "each rung the floor's training images degraded, scored against val by `Yardstick.score`. "
             "⚠: not monotone along a family (a harsher step better by more than 2% of the metric's range over "
             "the ladder), or ×4 blobs within 5% of the floor.", ""]
    for lad in ladders.values():
        lad.update(trust(lad))  # the verdicts of this code, also for data sets measured before
    for name, lad in ladders.items():
        lines += [f"## {name}", "",
                  f"data {lad['data']}; {lad['n_train']} train, {lad['n_val']} val; {lad['n_images']} images a rung; "
                  f"features {lad.get('features') or 'as in params.yaml'}; "
                  f"feature classifier val accuracy {lad['features_val_accuracy']}; prepare+features "
                  f"{lad['stage_seconds']} s, ladder {lad['seconds']} s ({lad.get('cpu_seconds', '?')} s CPU).", ""]
        lines += ladder_table(lad) + [""] + untrusted_lines(lad) + [""]
    fams = list(families())  # every rung: the bench scores all of RUNGS
    lines += ["## Monotone along each family (✓), and tells ×4 blobs from the floor", "",
              "| data | metric | " + " | ".join(fams) + " | blobs ≠ floor |", "|---" * (len(fams) + 3) + "|"]
    for name, lad in ladders.items():
        for key in [k for k in LADDER_KEYS if k in lad["monotone"]]:
            mono = lad["monotone"][key]
            lines.append(f"| {name} | {key} | " + " | ".join("✓" if mono[f] else "✗" for f in fams)
                         + f" | {'✓' if lad['separates_blobs'].get(key) else '✗'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "2026-12-02-ladder-cpu"))
    ap.add_argument("--root", default="/tmp/arvision_ladder_bench")
    ap.add_argument("--only", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--features", nargs="*", default=[], metavar="KEY=VALUE",
                    help="features settings over params.yaml's (values parsed as YAML)")
    ap.add_argument("--seed", type=int, default=None, help="the project seed (default: params.yaml's)")
    args = ap.parse_args()
    features_over = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.features)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # data sets measured by an earlier call into the same --out are kept (runs may be split)
    ladders: dict[str, dict] = json.loads((out / "ladder.json").read_text()) if (out / "ladder.json").exists() else {}
    for name in args.only:
        ladders[name] = run_one(name, Path(args.root) / name, features_over, args.seed)
        # after each: a stopped run keeps what it measured
        (out / "ladder.json").write_text(json.dumps(ladders, indent=2))
        (out / "ladder.md").write_text(markdown(ladders))
    print(markdown(ladders))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
