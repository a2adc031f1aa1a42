"""The tokenizer on several Ray Train workers (``tokenizer.num_workers``): DDP on CPU (gloo).

- two workers end with the same weights and the same codebook on every rank (a hash of each
  rank's whole state dict), and training changed them;
- one worker, through the tokenizer stage, saves exactly the tokenizer the in-process stage
  saves (same weights, curve and val metrics): the DDP wrapper and the all-reduce change
  nothing for one replica;
- each worker's part of the train split is its own, deterministic, and ``(0, 1)`` is the
  whole split's stream;
- a global batch that does not split over the workers is refused when params are read.

One Ray instance serves the whole module (its start-up is most of the time).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from arvision.cluster import TrainRun
from arvision.config import ParamsError, RayConfig, TokenizerConfig, parse_params
from arvision.data.feed import shuffled_batches
from arvision.data.parquet_io import PREPARED_SCHEMA, load_images, write_shards
from arvision.tokenizers import build_tokenizer, load_tokenizer
from arvision.tracking import NullTracker
from stages.common import Paths

ROOT = Path(__file__).resolve().parents[1]
RES = 16


def _images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, RES, RES, 3): a coloured disc on a light background per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:RES, 0:RES] / (RES - 1)
    out = np.empty((n, RES, RES, 3), np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.25, 0.75, 2).tolist() + [rng.uniform(0.15, 0.35)]
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2) < r**2)[..., None]
        out[i] = np.where(mask, rng.uniform(0, 255, 3), rng.uniform(180, 255, 3)).astype(np.uint8)
    return out


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _prepared(root: Path, n_train: int = 96, n_val: int = 8, shard_size: int = 32) -> Paths:
    """A prepared data set as the ``prepare`` stage lays it out (sorted ids, PNG, labels)."""
    paths = Paths(root)
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        images = _images(n, seed)
        ids = [hashlib.sha256(x.tobytes() + i.to_bytes(4, "big")).hexdigest()[:32] for i, x in enumerate(images)]
        order = np.argsort(ids)
        table = pa.Table.from_arrays(
            [pa.array([ids[i] for i in order], pa.string()), pa.array([_png(images[i]) for i in order], pa.binary()),
             pa.array(np.zeros(n, np.int32))], schema=PREPARED_SCHEMA)
        write_shards(table, paths.prepared / split, shard_size)
    (paths.prepared / "manifest.json").write_text(json.dumps(
        {"resolution": RES, "channels": 3, "num_classes": 0, "content_hash": "synthetic", "class_names": []}))
    return paths


def _cfg(**kw) -> TokenizerConfig:
    """A tiny vq with EMA, k-means init and dead-code restarts (a fast EMA and a high threshold:
    codes restart within a few steps)."""
    base = dict(kind="vq", width=8, channel_mult=[1, 2, 2], num_res_blocks=0, codebook_size=32, code_dim=4,
                ema=True, ema_decay=0.5, kmeans_init=True, dead_code_restart=True, dead_code_threshold=2.0,
                steps=6, batch_size=16, lr=3e-3, warmup_steps=1, log_every=1, device="cpu")
    return TokenizerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module, sized for two one-CPU workers (Ray Train's
    controller checks its workers every 0.2 s here: tests/conftest.py)."""
    import ray

    from arvision.cluster import init_ray

    init_ray(RayConfig(num_workers=2, cpus_per_worker=1), ROOT)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Ray workers run with ``ray.cpus_per_worker`` (1) torch threads: the in-process reference too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: the VQGAN recipe on (a discriminator from step 2, feature matching): its gradients are
#: averaged over the replicas by train_tokenizer's reduce, not by DDP
ADV = dict(adv_weight=0.5, disc_start=2, disc_layers=2, disc_width=8, perceptual="disc_features")


@pytest.mark.parametrize("recipe", [{}, ADV], ids=["plain", "adversarial"])
def test_two_workers_keep_identical_replicas(tmp_path, ray_session, recipe):
    from arvision.train.tokenizer import fit_tokenizer, state_hash

    paths = _prepared(tmp_path)
    cfg = _cfg(num_workers=2, **recipe)
    state = fit_tokenizer(
        tokenizer_cfg=cfg, ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1), seed=0, split_dir=paths.prepared / "train",
        channels=3, resolution=RES, run=TrainRun(tmp_path / "ray", "two", root=ROOT),
    )
    hashes = state["replica_hashes"]
    assert state["world"] == 2 and len(hashes) == 2
    assert hashes[0] == hashes[1] == state_hash(state["model"])  # rank 1's weights and buffers are rank 0's
    torch.manual_seed(0)
    init = build_tokenizer(cfg, channels=3, resolution=RES).state_dict()
    assert init.keys() == state["model"].keys()
    params = {name for name, _ in build_tokenizer(cfg, channels=3, resolution=RES).named_parameters()}
    unchanged = [k for k in params if torch.equal(init[k], state["model"][k])]
    assert params and not unchanged, unchanged  # training moved every weight
    for k in ("quantizer.embed", "quantizer.cluster_size", "quantizer.embed_sum", "quantizer.initted"):
        assert not torch.equal(init[k], state["model"][k]), k  # and the codebook state
    assert bool(state["model"]["quantizer.initted"])
    # every step logged (means over the two replicas); the restarts (averaged draws) did happen
    assert [r["step"] for r in state["curve"]] == list(range(1, 7))
    assert sum(r["restarted"] for r in state["curve"]) > 0
    assert all(np.isfinite(r["loss"]) for r in state["curve"])
    if recipe:  # the discriminator trained from disc_start on, and its loss reached the decoder
        assert all(r["d_loss"] == 0 for r in state["curve"][:2]) and all(r["d_loss"] > 0 for r in state["curve"][2:])
        assert all(r["adv_lambda"] > 0 and r["perceptual_loss"] > 0 for r in state["curve"][2:])


def _curve(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_worker_stage_equals_in_process_stage(tmp_path, ray_session, one_thread):
    """The stage with ``tokenizer.num_workers: 1`` (Ray Train, DDP over one gloo rank, the
    quantiser's update through an all-reduce) saves bit for bit what the in-process stage saves:
    the same weights and buffers, the same training curve and the same val metrics."""
    from stages.tokenizer import run

    results = {}
    for workers in (0, 1):
        root = tmp_path / f"w{workers}"
        _prepared(root)
        params = parse_params({"seed": 0, "tokenizer": _cfg(num_workers=workers).model_dump(mode="json"),
                               "ray": {"num_workers": 1, "cpus_per_worker": 1}})
        out = run(params, Paths(root), NullTracker())
        results[workers] = (out, load_tokenizer(root / "models" / "tokenizer").state_dict(), _curve(root / "metrics" / "tokenizer_curve.csv"))
        assert not list((root / ".arvision").glob("ray/tokenizer-*"))  # Ray's run folder is removed
    (m0, s0, c0), (m1, s1, c1) = results[0], results[1]
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0), [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert c0 == c1 and len(c0) == 6
    assert {k: v for k, v in m0.items() if k != "train_seconds"} == {k: v for k, v in m1.items() if k != "train_seconds"}


@pytest.mark.parametrize("buffer", [4096, 10])  # each part fits the buffer / streams through it
def test_parts_of_the_split_are_disjoint_seeded_and_whole_for_one(tmp_path, buffer):
    paths = _prepared(tmp_path, n_train=50, shard_size=8)
    split = paths.prepared / "train"
    _, images, _ = load_images(split)
    row = {x.tobytes(): i for i, x in enumerate(images)}  # the images are distinct

    def draw(part, n_batches=12, seed=0):
        it = shuffled_batches(split, 5, seed, buffer, part=part)
        return [next(it) for _ in range(n_batches)]

    whole = shuffled_batches(split, 5, 0, buffer)
    assert all(np.array_equal(a, next(whole)) for a in draw((0, 1)))  # (0, 1): the stream without part
    seen = []
    for rank in range(3):
        batches = draw((rank, 3))
        assert all(np.array_equal(a, b) for a, b in zip(batches, draw((rank, 3))))  # deterministic
        rows = {row[x.tobytes()] for b in batches for x in b}
        assert rows and all(r % 3 == rank for r in rows)  # this rank's rows only
        seen.append(rows)
    assert set().union(*seen) == set(range(50))  # together: the whole split (12 batches of 5 cover each part of <= 17)
    with pytest.raises(ValueError, match="rank"):
        draw((3, 3))


def test_batch_not_divisible_by_workers_is_refused():
    with pytest.raises(ParamsError) as err:
        parse_params({"tokenizer": {"batch_size": 30, "num_workers": 4}})
    msg = str(err.value)
    assert "tokenizer.batch_size / tokenizer.num_workers" in msg and "30" in msg and "4 workers" in msg
    assert "28 or 32" in msg  # the nearest multiples
    with pytest.raises(ParamsError, match="tokenizer.num_workers"):
        parse_params({"tokenizer": {"num_workers": -1}})
    assert parse_params({"tokenizer": {"batch_size": 32, "num_workers": 4}}).tokenizer.num_workers == 4
    # a palette is fitted in-process (no batches split): num_workers does not constrain its batch
    assert parse_params({"tokenizer": {"kind": "palette", "batch_size": 30, "num_workers": 4}}).tokenizer.kind == "palette"
    assert parse_params({}).tokenizer.num_workers == 0  # default: in-process, as before


def test_palette_is_fitted_in_process_whatever_num_workers(tmp_path, caplog):
    """A palette is fitted (k-means), not trained: with ``num_workers: 2`` the stage fits it in
    its own process, says so, and saves what ``num_workers: 0`` saves."""
    import logging

    from stages.tokenizer import run

    saved = {}
    for workers in (0, 2):
        root = tmp_path / f"w{workers}"
        _prepared(root, n_train=64)
        params = parse_params({"seed": 0, "tokenizer": {"kind": "palette", "palette_size": 8, "device": "cpu", "num_workers": workers}})
        with caplog.at_level(logging.INFO, logger="arvision"):
            run(params, Paths(root), NullTracker())
        saved[workers] = load_tokenizer(root / "models" / "tokenizer").state_dict()
        assert not (root / ".arvision" / "ray").exists()  # no Ray run
    assert "palette is fitted by k-means" in caplog.text and "tokenizer.num_workers 2 does not apply" in caplog.text
    assert "palette" in saved[0] and saved[0].keys() == saved[2].keys() and all(torch.equal(saved[0][k], saved[2][k]) for k in saved[0])


# --------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("buffer", [4096, 10])  # the part fits the buffer / streams through it
def test_skip_drops_the_first_batches_and_keeps_the_rest(tmp_path, buffer):
    split = _prepared(tmp_path, n_train=50, shard_size=8).prepared / "train"
    for part in ((0, 1), (1, 2)):
        whole = shuffled_batches(split, 5, 0, buffer, labels=True, part=part)
        expected = [next(whole) for _ in range(20)]
        skipped = shuffled_batches(split, 5, 0, buffer, labels=True, part=part, skip=7)
        for want, (x, y) in zip(expected[7:], (next(skipped) for _ in range(13))):
            assert np.array_equal(want[0], x) and np.array_equal(want[1], y)


@pytest.mark.parametrize("buffer, recipe", [(4096, {}), (10, {}), (10, {**ADV, "disc_start": 3})],
                         ids=["in-memory", "streamed", "streamed-adversarial"])
def test_interrupted_stage_resumes_to_the_same_tokenizer(tmp_path, monkeypatch, buffer, recipe):
    """The stage stopped right after its checkpoint at step 4 of 8 (a KeyboardInterrupt, as
    Ctrl-C) leaves that checkpoint and no tokenizer; run again with the same params, it goes on
    from step 4 and saves bit for bit what a run never stopped saves: weights, codebook, curve
    and val metrics. The checkpoint's folder is gone afterwards. With the VQGAN recipe on, the
    checkpoint carries the discriminator and its optimizer too."""
    import arvision.train.tokenizer as training
    import stages.tokenizer as stage

    monkeypatch.setattr(training, "shuffle_buffer_rows", lambda *a, **k: buffer)
    cfg = _cfg(steps=8, checkpoint_every=2, log_every=3, **recipe)  # a checkpoint between two log lines
    params = parse_params({"seed": 0, "tokenizer": cfg.model_dump(mode="json")})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for root in (whole, cut):
        _prepared(root, n_train=48)
    ref = stage.run(params, Paths(whole), NullTracker())

    train = training.train_tokenizer

    def stopped_at_4(*args, on_checkpoint=None, **kw):
        def save_then_stop(step, st):
            on_checkpoint(step, st)
            if step == 4:
                raise KeyboardInterrupt
        return train(*args, on_checkpoint=save_then_stop, **kw)

    monkeypatch.setattr(training, "train_tokenizer", stopped_at_4)
    with pytest.raises(KeyboardInterrupt):
        stage.run(params, Paths(cut), NullTracker())
    ckpts = list((cut / ".arvision" / "ray").glob("tokenizer-*/checkpoint.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=False)["step"] == 4
    assert ("disc" in torch.load(ckpts[0], weights_only=False)) == bool(recipe)
    assert not (cut / "models" / "tokenizer").exists()
    monkeypatch.setattr(training, "train_tokenizer", train)
    again = stage.run(params, Paths(cut), NullTracker())
    s0, s1 = (load_tokenizer(r / "models" / "tokenizer").state_dict() for r in (whole, cut))
    assert all(torch.equal(s0[k], s1[k]) for k in s0), [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert _curve(whole / "metrics" / "tokenizer_curve.csv") == _curve(cut / "metrics" / "tokenizer_curve.csv")
    assert [int(r["step"]) for r in _curve(cut / "metrics" / "tokenizer_curve.csv")] == [3, 6, 8]
    assert {k: v for k, v in ref.items() if k != "train_seconds"} == {k: v for k, v in again.items() if k != "train_seconds"}
    assert not list((cut / ".arvision" / "ray").glob("tokenizer-*"))


@pytest.mark.parametrize("damage", ["another model", "not a checkpoint"])
def test_a_checkpoint_the_tokenizer_cannot_load_is_dropped(tmp_path, caplog, damage):
    """A checkpoint of another model (e.g. left by another version of the code under the same
    run name), or a file that is no checkpoint at all, is not fatal: the stage says so and
    trains from the start."""
    import logging

    import stages.tokenizer as stage

    root = tmp_path / "p"
    _prepared(root)
    params = parse_params({"seed": 0, "tokenizer": _cfg(steps=2).model_dump(mode="json")})
    run = stage._train_run(params, Paths(root), NullTracker(), {"content_hash": "synthetic"})
    (run.storage / run.name).mkdir(parents=True)
    if damage == "another model":
        torch.save({"model": {"not": torch.zeros(1)}, "step": 1}, run.storage / run.name / stage.CHECKPOINT)
    else:
        (run.storage / run.name / stage.CHECKPOINT).write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING, logger="arvision"):
        stage.run(params, Paths(root), NullTracker())
    assert "dropping the checkpoint" in caplog.text and "training from the start" in caplog.text
    assert (root / "models" / "tokenizer" / "config.json").exists()


def test_a_lost_worker_restarts_the_group_from_the_last_checkpoint(tmp_path, ray_session):
    """A worker killed (SIGKILL) after the first checkpoints: Ray Train restarts the group
    (``ray.max_failures: 1``) from the last checkpoint, each rank's stream skips what it had
    consumed, and the result is bit for bit the run no worker was lost in. The same run name
    again (the stage re-run before it could save, say) restores the finished run's result:
    the same state, curve and stats, its training time included (nothing trained again)."""
    import signal
    import threading
    import time

    import psutil

    from arvision.train.tokenizer import fit_tokenizer

    paths = _prepared(tmp_path)
    cfg = _cfg(num_workers=2, steps=200, checkpoint_every=20, log_every=20)
    kw = dict(tokenizer_cfg=cfg, seed=0, split_dir=paths.prepared / "train", channels=3, resolution=RES)
    whole = fit_tokenizer(**kw, ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1), run=TrainRun(tmp_path / "ray", "whole", root=ROOT))
    killed: list[int] = []

    def kill_a_worker_after_a_checkpoint() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((tmp_path / "ray" / "lost").glob("checkpoint_*"))) < 1:
            time.sleep(0.05)
        time.sleep(1.0)  # a few of the controller's health checks: it has taken up a checkpoint
        workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        if workers:
            workers[-1].send_signal(signal.SIGKILL)
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint)
    killer.start()
    lost = fit_tokenizer(**kw, ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1, max_failures=1),
                         run=TrainRun(tmp_path / "ray", "lost", root=ROOT))
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert whole["resumed_from"] == 0 and lost["resumed_from"] > 0  # the new group went on from a checkpoint
    assert all(torch.equal(whole["model"][k], lost["model"][k]) for k in whole["model"])

    def numbers(curve):  # the learning curve without its wall-clock columns (throughput, time)
        return [{k: v for k, v in r.items() if not k.endswith(("_per_s", "_time_s"))} for r in curve]

    assert numbers(lost["curve"]) == numbers(whole["curve"]) and [r["step"] for r in lost["curve"]] == list(range(20, 201, 20))
    again = fit_tokenizer(**kw, ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1), run=TrainRun(tmp_path / "ray", "lost", root=ROOT))
    assert all(torch.equal(again["model"][k], lost["model"][k]) for k in lost["model"])
    assert again["curve"] == lost["curve"]  # a finished run reports its result again (resumed_from: that run's own)
    assert numbers([again["stats"]]) == numbers([lost["stats"]])  # the same result, re-reported (its timing re-measured)
