"""The calibration ladder: degradations keep shape and dtype and are seeded; rung 0 is the floor;
on real emoji in a small trained feature space, unseen real images score near the floor and
×4 down-up blobs far from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from arvision import ladder as L
from arvision.config import FeaturesConfig
from arvision.data.prepare import normalise
from arvision.features import train_features
from arvision.judge import Yardstick
from tests.test_sample_metrics import _IdentityTokenizer  # a lossless tokenizer: reconstructions = the images

EMOJI = Path(__file__).resolve().parents[1] / "arvision" / "data" / "emoji" / "emoji.parquet"
RES, CLASSES = 16, 9
N_TRAIN, N_VAL, N_HELD = 20, 10, 10  # per class


@pytest.mark.parametrize("shape", [(5, 16, 16, 3), (3, 18, 14, 1)])
def test_every_degradation_keeps_shape_dtype_and_is_seeded(shape):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for rung in L.RUNGS:
        y = L.degrade(x, rung, seed=3)
        assert y.shape == x.shape and y.dtype == np.uint8, rung.name
        assert np.array_equal(y, L.degrade(x, rung, seed=3)), rung.name
        assert not np.array_equal(y, x), rung.name  # each does something
    assert not np.array_equal(L.gaussian_noise(x, 16, 0), L.gaussian_noise(x, 16, 1))


def test_blur_to_zero_is_the_input_and_grows_with_sigma():
    x = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(L.gaussian_blur(x, 0.0), x)
    assert np.array_equal(L.gaussian_blur(x, 1e-3), x)
    flat = np.full_like(x, 77)
    assert np.array_equal(L.gaussian_blur(flat, 2.0), flat)  # the kernel sums to 1
    dev = [np.abs(L.gaussian_blur(x, s).astype(int) - x).mean() for s in L.BLUR_SIGMAS]
    assert all(b > a for a, b in zip(dev, dev[1:])), dev


def test_shuffle_moves_whole_patches_and_families_are_ordered():
    x = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    y = L.shuffle_patches(x, 4, seed=0)
    patches = lambda a: sorted(a[i : i + 4, j : j + 4].tobytes() for i in range(0, 16, 4) for j in range(0, 16, 4))  # noqa: E731
    assert all(patches(a) == patches(b) for a, b in zip(x, y))
    assert len(np.unique(L.quantise_colours(x, 4)[0].reshape(-1, 3), axis=0)) <= 4
    fam = L.families()
    assert [r.param for r in fam["jpeg"]] == [30, 10] and [r.param for r in fam["quantise"]] == [8, 4]
    assert [r.param for r in fam["blur"]] == list(L.BLUR_SIGMAS)


def _ladder(values: dict[str, float]) -> dict:
    """A hand-made ladder: fd = ``values[name]`` per rung (0 elsewhere)."""
    rungs = {n: {"family": "", "param": 0, "label": n, "metrics": {"fd": v, "precision": 1.0 - v / 100}} for n, v in values.items()}
    lad = {"n_images": 10, "seed": 0, "rungs": rungs}
    lad.update(L.trust(lad))
    return lad


def test_blur_equivalent_and_trust_on_a_hand_made_ladder():
    names = ["floor"] + [r.name for r in L.RUNGS]
    vals = {n: 1.0 + i for i, n in enumerate(names)}  # worse at every rung
    vals.update({"blur_0.5": 2.0, "blur_1": 4.0, "blur_1.5": 6.0, "blur_2": 8.0, "blur_3": 10.0})
    lad = _ladder(vals)
    assert L.blur_equivalent(lad, "fd", 5.0) == (pytest.approx(1.25), "=")
    assert L.blur_equivalent(lad, "fd", 0.5) == (0.0, "<")
    assert L.blur_equivalent(lad, "fd", 50.0) == (3.0, ">")
    assert L.blur_equivalent(lad, "precision", 1 - 5.0 / 100) == (pytest.approx(1.25), "=")  # higher is better
    assert L.trustworthy(lad, "fd") and L.trustworthy(lad, "precision")
    vals["blur_1"] = 2.0 - 0.01 * (max(vals.values()) - 1.0)  # a reversal within the tolerance: noise
    assert L.trustworthy(_ladder(vals), "fd") and not _ladder(vals)["monotone_strict"]["fd"]["blur"]
    vals["blur_1"] = 4.0
    vals["noise_16"] = 0.5  # better than the floor at a harsher step
    vals["downup_x4"] = vals["floor"] * 1.01
    bad = _ladder(vals)
    assert not bad["monotone"]["fd"]["noise"] and bad["monotone"]["fd"]["blur"]
    assert not bad["separates_blobs"]["fd"] and not L.trustworthy(bad, "fd")
    text = "\n".join(L.untrusted_lines(bad))
    assert "`fd`: not trustworthy" in text and "noise" in text and "blobs" in text


def test_report_has_the_ladder_section():
    from stages.evaluate import report_md

    lad = _ladder({n: 1.0 + i for i, n in enumerate(["floor"] + [r.name for r in L.RUNGS])})
    model = {"fd": 3.5, "precision": 0.97}
    md = report_md(model, {"fd": 1.0}, None, None, "fd", "", False, lad)
    assert "## Calibration ladder" in md and "| **this model** |" in md and "| blur_1.5 |" in md
    assert "blurred with σ≈" in md and "(fd;" in md
    flat = L.flat_metrics(lad, model)
    assert flat["ladder_blur_sigma_equiv_fd"] == pytest.approx(1.25)  # fd 3.5: halfway from blur σ 1 (3.0) to σ 1.5 (4.0)
    assert "## Calibration ladder" not in report_md(model, {"fd": 1.0}, None, None, "fd", "", False)
    # evaluate's shorter ladder: families of the rungs it has
    short = _ladder({n: 1.0 + i for i, n in enumerate(["floor"] + [r.name for r in L.EVALUATE_RUNGS])})
    assert set(short["monotone"]["fd"]) == set(L.families()) and "noise_16" not in short["rungs"]
    # its blur rungs start at σ 1 (fd 2.0): fd 3.5 is halfway from σ 1.5 (3.0) to σ 2 (4.0)
    assert L.trustworthy(short, "fd") and L.blur_equivalent(short, "fd", 3.5) == (pytest.approx(1.75), "=")


# ---------------------------------------------------------------- real images, a trained yardstick


@pytest.fixture(scope="module")
def yard_held():
    """A yardstick over emoji at 16² (a small classifier trained on its train split), and
    held-out real images with labels."""
    table = pq.read_table(EMOJI, columns=["image", "label"])
    blobs, labels = table.column("image").to_pylist(), table.column("label").to_numpy()
    rng = np.random.default_rng(0)
    split: dict[str, list[int]] = {"train": [], "val": [], "held": []}
    for c in range(CLASSES):
        pick = rng.choice(np.flatnonzero(labels == c), N_TRAIN + N_VAL + N_HELD, replace=False)
        split["train"] += list(pick[:N_TRAIN])
        split["val"] += list(pick[N_TRAIN : N_TRAIN + N_VAL])
        split["held"] += list(pick[N_TRAIN + N_VAL :])
    data = {k: (np.stack([normalise(blobs[i], RES, 3) for i in idx]), labels[idx].astype(np.int64)) for k, idx in split.items()}
    (tx, ty), (vx, vy) = data["train"], data["val"]
    cfg = FeaturesConfig(width=16, dim=32, steps=80, batch_size=64, device="cpu")
    net, _, _ = train_features(tx, ty, vx, vy, cfg, seed=0, device="cpu")
    yard = Yardstick(net=net, device=torch.device("cpu"), val_u8=vx, val_labels=vy, train_u8=tx, train_labels=ty,
                     batch_size=64)
    return yard, data["held"]


def test_rung0_is_the_floor_and_blobs_are_far_from_it(yard_held):
    yard, (hx, hy) = yard_held
    n = N_VAL * CLASSES
    lad = L.score_ladder(yard, n, seed=1, recon_ref=yard.reconstruction_reference(_IdentityTokenizer()))
    floor = yard.floor(n, seed=1)
    rung0 = lad["rungs"]["floor"]["metrics"]
    assert {k: rung0[k] for k in floor} == floor
    assert "copy_rate" in rung0 and rung0["copy_rate"] >= 0.9  # scored as samples are: these are training images
    assert list(lad["rungs"]) == ["floor"] + [r.name for r in L.RUNGS] + ["tokenizer"]
    # a lossless tokenizer's reconstructions are the floor's images: the same sample metrics
    rec = lad["rungs"]["tokenizer"]["metrics"]
    assert all(rec[k] == pytest.approx(floor[k], abs=1e-6) for k in floor)
    # real unseen images land near the floor; ×4 blobs far from it on FD and on precision or density
    held, _ = yard.score(hx, hy, memorisation_check=False)
    blobs = lad["rungs"][L.BLOBS]["metrics"]
    assert held["fd"] <= 2.0 * floor["fd"] + 1e-3, (held["fd"], floor["fd"])
    assert blobs["fd"] > 3 * max(floor["fd"], held["fd"]), (blobs["fd"], floor["fd"])
    assert lad["separates_blobs"]["fd"] and lad["separates_blobs"]["kid"]
    # precision and density call these blobs as good as real images (the complaint), and
    # the ladder says so: each verdict is the numbers' own
    for key in ("precision", "density", "recall", "coverage", "class_accuracy"):
        far = abs(blobs[key] - floor[key]) > L.SEPARATION * abs(floor[key])
        assert lad["separates_blobs"][key] == far, key
    assert not lad["separates_blobs"]["precision"], (blobs["precision"], floor["precision"])
    json.dumps(lad)  # reports/ladder.json
