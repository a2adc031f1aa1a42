"""Bounded memory at real data sizes: the stages stream their splits, with the same results.

- ``tokens``: batch by batch into a ShardWriter, byte-identical to encoding the whole split and
  writing it with ``write_shards``; the Ray Data path writes the same files; peak memory does
  not grow with the number of images;
- the readers: exact batches across shards, a lazily decoded split that slices like the array,
  a seeded shuffle buffer (the whole-array draw when the split fits);
- the tokenizer trainer fed by a batch stream: deterministic for a seed, and on a split that
  fits the buffer the very run the whole array gives; its evaluation streams with the same numbers;
- the features stage on a split larger than its buffer; the evaluation's yardstick on lazily
  decoded splits scores as it does on arrays; the prior's token shard kept narrow.

Everything runs on synthetic prepared shards (16×16 blobs), not on ``stages.prepare``.
"""

from __future__ import annotations

import functools

import hashlib
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from arvision.config import FeaturesConfig, TokenizerConfig, parse_params
from arvision.data.feed import ImageSplit, LazyImages, shuffled_batches
from arvision.data.parquet_io import PREPARED_SCHEMA, iter_image_batches, load_images, write_shards
from arvision.tokenizers import build_tokenizer, save_tokenizer
from arvision.tracking import NullTracker
from arvision.train.common import encode_images, endless_indices
from arvision.train.tokenizer import codebook_stats_from_counts, evaluate_tokenizer, train_tokenizer
from stages.common import Paths
from isolation import run_here

RES, CLASSES = 16, 3
CPU = torch.device("cpu")


def blobs(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, RES, RES, 3): a smooth coloured blob on a light background per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:RES, 0:RES] / (RES - 1)
    out = np.empty((n, RES, RES, 3), np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.15, 0.35)
        mask = 1 / (1 + np.exp(((xx - cx) ** 2 + (yy - cy) ** 2 - r**2) * 80))
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(180, 255, 3)
        out[i] = (mask[..., None] * fg + (1 - mask[..., None]) * bg).round().astype(np.uint8)
    return out


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def prepared(root: Path, n_train: int, n_val: int, shard_size: int = 64, seed: int = 0) -> Paths:
    """A prepared data set as the ``prepare`` stage lays it out (sorted ids, PNG, labels)."""
    paths = Paths(root)
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        images = blobs(n, s)
        blobs_png = [_png(x) for x in images]
        ids = [hashlib.sha256(x.tobytes() + bytes([i % 256, i // 256])).hexdigest()[:32] for i, x in enumerate(images)]
        labels = (np.arange(n) % CLASSES).astype(np.int32)
        order = np.argsort(ids)
        table = pa.Table.from_arrays(
            [pa.array([ids[i] for i in order], pa.string()), pa.array([blobs_png[i] for i in order], pa.binary()),
             pa.array(labels[order], pa.int32())], schema=PREPARED_SCHEMA)
        write_shards(table, paths.prepared / split, shard_size)
    (paths.prepared / "manifest.json").write_text(json.dumps(
        {"resolution": RES, "channels": 3, "num_classes": CLASSES, "content_hash": "synthetic",
         "class_names": [str(c) for c in range(CLASSES)]}))
    return paths


def tiny_tokenizer_cfg(kind: str = "vq", **kw) -> TokenizerConfig:
    base = dict(kind=kind, width=8, channel_mult=[1, 2, 2], num_res_blocks=1, codebook_size=32, code_dim=4,
                scales=[1, 2, 4], steps=6, batch_size=16, lr=3e-3, warmup_steps=2, log_every=3, device="cpu")
    return TokenizerConfig(**{**base, **kw})


def with_tokenizer(paths: Paths, kind: str = "vq") -> None:
    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(tiny_tokenizer_cfg(kind), channels=3, resolution=RES), paths.tokenizer)


def tokens_params(batch_size: int = 50, shard_size: int = 96):
    return parse_params({"tokens": {"batch_size": batch_size, "shard_size": shard_size, "device": "cpu"}})


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.parquet"))}


# ---------------------------------------------------------------------------------- readers


def test_iter_image_batches_and_image_split_slice_like_the_array(tmp_path):
    paths = prepared(tmp_path, 300, 10, shard_size=64)
    ids, x, y = load_images(paths.prepared / "train")
    for bs in (1, 50, 64, 1000):
        got = list(iter_image_batches(paths.prepared / "train", bs))
        assert [len(g[0]) for g in got] == [len(x[i : i + bs]) for i in range(0, len(x), bs)]
        assert all(np.array_equal(g[1], x[i * bs : (i + 1) * bs]) for i, g in enumerate(got))
        assert sum((g[0] for g in got), []) == ids and np.array_equal(np.concatenate([g[2] for g in got]), y)
    assert sum(len(g[0]) for g in iter_image_batches(paths.prepared / "train", 50, limit=77)) == 77

    split = ImageSplit(paths.prepared / "train", block_rows=32, cache_bytes=5000)  # cache smaller than a block
    assert len(split) == len(x) and split.shape == x.shape and np.array_equal(split.labels, y)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = sorted(rng.integers(0, len(x) + 3, 2))
        assert np.array_equal(split[a:b], x[a:b])
        idx = rng.integers(-len(x), len(x), 17)
        assert np.array_equal(split[idx], x[idx])
    assert np.array_equal(split[7], x[7]) and np.array_equal(split[::9], x[::9])
    assert len(ImageSplit(paths.prepared / "train", limit=40)) == 40
    with pytest.raises(TypeError, match="streams"):
        np.asarray(split)


def test_shuffled_batches_fit_equals_whole_array_draw_and_stream_is_seeded(tmp_path):
    paths = prepared(tmp_path, 200, 4, shard_size=32)
    _, x, y = load_images(paths.prepared / "train")
    fits = shuffled_batches(paths.prepared / "train", 16, 3, buffer_rows=4096)
    for _, idx in zip(range(40), endless_indices(len(x), 16, 3)):
        assert np.array_equal(next(fits), x[idx.numpy()])

    def draw(seed):
        it = shuffled_batches(paths.prepared / "train", 16, seed, buffer_rows=48, labels=True)
        return [next(it) for _ in range(40)]

    a, b, c = draw(5), draw(5), draw(6)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))
    label_of = {img.tobytes(): lab for img, lab in zip(x, y)}
    drawn = np.concatenate([p[0] for p in a])
    assert all(label_of[img.tobytes()] == lab for img, lab in zip(drawn, np.concatenate([p[1] for p in a])))
    assert len({img.tobytes() for img in drawn}) > 0.9 * len(x)  # 640 draws of 200 images: most seen


# ---------------------------------------------------------------------------------- tokens


def _reference_tokens(paths: Paths, out: Path, batch_size: int, shard_size: int) -> None:
    """What the stage wrote before it streamed: the whole split decoded, encoded, one table,
    ``write_shards``."""
    from arvision.tokenizers import load_tokenizer
    from arvision.data.tokens import token_schema

    tok = load_tokenizer(paths.tokenizer, device=CPU)
    meta = {"arvision.tokenizer.kind": tok.kind, "arvision.tokenizer.layout": json.dumps([list(x) for x in tok.layout]),
            "arvision.tokenizer.vocab_size": str(tok.vocab_size), "arvision.tokenizer.model_uri": "",
            "arvision.tokenizer.dvc_hash": ""}
    schema = token_schema(tok.vocab_size, tok.seq_len, meta)
    for split in ("train", "val"):
        ids, images, labels = load_images(paths.prepared / split)
        if len(ids) == 0:
            images = np.zeros((0, RES, RES, 3), np.uint8)
        codes = encode_images(tok, images, batch_size=batch_size, device=CPU).numpy().astype(np.uint16)
        flat = pa.array(codes.reshape(-1), type=schema.field("codes").type.value_type)
        table = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(labels, pa.int32()),
                                      pa.FixedSizeListArray.from_arrays(flat, tok.seq_len)], schema=schema)
        write_shards(table, out / split, shard_size)


def test_tokens_stream_equals_whole_table_write_shards(tmp_path):
    from stages import tokens

    paths = prepared(tmp_path / "p", 333, 0, shard_size=64)  # batches of 50 across shards of 64; an empty val
    with_tokenizer(paths)
    m = tokens.run(tokens_params(50, 96), paths, NullTracker())
    assert (m["train_sequences"], m["val_sequences"]) == (333, 0)
    _reference_tokens(paths, tmp_path / "ref", 50, 96)
    got, want = files(paths.tokens), files(tmp_path / "ref")
    assert list(got) == list(want) and len(want) == 5  # 4 train shards (96, 96, 96, 45), 1 empty val shard
    assert got == want


def test_tokens_on_ray_writes_the_same_files(tmp_path, monkeypatch):
    import ray

    import arvision.data.tokens as encoding
    from stages import tokens

    paths = prepared(tmp_path / "p", 230, 70, shard_size=64)
    with_tokenizer(paths)
    params = tokens_params(32, 80)
    tokens.run(params, paths, NullTracker())
    local = files(paths.tokens)
    monkeypatch.setattr(encoding, "RAY_MIN_ROWS", 1)  # every split on Ray Data
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh instance, whatever else runs on this machine
    calls = []
    monkeypatch.setattr(tokens, "encode_split", lambda *a, **k: calls.append(a))  # the in-process path must not run
    try:
        tokens.run(params, paths, NullTracker())
        assert files(paths.tokens) == local
        # an actor call of several batches (as GPU actors take them) still encodes batch by batch
        monkeypatch.setattr(encoding, "tokens_dataset", functools.partial(encoding.tokens_dataset, calls_of=3))
        tokens.run(params, paths, NullTracker())
        assert files(paths.tokens) == local
    finally:
        ray.shutdown()
    assert not calls


def test_tokens_peak_memory_does_not_grow_with_the_images(tmp_path, request):
    if not run_here(request):  # tracemalloc in a fresh interpreter: see tests/isolation.py
        return
    from stages import tokens

    peaks = {}
    params = tokens_params(64, 128)
    for n in (1000, 1000, 4000):  # the first run warms up imports and caches
        paths = prepared(tmp_path / f"p{n}-{len(peaks)}", n, 64, shard_size=128)
        with_tokenizer(paths)
        tracemalloc.start()
        tokens.run(params, paths, NullTracker())
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[4000] / peaks[1000] < 1.5, peaks


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_from_a_stream_is_deterministic_and_equals_the_array_when_it_fits(tmp_path):
    paths = prepared(tmp_path, 120, 8, shard_size=32)
    split = paths.prepared / "train"

    def trained(source, seed=0):
        torch.manual_seed(0)
        tok = build_tokenizer(tiny_tokenizer_cfg(), channels=3, resolution=RES)
        train_tokenizer(tok, source, tok.cfg, seed=seed, device=CPU, progress=False)
        return tok.state_dict()

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    streamed = [trained(shuffled_batches(split, 16, s, buffer_rows=40), seed=s) for s in (0, 0, 1)]  # buffer < split
    assert same(streamed[0], streamed[1]) and not same(streamed[0], streamed[2])
    whole = trained(load_images(split)[1])
    assert same(trained(shuffled_batches(split, 16, 0, buffer_rows=4096)), whole)  # fits: the array's run
    with pytest.raises(ValueError, match="ran out"):
        trained(iter([load_images(split)[1][:16]]))


@pytest.mark.parametrize("kind", ["vq", "msvq"])
def test_evaluate_tokenizer_streams_with_the_same_numbers(tmp_path, kind):
    from arvision.metrics.codebook import codebook_stats

    paths = prepared(tmp_path, 150, 70, shard_size=32)
    torch.manual_seed(0)
    tok = build_tokenizer(tiny_tokenizer_cfg(kind), channels=3, resolution=RES).eval()
    _, train_x, _ = load_images(paths.prepared / "train")
    _, val_x, _ = load_images(paths.prepared / "val")
    want = evaluate_tokenizer(tok, val_x, batch_size=32, usage_images=train_x)
    lazy = evaluate_tokenizer(tok, ImageSplit(paths.prepared / "val"), batch_size=32,
                              usage_images=ImageSplit(paths.prepared / "train", cache_bytes=0))
    batches = evaluate_tokenizer(tok, (val_x[i : i + 32] for i in range(0, len(val_x), 32)), batch_size=32,
                                 usage_images=(b for _, b, _ in iter_image_batches(paths.prepared / "train", 32)))
    assert lazy == want and batches == want and want["usage_images_n"] == 150
    codes = encode_images(tok, train_x, batch_size=32, device=CPU)
    counts = torch.bincount(codes.reshape(-1), minlength=tok.vocab_size)
    assert codebook_stats_from_counts(counts, tok.vocab_size) == codebook_stats(codes, tok.vocab_size)


def test_tokenizer_stage_streams(tmp_path):
    from stages import tokenizer

    paths = prepared(tmp_path, 100, 20, shard_size=32)
    params = parse_params({"tokenizer": tiny_tokenizer_cfg().model_dump(mode="json")})
    m = tokenizer.run(params, paths, NullTracker())
    assert m["trainset_usage_images_n"] == 100 and m["val_usage_images_n"] == 20 and (paths.tokenizer / "recon.png").exists()


# ---------------------------------------------------------------------------------- features


def test_features_stage_streams_a_split_larger_than_its_buffer(tmp_path, monkeypatch):
    from stages import features

    paths = prepared(tmp_path, 200, 30, shard_size=32)
    monkeypatch.setattr(features, "shuffle_buffer_rows", lambda batch, image_bytes: 64)
    monkeypatch.setattr(features, "load_images", lambda *a, **k: pytest.fail("the train split was loaded whole"))
    params = parse_params({"features": {"width": 8, "dim": 16, "steps": 12, "batch_size": 16, "device": "cpu"}})
    runs = []
    for _ in range(2):
        features.run(params, paths, NullTracker())
        runs.append(torch.load(paths.features / "weights.pt", weights_only=True))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# ---------------------------------------------------------------------------------- evaluate


def test_yardstick_on_lazy_splits_scores_as_on_arrays(tmp_path, monkeypatch):
    import arvision.metrics.samples as samples
    from arvision.features import FeatureNet, save_features
    from arvision.judge import Yardstick

    monkeypatch.setattr(samples, "CHUNK", 37)  # several blocks on both sides of every search
    monkeypatch.setattr(LazyImages, "CACHE_BYTES", 0)  # nothing kept: every walk decodes again
    paths = prepared(tmp_path, 150, 60, shard_size=32)
    torch.manual_seed(0)
    net = FeatureNet(FeaturesConfig(width=8, dim=16), channels=3, num_classes=CLASSES).eval()
    save_features(net, tmp_path / "features", {})
    torch.manual_seed(1)
    tok = build_tokenizer(tiny_tokenizer_cfg(), channels=3, resolution=RES).eval()

    lazy = Yardstick.load(paths.prepared, tmp_path / "features", device="cpu", batch_size=32)
    _, val_x, val_y = load_images(paths.prepared / "val")
    _, train_x, train_y = load_images(paths.prepared / "train")
    eager = Yardstick(net=lazy.net, device=CPU, val_u8=val_x, val_labels=val_y, train_u8=train_x,
                      train_labels=train_y, batch_size=32)
    assert isinstance(lazy.train_u8, ImageSplit)
    np.testing.assert_array_equal(lazy.train_feats, eager.train_feats)
    np.testing.assert_array_equal(lazy.val_feats, eager.val_feats)
    ref = samples.copy_reference(eager.train_feats, train_x, eager.val_feats, val_x)
    assert (lazy.memo.threshold, lazy.memo.threshold_pixels) == (ref.threshold, ref.threshold_pixels)

    fake = np.concatenate([train_x[:5], blobs(20, seed=9)])  # five copies among new images
    labels = np.arange(len(fake)) % CLASSES
    rec_lazy, rec_eager = lazy.reconstruction_reference(tok), eager.reconstruction_reference(tok)
    # past the cache, the training set's reconstructions are made once and kept as PNG shards
    assert isinstance(rec_lazy.train_u8, ImageSplit) and isinstance(rec_eager.train_u8, ImageSplit)
    np.testing.assert_array_equal(rec_lazy.train_u8[:], rec_eager.train_u8[:])
    folder = rec_lazy.train_u8.split_dir
    assert folder.exists()
    assert (rec_lazy.threshold, rec_lazy.threshold_pixels) == (rec_eager.threshold, rec_eager.threshold_pixels)
    m_lazy, d_lazy = lazy.score(fake, labels, rec_lazy)
    m_eager, d_eager = eager.score(fake, labels, rec_eager)
    assert m_lazy == m_eager and m_lazy["copy_rate"] >= 0.2
    for k in d_eager:
        np.testing.assert_array_equal(d_lazy[k], d_eager[k])
    assert lazy.floor(40, 0) == eager.floor(40, 0)
    np.testing.assert_array_equal(lazy.train_u8[d_lazy["nearest_train"]], train_x[d_eager["nearest_train"]])
    del rec_lazy
    import gc

    gc.collect()
    assert not folder.exists()  # the temporary shards go with the reference


# ---------------------------------------------------------------------------------- prior feed


class _FakeShard:
    """What ``ray.train.get_dataset_shard`` gives, for ``_read_shard``: numpy batches."""

    def __init__(self, codes: np.ndarray, labels: np.ndarray):
        self.codes, self.labels = codes, labels

    def iter_batches(self, batch_size: int, batch_format: str):
        for i in range(0, len(self.codes), batch_size):
            yield {"codes": self.codes[i : i + batch_size], "label": self.labels[i : i + batch_size]}


def test_prior_feed_keeps_codes_narrow_and_batches_as_before(tmp_path):
    from arvision.train.loop import _batches, _read_shard, _val_batches

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 60000, (5000, 16)).astype(np.uint16)
    labels = rng.integers(-1, 3, 5000).astype(np.int32)
    held, held_labels, held_views = _read_shard(_FakeShard(codes, labels))  # no view column: all view 0
    assert held.dtype == np.uint16 and held_labels.dtype == np.int32 and held.nbytes == codes.nbytes and not held_views.any()
    want_c, want_l = torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(np.maximum(labels, 0).astype(np.int64))
    got = _batches(_FakeShard(codes, labels), 64, seed=3, skip=2)
    for idx in list(zip(range(100), endless_indices(5000, 64, 3, skip=2))):
        c, lab = next(got)
        assert c.dtype == lab.dtype == torch.int64
        assert torch.equal(c, want_c[idx[1]]) and torch.equal(lab, want_l[idx[1]])

    table = pa.Table.from_arrays(
        [pa.array(labels[:300]), pa.FixedSizeListArray.from_arrays(pa.array(codes[:300].reshape(-1)), 16)],
        names=["label", "codes"])
    write_shards(table, tmp_path / "val", 128)
    val = _val_batches(str(tmp_path / "val"), 64)
    for _ in range(2):  # iterable again for every evaluation
        batches = list(val)
        assert len(val) == len(batches) == 5
        assert torch.equal(torch.cat([b[0] for b in batches]), want_c[:300])
        assert torch.equal(torch.cat([b[1] for b in batches]), want_l[:300])


def test_nearest_walks_the_reference_once_per_query_span_with_the_same_numbers(monkeypatch):
    import arvision.metrics.samples as samples

    monkeypatch.setattr(samples, "CHUNK", 16)
    query, ref = blobs(70, seed=1), np.concatenate([blobs(50, seed=2), blobs(3, seed=1)])
    monkeypatch.setattr(samples, "QUERY_BYTES", 1)  # a walk of the reference for every query block
    want = samples._nearest(query, ref, samples._pixels)
    assert want[1][:3].tolist() == [50, 51, 52] and float(want[0][:3].max()) == 0.0  # the three copies found
    for budget in (16 * RES * RES * 3 * 4 * 2, 1 << 30):  # two, then all query blocks a walk
        monkeypatch.setattr(samples, "QUERY_BYTES", budget)
        d, i = samples._nearest(query, ref, samples._pixels)
        assert torch.equal(d, want[0]) and torch.equal(i, want[1])


def test_prefetched_keeps_order_raises_the_producers_error_and_stops_when_closed():
    import threading
    import time

    from arvision.data.feed import prefetched

    assert list(prefetched(iter(range(10)))) == list(range(10))

    def failing():
        yield 1
        raise ValueError("a bad shard")

    g = prefetched(failing())
    assert next(g) == 1
    with pytest.raises(ValueError, match="a bad shard"):
        next(g)

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    g = prefetched(endless())
    assert [next(g) for _ in range(5)] == list(range(5))
    g.close()
    deadline = time.monotonic() + 5
    while any(t.name == "arvision-prefetch" and t.is_alive() for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "arvision-prefetch" and t.is_alive() for t in threading.enumerate())


# ---------------------------------------------------------------------------------- augmented views


def _views_params(batch_size: int = 16, shard_size: int = 50):
    return parse_params({"tokens": {"batch_size": batch_size, "shard_size": shard_size, "device": "cpu",
                                    "hflip": True, "crops": 1, "crop_scale": [0.5, 0.9]}})


def test_tokens_views_rows_codes_and_bytes(tmp_path):
    """hflip + 1 crop: the train split holds 3 rows per image, in order, the mirror's codes are the
    tokenizer's codes of the mirrored image and the crop's those of its crop; val holds view 0 only;
    a second run writes the same bytes."""
    import pyarrow.parquet as pq

    from arvision.data.parquet_io import read_split
    from arvision.data.views import ViewSpec, view_images
    from arvision.tokenizers import load_tokenizer
    from stages import tokens

    paths = prepared(tmp_path / "p", 37, 9, shard_size=16)  # batches of 16 across shards of 16 → 3 per image → shards of 50
    with_tokenizer(paths)
    params = _views_params()
    m = tokens.run(params, paths, NullTracker())
    assert (m["train_sequences"], m["val_sequences"], m["views"]) == (3 * 37, 9, 3)
    first = files(paths.tokens)
    assert [k for k in first if k.startswith("train")] == ["train/part-00000.parquet", "train/part-00001.parquet",
                                                           "train/part-00002.parquet"]
    tokens.run(params, paths, NullTracker())
    assert files(paths.tokens) == first  # byte-identical

    train, val = read_split(paths.tokens / "train"), read_split(paths.tokens / "val")
    md = pq.read_schema(paths.tokens / "train" / "part-00000.parquet").metadata
    assert json.loads(md[b"arvision.tokens.views"]) == {"names": ["image", "hflip", "crop1"], "crop_scale": [0.5, 0.9]}
    ids, images, labels = load_images(paths.prepared / "train")
    assert train.column("id").to_pylist() == [i for i in ids for _ in range(3)]
    assert train.column("view").to_pylist() == [0, 1, 2] * 37
    assert train.column("label").to_pylist() == np.repeat(labels, 3).tolist()
    assert val.column("view").to_pylist() == [0] * 9 and val.column("id").to_pylist() == load_images(paths.prepared / "val")[0]

    tok = load_tokenizer(paths.tokenizer, device=CPU)
    codes = train.column("codes").combine_chunks().flatten().to_numpy().reshape(train.num_rows, -1)
    spec = ViewSpec.of(params.tokens)
    for view in range(3):
        want = encode_images(tok, view_images(ids, images, view, spec), batch_size=16, device=CPU).numpy()
        np.testing.assert_array_equal(codes[view::3], want)
    np.testing.assert_array_equal(view_images(ids, images, 1, spec), images[:, :, ::-1])
    assert not np.array_equal(view_images(ids, images, 2, spec), images)  # a crop, not the image


def test_encode_actor_with_views_gives_the_in_process_rows(tmp_path):
    """An actor call of several batches (as GPU actors take them) encodes batch by batch with the
    views, as the in-process path does (the Ray path's files then equal the in-process ones)."""
    from arvision.data.views import ViewSpec
    from arvision.tokenizers import load_tokenizer
    from arvision.data.tokens import EncodeActor, encode_views

    paths = prepared(tmp_path / "p", 40, 0)
    with_tokenizer(paths)
    ids, images, labels = load_images(paths.prepared / "train")
    spec = ViewSpec(hflip=True, crops=2)
    got = EncodeActor(str(paths.tokenizer), "cpu", 16, views=spec)(
        {"id": np.asarray(ids, object), "pixels": images, "label": labels})
    tok = load_tokenizer(paths.tokenizer, device=CPU)
    parts = [encode_views(tok, ids[a : a + 16], images[a : a + 16], labels[a : a + 16], spec, batch_size=16, device=CPU)
             for a in range(0, 40, 16)]  # what encode_split writes, batch by batch
    assert list(got["id"]) == sum((p[0] for p in parts), [])
    np.testing.assert_array_equal(got["view"], np.concatenate([p[2] for p in parts]))
    np.testing.assert_array_equal(got["codes"], np.concatenate([p[3] for p in parts]).astype(np.uint16))


class _ViewShard(_FakeShard):
    def __init__(self, codes: np.ndarray, labels: np.ndarray, view: np.ndarray):
        super().__init__(codes, labels)
        self.view = view

    def iter_batches(self, batch_size: int, batch_format: str):
        for i, b in zip(range(0, len(self.codes), batch_size), super().iter_batches(batch_size, batch_format)):
            yield {**b, "view": self.view[i : i + batch_size]}


def test_prior_feed_draws_one_view_per_image_per_epoch_seeded_and_resumable(tmp_path):
    from arvision.data.views import image_rows
    from arvision.train.loop import _batches, _val_batches

    n, v, bs = 50, 3, 8  # 6 batches an epoch (the last 2 images wait for the next epoch's order)
    image_N, view_N = np.repeat(np.arange(n), v), np.tile(np.arange(v), n)
    codes = np.stack([image_N, view_N], 1).astype(np.uint16)  # each row says which (image, view) it is
    labels = (image_N % 3).astype(np.int32)

    def draws(seed: int, skip: int = 0, batches: int = 18) -> list[np.ndarray]:
        it = _batches(_ViewShard(codes, labels, view_N.astype(np.int32)), bs, seed=seed, skip=skip)
        return [next(it)[0].numpy() for _ in range(batches)]

    run = draws(3)
    epochs = [np.concatenate(run[e * 6 : (e + 1) * 6]) for e in range(3)]
    for e, rows in enumerate(epochs):
        images = rows[:, 0]
        assert len(set(images)) == len(images) == 48  # one pass over the images: each at most once
        order = next(x for k, x in enumerate(endless_indices(n, bs, 3)) if k == 6 * e)  # the images drawn as rows were
        assert images[:bs].tolist() == order.tolist()
    picked = [dict(zip(r[:, 0], r[:, 1])) for r in epochs]
    common = set(picked[0]) & set(picked[1])
    assert any(picked[0][i] != picked[1][i] for i in common)  # other views in another epoch
    assert {x for p in picked for x in p.values()} == {0, 1, 2}
    assert all(np.array_equal(a, b) for a, b in zip(draws(3), run))  # seeded
    assert not all(np.array_equal(a, b) for a, b in zip(draws(4), run))
    assert all(np.array_equal(a, b) for a, b in zip(draws(3, skip=7, batches=11), run[7:]))  # a resume goes on exactly

    # a worker's share that begins inside an image's views: that part is an image of its own
    starts, counts = image_rows(np.array([1, 2, 0, 1, 2, 0, 0, 1]))
    assert starts.tolist() == [0, 2, 5, 6] and counts.tolist() == [2, 3, 1, 2]

    # the val loss scores view 0 only
    table = pa.Table.from_arrays([pa.array(labels), pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), 2),
                                  pa.array(view_N.astype(np.int32))], names=["label", "codes", "view"])
    write_shards(table, tmp_path / "val", 64)
    got = torch.cat([b[0] for b in _val_batches(str(tmp_path / "val"), 16)])
    assert got[:, 1].eq(0).all() and got[:, 0].tolist() == list(range(n))


def test_tokenizer_hflip_is_seeded_and_resumes_exactly():
    from arvision.train.tokenizer import random_hflips

    x = torch.from_numpy(blobs(32))
    flipped = [b for b in random_hflips(iter([x] * 4), seed=0)]
    same = [(b == x).flatten(1).all(1) for b in flipped]
    mirror = [(b == x.flip(2)).flatten(1).all(1) for b in flipped]
    assert all((s | m).all() for s, m in zip(same, mirror))  # each image as it was or mirrored
    assert 0 < sum(int(m.sum()) for m in mirror) < 4 * 32
    assert all(torch.equal(a, b) for a, b in zip(random_hflips(iter([x] * 4), seed=0), flipped))
    assert all(torch.equal(a, b) for a, b in zip(random_hflips(iter([x] * 2), seed=0, start=2), flipped[2:]))

    cfg = tiny_tokenizer_cfg(hflip=True, steps=4, checkpoint_every=2)
    images = blobs(40)

    def trained(state=None):
        torch.manual_seed(0)
        tok = build_tokenizer(cfg, channels=3, resolution=RES)
        ckpts = {}
        train_tokenizer(tok, images, cfg, seed=0, device=CPU, progress=False, state=state,
                        on_checkpoint=lambda s, st: ckpts.__setitem__(s, st))
        return tok, ckpts

    whole, ckpts = trained()
    resumed, _ = trained(state=ckpts[2])
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    torch.manual_seed(0)
    plain = build_tokenizer(tiny_tokenizer_cfg(steps=4), channels=3, resolution=RES)
    train_tokenizer(plain, images, tiny_tokenizer_cfg(steps=4), seed=0, device=CPU, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), plain.state_dict().values()))
