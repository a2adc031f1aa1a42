"""Sample-quality and memorisation metrics: numerics on toy sets, then planted generators scored
in the space of a feature net trained on real emoji (train / val / held-out split by class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from arvision.config import FeaturesConfig
from arvision.data.prepare import normalise
from arvision.errors import UserError
from arvision.features import classify, embed, train_features
from arvision.metrics.samples import (
    class_accuracy,
    copy_reference,
    frechet_distance,
    inception_fd,
    kernel_distance,
    memorisation,
    prdc,
    sample_metrics,
)
from arvision.viz import memorisation_panel

EMOJI = Path(__file__).resolve().parents[1] / "arvision" / "data" / "emoji" / "emoji.parquet"
RES = 16
CLASSES = 9
# per class: 40 train, 10 val (the reference set), 10 held out (a "generator" of real unseen images)
N_TRAIN, N_VAL, N_HELD = 40, 10, 10


# ---------------------------------------------------------------- numerics on toy sets


def _reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The formulas of Kynkäänniemi et al. / Naeem et al. on full distance matrices, strictly
    inside a ball (as the authors' ``prdc`` package computes them)."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)  # (N real, M fake)
    return {
        "precision": float((d < r_real[:, None]).any(0).mean()),
        "recall": float((d < r_fake[None, :]).any(1).mean()),
        "density": float((d < r_real[:, None]).sum(0).mean() / k),
        "coverage": float((d.min(1) < r_real).mean()),
    }


def test_prdc_matches_reference_formulas(monkeypatch):
    import arvision.metrics.samples as samples

    monkeypatch.setattr(samples, "CHUNK", 37)  # several blocks on both sides
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(150, 8)), rng.normal(0.4, 1.2, size=(120, 8))
    got, want = prdc(fake, real, nearest_k=5), _reference_prdc(real, fake, 5)
    assert got == pytest.approx(want, abs=1e-12)
    monkeypatch.setattr(samples, "PRDC_MAX_POINTS", 100)  # the block-wise path for large sets
    assert prdc(fake, real, nearest_k=5) == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 16))
    same = prdc(a, a, nearest_k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0)  # each ball holds its centre and k - 1 others, strictly inside
    apart = prdc(a + 100.0, a, nearest_k=5)
    assert apart == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_frechet_distance_known_values():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 12))
    assert abs(frechet_distance(a, a)) < 1e-8
    # same covariance, means 0.5 apart in each of 12 dims: FD = |Δμ|² = 12 · 0.25
    assert frechet_distance(a + 0.5, a) == pytest.approx(3.0, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a * 2), a) > 1.0  # scale change counts too


def test_kid_adapts_to_small_sets_and_is_seeded():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(30, 8))
    kid, std = kernel_distance(b, a)  # subsets of 15: half the smaller set
    assert (kid, std) == kernel_distance(b, a)
    assert abs(kid) < 0.1 and std > 0
    assert kernel_distance(b + 2.0, a)[0] > 10 * max(abs(kid), std)


def test_sample_metrics_keys():
    rng = np.random.default_rng(4)
    m = sample_metrics(rng.normal(size=(50, 8)), rng.normal(size=(60, 8)), nearest_k=3)
    assert set(m) == {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage"}


def test_class_accuracy():
    assert class_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert class_accuracy(np.array([0, 5]), np.array([0, -1])) == 1.0  # unlabelled intents left out
    with pytest.raises(ValueError):
        class_accuracy([0], [-1])


def test_inception_fd_error_paths(tmp_path):
    u8 = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(UserError, match="evaluate.inception_weights"):
        inception_fd(u8, u8, tmp_path / "missing.pth")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        (tmp_path / "weights.pth").write_bytes(b"")
        with pytest.raises(UserError, match="pip install torch-fidelity"):
            inception_fd(u8, u8, tmp_path / "weights.pth")


# ---------------------------------------------------------------- planted generators


@pytest.fixture(scope="module")
def emoji() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """540 emoji at 16×16, 60 from each of the 9 groups, split per class into train / val / held."""
    table = pq.read_table(EMOJI, columns=["image", "label"])
    blobs, labels = table.column("image").to_pylist(), table.column("label").to_numpy()
    rng = np.random.default_rng(0)
    split: dict[str, list[int]] = {"train": [], "val": [], "held": []}
    for c in range(CLASSES):
        pick = rng.choice(np.flatnonzero(labels == c), N_TRAIN + N_VAL + N_HELD, replace=False)
        split["train"] += list(pick[:N_TRAIN])
        split["val"] += list(pick[N_TRAIN : N_TRAIN + N_VAL])
        split["held"] += list(pick[N_TRAIN + N_VAL :])
    return {
        name: (np.stack([normalise(blobs[i], RES, 3) for i in idx]), labels[idx].astype(np.int64))
        for name, idx in split.items()
    }


@pytest.fixture(scope="module")
def judge(emoji):
    """A small classifier feature net trained on the train split, and the real sets' features."""
    (tx, ty), (vx, vy) = emoji["train"], emoji["val"]
    cfg = FeaturesConfig(width=16, dim=32, steps=150, batch_size=64, device="cpu")
    net, metrics, _ = train_features(tx, ty, vx, vy, cfg, seed=0, device="cpu")
    assert metrics["val_accuracy"] > 2 / CLASSES  # it has learnt something about the groups
    feats = {name: embed(net, x) for name, (x, _) in emoji.items()}
    return net, feats


def _noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


def _perturb(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noisy = x.astype(np.float64) + np.random.default_rng(seed).normal(0, sigma, x.shape)
    return noisy.clip(0, 255).round().astype(np.uint8)


def test_planted_fd(emoji, judge):
    net, feats = judge
    val = feats["val"]
    n = len(val)
    floor = frechet_distance(feats["train"][:: len(feats["train"]) // n][:n], val)  # real seen images
    held = frechet_distance(feats["held"], val)  # real unseen images
    mild = frechet_distance(embed(net, _perturb(emoji["held"][0], 6.0, 0)), val)
    noise = frechet_distance(embed(net, _noise(n, 1)), val)
    assert held <= 1.5 * floor, (held, floor)
    assert noise > 5 * floor and noise > 2 * mild, (noise, mild, floor)
    m_held, m_noise = sample_metrics(feats["held"], val), sample_metrics(embed(net, _noise(n, 1)), val)
    assert m_noise["kid"] > m_held["kid"] + 2 * m_held["kid_std"]
    # noise collapses onto a few features: it covers little of the real manifold
    assert m_noise["recall"] < 0.6 and m_held["recall"] > 0.8
    assert m_noise["coverage"] < 0.6 and m_held["coverage"] > 0.8


def _prdc_before_the_package(gen_ND: np.ndarray, real_ND: np.ndarray, k: int) -> dict[str, float]:
    """precision/recall/density/coverage as arvision computed them before it called the ``prdc``
    package (main at 10a6ad8, ``arvision.metrics.samples.prdc``), kept here as the reference."""
    gen, real = torch.as_tensor(gen_ND, dtype=torch.float64), torch.as_tensor(real_ND, dtype=torch.float64)

    def kth(x):
        return torch.cdist(x, x).topk(k + 1, dim=1, largest=False).values[:, k]

    r_real, r_gen, d = kth(real), kth(gen), torch.cdist(gen, real)
    inside = d <= r_real[None]
    return {"precision": float(inside.any(1).double().mean()), "recall": float((d <= r_gen[:, None]).any(0).double().mean()),
            "density": float(inside.sum().double() / (k * len(gen))), "coverage": float(inside.any(0).double().mean())}


def test_prdc_package_gives_the_numbers_of_before(emoji, judge, monkeypatch):
    """The ``prdc`` package (and the block-wise path for large sets) on a feature net's features
    of real and generated-like sets: the very numbers arvision's own code gave."""
    import arvision.metrics.samples as samples

    net, feats = judge
    sets = {"held": feats["held"], "train": feats["train"][:90], "noise": embed(net, _noise(90, 1)),
            "perturbed": embed(net, _perturb(emoji["held"][0], 12.0, 2))}
    for name, gen in sets.items():
        for k in (3, 5):
            before = _prdc_before_the_package(gen, feats["val"], k)
            # the same counts: equal shares, density to the last bits of its division
            assert prdc(gen, feats["val"], nearest_k=k) == pytest.approx(before, rel=1e-14, abs=0), (name, k)
            monkeypatch.setattr(samples, "PRDC_MAX_POINTS", 10)  # the block-wise path, several blocks
            monkeypatch.setattr(samples, "CHUNK", 37)
            assert prdc(gen, feats["val"], nearest_k=k) == pytest.approx(before, rel=1e-14, abs=0), (name, k, "blocks")
            monkeypatch.undo()
    assert 0 < prdc(sets["noise"], feats["val"])["coverage"] < prdc(sets["held"], feats["val"])["coverage"]


def test_planted_memorisation(emoji, judge, tmp_path):
    net, feats = judge
    (tx, _), (vx, _), (hx, _) = emoji["train"], emoji["val"], emoji["held"]
    ref = copy_reference(feats["train"], tx, feats["val"], vx)
    assert 0 < ref.threshold and 0 < ref.threshold_pixels
    copies = memorisation(ref, feats["train"][:90], tx[:90])  # a generator returning training images
    assert copies.copy_rate >= 0.9 and copies.copy_rate_pixels >= 0.9
    assert np.array_equal(copies.nearest_pixels, np.arange(90))  # each found its own original
    assert (copies.score >= 1).mean() == copies.copy_rate
    held = memorisation(ref, feats["held"], hx)  # real unseen images: ~5 % by construction
    assert held.copy_rate <= 0.2 and held.copy_rate_pixels <= 0.2, held.metrics()
    assert set(held.metrics()) == {"copy_rate", "copy_rate_pixels", "copy_threshold", "copy_threshold_pixels"}
    # the panel: the most copy-like of a mixed set are the planted copies
    mixed_x, mixed_f = np.concatenate([hx[:20], tx[:4]]), np.concatenate([feats["held"][:20], feats["train"][:4]])
    rep = memorisation(ref, mixed_f, mixed_x)
    assert set(np.argsort(-rep.score_pixels)[:4]) == {20, 21, 22, 23}
    path = memorisation_panel(mixed_x, tx[rep.nearest_pixels], rep.score_pixels, tmp_path / "mem.png", n=6)
    with Image.open(path) as img:
        assert img.size[0] == 110 + 6 * (RES * 3 + 2) + 2


def test_planted_class_accuracy(emoji, judge):
    net, _ = judge
    x = np.concatenate([emoji["val"][0], emoji["held"][0]])
    y = np.concatenate([emoji["val"][1], emoji["held"][1]])
    pred = classify(net, x)
    right = class_accuracy(pred, y)
    shuffled_y = np.random.default_rng(5).permutation(y)
    shuffled = class_accuracy(pred, shuffled_y)
    # chance for these label frequencies: Σ_c p_pred(c) · p_intended(c)
    chance = float((np.bincount(pred, minlength=CLASSES) * np.bincount(y, minlength=CLASSES)).sum()) / len(y) ** 2
    assert abs(shuffled - chance) < 0.08, (shuffled, chance)
    assert right > chance + 0.2, (right, chance)


class _IdentityTokenizer:
    """codes = the images themselves: a lossless tokenizer."""

    def encode(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return x_BCHW

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes


class _BlurTokenizer(_IdentityTokenizer):
    """4× average-pooled codes, decoded by nearest upsampling: what a blurring tokenizer does."""

    def encode(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x_BCHW, 4)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(codes, scale_factor=4, mode="nearest")


def test_reconstruction_fd_is_zero_for_a_lossless_tokenizer_and_grows_with_blur(emoji, judge):
    """``tokenizer_rfd`` (:meth:`Yardstick.reconstruction_fd`), from the reconstruction reference
    the evaluate stage builds anyway: ~0 when reconstructions are the val images, far above
    the real-vs-real floor when they are blurred."""
    from arvision.judge import Yardstick

    net, feats = judge
    (tx, ty), (vx, vy) = emoji["train"], emoji["val"]
    yard = Yardstick(net=net, device=torch.device("cpu"), val_u8=vx, val_labels=vy, train_u8=tx, train_labels=ty,
                     batch_size=64)
    exact = yard.reconstruction_fd(yard.reconstruction_reference(_IdentityTokenizer()))
    blurred = yard.reconstruction_fd(yard.reconstruction_reference(_BlurTokenizer()))
    floor = frechet_distance(feats["held"], feats["val"])  # real unseen images against val
    assert abs(exact) < 1e-3 * floor, (exact, floor)
    assert blurred > 2 * floor, (blurred, floor)


def test_prdc_without_the_package_gives_the_same_numbers(monkeypatch):
    """The GPU machine has no scikit-learn, so no ``prdc``: the block-wise path answers, unchanged."""
    import sys

    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(90, 6)), rng.normal(0.3, 1.1, size=(80, 6))
    want = prdc(fake, real, nearest_k=4)
    monkeypatch.setitem(sys.modules, "prdc", None)  # import prdc raises ImportError
    assert prdc(fake, real, nearest_k=4) == pytest.approx(want, abs=1e-12)
