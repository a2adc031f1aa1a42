"""The feature net that judges samples: modes, determinism, save/load, and the ``features`` stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arvision.config import DataConfig, FeaturesConfig, Params
from arvision.data.prepare import prepare_dataset
from arvision.errors import UserError
from arvision.images import images_to_tensor
from arvision.features import (
    FeatureNet,
    augment,
    classify,
    embed,
    load_features,
    resolve_mode,
    save_features,
    train_features,
)
from arvision.tracking import NullTracker
from stages.common import Paths

EMOJI = Path(__file__).resolve().parents[1] / "arvision" / "data" / "emoji" / "emoji.parquet"
TINY = FeaturesConfig(width=8, dim=16, steps=12, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    """A project root holding 200 emoji at 16×16, prepared as the pipeline does (labelled)."""
    root = tmp_path_factory.mktemp("labelled")
    prepare_dataset(DataConfig(resolution=16, max_images=200), 0, Paths(root).prepared, progress=False)
    return root


@pytest.fixture(scope="module")
def images(prepared_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from arvision.data.parquet_io import load_images

    _, x, y = load_images(Paths(prepared_root).prepared / "train")
    return x, y.astype(np.int64)


def test_resolve_mode():
    assert resolve_mode("auto", np.array([0, 1, 1])) == "hybrid"
    assert resolve_mode("auto", np.array([-1, -1])) == "contrastive"
    assert resolve_mode("auto", np.array([2, 2, 2])) == "contrastive"  # one class: nothing to tell apart
    assert resolve_mode("contrastive", np.array([0, 1])) == "contrastive"
    assert resolve_mode("classifier", np.array([0, 1])) == "classifier"
    with pytest.raises(UserError, match="needs labelled data"):
        resolve_mode("classifier", np.array([-1, -1]))
    assert resolve_mode("hybrid", np.array([0, 1])) == "hybrid"
    with pytest.raises(UserError, match="'hybrid' needs labelled data"):
        resolve_mode("hybrid", np.array([-1, -1]))


def test_config_hybrid_and_contrastive_weight_bounds():
    from pydantic import ValidationError

    assert FeaturesConfig(mode="hybrid", contrastive_weight=0.5).contrastive_weight == 0.5
    assert FeaturesConfig().contrastive_weight == 0.3 and FeaturesConfig(contrastive_weight=0).contrastive_weight == 0
    for bad in (-0.1, 101):
        with pytest.raises(ValidationError):
            FeaturesConfig(contrastive_weight=bad)
    with pytest.raises(ValidationError):
        FeaturesConfig(mode="hybird")


def test_feature_net_shapes():
    net = FeatureNet(TINY, channels=3, num_classes=5).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert net(x).shape == (4, 16) and net.logits(x).shape == (4, 5)
    gray = FeatureNet(TINY, channels=1, num_classes=0).eval()
    assert gray(torch.zeros(2, 1, 32, 32)).shape == (2, 16)
    with pytest.raises(ValueError, match="no classes"):
        gray.logits(torch.zeros(2, 1, 32, 32))


def test_augment_is_seeded_and_in_range():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))


def test_training_is_deterministic_on_cpu(images):
    x, y = images

    def weights(seed: int) -> dict[str, torch.Tensor]:
        net, _, _ = train_features(x, y, x[:20], y[:20], TINY, seed=seed, device="cpu")
        return net.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_classifier_learns_and_round_trips(images, tmp_path):
    x, y = images
    cfg = FeaturesConfig(mode="classifier", width=16, dim=16, steps=100, batch_size=32, device="cpu")
    net, m, curve = train_features(x, y, x, y, cfg, seed=0, device="cpu")
    assert m["mode"] == "classifier" and m["num_classes"] == int(y.max()) + 1
    # on the images it was trained on (first 200 emoji by id: 64 % "People & Body"), above the
    # majority class share
    assert m["val_accuracy"] > np.bincount(y).max() / len(y)
    assert [r["step"] for r in curve] == list(range(10, 101, 10)) and curve[-1]["loss"] < curve[0]["loss"]
    save_features(net, tmp_path / "f", {"resolution": 16})
    back = load_features(tmp_path / "f")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["resolution"] == 16
    feats = embed(net, x[:50], batch_size=16)
    assert feats.dtype == np.float32 and feats.shape == (50, 16)
    np.testing.assert_allclose(embed(back, x[:50]), feats, rtol=1e-5, atol=1e-5)
    assert np.array_equal(classify(back, x[:50]), classify(net, x[:50]))


def test_contrastive_on_unlabelled(images):
    x, _ = images
    unlabelled = np.full(len(x), -1)
    cfg = FeaturesConfig(width=8, dim=16, steps=20, batch_size=16, device="cpu")
    net, m, curve = train_features(x, unlabelled, x[:64], unlabelled[:64], cfg, seed=0, device="cpu")
    assert m["mode"] == "contrastive" and net.num_classes == 0
    # retrieval of augmented views among 64 images: chance is 1/64
    assert 1 / 64 < m["val_retrieval_top1"] <= 1
    assert all(np.isfinite(r["loss"]) for r in curve)
    assert embed(net, x[:5]).shape == (5, 16)
    with pytest.raises(ValueError, match="no classes"):
        classify(net, x[:5])


def _read_curve(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_stage_run_labelled(prepared_root):
    from stages.features import run

    params = Params(features=FeaturesConfig(width=8, dim=16, steps=20, batch_size=16, device="cpu"))
    metrics = run(params, Paths(prepared_root), NullTracker())
    out = Paths(prepared_root).features
    assert (out / "weights.pt").is_file() and (out / "config.json").is_file()
    meta = json.loads((out / "config.json").read_text())
    assert meta["mode"] == "hybrid" and meta["class_names"]  # auto on labelled data
    assert metrics["classifier"] == 1 and 0 <= metrics["val_accuracy"] <= 1 and metrics["params"] > 0
    rows = _read_curve(Paths(prepared_root).metrics / "features_curve.csv")
    assert [int(r["step"]) for r in rows] == [10, 20] and {"loss", "lr", "accuracy"} <= set(rows[0])
    assert load_features(out).num_classes == meta["num_classes"]


def test_stage_run_unlabelled(tmp_path):
    """Unlabelled data (a Parquet file without a label column) train a contrastive encoder."""
    from stages.features import run

    blobs = pq.read_table(EMOJI, columns=["image"]).column("image").to_pylist()[:120]
    pq.write_table(pa.table({"image": blobs}), tmp_path / "src.parquet")
    data = DataConfig(source="parquet", path=str(tmp_path / "src.parquet"), label_column=None, resolution=16)
    prepare_dataset(data, 0, Paths(tmp_path).prepared, progress=False)
    params = Params(features=FeaturesConfig(width=8, dim=16, steps=10, batch_size=16, device="cpu"))
    metrics = run(params, Paths(tmp_path), NullTracker())
    assert metrics["classifier"] == 0 and 0 <= metrics["val_retrieval_top1"] <= 1
    assert json.loads((Paths(tmp_path).features / "config.json").read_text())["mode"] == "contrastive"
    assert len(_read_curve(Paths(tmp_path).metrics / "features_curve.csv")) == 1


def test_hybrid_trains_both_heads_and_round_trips(images, tmp_path):
    """One trunk, a class head and a projection head: one hybrid step sends gradient to both
    heads, a few steps train, and the saved net loads back with both heads."""
    x, y = images
    cfg = FeaturesConfig(mode="hybrid", width=8, dim=16, steps=10, batch_size=16, device="cpu")
    net = FeatureNet(cfg, channels=3, num_classes=int(y.max()) + 1, projection=True)
    assert net.mode == "hybrid" and net.proj is not None
    g = torch.Generator().manual_seed(0)
    xb, yb = images_to_tensor(x[:16]), torch.from_numpy(y[:16])
    v1, v2 = net(augment(xb, g)), net(augment(xb, g))
    from arvision.features import nt_xent

    loss = torch.nn.functional.cross_entropy(net.head(v1), yb) + nt_xent(net.proj(v1), net.proj(v2), 0.2)
    loss.backward()
    for name, module in (("head", net.head), ("proj", net.proj), ("trunk", net.trunk)):
        grads = [p.grad for p in module.parameters()]
        assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), name

    trained, m, curve = train_features(x, y, x[:40], y[:40], cfg, seed=0, device="cpu")
    assert m["mode"] == "hybrid" and m["num_classes"] == int(y.max()) + 1 and 0 <= m["val_accuracy"] <= 1
    assert all(np.isfinite(r["loss"]) for r in curve) and "accuracy" in curve[0]
    assert trained.project(torch.zeros(2, 3, 16, 16)).shape == (2, 16)
    save_features(trained, tmp_path / "h", {"resolution": 16})
    assert json.loads((tmp_path / "h" / "config.json").read_text())["mode"] == "hybrid"
    back = load_features(tmp_path / "h")
    assert back.mode == "hybrid"
    np.testing.assert_allclose(embed(back, x[:20]), embed(trained, x[:20]), rtol=1e-5, atol=1e-5)
    assert np.array_equal(classify(back, x[:20]), classify(trained, x[:20]))


def test_classifier_has_no_projection():
    net = FeatureNet(TINY, channels=3, num_classes=4)
    assert net.mode == "classifier" and net.proj is None and "proj.0.weight" not in net.state_dict()
    with pytest.raises(ValueError, match="no projection head"):
        net.project(torch.zeros(2, 3, 16, 16))
