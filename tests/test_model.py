"""Tests for the decoder (lm/model/transformer.py) and its configuration (lm/config.py): Transformer-XL
memory equivalence, layer selection and validation, training of every variant, norms, outputs, bf16."""

from __future__ import annotations

import math

import pytest
import torch

from lm.config import AttentionConfig, FFNConfig, ModelConfig, select_layers
from lm.errors import ConfigError
from lm.model.attention import ATTENTION, AttnContext, LayerState
from lm.model.transformer import TransformerLM

V = 40
# Every registered variant with Transformer-XL relative positions (the tests below use memory): from the registry.
VARIANTS = sorted(n for n, c in ATTENTION.items() if c.supports_relative)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def make_model(name="softmax", pos="relative", mem_len=0, norm="post", options=None, layers="1:", seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, dropatt=0.0, pos=pos,
                mem_len=mem_len, norm=norm, adaptive=False, cutoffs=[], init_std=0.1,
                attention=AttentionConfig(name=name, layers=layers if name != "softmax" else "all",
                                          options=options or {}))
    base.update(kw)
    return TransformerLM(ModelConfig(**base), vocab_size=V).eval()


def tokens(b=2, t=12, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Transformer-XL memory
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("name, options", [("softmax", {}), ("elliptical", {"estimator": "causal"}),
                                           ("quest", {}), ("qknorm", {}), ("elliptical_quest", {"estimator": "causal"})])
@pytest.mark.parametrize("mem_len", [6, 16])
def test_two_segments_with_memory_equal_one_pass(name, options, mem_len, norm):
    """mem covering the first segment: segment 2 with memory == the second half of one pass (exact)."""
    model = make_model(name, mem_len=mem_len, norm=norm, options=options)
    x = tokens(t=12)
    with torch.no_grad():
        one = model(x, output_hidden_states=True)
        s1 = model(x[:, :6])
        s2 = model(x[:, 6:], mems=s1.mems, output_hidden_states=True)
    torch.testing.assert_close(s1.hidden, one.hidden[:, :6], atol=1e-5, rtol=1e-5)  # causal prefix
    torch.testing.assert_close(s2.hidden, one.hidden[:, 6:], atol=1e-5, rtol=1e-5)
    for a, b in zip(s2.hidden_states, one.hidden_states):
        torch.testing.assert_close(a, b[:, 6:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.log_prob(s2.hidden), model.log_prob(one.hidden[:, 6:]), atol=1e-5, rtol=1e-5)
    # memory: per layer, the layer inputs of the last mem_len positions, detached
    assert len(s1.mems) == 3 and all(m.shape == (2, min(6, mem_len), 16) and not m.requires_grad for m in s1.mems)
    assert all(m.shape == (2, min(12, mem_len), 16) for m in s2.mems)
    torch.testing.assert_close(s1.mems[0], model.embed(x[:, :6])[:, -mem_len:])  # layer 0 input = embeddings


def test_segment_mean_with_memory_differs_from_one_pass():
    """The segment-mean estimate of segment 1 covers only segment 1 in the two-segment run but all 12
    positions in the one pass, so the two disagree (this is why the equality test uses 'causal').

    In segment 2 the first elliptical layer (1) still agrees: its memory (layer-0 outputs) and the values
    it averages over (memory + segment = all 12 positions) are those of the one pass. Layer 2's memory
    holds layer-1 outputs of segment 1, which were computed with the segment-1-only estimate: differs."""
    model = make_model("elliptical", mem_len=16, options={"estimator": "segment_mean"}, init_std=0.3)
    x = tokens(t=12)
    with torch.no_grad():
        one = model(x, output_hidden_states=True)
        s1 = model(x[:, :6], output_hidden_states=True)
        s2 = model(x[:, 6:], mems=s1.mems, output_hidden_states=True)
    torch.testing.assert_close(s1.hidden_states[0], one.hidden_states[0][:, :6], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s1.hidden, one.hidden[:, :6], atol=1e-4)
    torch.testing.assert_close(s2.hidden_states[0], one.hidden_states[0][:, 6:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2.hidden_states[1], one.hidden_states[1][:, 6:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s2.hidden, one.hidden[:, 6:], atol=1e-4)


def test_memory_changes_output_and_is_truncated():
    model = make_model("softmax", mem_len=4)
    x = tokens(t=12)
    with torch.no_grad():
        s1 = model(x[:, :6])
        with_mem = model(x[:, 6:], mems=s1.mems)
        without = model(x[:, 6:])
        longer = model(x[:, 6:], mems=s1.mems, mem_len=10)  # evaluation may use a longer memory
    assert all(m.shape[1] == 4 for m in s1.mems)
    assert not torch.allclose(with_mem.hidden, without.hidden, atol=1e-4)
    assert all(m.shape[1] == 10 for m in longer.mems)


def test_same_length_and_clamp_len_run_and_matter():
    model = make_model("elliptical", mem_len=6, options={"estimator": "causal"}, same_length=True)
    x = tokens(t=12)
    with torch.no_grad():
        s1 = model(x[:, :6])
        a = model(x[:, 6:], mems=s1.mems)
        model.cfg.same_length = False
        b = model(x[:, 6:], mems=s1.mems)
        c = model(x[:, 6:], mems=s1.mems, clamp_len=2)
    assert torch.isfinite(a.hidden).all()
    assert not torch.allclose(a.hidden, b.hidden, atol=1e-5)
    # clamp_len=2 only differs for distances > 2; the first query of segment 2 sees distances 0..6
    assert not torch.allclose(b.hidden, c.hidden, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# select_layers and ModelConfig validation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, n, expected", [
    ("all", 4, [0, 1, 2, 3]),
    (None, 3, [0, 1, 2]),
    ("none", 4, []),
    ("1:", 4, [1, 2, 3]),
    (":2", 4, [0, 1]),
    ("::2", 5, [0, 2, 4]),
    ("1::2", 5, [1, 3]),
    ("-2:", 5, [3, 4]),
    (" 1 : 3 ", 5, [1, 2]),
    ("even", 5, [0, 2, 4]),
    ("odd", 5, [1, 3]),
    ("odd", 1, []),
    ([0, 2], 4, [0, 2]),
    ([3, 1, 1], 4, [1, 3]),
    ([-1], 4, [3]),
    ([-4, 0], 4, [0]),
    ([], 4, []),
])
def test_select_layers(spec, n, expected):
    assert select_layers(spec, n) == expected


@pytest.mark.parametrize("spec, match", [
    ("first", "not a layer selection"),
    ("1:2:3:4", "not a layer selection"),
    ("a:", "must contain integers"),
    ("1.5:", "must contain integers"),
    ([4], "layer 4 does not exist"),
    ([-5], "layer -5 does not exist"),
])
def test_select_layers_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        select_layers(spec, 4, "model.attention.layers")


def test_select_layers_zero_step_is_config_error():
    with pytest.raises(ConfigError, match="invalid"):
        select_layers("::0", 4)


def test_select_layers_single_int():
    assert select_layers(3, 4) == [3]
    with pytest.raises(ConfigError):
        select_layers(7, 4)


def test_attention_typos_fail_before_the_model_draws_a_weight(monkeypatch):
    # The registry check runs first in TransformerLM (the config imports no model code), so a typo fails
    # even where no layer selects the misspelt variant, and before any parameter is initialised.
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match="Did you mean 'elliptical'"):
        TransformerLM(ModelConfig(attention=AttentionConfig(name="ellipitcal", layers="none")), 10)
    with pytest.raises(ConfigError, match="Did you mean 'softmax'"):
        TransformerLM(ModelConfig(attention=AttentionConfig(default="sofmax")), 10)
    with pytest.raises(ConfigError, match="no option 'estimtor'"):
        TransformerLM(ModelConfig(attention=AttentionConfig(name="elliptical", layers=[],
                                                            options={"estimtor": "causal"})), 10)


def test_model_config_bad_layers_fail_at_construction():
    with pytest.raises(ConfigError, match="model.attention.layers"):
        ModelConfig(n_layer=4, attention=AttentionConfig(name="elliptical", layers=[4]))
    with pytest.raises(ConfigError, match="ffn.layers"):
        ModelConfig(n_layer=4, ffn=FFNConfig(name="glam", layers="x"))
    cfg = ModelConfig(n_layer=4, attention=AttentionConfig(name="elliptical", layers="1:"))
    assert cfg.attention_layers() == ["softmax", "elliptical", "elliptical", "elliptical"]
    cfg = ModelConfig(n_layer=4, attention=AttentionConfig(name="quest", layers="odd", default="qknorm"))
    assert cfg.attention_layers() == ["qknorm", "quest", "qknorm", "quest"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(mem_len=8, pos="absolute"), "needs relative positions"),
    (dict(norm="postt"), "Did you mean 'post'"),
    (dict(norm="layer"), "Unknown model.norm"),
    (dict(pos="relativ"), "Did you mean 'relative'"),
    (dict(same_length=True), "same_length"),
    (dict(mem_len=-1, pos="relative"), "mem_len"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_head=0), "n_head"),
    (dict(cutoffs=[200, 100]), "cutoffs"),
])
def test_model_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_model_config_accepts_dict_sections():
    cfg = ModelConfig(attention={"name": "elliptical", "layers": "1:"}, n_layer=2)
    assert isinstance(cfg.attention, AttentionConfig) and cfg.attention_layers() == ["softmax", "elliptical"]
    assert ModelConfig(pos="relative", mem_len=8).mem_len == 8


def test_each_layer_reads_the_previous_layers_values():
    """Elliptical layer l's estimator uses v^{l-1}: the value projection of layer l-1 of *its* input.
    Recompute each block from captured inputs with hand-projected previous values."""
    model = make_model("elliptical", pos="absolute", layers="1:", init_std=0.3, n_layer=4)
    x = tokens()
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.layers]
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        for h in hooks:
            h.remove()

        def values(i):  # [B, H, T, D] value projection of layer i's input, computed here
            w = model.layers[i].attn.qkv.weight[2 * 16:]
            return torch.einsum("btm,om->bto", inputs[i], w).view(2, 12, 2, 8).transpose(1, 2)

        for i in range(1, 4):
            h, state = model.layers[i](inputs[i], None, AttnContext(), LayerState(values=values(i - 1)))
            torch.testing.assert_close(h, out.hidden_states[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(state.values, values(i), atol=1e-6, rtol=1e-6)
            if i >= 2:  # any other layer's values give a different output
                wrong, _ = model.layers[i](inputs[i], None, AttnContext(), LayerState(values=values(0)))
                assert not torch.allclose(wrong, out.hidden_states[i], atol=1e-4)


def test_layer_assignment_in_model():
    model = make_model("elliptical", layers="::2", n_layer=4)
    assert [b.attn.name for b in model.layers] == ["elliptical", "softmax", "elliptical", "softmax"]
    assert [b.attn.layer_idx for b in model.layers] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["absolute", "relative"])
@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_model_trains(name, pos):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, dropout=0.0, pos=pos,
                      adaptive=False, cutoffs=[],
                      attention=AttentionConfig(name=name, layers="all"))
    model = TransformerLM(cfg, vocab_size=V).train()
    pattern = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(1))
    seq = pattern.repeat(4)
    batch = torch.stack([seq[o:o + 17] for o in range(4)])
    x, y = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for step in range(30):
        loss = model.nll(model(x).hidden, y).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"parameters without gradient: {missing}"
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(V), abs=0.3)
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------------
# norms and outputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("name", VARIANTS)
def test_outputs_weights_and_hidden_states(name, norm):
    model = make_model(name, mem_len=4, norm=norm)
    x = tokens(t=6)
    with torch.no_grad():
        s1 = model(x[:, :5])
        out = model(x, mems=s1.mems, need_weights=True, output_hidden_states=True)
        fused = model(x, mems=s1.mems)
    assert out.hidden.shape == (2, 6, 16)
    torch.testing.assert_close(out.hidden, fused.hidden, atol=1e-5, rtol=1e-5)  # math path == fused path
    assert len(out.attentions) == 3
    for w in out.attentions:
        assert w.shape == (2, 2, 6, 4 + 6)  # [B, H, T, M + T]
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))
        assert (w.triu(diagonal=4 + 1) == 0).all()  # no key after the query
    assert fused.attentions is None and fused.hidden_states is None
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 6, 16) for h in out.hidden_states)
    last = out.hidden_states[-1]
    if norm == "post":
        assert isinstance(model.final_norm, torch.nn.Identity)
        torch.testing.assert_close(out.hidden, last)
        # post-LN: every block output is LayerNorm-ed (zero mean over features, at init gain 1 / bias 0)
        torch.testing.assert_close(last.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out.hidden, model.final_norm(last))
        assert not torch.allclose(out.hidden, last)


def test_pre_and_post_norm_differ():
    x = tokens()
    with torch.no_grad():
        a = make_model("elliptical", norm="post")(x).hidden
        b = make_model("elliptical", norm="pre")(x).hidden
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-3)


def test_absolute_positions_matter_and_no_relative_params():
    model = make_model("softmax", pos="absolute")
    assert not any("r_net" in n or "r_w_bias" in n for n, _ in model.named_parameters())
    x = torch.full((1, 6), 3)
    with torch.no_grad():
        h = model(x).hidden
    assert not torch.allclose(h[0, 1], h[0, 4], atol=1e-4)  # same token, different positions


# ----------------------------------------------------------------------------------------------------
# bf16 autocast
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["absolute", "relative"])
@pytest.mark.parametrize("name, options", [("softmax", {}), ("elliptical", {}), ("elliptical", {"estimator": "causal"})])
def test_bf16_autocast_close_to_float32(name, options, pos):
    model = make_model(name, pos=pos, options=options, mem_len=4 if pos == "relative" else 0, init_std=0.2)
    x = tokens(b=4, t=13)
    inp, tgt = x[:, :-1], x[:, 1:]
    seen = []
    hooks = [b.attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for b in model.layers]
    with torch.no_grad():
        mems = model(inp[:, :4]).mems if pos == "relative" else None
        ref = model.nll(model(inp, mems=mems).hidden, tgt).mean()
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inp, mems=mems)
            loss = model.nll(out.hidden, tgt).mean()
    for h in hooks:
        h.remove()
    assert seen == [torch.bfloat16] * 3  # the projections really ran in bf16
    assert out.hidden.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item(), (loss.item(), ref.item())
