"""Tokenizers: the invariants every kind keeps, training that helps, and the metrics' numerics.

Tiny configurations (16×16 images, 4×4 latents) keep each kind's tests to seconds on CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arvision.config import TokenizerConfig
from arvision.metrics.codebook import codebook_stats, expected_uniform_usage, perplexity, usage
from arvision.metrics.image import psnr, ssim
from arvision.tokenizers import (
    TOKENIZERS,
    build_tokenizer,
    images_to_tensor,
    load_tokenizer,
    save_tokenizer,
    tensor_to_images,
)
from arvision.tokenizers.quantizer import VectorQuantizer
from arvision.train.tokenizer import evaluate_tokenizer, train_tokenizer

KINDS = list(TOKENIZERS)
RES = 16
CPU = torch.device("cpu")


def tiny_cfg(kind: str, **kw) -> TokenizerConfig:
    base = dict(
        kind=kind,
        width=8,
        channel_mult=[1, 2, 2],  # 4x down: 16x16 -> 4x4
        num_res_blocks=1,
        codebook_size=32,
        code_dim=4,
        rq_depth=2,
        fsq_levels=[3, 3, 3],
        scales=[1, 2, 4],
        palette_size=8,
        steps=40,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        log_every=10,
    )
    return TokenizerConfig(**{**base, **kw})


def blobs(n: int = 64, res: int = RES, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 (n, res, res, channels): a smooth coloured blob on a light background per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / (res - 1)
    out = np.empty((n, res, res, channels), np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.15, 0.35)
        mask = 1 / (1 + np.exp(((xx - cx) ** 2 + (yy - cy) ** 2 - r**2) * 80))
        fg, bg = rng.uniform(0, 255, channels), rng.uniform(180, 255, channels)
        out[i] = (mask[..., None] * fg + (1 - mask[..., None]) * bg).round().astype(np.uint8)
    return out


def fresh(kind: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_tokenizer(tiny_cfg(kind, **kw), channels=3, resolution=RES)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return blobs()


@pytest.fixture(scope="module")
def trained(images) -> dict:
    """One short training run per kind, shared by the tests that need a trained tokenizer."""
    out = {}
    for kind in KINDS:
        tok = fresh(kind)
        before = evaluate_tokenizer(tok, images)
        train_tokenizer(tok, images, tok.cfg, seed=0, device=CPU, progress=False)
        out[kind] = (tok.eval(), before, evaluate_tokenizer(tok, images))
    return out


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("kind", KINDS)
def test_codes_in_range_and_match_layout(kind, trained, images):
    tok = trained[kind][0]
    codes = tok.encode(images_to_tensor(images[:8]))
    assert codes.dtype == torch.long
    assert codes.shape == (8, tok.seq_len)
    assert tok.seq_len == sum(math.prod(e) for e in tok.layout)
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.vocab_size


def test_layouts():
    assert fresh("palette").layout == [(RES, RES)]
    assert fresh("vq").layout == [(4, 4)]
    assert fresh("rq").layout == [(4, 4, 2)] and fresh("rq").seq_len == 32
    assert fresh("fsq").vocab_size == 27
    assert fresh("msvq").layout == [(1, 1), (2, 2), (4, 4)] and fresh("msvq").seq_len == 21


@pytest.mark.parametrize("kind", KINDS)
def test_decode_of_encode_equals_reconstruct(kind, trained, images):
    tok = trained[kind][0]
    x = images_to_tensor(images[:16])
    with torch.no_grad():
        via_codes = tok.decode(tok.encode(x))
        direct = tok.reconstruct(x)
    assert via_codes.shape == x.shape
    assert float(via_codes.abs().max()) <= 1.0
    torch.testing.assert_close(direct, via_codes, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, trained, images, tmp_path):
    tok = trained[kind][0]
    save_tokenizer(tok, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert not loaded.training and loaded.kind == kind and loaded.layout == tok.layout
    x = images_to_tensor(images[:16])
    with torch.no_grad():
        assert torch.equal(tok.encode(x), loaded.encode(x))
        assert torch.equal(tok.reconstruct(x), loaded.reconstruct(x))


@pytest.mark.parametrize("kind", KINDS)
def test_training_raises_psnr_without_collapse(kind, trained):
    _, before, after = trained[kind]
    assert after["psnr"] > before["psnr"] + 1.0, (before["psnr"], after["psnr"])
    # 64 images x 16 positions against 32 codes: a healthy codebook uses most of them
    floor = {"palette": 0.5, "vq": 0.5, "rq": 0.5, "fsq": 0.3, "msvq": 0.5}[kind]
    assert after["usage"] >= floor, after


@pytest.mark.parametrize("kind", ["vq", "msvq"])
def test_same_seed_same_weights(kind, images):
    states = []
    for _ in range(2):
        tok = fresh(kind, steps=6)
        train_tokenizer(tok, images, tok.cfg, seed=3, device=CPU, progress=False)
        states.append(tok.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    other = fresh(kind, steps=6)
    train_tokenizer(other, images, other.cfg, seed=4, device=CPU, progress=False)
    assert not torch.equal(other.state_dict()["decoder.conv_out.weight"], states[0]["decoder.conv_out.weight"])


def test_palette_fit_is_deterministic_and_grey_for_one_channel():
    rgb = blobs(32)
    a, b = fresh("palette"), fresh("palette")
    a.fit(rgb, seed=0), b.fit(rgb, seed=0)
    assert torch.equal(a.palette, b.palette)
    grey = build_tokenizer(tiny_cfg("palette"), channels=1, resolution=RES)
    grey.fit(blobs(32, channels=1), seed=0)
    assert grey.palette.shape == (8, 1)
    x = images_to_tensor(blobs(4, channels=1))
    assert grey.decode(grey.encode(x)).shape == x.shape


def test_log_callback_and_returned_stats(images):
    tok, seen = fresh("vq", steps=20), []
    out = train_tokenizer(tok, images, tok.cfg, seed=0, device=CPU, progress=False, log=lambda s, m: seen.append((s, m)))
    assert [s for s, _ in seen] == [10, 20]
    for key in ("loss", "psnr", "batch_usage", "batch_perplexity", "lr"):
        assert key in seen[-1][1] and math.isfinite(seen[-1][1][key])
    assert out["train_time_s"] > 0


def test_builds_from_the_config_section(images):
    tok = build_tokenizer(tiny_cfg("vq"), channels=3, resolution=RES)
    assert isinstance(tok.cfg, TokenizerConfig)
    assert tok.encode(images_to_tensor(images[:2])).shape == (2, 16)


def test_vq_kmeans_init_and_dead_code_restart(images):
    tok = fresh("vq", steps=1)
    assert not bool(tok.quantizer.initted)
    train_tokenizer(tok, images, tok.cfg, seed=0, device=CPU, progress=False)
    assert bool(tok.quantizer.initted)
    q = tok.quantizer
    q.cluster_size[:5] = 0.0  # pretend five codes died
    before = q.embed[:5].clone()
    q.train()
    q(torch.randn(64, q.proj_in.in_features))
    stats = q.update()
    assert stats["restarted"] >= 5
    assert not torch.equal(before, q.embed[:5])
    assert bool((q.cluster_size[:5] >= q.threshold).all())


def test_rq_codes_depth_within_position(trained, images):
    """Zeroing the depth-1 codes changes only the second entry of each position's pair."""
    tok = trained["rq"][0]
    codes = tok.encode(images_to_tensor(images[:4]))
    per_pos = codes.view(4, 16, 2)  # (b, positions, depth)
    first_only = tok.quantizer.lookup(
        tok.quantizer.proj_in(tok.encoder(images_to_tensor(images[:4])).permute(0, 2, 3, 1).reshape(-1, 32))
    ).view(4, 16)
    assert torch.equal(per_pos[..., 0], first_only)


def test_fsq_every_code_distinct_vector():
    tok = fresh("fsq").eval()
    codes = torch.arange(tok.vocab_size).view(-1, 1).repeat(1, 16)  # (27, 16)
    z = tok._dequantize(codes)[:, :, 0, 0]  # (27, Z)
    assert torch.unique(z.round(decimals=5), dim=0).shape[0] == tok.vocab_size


# --------------------------------------------------------------------------- msvq and the VAR prior


def test_msvq_teacher_forcing_matches_stepping(trained, images):
    tok = trained["msvq"][0]
    x = images_to_tensor(images[:3])
    with torch.no_grad():
        codes = tok.encode(x)
        tf = tok.teacher_forcing_input(codes)
        assert tf.shape == (3, tok.seq_len - tok.scales[0] ** 2, tok.embed_dim)
        f_hat, start, pieces = None, 0, []
        for k, s in enumerate(tok.scales):
            f_hat, nxt = tok.next_scale_input(k, f_hat, codes[:, start : start + s * s])
            start += s * s
            if k + 1 < len(tok.scales):
                assert nxt.shape == (3, tok.scales[k + 1] ** 2, tok.embed_dim)
                pieces.append(nxt)
            else:
                assert nxt is None
        torch.testing.assert_close(torch.cat(pieces, 1), tf)
        assert f_hat.shape == (3, tok.embed_dim, tok.scales[-1], tok.scales[-1])
        torch.testing.assert_close(tok.decode_fhat(f_hat), tok.decode(codes))


def test_msvq_first_teacher_forcing_input_is_scale0_downsampled(trained, images):
    """The input for scale 1 is the scale-0 contribution, area-downsampled to 2×2."""
    tok = trained["msvq"][0]
    with torch.no_grad():
        codes = tok.encode(images_to_tensor(images[:2]))
        h = tok._scale_vectors(0, codes[:, :1])  # (2, Z, 4, 4)
        want = torch.nn.functional.interpolate(h, size=(2, 2), mode="area").flatten(2).transpose(1, 2)
        torch.testing.assert_close(tok.teacher_forcing_input(codes)[:, :4], want)


def test_msvq_scales_must_end_at_latent_side():
    from arvision.errors import UserError

    with pytest.raises(UserError, match="latent side"):
        build_tokenizer(tiny_cfg("msvq", scales=[1, 2, 3]), channels=3, resolution=RES)


def test_msvq_reports_usage_per_scale(trained, images):
    after = trained["msvq"][2]
    for k in range(3):
        assert 0 < after[f"usage_scale{k}"] <= 1
        assert after[f"usage_scale{k}"] <= after[f"usage_possible_scale{k}"] <= 1
    assert after["usage_min_scale"] == min(after[f"usage_possible_scale{k}"] for k in range(3))
    # codebook metrics over other images (the training set) than the reconstruction metrics
    tok = trained["msvq"][0]
    more = evaluate_tokenizer(tok, images[:8], usage_images=images)
    assert more["usage_images_n"] == len(images) and after["usage_images_n"] == len(images)
    assert more["usage"] == after["usage"] and more["psnr"] != after["psnr"]


def test_msvq_whitened_lookup_round_trips(trained, images):
    """A code's vector, mapped back from the whitened space, is what the lookup compared against."""
    tok = trained["msvq"][0]
    r = torch.randn(50, tok.embed_dim)
    for k in range(len(tok.scales)):
        L = tok._chol(k)
        torch.testing.assert_close(tok._whiten(k, r) @ L.t() + tok.res_mean[k], r, rtol=1e-4, atol=1e-4)
    assert bool(tok.whiten_initted) and torch.isfinite(tok.res_cov).all()
    # training keeps the coarse scales' statistics apart from the fine ones'
    assert not torch.allclose(tok.res_cov[0], tok.res_cov[-1])


def test_quantizer_groups_count_equally():
    """EMA counts weigh every restart group (msvq scale) equally, whatever its size."""
    cfg = tiny_cfg("vq", ema_decay=0.5, dead_code_restart=False, kmeans_init=False)
    q = VectorQuantizer(8, cfg)
    q.cluster_size.zero_()
    q.record(torch.randn(2, 4), torch.tensor([0, 0]))  # a coarse group: 2 vectors
    q.record(torch.randn(30, 4), torch.full((30,), 1))  # a fine group: 30 vectors
    q.update()
    assert float(q.cluster_size[0]) == pytest.approx(float(q.cluster_size[1]))
    assert float(q.cluster_size.sum()) == pytest.approx(0.5 * 32)


# --------------------------------------------------------------------------- the explicit quantiser update

STATEFUL = ["vq", "rq", "msvq"]


def _state(tok) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tok.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["vq", "rq", "msvq", "fsq"])
def test_train_mode_encode_changes_no_buffer(kind, images):
    """A training-mode forward only records; update_quantizer applies (first batch and later ones)."""
    tok = fresh(kind).train()
    x = images_to_tensor(images[:16])
    for _ in range(2):  # the first batch (initialisation planned) and a later one
        before = _state(tok)
        codes = tok.encode(x)
        reconstructed = tok.reconstruct(x)
        assert codes.shape == (16, tok.seq_len) and reconstructed.shape == x.shape
        _assert_same_state(before, _state(tok))
        stats = tok.update_quantizer()
        after = _state(tok)
        if kind == "fsq":
            assert stats == {}
            _assert_same_state(before, after)
        else:
            assert {"batch_usage", "batch_perplexity", "restarted"} <= stats.keys()
            assert any(not torch.equal(before[k], after[k]) for k in before)
    if kind != "fsq":
        assert bool(tok.quantizer.initted)
        assert tok.update_quantizer() == {}  # nothing recorded since
        _assert_same_state(after, _state(tok))


def test_palette_update_quantizer_is_a_no_op(images):
    tok = fresh("palette").train()
    before = _state(tok)
    tok.encode(images_to_tensor(images[:4]))
    assert tok.update_quantizer() == {}
    _assert_same_state(before, _state(tok))


@pytest.mark.parametrize("kind", STATEFUL)
def test_update_applies_what_any_training_forward_recorded(kind, images):
    """training_loss + update_quantizer and encode + update_quantizer leave the same quantiser
    state (the update depends only on what the forward recorded, not on which forward)."""
    x = images_to_tensor(images[:16])
    states = []
    for path in ("training_loss", "encode"):
        tok = fresh(kind).train()
        torch.manual_seed(5)  # k-means seeds and restart draws
        for _ in range(3):
            tok.training_loss(x) if path == "training_loss" else tok.encode(x)
            tok.update_quantizer()
        states.append(_state(tok))
    _assert_same_state(*states)


@pytest.mark.parametrize("kind", STATEFUL)
def test_same_seed_same_quantizer_state_with_explicit_updates(kind, images):
    runs = []
    for _ in range(2):
        tok = fresh(kind, steps=4, dead_code_threshold=6.0, ema_decay=0.8)  # restarts happen
        logs = []
        train_tokenizer(tok, images, tok.cfg, seed=2, device=CPU, progress=False, log=lambda s, m: logs.append(m))
        runs.append((_state(tok), logs))
    _assert_same_state(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert "restarted" in runs[0][1][-1]


def test_reduce_sums_counts_and_sums_like_a_global_batch():
    """A fake all-reduce over two identical replicas (it doubles) gives the state one process
    gets from the batch twice over; the EMA mean of each code stays what one replica's batch gives."""
    cfg = tiny_cfg("vq", ema_decay=0.5, dead_code_restart=False, kmeans_init=False, l2_norm=False)
    g = torch.Generator().manual_seed(0)
    e, codes = torch.randn(40, 4, generator=g), torch.randint(0, 8, (40,), generator=g)
    quantizers = []
    for reduce, reps in ((None, 1), (lambda t: 2 * t, 1), (None, 2)):
        torch.manual_seed(0)
        q = VectorQuantizer(8, cfg)
        q.cluster_size.zero_()
        q.embed_sum.zero_()
        q.record(e.repeat(reps, 1), codes.repeat(reps))
        q.update(reduce)
        quantizers.append(q)
    alone, doubled, twice = quantizers
    torch.testing.assert_close(doubled.cluster_size, 2 * alone.cluster_size)
    torch.testing.assert_close(doubled.embed_sum, 2 * alone.embed_sum)
    for name in ("cluster_size", "embed_sum", "embed"):
        torch.testing.assert_close(getattr(doubled, name), getattr(twice, name))
    used = alone.cluster_size > 0  # the EMA means (Laplace smoothing aside) are the batch means
    torch.testing.assert_close(doubled.embed[used], alone.embed[used], rtol=1e-4, atol=1e-4)
    means = torch.stack([e[codes == c].mean(0) for c in range(cfg.codebook_size) if used[c]])
    torch.testing.assert_close(alone.embed[used], means, rtol=1e-4, atol=1e-4)


def test_reduce_averages_what_each_replica_draws():
    """k-means centres and restart vectors are averaged over the replicas: with identical
    replicas (a reduce that doubles) they are exactly one replica's."""
    cfg = tiny_cfg("vq", ema_decay=0.5)
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(40, 4, generator=g), dim=1)
    quantizers, centres, shapes = [], [], []
    for reduce in (None, lambda t: shapes.append(tuple(t.shape)) or 2 * t):
        torch.manual_seed(0)
        q = VectorQuantizer(8, cfg)
        q.plan_init(e)
        assert q.update(reduce) == {} and bool(q.initted)  # nothing recorded: the initialisation only
        centres.append(q.embed.clone())
        q.cluster_size[:5] = 0.0  # five dead codes, not used below: the same ones in both runs
        q.record(e, torch.full((40,), 7))
        torch.manual_seed(1)
        assert q.update(reduce)["restarted"] == 5
        quantizers.append(q)
    alone, doubled = quantizers
    # reduced: the centres, the restart vectors (each with the replica count), counts and sums together
    assert shapes == [(32, 4), (1,), (32, 5), (5, 4), (1,)]
    assert torch.equal(centres[1], centres[0])
    assert torch.equal(doubled.embed[:5], alone.embed[:5])  # the restart vectors


def test_reduce_averages_msvq_whitening_moments(images):
    x = images_to_tensor(images[:16])
    toks = []
    for reduce in (None, lambda t: 2 * t):
        tok = fresh("msvq").train()
        tok.training_loss(x)
        tok.update_quantizer(reduce)  # the first batch's statistics, then an EMA step towards its moments
        toks.append(tok)
    alone, doubled = toks
    assert torch.equal(doubled.res_mean, alone.res_mean) and torch.equal(doubled.res_cov, alone.res_cov)
    assert bool(doubled.whiten_initted)


def test_load_builds_a_typed_config_and_drops_unknown_keys(tmp_path):
    import json

    tok = fresh("vq")
    save_tokenizer(tok, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["cfg"]["a_key_an_old_version_wrote"] = 1
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded.cfg, TokenizerConfig) and loaded.cfg == tok.cfg


# --------------------------------------------------------------------------- helpers and metrics


def test_images_tensor_round_trip():
    imgs = blobs(4)
    x = images_to_tensor(imgs)
    assert x.shape == (4, 3, RES, RES) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(tensor_to_images(x), imgs)


def test_psnr_known_values():
    a = torch.zeros(2, 3, 8, 8)
    assert math.isinf(float(psnr(a, a)))
    # MSE 0.01 on data range 1 -> 20 dB; on [-1, 1] (range 2) an offset of 0.2 is the same
    assert float(psnr(a, a + 0.1, data_range=1.0)) == pytest.approx(20.0)
    assert float(psnr(a, a + 0.2)) == pytest.approx(20.0)
    # per-image mean: 20 dB and 40 dB images average to 30 dB
    b = torch.cat([a[:1] + 0.1, a[:1] + 0.01])
    assert float(psnr(a, b, data_range=1.0)) == pytest.approx(30.0)


def test_ssim_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert float(ssim(x, x, data_range=1.0)) == pytest.approx(1.0)
    # flat images: variances vanish, SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    c1 = (0.01 * 1.0) ** 2
    want = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert float(ssim(torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6), data_range=1.0)) == pytest.approx(want)
    # noise lowers it, monotonically in the noise level
    y1 = x + 0.05 * torch.randn(x.shape, generator=g)
    y2 = x + 0.2 * torch.randn(x.shape, generator=g)
    assert 1.0 > float(ssim(x, y1, data_range=1.0)) > float(ssim(x, y2, data_range=1.0))


def test_ssim_matches_direct_formula():
    """Against a direct numpy computation on one 11×11 window (a 11×11 image has exactly one)."""
    rng = np.random.default_rng(1)
    a, b = rng.random((11, 11)), rng.random((11, 11))
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
    cov = (w * a * b).sum() - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    want = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    got = ssim(torch.tensor(a).view(1, 1, 11, 11), torch.tensor(b).view(1, 1, 11, 11), data_range=1.0)
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_codebook_metrics():
    codes = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    assert usage(codes, 8) == 0.5
    assert perplexity(codes, 8) == pytest.approx(4.0)  # four codes equally used
    st = codebook_stats(codes, 8)
    assert st["dead_codes"] == 4 and st["usage_possible"] == 0.5
    assert codebook_stats(torch.tensor([5, 6]), 512)["usage_possible"] == 1.0  # 2 codes, 2 distinct
    assert perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx(1.0)
    assert expected_uniform_usage(512, 512) == pytest.approx(1 - math.exp(-1), rel=1e-3)
    # 364 codes over 512 entries: a uniform codebook shows ~260 distinct ones, not 364
    st = codebook_stats(torch.arange(512).repeat(10), 512)
    assert st["usage_possible"] == 1.0 and st["usage_vs_uniform"] == pytest.approx(1.0, abs=1e-3)
    st = codebook_stats(torch.arange(364) % 260, 512)
    assert st["usage_possible"] == pytest.approx(260 / 364) and st["usage_vs_uniform"] == pytest.approx(1.0, abs=0.01)
