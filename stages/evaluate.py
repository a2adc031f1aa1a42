"""Stage ``evaluate``: likelihood, reconstruction, samples and speed; registers the generator.

Writes ``metrics/eval.json`` (for ``dvc metrics``), ``reports/samples.png`` (one row per class)
and ``reports/report.md``; registers ``arvision-generator`` with alias ``candidate`` and moves
``champion`` only when the candidate has lower validation bits per dimension.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from arvision.config import Params
from arvision.data.parquet_io import load_images
from arvision.generator import Generator
from arvision.tracking import Tracker
from arvision.train.tokenizer import evaluate_tokenizer
from arvision.viz import save_grid
from stages.common import Paths, atomic_dir, read_json, resolve_device, stage_main

PRIMARY = "val_bpd"


def load_codes(split_dir) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``(N, L)`` int64 and labels ``(N,)`` from token shards."""
    table = pq.read_table(split_dir, columns=["codes", "label"])
    n = table.num_rows
    if n == 0:
        return np.zeros((0, 0), np.int64), np.zeros((0,), np.int64)
    flat = table.column("codes").combine_chunks().flatten().to_numpy()
    return flat.reshape(n, -1).astype(np.int64), table.column("label").to_numpy().astype(np.int64)


@torch.no_grad()
def nll_nats(prior, codes: np.ndarray, labels: np.ndarray, batch_size: int, device) -> float:
    """Summed negative log-likelihood (nats) of ``codes`` under the prior, conditional on labels."""
    prior.eval()
    total = 0.0
    for i in tqdm(range(0, len(codes), batch_size), desc="evaluate/nll", unit="batch", leave=False):
        c = torch.from_numpy(codes[i : i + batch_size]).to(device)
        y = torch.from_numpy(labels[i : i + batch_size]).to(device)
        logits = prior(c, y).float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), c.flatten(), reduction="sum").item()
    return total


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    cfg = params.evaluate
    device = resolve_device(cfg.device)
    manifest = read_json(paths.prepared / "manifest.json")
    gen = Generator.load(paths.tokenizer, paths.prior, device=str(device))
    if cfg.compile_sampling:
        gen.compile_sampling()
    codes, labels = load_codes(paths.tokens / "val")
    if cfg.max_val_images:
        codes, labels = codes[: cfg.max_val_images], labels[: cfg.max_val_images]
    n_dims = manifest["resolution"] ** 2 * manifest["channels"]
    nats = nll_nats(gen.prior, codes, labels, cfg.batch_size, device)
    metrics: dict[str, Any] = {
        "val_bits_per_token": nats / (math.log(2) * max(1, codes.size)),
        PRIMARY: nats / (math.log(2) * max(1, len(codes)) * n_dims),
    }
    _, val_images, _ = load_images(paths.prepared / "val", limit=cfg.max_val_images)
    tok_metrics = evaluate_tokenizer(gen.tokenizer, val_images, batch_size=cfg.batch_size, device=device)
    metrics.update({f"tokenizer_{k}": v for k, v in tok_metrics.items()})

    names = gen.class_names or [str(c) for c in range(gen.num_classes)]
    sample_labels = [c for c in range(gen.num_classes) for _ in range(cfg.samples_per_class)]
    t0 = time.perf_counter()
    images = gen.generate(
        sample_labels, cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
    )
    metrics["sample_images_per_s"] = len(images) / (time.perf_counter() - t0)
    rows = [images[c * cfg.samples_per_class : (c + 1) * cfg.samples_per_class] for c in range(gen.num_classes)]

    with atomic_dir(paths.reports) as out:
        save_grid(out / "samples.png", rows, row_names=names, scale=2)
        if tracker.run_id:
            from arvision.registry import register_generator

            tracker.log_artifact(out / "samples.png")
            reg = register_generator(
                tracker.run_id, paths.tokenizer, paths.prior, PRIMARY, metrics[PRIMARY],
                {"data.content_hash": manifest["content_hash"]},
            )
            metrics["registered_version"] = int(reg["version"])
            metrics["is_champion"] = int(reg["champion"])
        lines = [f"# arvision evaluation\n", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
        lines.append("\n![samples](samples.png)\n")
        (out / "report.md").write_text("\n".join(lines))
        if tracker.run_id:
            tracker.log_artifact(out / "report.md")
    return metrics


def main() -> None:
    stage_main("evaluate", run, reads=["data/prepared", "data/tokens", "models/tokenizer", "models/prior"])


if __name__ == "__main__":
    main()
