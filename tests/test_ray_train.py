"""Ray Train on CPU: the DDP path (gloo) across two workers, and joining an existing cluster.

- two workers with batch b give the same loss curve as one worker with batch 2b, and
  ``ray.num_workers: 0`` (the same job in the stage's process) the same run as one worker;
- a cluster started separately (`ray start --head` plus a second node) is used through
  ``RAY_ADDRESS``;
- validation: early stopping takes the same decision on both DDP ranks and survives a restore;
  the prior stage keeps the best weights (and the last in ``models/prior/last``).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arvision.data.parquet_io import write_shards

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SIDE, CLASSES = 16, 4, 3


def _table(n: int, seed: int = 0, shift: int = 0) -> pa.Table:
    """``n`` rows of codes with class-dependent structure; ``shift`` moves the codes off that
    structure (a val split on which the val loss rises as the prior fits the train split)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    codes = (labels[:, None] * 5 + rng.integers(0, 3, (n, SIDE * SIDE)) + shift) % VOCAB
    flat = pa.array(codes.astype(np.uint16).reshape(-1), pa.uint16())
    schema = pa.schema([("id", pa.string()), ("label", pa.int32()), ("codes", pa.list_(pa.uint16(), SIDE * SIDE))])
    return pa.Table.from_arrays(
        [pa.array([f"{i:04d}" for i in range(n)]), pa.array(labels), pa.FixedSizeListArray.from_arrays(flat, SIDE * SIDE)],
        schema=schema,
    )


def _tokens(tmp: Path, n: int = 256, val_rows: int = 0, metadata: dict | None = None) -> Path:
    """A tiny token data set: a train split (one shard of 128 rows per worker) and, with
    ``val_rows``, a shifted val split with a third of its rows unlabelled (label -1)."""
    out = tmp / "tokens"
    write_shards(_table(n), out / "train", 128, metadata=metadata)
    if val_rows:
        val = _table(val_rows, seed=1, shift=3)
        labels = np.where(np.arange(val_rows) % 3 == 0, -1, val.column("label").to_numpy()).astype(np.int32)
        val = val.set_column(1, "label", pa.array(labels))
        write_shards(val, out / "val", 128, metadata=metadata)
    return out


def _fit(tmp: Path, token_dir: Path, workers: int, batch: int, name: str, address=None, **prior_kw) -> dict:
    from arvision.config import PriorConfig, RayConfig
    from arvision.cluster import TrainRun
    from arvision.train.loop import fit_prior

    kw = dict(size="tiny", steps=6, batch_size=batch, lr=3e-3, warmup_steps=0, ema_decay=0.0, class_dropout=0.0, log_every=1,
              checkpoint_every=6)
    return fit_prior(
        prior_cfg=PriorConfig(**{**kw, **prior_kw}), ray_cfg=RayConfig(address=address, num_workers=workers, cpus_per_worker=1),
        seed=0, token_dir=token_dir, tokenizer_dir=tmp, vocab_size=VOCAB, layout=[[SIDE, SIDE]],
        num_classes=CLASSES, run=TrainRun(tmp / "ray", name, root=ROOT),
    )


def test_two_workers_match_one_worker_with_double_batch(tmp_path):
    import ray

    token_dir = _tokens(tmp_path)
    try:
        one = _fit(tmp_path, token_dir, workers=1, batch=32, name="one")
        # the same run name again: Ray Train restores the last checkpoint (resume), no retraining
        again = _fit(tmp_path, token_dir, workers=1, batch=32, name="one")
        two = _fit(tmp_path, token_dir, workers=2, batch=16, name="two")
    finally:
        ray.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (ray.cpus_per_worker 1): the same float sums
    try:  # ray.num_workers 0: the same job in this process, the same run
        here = _fit(tmp_path, token_dir, workers=0, batch=32, name="here")
    finally:
        torch.set_num_threads(threads)
    assert [r["loss"] for r in here["curve"]] == [r["loss"] for r in one["curve"]]
    assert all(torch.equal(here["model"][k], v) for k, v in one["model"].items())
    assert again["step"] == one["step"] == 6
    assert one["val_curve"] == [] and one["best_weights"] is None  # no val split: validation skipped
    assert [r["loss"] for r in again["curve"]] == [r["loss"] for r in one["curve"]]
    assert all(torch.equal(again["model"][k], v) for k, v in one["model"].items())
    l1 = np.array([r["loss"] for r in one["curve"]])
    l2 = np.array([r["loss"] for r in two["curve"]])
    assert len(l1) == len(l2) == 6
    # same data in a different split across ranks: curves agree within tolerance
    assert np.allclose(l1, l2, atol=0.15), (l1, l2)
    assert l1[-1] < l1[0] and l2[-1] < l2[0]


def test_views_of_the_same_codes_train_as_the_images_alone(tmp_path):
    """Token data with a ``view`` column (two rows an image) read through Ray Data: the feed draws
    one view per image per epoch, so when both views hold the image's codes the run is the run on
    the images alone (old shards without a view column), step for step."""
    import ray

    plain = _tokens(tmp_path / "plain")
    table = _table(256)
    doubled = table.take(np.repeat(np.arange(256), 2))
    doubled = doubled.append_column("view", pa.array(np.tile([0, 1], 256).astype(np.int32)))
    views = tmp_path / "views" / "tokens"
    write_shards(doubled, views / "train", 128)
    try:
        want = _fit(tmp_path, plain, workers=1, batch=32, name="plain")
        got = _fit(tmp_path, views, workers=1, batch=32, name="views")
    finally:
        ray.shutdown()
    assert [r["loss"] for r in got["curve"]] == [r["loss"] for r in want["curve"]]


def _ray(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], capture_output=True, text=True, env=env, timeout=180)


def test_pipeline_joins_existing_cluster(tmp_path):
    import ray

    token_dir = _tokens(tmp_path)
    port = "6391"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    head = _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", env=env)
    assert head.returncode == 0, head.stderr
    try:
        node = _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=2", env=env)
        assert node.returncode == 0, node.stderr
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        try:
            state = _fit(tmp_path, token_dir, workers=2, batch=16, name="cluster")
            nodes = [n for n in ray.nodes() if n["Alive"]]
        finally:
            os.environ.pop("RAY_ADDRESS", None)
            ray.shutdown()
        assert len(nodes) == 2  # the head and the joined node
        assert len(state["curve"]) == 6
    finally:
        _ray("stop", "--force", env=env)


def test_early_stop_same_on_two_workers_and_resume(tmp_path):
    """The val loss rises on the shifted val split: best at the first eval (step 2), and with
    patience 2 the run stops at step 6 of 30 on two workers (both ranks stop together, else the
    second would hang in DDP's all-reduce). Re-running the same run name
    restores the stopped run's checkpoint, bookkeeping included, and trains no further."""
    import ray

    token_dir = _tokens(tmp_path, val_rows=100)
    kw = dict(steps=30, eval_every=2, early_stop_patience=2, keep="best", checkpoint_every=4, lr=1e-2, ema_decay=0.5)
    try:
        two = _fit(tmp_path, token_dir, workers=2, batch=16, name="two", **kw)
        again = _fit(tmp_path, token_dir, workers=2, batch=16, name="two", **kw)
    finally:
        ray.shutdown()
    for st in (two, again):
        assert st["step"] == 6 and st["stopped_early"] and (st["best_step"], st["evals_since_best"]) == (2, 2)
        assert [s for s, _ in st["val_curve"]] == [2, 4, 6]
        assert st["val_curve"][0][1] < st["val_curve"][1][1] < st["val_curve"][2][1]
        assert st["best_val_loss"] == st["val_curve"][0][1]
    assert again["val_curve"] == two["val_curve"] and len(again["curve"]) == len(two["curve"]) == 6
    assert all(torch.equal(again["best_weights"][k], v) for k, v in two["best_weights"].items())


def test_prior_stage_keeps_best_and_last(tmp_path):
    """The prior stage with keep=best: models/prior holds the lowest-val-loss weights,
    models/prior/last the final ones (both loadable by Generator.load), the val curve CSV and
    the summary metrics agree with them."""
    import csv
    import json

    import ray

    from arvision.config import Params, PriorConfig, RayConfig, TokenizerConfig
    from arvision.generator import Generator
    from arvision.priors import load_prior
    from arvision.tokenizers import build_tokenizer, save_tokenizer
    from arvision.tracking import NullTracker
    from arvision.train.loop import val_loss
    from stages.common import Paths
    from stages.prior import run

    meta = {"arvision.tokenizer.kind": "palette", "arvision.tokenizer.layout": json.dumps([[SIDE, SIDE]]),
            "arvision.tokenizer.vocab_size": str(VOCAB)}
    paths = Paths(tmp_path)
    token_dir = _tokens(tmp_path, val_rows=100, metadata=meta)
    (tmp_path / "data").mkdir()
    token_dir.rename(paths.tokens)
    paths.prepared.mkdir(parents=True)
    (paths.prepared / "manifest.json").write_text(json.dumps({"num_classes": CLASSES, "class_names": ["a", "b", "c"]}))
    save_tokenizer(build_tokenizer(TokenizerConfig(kind="palette", palette_size=VOCAB), channels=1, resolution=SIDE), paths.tokenizer)
    params = Params(
        prior=PriorConfig(size="tiny", steps=8, batch_size=32, lr=1e-2, warmup_steps=0, ema_decay=0.5, class_dropout=0.0,
                          log_every=2, checkpoint_every=4, eval_every=3, keep="best"),
        ray=RayConfig(num_workers=1, cpus_per_worker=1),
    )
    try:
        metrics = run(params, paths, NullTracker())
    finally:
        ray.shutdown()
    rows = list(csv.DictReader(open(paths.metrics / "prior_val_curve.csv")))
    assert list(rows[0]) == ["step", "val_loss"] and [int(r["step"]) for r in rows] == [3, 6, 8]
    losses = [float(r["val_loss"]) for r in rows]
    assert metrics["steps"] == 8 and metrics["stopped_early"] == 0 and "train_loss" not in metrics
    assert metrics["best_step"] == 3 and metrics["val_loss_best"] == pytest.approx(min(losses), abs=1e-6)
    assert metrics["val_loss_last"] == pytest.approx(losses[-1], abs=1e-6) and losses[-1] > losses[0]
    # the saved weights are the ones scored: re-score them on the val split (labels -1 → 0)
    val = pq.read_table(paths.tokens / "val")
    codes = val.column("codes").combine_chunks().flatten().to_numpy().reshape(val.num_rows, -1).astype(np.int64)
    batches = [(torch.from_numpy(codes), torch.from_numpy(np.maximum(val.column("label").to_numpy(), 0).astype(np.int64)))]
    cpu = torch.device("cpu")
    assert val_loss(load_prior(paths.prior), batches, cpu) == pytest.approx(metrics["val_loss_best"], rel=1e-5)
    assert val_loss(load_prior(paths.prior / "last"), batches, cpu) == pytest.approx(metrics["val_loss_last"], rel=1e-5)
    for d in (paths.prior, paths.prior / "last"):
        gen = Generator.load(paths.tokenizer, d)
        assert gen.class_names == ["a", "b", "c"] and gen.num_classes == CLASSES
