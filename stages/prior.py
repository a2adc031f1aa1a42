"""Stage ``prior``: train the AR prior on ``data/tokens`` under Ray Train → ``models/prior``.

On ``ray.num_workers`` Ray Train workers (1 by default), or in this process at 0: the one Ray
shell's rule (:func:`arvision.train.loop.fit_prior`, :mod:`arvision.train.ray`).

Writes the weights ``prior.keep`` asks for (EMA weights when ``ema_decay`` > 0: what sampling
uses): ``best``, the lowest val loss, with the last weights too in ``models/prior/last/``
(same format, loadable by ``Generator.load``), or ``last``. Also ``metrics/prior.json`` and,
for ``dvc plots``, the training curve ``metrics/prior_curve.csv`` and the validation curve
``metrics/prior_val_curve.csv`` (``step,val_loss``, nats/token; header only when validation
is off or there is no val split).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from arvision.config import Params
from arvision.priors import build_prior, save_prior
from arvision.tokenizers import load_tokenizer
from arvision.tracking import Tracker, tracking_uri
from arvision.train.loop import fit_prior, steady_tokens_per_s
from arvision.train.trainer import final_weights, kept_weights
from arvision.cluster import TrainRun
from stages.common import Paths, atomic_dir, read_json, stage_main, write_curve

log = logging.getLogger("arvision")


def token_meta(paths: Paths) -> dict[str, Any]:
    """Tokenizer kind, layout and vocab size from the token shards' schema metadata."""
    first = sorted((paths.tokens / "train").glob("*.parquet"))[0]
    md = {k.decode(): v.decode() for k, v in (pq.read_schema(first).metadata or {}).items()}
    return {
        "kind": md["arvision.tokenizer.kind"],
        "layout": json.loads(md["arvision.tokenizer.layout"]),
        "vocab_size": int(md["arvision.tokenizer.vocab_size"]),
    }


def files_hash(directory) -> str:
    """sha256 over the token shards' bytes (a few MB): the data a training run depends on."""
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*.parquet")):
        h.update(str(f.relative_to(directory)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def write_val_curve(path: Path, points: list[list[float]]) -> None:
    """``step,val_loss`` rows (val loss in nats/token) for ``dvc plots``; the header alone when empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "val_loss"])
        w.writerows([int(step), round(float(loss), 6)] for step, loss in points)


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    meta = token_meta(paths)
    manifest = read_json(paths.prepared / "manifest.json")
    num_classes = max(1, int(manifest["num_classes"]))
    name = TrainRun.name_for("prior", {"prior": params.prior.model_dump(mode="json"), "seed": params.seed,
                                       "workers": params.ray.num_workers, "meta": meta, "tokens": files_hash(paths.tokens)})
    run = TrainRun(paths.cache / "ray", name, tracker.run_id, tracking_uri(paths.root) if tracker.run_id else None, paths.root)
    state = fit_prior(
        prior_cfg=params.prior, ray_cfg=params.ray, seed=params.seed, token_dir=paths.tokens, tokenizer_dir=paths.tokenizer,
        vocab_size=meta["vocab_size"], layout=meta["layout"], num_classes=num_classes, run=run,
    )
    tok = load_tokenizer(paths.tokenizer) if params.prior.kind == "var" else None
    model = build_prior(params.prior, vocab_size=meta["vocab_size"], layout=meta["layout"], num_classes=num_classes, tokenizer=tok)
    curve = state.get("curve", [])
    val_curve = state.get("val_curve", [])
    keep = params.prior.keep
    if keep == "best" and not val_curve:
        log.info("prior: no val loss (prior.eval_every 0 or no val split): keep=best writes the last weights")
    extra = {"class_names": manifest.get("class_names", []), "tokenizer": meta, "ray_run": name}
    meta_json = json.dumps({"class_names": manifest.get("class_names", []), "tokenizer": meta}, indent=2)
    with atomic_dir(paths.prior) as out:
        best = keep == "best" and state.get("best_weights") is not None
        outputs = [(out, kept_weights(state, keep), "best" if best else "last", state["best_step"] if best else state["step"])]
        if keep == "best":  # the last weights too, for evaluate to score both
            outputs.append((out / "last", final_weights(state), "last", state["step"]))
        for directory, weights, which, step in outputs:
            model.load_state_dict(weights)
            save_prior(model, directory, extra={**extra, "weights": which, "step": int(step)})
            (directory / "meta.json").write_text(meta_json)
        write_curve(paths.metrics / "prior_curve.csv", curve)
        write_val_curve(paths.metrics / "prior_val_curve.csv", val_curve)
    run.cleanup()
    last = curve[-1] if curve else {}
    metrics: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": int(state["step"]),
        "train_loss_final": float(last.get("loss", float("nan"))),
        "stopped_early": int(bool(state.get("stopped_early", False))),
        "seq_len": sum(int(torch.tensor(x).prod()) for x in meta["layout"]),
    }
    if len(curve) > 1:  # the first window holds compile and warm-up: a one-window run has no steady state
        metrics["tokens_per_s"] = steady_tokens_per_s(curve)
    if val_curve:
        metrics.update(val_loss_best=float(state["best_val_loss"]), val_loss_last=float(val_curve[-1][1]),
                       best_step=int(state["best_step"]))
    return metrics


def main() -> None:
    stage_main("prior", run, reads=["data/tokens", "models/tokenizer"])


if __name__ == "__main__":
    main()
