"""The VQGAN recipe of the tokenizer (``tokenizer.adv_weight``, ``tokenizer.perceptual``): the
discriminator's shapes, the losses' values, taming's adaptive weight against a hand
computation, "off" being today's training bit for bit, resume exactness with it on, and the
config checks. Tiny models on 16² images: seconds on CPU."""

from __future__ import annotations

import io
import re

import pytest
import torch

from arvision.config import ParamsError, TokenizerConfig, parse_params
from arvision.metrics.image import msssim_loss, msssim_scales
from arvision.tokenizers.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    feature_matching_loss,
    generator_adv_loss,
    hinge_d_loss,
    max_layers,
    patch_side,
)
from arvision.train.tokenizer import _average_grads, train_tokenizer
from tests.test_tokenizers import CPU, blobs, fresh

ADV = dict(adv_weight=0.5, disc_start=3, disc_layers=2, disc_width=16)  # 2 layers: 16² → 2×2 logits


@pytest.fixture(scope="module")
def images():
    return blobs(32)


def _train(kind: str, images, steps: int = 8, **kw) -> tuple[torch.nn.Module, list[tuple[int, dict[str, float]]]]:
    tok = fresh(kind, steps=steps, log_every=1, warmup_steps=2, **kw)
    logs: list[tuple[int, dict[str, float]]] = []
    train_tokenizer(tok, images, tok.cfg, seed=0, device=CPU, progress=False, log=lambda s, m: logs.append((s, dict(m))))
    return tok, logs


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("res, layers, side", [(32, 3, 2), (64, 3, 6), (32, 2, 6), (16, 2, 2)])
def test_discriminator_patch_logits(res, layers, side):
    d = PatchDiscriminator(3, width=8, layers=layers, resolution=res)
    logits, feats = d.forward_features(torch.randn(2, 3, res, res))
    assert logits.shape == (2, 1, side, side) and patch_side(res, layers) == side
    assert len(feats) == layers + 1 and all(f.shape[0] == 2 for f in feats)


def test_discriminator_refuses_a_depth_that_leaves_no_logit():
    assert max_layers(32) == 3 and max_layers(64) == 4 and max_layers(16) == 2
    with pytest.raises(ValueError, match="at most 3 layers"):
        PatchDiscriminator(3, width=8, layers=4, resolution=32)


def test_discriminator_is_per_sample():
    """GroupNorm, no BatchNorm: an image's logits do not depend on the rest of its batch (why
    real and reconstructed images may share a forward)."""
    d = PatchDiscriminator(3, width=8, layers=2)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(d(x)[:2], d(x[:2]))


# --------------------------------------------------------------------------- losses


def test_hinge_and_generator_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] (mean 5/6), relu(1 + fake) = [0, 1, 2] (mean 1)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1))
    assert float(hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0))) == 0.0  # a winning D stops pushing
    assert float(generator_adv_loss(fake)) == pytest.approx(1 / 3)
    assert hinge_d_loss(real.bfloat16(), fake.bfloat16()).dtype == torch.float32  # fp32 whatever the autocast


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer(images):
    tok = fresh("vq")
    d = PatchDiscriminator(3, width=8, layers=2)
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    loss, _, recon = tok.training_loss(x)
    g_adv = generator_adv_loss(d(recon))
    lam = adaptive_weight(loss, g_adv, tok.last_layer)
    # by hand: the two gradients' norms at the decoder's last conv
    w = tok.decoder.conv_out.weight
    (g_rec,) = torch.autograd.grad(loss, w, retain_graph=True)
    (g_a,) = torch.autograd.grad(g_adv, w, retain_graph=True)
    assert float(lam) == pytest.approx(float(g_rec.norm() / (g_a.norm() + 1e-4)), rel=1e-6)
    assert not lam.requires_grad
    loss.backward()  # the graph was retained for the step's backward
    assert tok.last_layer is w and w.grad is not None
    # a vanishing adversarial gradient: clamped at 1e4, not infinite
    assert float(adaptive_weight(w.sum(), w.sum() * 0, w)) == 1e4


def test_feature_matching_is_zero_on_itself_and_trains_only_the_fake_side():
    d = PatchDiscriminator(3, width=8, layers=2)
    x = torch.randn(2, 3, 16, 16)
    xr = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    _, f_real = d.forward_features(x)
    assert float(feature_matching_loss(f_real, d.forward_features(x)[1]).detach()) == 0.0
    feature_matching_loss(f_real, d.forward_features(xr)[1]).backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0


@pytest.mark.parametrize("res, scales", [(16, 2), (32, 3), (64, 4)])
def test_msssim_loss_works_on_small_images(res, scales):
    torch.manual_seed(0)
    x = torch.rand(2, 3, res, res) * 2 - 1
    noisy = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert msssim_scales(res) == scales
    assert float(msssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    loss = msssim_loss(noisy, x)
    loss.backward()
    assert 0 < float(loss.detach()) < 1 and torch.isfinite(noisy.grad).all()
    # under a bf16 autocast (as on CUDA) it is still computed in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = msssim_loss(noisy, x)
    assert in_autocast.dtype == torch.float32 and float(in_autocast.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)


def test_average_grads_is_the_mean_over_replicas():
    """Two replicas with the same gradients (reduce: the sum of two equal copies): unchanged."""
    d = PatchDiscriminator(3, width=8, layers=1)
    d(torch.randn(2, 3, 16, 16)).sum().backward()
    before = [p.grad.clone() for p in d.parameters()]
    _average_grads(d, lambda t: t * 2, CPU)
    assert all(torch.allclose(b, p.grad) for b, p in zip(before, d.parameters()))


# --------------------------------------------------------------------------- training


def test_off_is_the_plain_recipe_bit_for_bit(images):
    """adv_weight 0 and perceptual none build no discriminator (which would draw from the
    RNG): whatever the other adversarial keys say, the weights and curve are the plain ones."""
    plain, plain_log = _train("vq", images)
    off, off_log = _train("vq", images, adv_weight=0.0, disc_start=2, disc_width=16, disc_layers=2, disc_lr=1e-4,
                          perceptual_weight=0.3)
    assert _same_weights(plain, off) and plain_log == off_log
    assert not {"d_loss", "g_adv", "adv_lambda", "perceptual_loss"} & set(plain_log[-1][1])


@pytest.mark.parametrize("kind", ["vq", "fsq", "msvq"])
def test_adversarial_training_logs_the_discriminator_from_disc_start(kind, images):
    tok, logs = _train(kind, images, steps=6, **ADV)
    by_step = dict(logs)
    for step in (1, 2, 3):  # steps 0..2: before disc_start 3, neither D nor its loss
        assert by_step[step]["d_loss"] == 0.0 and by_step[step]["adv_lambda"] == 0.0 and by_step[step]["g_adv"] == 0.0
    for step in (4, 5, 6):
        m = by_step[step]
        assert m["d_loss"] > 0 and m["adv_lambda"] > 0 and m["logits_real"] != 0 and m["logits_fake"] != 0
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    plain, _ = _train(kind, images, steps=6)
    assert not _same_weights(tok, plain)  # the adversarial loss reached the tokenizer


@pytest.mark.parametrize("extra", [dict(perceptual="disc_features"), dict(perceptual="msssim")])
def test_perceptual_losses_are_logged_and_train(extra, images):
    kw = {**ADV, **extra} if extra["perceptual"] == "disc_features" else extra
    _, logs = _train("rq", images, steps=4, **kw)
    assert all(m["perceptual_loss"] > 0 for _, m in logs)


def test_resume_with_the_adversarial_loss_is_exact(images):
    """Stopped at its checkpoint of step 4 of 8 (round-tripped through bytes, as on disk) and
    resumed in a tokenizer of other initial weights: the same weights, curve and last stats as
    a run never stopped; the discriminator and its optimizer come back with it."""
    kw = dict(steps=8, checkpoint_every=4, log_every=3, warmup_steps=2, perceptual="disc_features", **ADV)
    whole = fresh("vq", **kw)
    whole_log: list = []
    saved: dict = {}

    def keep(step, st):
        buf = io.BytesIO()
        torch.save(st, buf)
        saved[step] = buf.getvalue()

    ref = train_tokenizer(whole, images, whole.cfg, seed=0, device=CPU, progress=False, on_checkpoint=keep,
                          log=lambda s, m: whole_log.append((s, dict(m))))
    state = torch.load(io.BytesIO(saved[4]), weights_only=False)
    assert state["step"] == 4 and "disc" in state and "disc_optimizer" in state
    resumed = fresh("vq", seed=7, **kw)
    log: list = [row for row in whole_log if row[0] <= 4]  # what the stage replays from the checkpoint's curve
    out = train_tokenizer(resumed, images, resumed.cfg, seed=0, device=CPU, progress=False, state=state,
                          log=lambda s, m: log.append((s, dict(m))))
    assert _same_weights(whole, resumed)
    assert log == whole_log
    drop = ("train_time_s", "images_per_s")
    assert {k: v for k, v in out.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}


# --------------------------------------------------------------------------- config


def test_defaults_train_no_discriminator():
    cfg = TokenizerConfig()
    assert cfg.adv_weight == 0.0 and cfg.perceptual == "none" and not cfg.uses_discriminator
    assert TokenizerConfig(perceptual="disc_features").uses_discriminator


@pytest.mark.parametrize("section, message", [
    (dict(kind="palette", adv_weight=0.5), "tokenizer.adv_weight / tokenizer.perceptual / tokenizer.kind: a palette"),
    (dict(kind="palette", perceptual="msssim"), "takes no adversarial or perceptual loss"),
    (dict(adv_weight=0.5, steps=100, warmup_steps=10, disc_start=100), "tokenizer.disc_start / tokenizer.steps"),
    (dict(perceptual="disc_features", steps=100, warmup_steps=10, disc_start=200), "never reaches"),
    (dict(perceptual="msssim", perceptual_weight=0.0), "tokenizer.perceptual / tokenizer.perceptual_weight"),
    (dict(adv_weight=0.5, disc_layers=4), "tokenizer.disc_layers / data.resolution: 4 strided discriminator layers"),
])
def test_config_checks_name_their_keys(section, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params({"data": {"resolution": 32}, "tokenizer": section})


def test_config_accepts_the_recipe():
    p = parse_params({"data": {"resolution": 64}, "tokenizer": dict(adv_weight=0.5, disc_start=300, disc_layers=4,
                                                                    perceptual="msssim", disc_lr=2e-4)})
    assert p.tokenizer.uses_discriminator and p.tokenizer.disc_lr == 2e-4
    # a kind that does not train ignores the discriminator's shape keys when it is off
    parse_params({"data": {"resolution": 16}, "tokenizer": dict(kind="palette", disc_layers=6, disc_start=10**6)})
