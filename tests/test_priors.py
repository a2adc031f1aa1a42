"""The priors: KV-cache decoding equals a full forward pass (gpt, and var with its block-causal
mask; with drop-path and dropout too, which the cached paths skip), seeded sampling is
reproducible, guidance at scale 1 equals conditional sampling, top-k / top-p filtering,
stochastic depth (off: bit-identical; on: training changes, eval and sampling do not), the size
registry's parameter counts, and save / load."""


import pytest
import torch

from arvision.config import PriorConfig
from arvision.priors import SIZES, build_prior, load_prior, param_count, save_prior
from arvision.priors.sampling import filter_logits, guide, pick, sample_gpt, sample_var, var_guidance_scale

CLASSES = 5


def _gpt(layout, vocab=64, seed=0, class_dropout=0.1, dropout=0.0, drop_path=0.0):
    torch.manual_seed(seed)
    cfg = PriorConfig(kind="gpt", size="tiny", dropout=dropout, class_dropout=class_dropout, drop_path=drop_path)
    return build_prior(cfg, vocab_size=vocab, layout=layout, num_classes=CLASSES).eval()


# --------------------------------------------------------------------------- gpt


@pytest.mark.parametrize("drop", [0.0, 0.3], ids=["plain", "drop-path+dropout"])
@pytest.mark.parametrize("bucket", [None, 4], ids=["whole-cache", "bucketed"])
@pytest.mark.parametrize("layout", [[(4, 4)], [(3, 5)], [(2, 3, 4)]], ids=["grid", "oblong", "rq"])
def test_gpt_kv_cache_matches_full_forward(layout, bucket, drop):
    """Decoding through the cache (reading all of it, or only its filled buckets) gives the
    logits of a full forward pass in eval mode. With drop-path and dropout, the cached path
    gives them even in training mode: prefill and decode steps never regularise."""
    model = _gpt(layout, vocab=50, dropout=drop, drop_path=drop)  # 50: the head is padded to 64, logits must not be
    model.decode_bucket = bucket
    L = model.seq_len
    codes = torch.randint(0, 50, (3, L))
    labels = torch.tensor([0, 4, CLASSES])  # the last: the null class
    full = model(codes, labels)
    assert full.shape == (3, L, 50)
    model.train(drop > 0)
    model.setup_caches(3)
    k = 5
    pre = model.prefill(labels, codes[:, : k - 1])  # class token + k-1 codes → logits for x_0..x_{k-1}
    torch.testing.assert_close(pre, full[:, :k], rtol=1e-5, atol=1e-5)
    pos = torch.tensor([k])
    for i in range(k, L):
        kv_len = model.decode_kv_len(i)
        assert kv_len is None or i + 1 <= kv_len <= L
        step = model.decode_step(codes[:, i - 1 : i], pos, kv_len)
        torch.testing.assert_close(step, full[:, i], rtol=1e-5, atol=1e-5)
        pos += 1


def _no_drop_path(model):
    """``model`` with every DropPath module replaced by an identity: the blocks as they were
    before stochastic depth existed."""
    for blk in getattr(model, "layers", None) or model.blocks:
        blk.drop_path = torch.nn.Identity()
    return model


@pytest.mark.parametrize("kind", ["gpt", "var"])
def test_drop_path_zero_is_bit_identical(kind):
    """drop_path 0 (the default) draws no random numbers and changes no op: the same weights,
    training-mode outputs (with dropout on, so the RNG stream matters) and gradients as the
    blocks without it, bit for bit."""
    build = (lambda: _gpt([(4, 4)], dropout=0.2)) if kind == "gpt" else (lambda: _var(dropout=0.2))
    a, b = build().train(), _no_drop_path(build()).train()
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    codes = torch.randint(0, 48, (4, a.seq_len))
    labels = torch.tensor([0, 1, 2, 3])
    out = []
    for m in (a, b):
        torch.manual_seed(5)
        loss = m(codes, labels, return_loss=True)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in m.parameters()]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(x, y) for x, y in zip(out[0][1], out[1][1]))


@pytest.mark.parametrize("kind", ["gpt", "var"])
def test_drop_path_changes_training_not_eval_or_sampling(kind):
    """drop_path > 0: training-mode outputs change (and vary with the seed); eval mode is
    deterministic and equals the no-drop model's forward; sampling gives the no-drop model's
    codes."""
    if kind == "gpt":
        plain, dropped = _gpt([(4, 4)], vocab=48), _gpt([(4, 4)], vocab=48, drop_path=0.5)
    else:
        tok = _scale_tokenizer()
        plain, dropped = _var(tok=tok), _var(tok=tok, drop_path=0.5)
    rates = [blk.drop_path.p for blk in getattr(dropped, "layers", None) or dropped.blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.5 and rates == sorted(rates)  # linear over depth
    codes = torch.randint(0, 48, (8, plain.seq_len))
    labels = torch.arange(8) % CLASSES
    ref = plain.eval()(codes, labels)
    torch.testing.assert_close(dropped.eval()(codes, labels), ref, rtol=0, atol=0)
    dropped.train()
    plain.train()
    torch.manual_seed(1)
    train_1 = dropped(codes, labels)
    torch.manual_seed(1)
    train_plain = plain(codes, labels)
    torch.manual_seed(2)
    train_2 = dropped(codes, labels)
    assert not torch.allclose(train_1, train_plain) and not torch.allclose(train_1, train_2)
    kw = dict(cfg_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(3))
    a = dropped.sample(labels[:4], **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    assert torch.equal(a, plain.sample(labels[:4], **kw))


def test_drop_path_drops_whole_samples_and_rescales():
    from arvision.priors.blocks import DropPath, drop_path_rates

    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3]) and drop_path_rates(0.3, 1) == [0.0]
    dp = DropPath(0.25).train()
    x_BLC = torch.ones(4000, 3, 2)
    y_BLC = dp(x_BLC)
    per_sample_B = y_BLC.flatten(1)
    assert torch.all(per_sample_B == per_sample_B[:, :1])  # one decision per sample
    assert set(per_sample_B[:, 0].tolist()) == {0.0, torch.tensor(1 / 0.75).item()}  # kept: scaled by 1/(1-p)
    assert abs((per_sample_B[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert abs(y_BLC.mean().item() - 1.0) < 0.05  # expected value kept
    assert dp.eval()(x_BLC) is x_BLC


def test_drop_path_rates_do_not_recompile_the_blocks():
    """Blocks differ only in their drop-path rate, which is a tensor: one compiled graph serves
    every block with a nonzero rate (a float rate made Dynamo compile once per block, and past
    its recompile limit the deeper blocks ran eager)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _gpt([(4, 4)], drop_path=0.3).train()
    layers = getattr(model, "layers", None) or model.blocks
    assert len(layers) >= 3
    counter = CompileCounter()
    for blk in layers:
        blk.compile(backend=counter)
    model(torch.randint(0, 64, (2, model.seq_len)), torch.tensor([0, 1])).sum().backward()
    assert counter.frame_count <= 2  # rate 0 (the first block, identity) and rate > 0
    torch._dynamo.reset()


def test_gpt_is_causal():
    model = _gpt([(4, 4)])
    codes = torch.randint(0, 64, (2, 16))
    changed = codes.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    a, b = model(codes, torch.tensor([1, 2])), model(changed, torch.tensor([1, 2]))
    torch.testing.assert_close(a[:, :10], b[:, :10])  # logits up to x_9 don't see x_9
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt_same_seed_same_samples():
    model = _gpt([(4, 4)])
    labels = torch.tensor([0, 1, 2, 3])
    kw = dict(cfg_scale=2.0, temperature=1.0, top_k=20, top_p=0.9)
    a = model.sample(labels, generator=torch.Generator().manual_seed(3), **kw)
    b = model.sample(labels, generator=torch.Generator().manual_seed(3), **kw)
    c = model.sample(labels, generator=torch.Generator().manual_seed(4), **kw)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert 0 <= int(a.min()) and int(a.max()) < 64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gpt_guidance_scale_one_equals_conditional():
    model = _gpt([(4, 4)])
    labels = torch.tensor([0, 1, 2, 3])
    cond = sample_gpt(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(5))
    batched = sample_gpt(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(5), force_guidance_batch=True)
    guided = sample_gpt(model, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(cond, batched)
    assert not torch.equal(cond, guided)


def test_gpt_class_dropout_uses_null_class():
    model = _gpt([(4, 4)], class_dropout=0.5).train()
    labels = torch.zeros(2000, dtype=torch.long)
    dropped = model.drop_labels(labels, 0.5)
    assert set(dropped.tolist()) == {0, CLASSES}
    assert abs((dropped == CLASSES).float().mean().item() - 0.5) < 0.05
    assert torch.equal(model.eval().drop_labels(labels, 0.5), labels)


def test_gpt_save_load_roundtrip(tmp_path):
    model = _gpt([(2, 3, 4)], vocab=40)
    save_prior(model, tmp_path / "prior", extra={"note": "x"})
    again = load_prior(tmp_path / "prior")
    codes = torch.randint(0, 40, (2, 24))
    labels = torch.tensor([1, 3])
    torch.testing.assert_close(again(codes, labels), model(codes, labels))
    assert again.config == model.config and again.num_classes == CLASSES


def test_prior_saved_before_drop_path_loads(tmp_path):
    """A config.json written before ``drop_path`` existed (no such key) loads with drop-path off."""
    import json

    model = _gpt([(4, 4)], vocab=40)
    save_prior(model, tmp_path / "prior")
    path = tmp_path / "prior" / "config.json"
    payload = json.loads(path.read_text())
    assert payload["config"].pop("drop_path") == 0.0
    path.write_text(json.dumps(payload))
    again = load_prior(tmp_path / "prior")
    assert all(layer.drop_path.p == 0.0 for layer in again.layers)
    codes, labels = torch.randint(0, 40, (2, 16)), torch.tensor([1, 3])
    torch.testing.assert_close(again(codes, labels), model(codes, labels), rtol=0, atol=0)


# --------------------------------------------------------------------------- sampling helpers


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out).tolist() == [[True, False, True, False, True], [False, False, True, True, True]]
    torch.testing.assert_close(out[0, [1, 3]], logits[0, [1, 3]])
    assert torch.equal(filter_logits(logits, top_k=0), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    logits = probs.log()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.75))
    # row 0: 0.5 < 0.75, 0.5 + 0.3 ≥ 0.75 → {0, 2}; row 1: the top token alone reaches 0.9
    assert kept.tolist() == [[True, False, True, False], [True, False, False, False]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.81))  # needs 0.5 + 0.3 + 0.15
    assert kept[0].tolist() == [True, False, True, True]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)


def test_top_k_then_top_p_and_sampling_frequencies():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0]).log().expand(20000, 4).contiguous()
    noise = torch.empty(20000, 4).exponential_(generator=torch.Generator().manual_seed(0))
    idx = pick(logits, noise, top_k=3, top_p=1.0)  # drops token 0; renormalised 2/9, 3/9, 4/9
    freq = torch.bincount(idx, minlength=4).float() / 20000
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], torch.tensor([2 / 9, 3 / 9, 4 / 9]), atol=0.015, rtol=0)
    greedy = pick(logits, noise, temperature=0.0)
    assert bool((greedy == 3).all())


def test_guide_formula():
    c, u = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(guide(torch.cat([c, u]), 3, 2.5), u + 2.5 * (c - u))
    assert torch.equal(guide(torch.cat([c, u]), 3, 1.0), c)
    assert var_guidance_scale(2.5, 0, 10) == 1.0 and var_guidance_scale(2.5, 9, 10) == 2.5


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("kind,size", [(k, s) for k in SIZES for s in SIZES[k]])
def test_registry_param_counts(kind, size):
    n = param_count(kind, size)  # on the meta device: nothing allocated
    stated = SIZES[kind][size]["params"] * 1e6
    assert abs(n - stated) / stated < 0.01, f"{kind}/{size}: {n / 1e6:.2f}M, registry says {stated / 1e6}M"


def test_one_gpu_sizes_sit_between_small_and_the_paper_sizes():
    """gpt ``medium`` and var ``d8`` / ``d12`` (one GPU, 64² data) lie between the CPU sizes and
    LlamaGen B / VAR-d16, and the var ones follow VAR's rule: width 64·depth, heads = depth."""
    gpt, var = SIZES["gpt"], SIZES["var"]
    assert gpt["small"]["params"] < gpt["medium"]["params"] < gpt["B"]["params"]
    assert var["tiny"]["params"] < var["d6"]["params"] < var["d8"]["params"] < var["d12"]["params"] < var["d16"]["params"]
    for name in ("d6", "d8", "d12"):
        depth = var[name]["depth"]
        assert (var[name]["width"], var[name]["heads"]) == (64 * depth, depth)
    # the counts test_registry_param_counts checks, stated here too so a registry edit shows
    assert param_count("gpt", "medium") == 58_196_992
    assert param_count("var", "d8") == 41_315_904 and param_count("var", "d12") == 133_186_960


def test_gpt_b_is_111m():
    n = param_count("gpt", "B", vocab_size=16384, layout=[(16, 16)], num_classes=1000)
    assert 110e6 < n < 112e6


def test_unknown_size_is_an_error():
    with pytest.raises(ValueError, match="allowed"):
        build_prior(PriorConfig(kind="gpt", size="huge"), vocab_size=16, layout=[(2, 2)], num_classes=2)


# --------------------------------------------------------------------------- var

SCALES = [1, 2, 3, 4]


def _scale_tokenizer(vocab=48, embed_dim=8):
    """A tiny real msvq tokenizer (random weights, 8×8 images → 4×4 latents), or, where the
    tokenizer package cannot be imported, the stand-in from ``arvision.priors.var`` with the
    same prior-facing interface (``embed_dim``, ``scales``, ``teacher_forcing_input``,
    ``next_scale_input``)."""
    torch.manual_seed(11)
    try:
        from arvision.config import TokenizerConfig
        from arvision.tokenizers import build_tokenizer
    except ImportError:
        from arvision.priors.var import StandInScaleTokenizer

        return StandInScaleTokenizer(vocab, embed_dim, SCALES)
    cfg = TokenizerConfig(kind="msvq", width=8, channel_mult=[1, 2], num_res_blocks=0, codebook_size=vocab,
                          code_dim=embed_dim, scales=SCALES, kmeans_init=False)
    tok = build_tokenizer(cfg, channels=3, resolution=8).eval()
    assert tok.embed_dim == embed_dim and list(tok.scales) == SCALES
    return tok


def _var(vocab=48, seed=0, tok=None, dropout=0.0, drop_path=0.0):
    tok = tok or _scale_tokenizer(vocab)
    torch.manual_seed(seed)
    cfg = PriorConfig(kind="var", size="tiny", dropout=dropout, class_dropout=0.1, drop_path=drop_path)
    model = build_prior(cfg, vocab_size=vocab, layout=[(s, s) for s in SCALES], num_classes=CLASSES, tokenizer=tok)
    with torch.no_grad():  # open the adaLN-zero gates, so every block shapes the output
        for blk in model.blocks:
            blk.ada_lin[-1].bias.normal_(0, 0.5)
    return model.eval()


def test_tokenizer_teacher_forcing_matches_next_scale_chain():
    tok = _scale_tokenizer()
    codes = torch.randint(0, 48, (2, 30))
    tf = tok.teacher_forcing_input(codes)
    assert tf.shape == (2, 30 - 1, 8)
    f_hat, start, parts = None, 0, []
    for k, s in enumerate(SCALES):
        f_hat, nxt = tok.next_scale_input(k, f_hat, codes[:, start : start + s * s])
        start += s * s
        if nxt is not None:
            parts.append(nxt)
    assert nxt is None
    torch.testing.assert_close(torch.cat(parts, 1), tf)


@pytest.mark.parametrize("drop", [0.0, 0.3], ids=["plain", "drop-path+dropout"])
def test_var_kv_cache_matches_full_forward(drop):
    """Scale-by-scale cached logits equal the eval forward; with drop-path and dropout, even in
    training mode (the cached path never regularises)."""
    model = _var(dropout=drop, drop_path=drop)
    codes = torch.randint(0, 48, (3, model.seq_len))
    labels = torch.tensor([0, 3, CLASSES])
    full = model(codes, labels)
    assert full.shape == (3, 30, 48)
    model.train(drop > 0)
    torch.testing.assert_close(model.cached_logits(codes, labels), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_tokens", [1, 4, 9, 64])
def test_var_split_attention_equals_dense_mask(min_tokens):
    """Every grouping of the scales into SDPA calls gives the dense-mask result, and the cached
    (sampling) path agrees with both."""
    model = _var()
    model.split_min_tokens = min_tokens
    codes = torch.randint(0, 48, (3, model.seq_len))
    labels = torch.tensor([0, 3, CLASSES])
    plan = model.split_plan()
    assert plan[0][0] == 0 and plan[-1][1] == model.seq_len
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))  # contiguous, whole scales
    model.set_attention("split")
    split = model(codes, labels)
    model.set_attention("sdpa")
    dense = model(codes, labels)
    torch.testing.assert_close(split, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.cached_logits(codes, labels), split, rtol=1e-5, atol=1e-5)


def test_var_attention_is_block_causal():
    model = _var()
    codes = torch.randint(0, 48, (2, 30))
    changed = codes.clone()
    changed[:, 5:14] = (changed[:, 5:14] + 1) % 48  # scale 3 (3×3 = tokens 5..13)
    labels = torch.tensor([1, 2])
    a, b = model(codes, labels), model(changed, labels)
    # scales 1-3 are predicted from coarser scales only; scale 4 (tokens 14..29) sees scale 3
    torch.testing.assert_close(a[:, :14], b[:, :14])
    assert not torch.allclose(a[:, 14:], b[:, 14:])


def test_var_same_seed_same_samples_and_guidance_one():
    model = _var()
    labels = torch.tensor([0, 1, 2])
    kw = dict(temperature=1.0, top_k=10, top_p=0.95)
    a = model.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), **kw)
    b = model.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), **kw)
    c = model.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(2), **kw)
    assert a.shape == (3, 30) and torch.equal(a, b) and not torch.equal(a, c)
    cond = sample_var(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    batched = sample_var(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(1), force_guidance_batch=True)
    assert torch.equal(cond, batched)


def test_var_tokenizer_is_not_part_of_the_prior(tmp_path):
    tok = _scale_tokenizer()
    model = _var(tok=tok)
    assert not {id(p) for p in model.parameters()} & {id(p) for p in tok.parameters()}
    assert not any(k.startswith(("tokenizer", "_tok")) for k in model.state_dict())
    assert all(not p.requires_grad for p in tok.parameters())
    save_prior(model, tmp_path / "prior")
    again = load_prior(tmp_path / "prior", tokenizer=tok)
    codes = torch.randint(0, 48, (2, 30))
    labels = torch.tensor([1, 4])
    torch.testing.assert_close(again(codes, labels), model(codes, labels))
    bare = load_prior(tmp_path / "prior")  # builds without the tokenizer, but cannot run
    with pytest.raises(RuntimeError, match="tokenizer"):
        bare(codes, labels)


def test_var_trains_with_the_loop():
    from arvision.train.loop import train_prior

    tok = _scale_tokenizer()
    torch.manual_seed(0)
    model = build_prior(PriorConfig(kind="var", size="tiny", dropout=0.0, class_dropout=0.1), vocab_size=48,
                        layout=[(s, s) for s in SCALES], num_classes=CLASSES, tokenizer=tok)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            labels = torch.randint(0, CLASSES, (16,), generator=g)
            yield (labels[:, None] * 9 + torch.randint(0, 3, (16, 30), generator=g)) % 48, labels

    logs = {}
    cfg = PriorConfig(steps=40, lr=3e-3, warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.0, betas=[0.9, 0.95], grad_clip=1.0,
                      ema_decay=0.0, grad_accum=1, log_every=10, checkpoint_every=100, compile=False)
    train_prior(model, batches(), cfg, device=torch.device("cpu"), progress=False, on_log=lambda s, m: logs.__setitem__(s, m["loss"]))
    assert logs[40] < logs[10] - 0.5


def test_swiglu_loads_separate_w1_w3():
    """w1 / w3 are stored stacked as w13; a state dict from before still loads and computes
    ``w2(silu(w1 x) * w3 x)``."""
    from arvision.priors.blocks import SwiGLU

    torch.manual_seed(0)
    ff = SwiGLU(16, 32)
    w1, w3, w2 = torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32)
    ff.load_state_dict({"w1.weight": w1, "w3.weight": w3, "w2.weight": w2})
    x = torch.randn(3, 16)
    ref = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ff(x), ref)


def test_var_sample_loop_with_drawn_noise_equals_sample_var():
    """The CUDA-graph sampler feeds every scale's noise drawn up front; on the same generator
    that gives the codes the eager loop draws as it goes."""
    from arvision.priors.sampling import exp_noise, var_sample_loop

    model = _var()
    labels = torch.tensor([0, 1, 2])
    ref = sample_var(model, labels, cfg_scale=2.0, top_k=10, top_p=0.95, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    noise = [exp_noise((3, s * s, 48), g, torch.device("cpu")) for s in model.scales]
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)])
    with torch.no_grad():
        out = var_sample_loop(model, cond, lambda k, shape: noise[k], (3, 2.0, 1.0, 10, 0.95, True))
    assert torch.equal(out, ref)


def test_gpt_sample_loop_with_drawn_noise_equals_sample_gpt():
    """The whole-sequence graph sampler feeds every step's noise drawn up front and reads exactly
    the filled cache without a mask; on the same generator that gives sample_gpt's codes."""
    from arvision.priors.sampling import exp_noise, gpt_decode_and_sample, gpt_sample_loop

    model = _gpt([(4, 4)], vocab=50)
    labels = torch.tensor([0, 1, 2])
    ref = sample_gpt(model, labels, cfg_scale=2.0, top_k=10, top_p=0.95, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    noise = torch.stack([exp_noise((3, 50), g, torch.device("cpu")) for _ in range(model.seq_len)])
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)])
    model.setup_caches(6)
    with torch.no_grad():
        out = gpt_sample_loop(model, cond, noise, (3, 2.0, 1.0, 10, 0.95, True), gpt_decode_and_sample)
    assert torch.equal(out, ref)
