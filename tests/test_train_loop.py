"""The training loop: gradient accumulation equals a k× batch, resume continues exactly, the
EMA is what gets saved, the LR schedule is warm-up then cosine, and validation keeps the best
weights, stops early and resumes with its bookkeeping."""

import pytest
import torch

from arvision.config import PriorConfig
from arvision.priors import build_prior
from arvision.train.loop import lr_at, train_prior
from arvision.train.trainer import checkpoint_state, ema_model, final_weights, kept_weights, make_optimizer

VOCAB, SIDE, CLASSES = 32, 4, 3
CPU = torch.device("cpu")


def _cfg(**kw):
    base = dict(steps=6, lr=3e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.05, betas=[0.9, 0.95],
                grad_clip=1.0, ema_decay=0.9, grad_accum=1, log_every=1, checkpoint_every=3, compile=False)
    base.update(kw)
    return PriorConfig(**base)


def _model(seed=0, class_dropout=0.0, drop_path=0.0):
    torch.manual_seed(seed)
    cfg = PriorConfig(kind="gpt", size="tiny", dropout=0.0, class_dropout=class_dropout, drop_path=drop_path)
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


def test_compile_is_regional():
    from arvision.train.loop import compile_model

    model = _model()
    assert compile_model(model) is model and model.fused_loss  # each block compiled in place + fused loss (CUDA only)
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None for layer in model.layers)


def test_compile_auto_is_on_for_cuda_only():
    from arvision.train.loop import use_compile

    assert use_compile("auto", torch.device("cuda")) and not use_compile("auto", CPU)
    assert use_compile(True, CPU) and not use_compile(False, torch.device("cuda"))
    assert PriorConfig().compile == "auto"


def test_compiled_training_saves_plain_keys(tmp_path, monkeypatch):
    """``compile: true`` on CPU through the loop: the blocks are compiled in place and run
    compiled, and checkpoints and the saved prior carry the plain state-dict keys (no
    ``_orig_mod.``), so they load into an uncompiled model. Dynamo traces each block for real;
    only the backend is eager (Inductor's C++ build on CPU takes ~25 s)."""
    from arvision.priors import load_prior, save_prior

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, **{**kw, "backend": "eager"}))
    model = _model(drop_path=0.2)  # the random drop inside the compiled blocks too
    keys = list(model.state_dict())
    ckpts = {}
    train_prior(model, _batches(4), _cfg(steps=2, compile=True), device=CPU, progress=False,
                on_checkpoint=lambda s, st: ckpts.__setitem__(s, st))
    assert all(layer._compiled_call_impl is not None for layer in model.layers)
    assert list(model.state_dict()) == keys
    for part in ("model", "ema"):
        assert list(ckpts[2][part]) == keys, part
    save_prior(model, tmp_path / "prior")
    assert list(torch.load(tmp_path / "prior" / "weights.pt", weights_only=True)) == keys
    again = load_prior(tmp_path / "prior")
    codes, labels = _batch(0, 3)
    torch.testing.assert_close(again(codes, labels), model.eval()(codes, labels), rtol=0, atol=0)


def test_drop_path_changes_training():
    """The same run with drop_path 0.3 takes other steps than with 0 (same data, same seed)."""
    losses = {}
    for rate in (0.0, 0.3):
        torch.manual_seed(3)
        logs = []
        train_prior(_model(drop_path=rate), _batches(8), _cfg(steps=4, ema_decay=0.0), device=CPU, progress=False,
                    on_log=lambda s, m: logs.append(m["loss"]))
        losses[rate] = logs
    assert losses[0.0][0] != losses[0.3][0] and len(losses[0.3]) == 4


# ---------------------------------------------------------------- validation while training


def _val_batches(shift=0, sizes=(8, 8, 5)):
    """Held-out batches; ``shift`` moves the codes off the training distribution, so the val loss
    rises as the model fits the training data."""
    out = []
    for i, n in enumerate(sizes):
        codes, labels = _batch(5000 + i, n)
        out.append(((codes + shift) % VOCAB, labels))
    return out


def test_val_loss_is_token_weighted_mean_in_eval_mode():
    from arvision.train.loop import val_loss

    model = _model(class_dropout=0.5).eval()
    batches = _val_batches(sizes=(8, 3))
    expected = sum(model(c, y, return_loss=True).item() * c.numel() for c, y in batches) / sum(c.numel() for c, _ in batches)
    assert val_loss(model, batches, CPU) == pytest.approx(expected, rel=1e-6)
    assert val_loss(model, batches, CPU) == val_loss(model, batches, CPU)  # no class dropout in eval mode


def test_validation_keeps_best_weights_and_stops_early():
    """A known val sequence: best at the 4th eval (step 8), two evals without a new best after it
    → stop at step 12 of 40; the best weights are the EMA weights of step 8."""
    seq = [3.0, 2.0, 2.5, 1.5, 1.8, 1.9, 0.1]
    seen, evals, ckpts, logs = [], [], {}, []
    name = "layers.0.attention.wqkv.weight"

    def evaluate(m):
        assert not m.training
        seen.append(m.state_dict()[name].clone())
        return seq[len(seen) - 1]

    cfg = _cfg(steps=40, eval_every=2, keep="best", early_stop_patience=2, log_every=5, checkpoint_every=4, ema_decay=0.8)
    model = _model()
    out = train_prior(model, _batches(8), cfg, device=CPU, progress=False, evaluate=evaluate,
                      on_eval=lambda s, v: evals.append((s, v)), on_log=lambda s, m: logs.append(s),
                      on_checkpoint=lambda s, st: ckpts.__setitem__(s, st))
    assert evals == list(zip([2, 4, 6, 8, 10, 12], seq))
    assert out["step"] == 12 and out["stopped_early"] == 1.0
    assert sorted(ckpts) == [4, 8, 12] and logs == [5, 10, 12]  # the stop step is logged and checkpointed
    end = ckpts[12]
    assert end["step"] == 12 and end["stopped_early"] and end["evals_since_best"] == 2
    assert end["val_curve"] == [list(e) for e in evals] and (end["best_step"], end["best_val_loss"]) == (8, 1.5)
    # evaluate saw the EMA weights (what gets saved), and the best weights are those of step 8
    torch.testing.assert_close(seen[3], final_weights(ckpts[8])[name], rtol=0, atol=0)
    for k, v in final_weights(ckpts[8]).items():
        torch.testing.assert_close(end["best_weights"][k], v, rtol=0, atol=0, msg=k)
    assert kept_weights(end, "best") is end["best_weights"]
    assert not torch.equal(kept_weights(end, "last")[name], end["best_weights"][name])
    # the model is back in training mode with its own (not the EMA) weights
    assert model.training and torch.equal(model.state_dict()[name], end["model"][name])
    # a state that stopped early trains no further when resumed
    again = {}
    train_prior(_model(), _batches(8), cfg, device=CPU, state=end, progress=False, evaluate=evaluate,
                on_checkpoint=lambda s, st: again.__setitem__(s, st))
    assert again == {} and len(seen) == 6


def test_keep_last_and_validation_off():
    cfg = _cfg(steps=5, eval_every=2, keep="last")
    ckpts, evals = {}, []
    train_prior(_model(), _batches(8), cfg, device=CPU, progress=False, evaluate=lambda m: 1.0,
                on_eval=lambda s, v: evals.append(s), on_checkpoint=lambda s, st: ckpts.__setitem__(s, st))
    assert evals == [2, 4, 5]  # every eval_every steps and at the end
    end = ckpts[5]
    assert end["best_weights"] is None and end["best_step"] == 2  # keep=last: no copy of the best
    assert kept_weights(end, "best") is final_weights(end)
    # no evaluate (no val split) or eval_every 0: no validation, keep=best acts as last
    for kw in ({"evaluate": None}, {"evaluate": lambda m: 1.0}):
        seen = {}
        c = _cfg(steps=3, eval_every=0 if kw["evaluate"] else 2, keep="best")
        train_prior(_model(), _batches(8), c, device=CPU, progress=False, on_checkpoint=lambda s, st: seen.__setitem__(s, st), **kw)
        assert seen[3]["val_curve"] == [] and kept_weights(seen[3], "best") is final_weights(seen[3])


def test_resume_keeps_validation_bookkeeping(tmp_path):
    """Interrupted at step 4 and resumed: the same val curve, best step and best weights, and
    the same early stop (the patience counter survives the checkpoint)."""
    from arvision.train.loop import val_loss

    val = _val_batches(shift=2)
    cfg = _cfg(steps=30, lr=1e-2, eval_every=2, keep="best", early_stop_patience=2, checkpoint_every=4, class_dropout=0.3)
    full_ckpts = {}
    torch.manual_seed(7)
    train_prior(_model(class_dropout=0.3), _batches(8), cfg, device=CPU, progress=False,
                evaluate=lambda m: val_loss(m, val, CPU), on_checkpoint=lambda s, st: full_ckpts.__setitem__(s, st))
    end = full_ckpts[max(full_ckpts)]
    assert end["stopped_early"] and end["step"] < 30 and end["best_step"] < end["step"]
    torch.save(full_ckpts[4], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    res_ckpts = {}
    torch.manual_seed(999)
    train_prior(_model(seed=5, class_dropout=0.3), _batches(8, start=state["micro_batches"]), cfg, device=CPU, state=state,
                progress=False, evaluate=lambda m: val_loss(m, val, CPU), on_checkpoint=lambda s, st: res_ckpts.__setitem__(s, st))
    res = res_ckpts[max(res_ckpts)]
    assert max(res_ckpts) == max(full_ckpts)
    for key in ("step", "val_curve", "best_step", "best_val_loss", "evals_since_best", "stopped_early"):
        assert res[key] == end[key], key
    for key in ("best_weights", "ema"):
        for k, v in end[key].items():
            torch.testing.assert_close(res[key][k], v, rtol=0, atol=0, msg=f"{key}.{k}")


def test_a_nan_loss_stops_training_naming_the_step():
    """A diverged run (seen on CUDA: a var prior with dropout went NaN at step 10 and trained
    NaN to the end) stops at the first log line that sees it, with a message, not a curve of NaN."""
    from arvision.train.trainer import TrainingDiverged

    model = _model()
    with torch.no_grad():  # NaN in every weight's first entry: every forward gives a NaN loss
        for p in model.parameters():
            p.view(-1)[0] = float("nan")
    logs = []
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan in the 2 steps up to step 2 .*training diverged"):
        train_prior(model, _batches(8), _cfg(steps=6, log_every=2), device=CPU, progress=False,
                    on_log=lambda s, m: logs.append(s))
    assert logs == [2]  # stopped at the first log line


def test_ema_update_is_the_warmed_up_average():
    """``EMA.update`` (torch's ``get_ema_multi_avg_fn``) gives, bit for bit, the recursion
    e ← d·e + (1 − d)·p with d = min(decay, (1 + step) / (10 + step)) as ``torch.lerp`` computes it."""
    from arvision.train.trainer import EMA

    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.95)
    want = [p.detach().clone() for p in model.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(step)
        d = min(0.95, (1 + step) / (10 + step))
        want = [torch.lerp(w, p.detach(), 1.0 - d) for w, p in zip(want, model.parameters())]
    assert all(torch.equal(e, w) for e, w in zip(ema.shadow, want))
