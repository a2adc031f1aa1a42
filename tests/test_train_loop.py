"""The training loop: gradient accumulation equals a k× batch, resume continues exactly, the
EMA is what gets saved, and the LR schedule is warm-up then cosine."""

from types import SimpleNamespace as NS

import pytest
import torch

from arvision.priors import build_prior
from arvision.train.loop import checkpoint_state, ema_model, final_weights, lr_at, make_optimizer, train_prior

VOCAB, SIDE, CLASSES = 32, 4, 3
CPU = torch.device("cpu")


def _cfg(**kw):
    base = dict(steps=6, lr=3e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.05, betas=[0.9, 0.95],
                grad_clip=1.0, ema_decay=0.9, grad_accum=1, log_every=1, checkpoint_every=3, compile=False)
    base.update(kw)
    return NS(**base)


def _model(seed=0, class_dropout=0.0):
    torch.manual_seed(seed)
    cfg = NS(kind="gpt", size="tiny", dropout=0.0, class_dropout=class_dropout)
    return build_prior(cfg, vocab_size=VOCAB, layout=[(SIDE, SIDE)], num_classes=CLASSES)


def _batch(i, n):
    g = torch.Generator().manual_seed(1000 + i)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    codes = (labels[:, None] * 7 + torch.randint(0, 4, (n, SIDE * SIDE), generator=g)) % VOCAB
    return codes, labels


def _batches(n, start=0):
    i = start
    while True:
        yield _batch(i, n)
        i += 1


def test_grad_accum_equals_big_batch():
    k, b = 4, 8
    big, small = _model(), _model()
    big_iter = iter([tuple(torch.cat([_batch(i, b)[j] for i in range(k)]) for j in range(2))])
    train_prior(big, big_iter, _cfg(steps=1, ema_decay=0.0), device=CPU, progress=False)
    train_prior(small, _batches(b), _cfg(steps=1, ema_decay=0.0, grad_accum=k), device=CPU, progress=False)
    # One AdamW step moves each weight by about lr·sign(grad) (≈1.5e-3 here); fp32 rounding of
    # the summed gradients can flip that for a few near-zero gradients only, so allow 1% of a step.
    for (n, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-5, msg=n)
    # and the step really moved the weights
    assert any(not torch.equal(a, c) for a, c in zip(_model().parameters(), big.parameters()))


def test_resume_continues_identically(tmp_path):
    cfg = _cfg(steps=6, class_dropout=0.3)
    ckpts = {}
    logs_full = {}
    full = _model(class_dropout=0.3)
    torch.manual_seed(7)
    train_prior(full, _batches(8), cfg, device=CPU, progress=False,
                on_log=lambda s, m: logs_full.__setitem__(s, m["loss"]),
                on_checkpoint=lambda s, st: ckpts.__setitem__(s, st))
    assert sorted(ckpts) == [3, 6]
    # round-trip the mid-run checkpoint through disk, then resume in a fresh model
    torch.save(ckpts[3], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["step"] == 3 and state["micro_batches"] == 3
    resumed = _model(seed=123, class_dropout=0.3)  # different init: everything must come from the state
    torch.manual_seed(999)  # different RNG: must be restored from the state
    logs_res = {}
    end = {}
    train_prior(resumed, _batches(8, start=state["micro_batches"]), cfg, device=CPU, state=state, progress=False,
                on_log=lambda s, m: logs_res.__setitem__(s, m["loss"]), on_checkpoint=lambda s, st: end.__setitem__(s, st))
    assert sorted(logs_res) == [4, 5, 6]
    for s in (4, 5, 6):
        assert logs_res[s] == pytest.approx(logs_full[s], rel=1e-6, abs=1e-7)
    for key in ("model", "ema"):
        for name, v in ckpts[6][key].items():
            torch.testing.assert_close(end[6][key][name], v, rtol=0, atol=0, msg=f"{key}.{name}")


def test_ema_is_what_gets_saved():
    cfg = _cfg(steps=5, ema_decay=0.5)
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    train_prior(model, _batches(8), cfg, device=CPU, progress=False, on_checkpoint=lambda s, st: seen.__setitem__(s, st))
    st = seen[5]
    w = final_weights(st)
    name = "layers.0.attention.wqkv.weight"
    assert w is st["ema"]
    assert not torch.equal(w[name], st["model"][name])  # the EMA lags the weights
    assert not torch.equal(w[name], init[name])  # but did move
    m = ema_model(model, st)
    torch.testing.assert_close(m.state_dict()[name], w[name])
    # ema off: final weights are the model's
    st_off = checkpoint_state(model, make_optimizer(model, cfg, fused=False), None, 5, CPU, 5)
    assert final_weights(st_off) is st_off["model"]


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = _model()
    opt = make_optimizer(model, _cfg(), fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in plain and "cls_embedding.weight" in plain and "norm.weight" in plain
    assert "layers.0.attention.wqkv.weight" in decayed and "output.weight" in decayed
    assert not any("norm" in n for n in decayed)


def test_training_lowers_the_loss():
    model = _model()
    logs = {}
    train_prior(model, _batches(16), _cfg(steps=30, lr=1e-2, log_every=10, ema_decay=0.0), device=CPU, progress=False,
                on_log=lambda s, m: logs.__setitem__(s, m))
    assert logs[30]["loss"] < logs[10]["loss"] - 0.5
    assert set(logs[30]) >= {"loss", "lr", "grad_norm", "tokens_per_s"}


def test_compile_modes():
    from arvision.train.loop import compile_model

    model = _model()
    assert compile_model(model, "blocks") is model and not model.fused_loss
    assert compile_model(model, True) is model and model.fused_loss  # regional: blocks + fused loss (CUDA only)
    with pytest.raises(ValueError, match="compile mode"):
        compile_model(_model(), "everything")
