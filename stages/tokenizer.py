"""Stage ``tokenizer``: train the image tokenizer on ``data/prepared`` → ``models/tokenizer``.

Also writes ``metrics/tokenizer_curve.csv`` (DVC plots), an originals-beside-reconstructions
grid ``models/tokenizer/recon.png``, and registers ``arvision-tokenizer`` in MLflow.

Bounded memory: the trainer draws its batches from a seeded shuffle buffer over the train shards
(:func:`arvision.data.feed.shuffled_batches`; a split that fits the buffer is drawn
exactly as from the whole array), and the val and train-set metrics are computed a batch at a
time from lazily decoded splits (:class:`arvision.data.feed.ImageSplit`).

The training goes through the one Ray shell (:func:`arvision.train.tokenizer.fit_tokenizer`,
:mod:`arvision.train.ray`): in this process at ``tokenizer.num_workers`` 0, on N Ray Train
workers at N >= 1 (DDP, the quantiser's statistics all-reduced, each worker on its own part of
the train split and batch_size / N images a step); the trained state comes back to this
process, which evaluates, saves and registers it as above. A ``palette`` is
fitted (k-means), not trained: it is always fitted here, whatever ``num_workers`` says.

Resumable: training checkpoints every ``tokenizer.checkpoint_every`` steps into
``.arvision/ray/tokenizer-<hash of params and data>/`` (``checkpoint.pt`` in this process, Ray
Train's run folder on workers). A
run stopped part-way and re-run with the same params and data goes on from the last checkpoint,
to the same weights as a run never stopped (on CPU); the folder is removed once the stage's
outputs are saved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arvision.cluster import TrainRun
from arvision.config import Params
from arvision.data.feed import ImageSplit, shuffle_buffer_rows
from arvision.errors import UserError
from arvision.tokenizers import build_tokenizer, images_to_tensor, save_tokenizer, tensor_to_images
from arvision.tracking import Tracker
from arvision.train.ray import CHECKPOINT  # noqa: F401  (where an in-process run keeps its checkpoint)
from arvision.train.tokenizer import evaluate_tokenizer, fit_tokenizer, train_tokenizer
from arvision.viz import save_grid
from stages.common import Paths, atomic_dir, read_json, resolve_device, stage_main, write_curve, write_json

logger = logging.getLogger("arvision")


def recon_grid(tok, images: np.ndarray, path: Path, n: int = 16) -> None:
    """Originals (top row of each pair) beside their reconstructions."""
    x = images_to_tensor(images[:n])
    with torch.no_grad():
        rec = tensor_to_images(tok.reconstruct(x.to(next(tok.parameters(), torch.empty(0)).device)).float().cpu())
    save_grid(path, [images[:n], rec], row_names=["original", "reconstruction"], scale=3)


def _train_run(params: Params, paths: Paths, tracker: Tracker, manifest: dict) -> TrainRun:
    """The training run's folder and name: the same params and data, the same run (a resume)."""
    from arvision.tracking import tracking_uri

    name = TrainRun.name_for("tokenizer", {"tokenizer": params.tokenizer.model_dump(mode="json"), "seed": params.seed,
                                           "data": manifest.get("content_hash")})
    return TrainRun(paths.cache / "ray", name, tracker.run_id, tracking_uri(paths.root) if tracker.run_id else None, paths.root)


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    cfg = params.tokenizer
    manifest = read_json(paths.prepared / "manifest.json")
    train_x = ImageSplit(paths.prepared / "train")  # decoded on demand, a batch at a time
    val_x = ImageSplit(paths.prepared / "val")
    if len(train_x) == 0:
        raise UserError("data/prepared/train is empty: nothing to train the tokenizer on")
    device = resolve_device(cfg.device)
    torch.manual_seed(params.seed)
    tok = build_tokenizer(cfg, channels=manifest["channels"], resolution=manifest["resolution"]).to(device)
    curve: list[dict[str, float]] = []

    def log(step: int, m: dict[str, float]) -> None:
        tracker.log_metrics({f"train_{k}": v for k, v in m.items()}, step=step)
        curve.append({"step": step, **m})

    if cfg.num_workers and tok.kind == "palette":
        logger.info("tokenizer: a palette is fitted by k-means, not trained: fitted in this process "
                    "(tokenizer.num_workers %d does not apply)", cfg.num_workers)
    run = _train_run(params, paths, tracker, manifest)
    if tok.kind == "palette":  # fitted on (at most) a buffer's worth of images: all of them when they fit
        buffer = shuffle_buffer_rows(cfg.batch_size, int(np.prod(train_x.shape[1:])))
        trained = train_tokenizer(tok, train_x[:buffer], cfg, seed=params.seed, device=device, log=log)
    else:  # in this process at tokenizer.num_workers 0, else on that many Ray Train workers
        state = fit_tokenizer(tokenizer_cfg=cfg, ray_cfg=params.ray, seed=params.seed, split_dir=paths.prepared / "train",
                              channels=manifest["channels"], resolution=manifest["resolution"], run=run, device=device)
        tok.load_state_dict(state["model"])
        curve.extend(state["curve"])
        trained = state["stats"]
    tok.eval()
    val = evaluate_tokenizer(tok, val_x if len(val_x) else train_x, device=device)
    # codebook usage counted on train too: there every scale (even msvq's 1×1) sees enough
    # positions for the whole codebook to be reachable
    on_train = evaluate_tokenizer(tok, val_x[:1] if len(val_x) else train_x[:1], device=device, usage_images=train_x)
    with atomic_dir(paths.tokenizer) as out:
        save_tokenizer(tok.cpu(), out)
        recon_grid(tok, val_x if len(val_x) else train_x, out / "recon.png")
        write_curve(paths.metrics / "tokenizer_curve.csv", curve)
        info = {}
        if tracker.run_id:
            from arvision.registry import register_tokenizer

            tracker.log_artifact(out / "recon.png")
            info = register_tokenizer(tracker.run_id, out, {"data.content_hash": manifest["content_hash"]})
            tracker.link_model(info["model_id"])  # the stage's metrics, logged at its end, are the model's
        write_json(out / "registry.json", info)
    run.cleanup()  # the outputs hold the result now: nothing to resume
    n_params = sum(p.numel() for p in tok.parameters())
    return {
        **{f"val_{k}": v for k, v in val.items()},
        **{f"trainset_{k}": v for k, v in on_train.items() if "usage" in k or "perplexity" in k},
        "seq_len": tok.seq_len,
        "vocab_size": tok.vocab_size,
        "params": n_params,
        "train_seconds": round(trained["train_time_s"], 1),
    }


def main() -> None:
    stage_main("tokenizer", run, reads=["data/prepared"])


if __name__ == "__main__":
    main()
