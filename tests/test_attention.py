"""Tests for the attention variants (lm/model/attention/*) and the XL position machinery they use.

Every variant's fused path is checked against a deliberately naive reference written here: explicit
per-(query, key) loops, the Elliptical metric recomputed by its own loop from the values, the
Transformer-XL position term built from a sinusoid of the distance ``(M + i) - j`` computed per pair
(which verifies ``rel_shift``/``relative_positions`` independently), and an explicit masked softmax.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lm.config import AttentionConfig, ModelConfig
from lm.errors import ConfigError
from lm.model.attention import ATTENTION, AttnContext, LayerState, build_attention
from lm.model.attention.base import softmax_attention
from lm.model.attention.elliptical import elliptical_metric
from lm.model.positions import attention_mask, relative_positions, rel_shift, sinusoid
from lm.model.transformer import TransformerLM

B, H, D, T = 2, 2, 4, 5
D_MODEL = 8
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------------
def naive_sinusoid(dist: float, d_model: int) -> torch.Tensor:
    """XL layout [sin(d·f_0) … sin(d·f_{n-1}) | cos(d·f_0) … cos(d·f_{n-1})], f_k = 10000^(-2k/d_model)."""
    half = d_model // 2
    out = torch.empty(d_model, dtype=F64)
    for k in range(half):
        f = 1.0 / 10000 ** (2 * k / d_model)
        out[k] = math.sin(dist * f)
        out[half + k] = math.cos(dist * f)
    return out


def naive_metric(v, v_prev, qlen, estimator="segment_mean", normalize="max", reduce="mean") -> torch.Tensor:
    """m̂ per (b, h, query i, d) by explicit loops over python floats -> ``[B, H, qlen, D]`` float64."""
    Bv, Hv, S, Dv = v.shape
    vl, pl = v.detach().double().tolist(), v_prev.detach().double().tolist()
    out = torch.empty(Bv, Hv, qlen, Dv, dtype=F64)
    for b in range(Bv):
        for h in range(Hv):
            for i in range(qlen):
                n_pos = S if estimator == "segment_mean" else S - qlen + i + 1
                m = []
                for d in range(Dv):
                    vals = [abs(vl[b][h][n][d] - pl[b][h][n][d]) for n in range(n_pos)]
                    if reduce == "median":
                        m.append(sorted(vals)[(len(vals) - 1) // 2])  # lower median, like torch.median
                    else:
                        m.append(sum(vals) / len(vals))
                denom = max(m) if normalize == "max" else sum(m) / len(m)
                for d in range(Dv):
                    out[b, h, i, d] = 1.0 if denom == 0 else m[d] / denom
    return out


def naive_attention(q, k, v, *, M, m_hat=None, content_scale, key_norm=False, qk_gain=None, relative=False,
                    u=None, vb=None, w_r=None, d_model=D_MODEL, clamp_len=-1, same_length=False, mem_len=0,
                    stretch_position=False, pos_scale=None):
    """Explicit loops over (query i, key j); vectorised only over batch, heads and head dims.

    score_ij = content_scale · ((q_i + u) ⊙ m̂_i) · k̃_j  +  pos_scale · (q_i + vb)·(W_R R_{dist})
    with dist = (M + i) - j (clamped by clamp_len), keys allowed iff 0 <= dist (and dist < mem_len
    with same_length), then a softmax over the allowed keys and a weighted sum of v.
    """
    q, k, v = q.double(), k.double(), v.double()
    Bq, Hq, Tq, Dq = q.shape
    S = k.shape[2]
    assert S == M + Tq
    pos_scale = 1.0 / math.sqrt(Dq) if pos_scale is None else pos_scale
    scores = torch.zeros(Bq, Hq, Tq, S, dtype=F64)
    allowed = torch.zeros(Tq, S, dtype=torch.bool)
    for i in range(Tq):
        qc = q[:, :, i] + (u.double() if relative else 0.0)
        if qk_gain is not None:
            qc = qc / qc.norm(dim=-1, keepdim=True) * qk_gain
        m = m_hat[:, :, i].double() if m_hat is not None else 1.0
        for j in range(S):
            dist = (M + i) - j
            if dist < 0 or (same_length and dist >= mem_len):
                continue
            allowed[i, j] = True
            kj = k[:, :, j]
            if key_norm:
                kj = kj / kj.norm(dim=-1, keepdim=True)
            s = content_scale * (qc * m * kj).sum(-1)
            if relative:
                d_eff = min(dist, clamp_len) if clamp_len > 0 else dist
                wr = (w_r.double() @ naive_sinusoid(d_eff, d_model)).view(Hq, Dq)
                qp = q[:, :, i] + vb.double()
                if stretch_position:
                    qp = qp * m
                s = s + pos_scale * (qp * wr).sum(-1)
            scores[:, :, i, j] = s
    weights = torch.zeros_like(scores)
    out = torch.zeros(Bq, Hq, Tq, Dq, dtype=F64)
    for i in range(Tq):
        js = [j for j in range(S) if allowed[i, j]]
        mx = scores[:, :, i, js].amax(-1, keepdim=True)
        e = torch.exp(scores[:, :, i, js] - mx)
        w = e / e.sum(-1, keepdim=True)
        for n, j in enumerate(js):
            weights[:, :, i, j] = w[..., n]
            out[:, :, i] += w[..., n, None] * v[:, :, j]
    return out, weights, allowed


# ----------------------------------------------------------------------------------------------------
# the variants and what the reference must do for each
# ----------------------------------------------------------------------------------------------------
ELL_OPTS = [dict(scale=s, estimator=e, normalize=n) for s in ("sqrt", "none")
            for e in ("segment_mean", "causal") for n in ("max", "mean")]
VARIANTS = (
    [("softmax", {}), ("quest", {}), ("qknorm", {}), ("qknorm", {"init_len": 16})]
    + [("elliptical", o) for o in ELL_OPTS]
    + [("elliptical", {"reduce": "median"}), ("elliptical", {"stretch_position": True, "scale": "none"}),
       ("elliptical_quest", {}), ("elliptical_quest", {"estimator": "causal"}),
       ("elliptical_quest", {"scale": "sqrt", "normalize": "mean"})]
)
# (relative, M, same_length, mem_len, clamp_len)
POSITIONS = [
    (False, 0, False, 0, -1),
    (False, 3, False, 0, -1),
    (True, 0, False, 0, -1),
    (True, 3, False, 0, -1),
    (True, 3, True, 4, -1),
    (True, 0, True, 3, -1),
    (True, 3, False, 0, 2),
]


def vid(v):
    name, opts = v
    return name + "".join(f"-{k}={x}" for k, x in opts.items())


def pid(p):
    rel, M, sl, ml, cl = p
    return f"{'rel' if rel else 'abs'}-M{M}" + (f"-same{ml}" if sl else "") + (f"-clamp{cl}" if cl > 0 else "")


def make_module(name, opts, relative, seed=0):
    torch.manual_seed(seed)
    mod = build_attention(name, d_model=D_MODEL, n_head=H, d_head=D, dropatt=0.0, layer_idx=1,
                          relative=relative, options=dict(opts)).eval()
    if relative:  # XL initialises u, v to zero; random values make their placement observable
        with torch.no_grad():
            mod.r_w_bias.normal_()
            mod.r_r_bias.normal_()
    return mod


def make_ctx(T_, M, relative, same_length=False, mem_len=0, clamp_len=-1, need_weights=False):
    S = M + T_
    ctx = AttnContext(mask=attention_mask(T_, M, "cpu", same_length, mem_len), need_weights=need_weights)
    if relative:
        ctx.rel_pos = sinusoid(relative_positions(S, clamp_len, "cpu"), D_MODEL)
    return ctx


def expected_kwargs(mod, name, opts, has_prev, v, v_prev, T_):
    """How the naive reference must score for this variant (from REFERENCE §1-§3, not from the code)."""
    sqrt = 1.0 / math.sqrt(D)
    kw = dict(m_hat=None, content_scale=sqrt, key_norm=False, qk_gain=None)
    if name == "quest":
        kw.update(content_scale=1.0, key_norm=True)
    elif name == "qknorm":
        L = opts.get("init_len", 256)
        kw.update(content_scale=1.0, key_norm=True, qk_gain=math.log2(L * L - L))
    elif name in ("elliptical", "elliptical_quest"):
        default_scale = "sqrt" if name == "elliptical" else "none"
        scale = opts.get("scale", default_scale)
        if has_prev:
            kw["m_hat"] = naive_metric(v, v_prev, T_, opts.get("estimator", "segment_mean"),
                                       opts.get("normalize", "max"), opts.get("reduce", "mean"))
        if name == "elliptical_quest":  # QUEST keys and QUEST's (lack of) temperature also on layer 0
            kw.update(key_norm=True, content_scale=sqrt if scale == "sqrt" else 1.0)
        else:  # layer 0 (no previous values) is ordinary attention with 1/sqrt(D)
            kw["content_scale"] = sqrt if (scale == "sqrt" or not has_prev) else 1.0
        if opts.get("stretch_position") and has_prev:
            kw.update(stretch_position=True, pos_scale=kw["content_scale"])
    return kw


def rand_qkv(M, T_=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = M + T_
    q = torch.randn(B, H, T_, D, generator=g)
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g)
    v_prev = torch.randn(B, H, S, D, generator=g)
    return q, k, v, v_prev


def run_reference(mod, name, opts, q, k, v, v_prev, pos, has_prev):
    relative, M, same_length, mem_len, clamp_len = pos
    kw = expected_kwargs(mod, name, opts, has_prev, v, v_prev, q.shape[2])
    if relative:
        kw.update(relative=True, u=mod.r_w_bias.detach(), vb=mod.r_r_bias.detach(), w_r=mod.r_net.weight.detach(),
                  clamp_len=clamp_len)
    return naive_attention(q, k, v, M=M, same_length=same_length, mem_len=mem_len, **kw)


# ----------------------------------------------------------------------------------------------------
# fused and math paths vs the naive reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", POSITIONS, ids=pid)
@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_attend_matches_naive_reference(variant, pos):
    name, opts = variant
    relative, M, same_length, mem_len, clamp_len = pos
    mod = make_module(name, opts, relative)
    q, k, v, v_prev = rand_qkv(M)
    has_prev = name.startswith("elliptical")
    prev = LayerState(values=v_prev) if has_prev else None
    ref_out, ref_w, allowed = run_reference(mod, name, opts, q, k, v, v_prev, pos, has_prev)

    with torch.no_grad():
        fused, w_none = mod.attend(q, k, v, make_ctx(T, M, relative, same_length, mem_len, clamp_len), prev)
        math_out, w = mod.attend(q, k, v, make_ctx(T, M, relative, same_length, mem_len, clamp_len, True), prev)
    assert w_none is None
    torch.testing.assert_close(fused.double(), ref_out, atol=1e-5, rtol=1e-5)
    # math path: same output, weights are the reference's, rows sum to 1, exact zeros on masked keys
    torch.testing.assert_close(math_out, fused, atol=1e-5, rtol=1e-5)
    assert w.shape == (B, H, T, M + T)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T))
    assert (w[..., ~allowed] == 0).all()


@pytest.mark.parametrize("relative", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("variant", [("softmax", {}), ("elliptical", {}), ("elliptical", {"estimator": "causal"}),
                                     ("quest", {}), ("qknorm", {}), ("elliptical_quest", {})], ids=vid)
def test_full_forward_with_memory_matches_naive(variant, relative):
    """forward(h, mem): q over the segment, k/v over [mem; h] by the bias-free projections, then o."""
    name, opts = variant
    M = 3
    mod = make_module(name, opts, relative)
    g = torch.Generator().manual_seed(5)
    h, mem = torch.randn(B, T, D_MODEL, generator=g), torch.randn(B, M, D_MODEL, generator=g)
    has_prev = name.startswith("elliptical")
    v_prev = torch.randn(B, H, M + T, D, generator=g)
    prev = LayerState(values=v_prev) if has_prev else None
    with torch.no_grad():
        out, state = mod(h, mem, make_ctx(T, M, relative), prev)

    x = torch.cat([mem, h], 1).double()
    W = mod.qkv.weight.detach().double()  # rows: [q heads | k heads | v heads], each head d_head rows
    per = H * D

    def heads(rows):  # [B, S, H*D] -> [B, H, S, D]
        return torch.einsum("bsm,om->bso", x, rows).view(B, M + T, H, D).permute(0, 2, 1, 3)

    q, k, v = heads(W[:per])[:, :, M:], heads(W[per:2 * per]), heads(W[2 * per:])
    torch.testing.assert_close(state.values.double(), v, atol=1e-6, rtol=1e-6)  # handed on: [mem; seg] values
    ref, _, _ = run_reference(mod, name, opts, q, k, v, v_prev, (relative, M, False, 0, -1), has_prev)
    ref = torch.einsum("bhtd,ohd->bto", ref, mod.o.weight.detach().double().view(D_MODEL, H, D))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_rel_shift_against_gather():
    """x[..., i, p] with p <-> distance S-1-p becomes out[i, j] = x[i, (S-1) - ((S-T+i) - j)] for j <= S-T+i."""
    Tq, S = 4, 7
    x = torch.randn(2, Tq, S)
    out = rel_shift(x)
    for i in range(Tq):
        for j in range(S - Tq + i + 1):
            assert out[:, i, j].tolist() == x[:, i, (S - 1) - ((S - Tq + i) - j)].tolist()


def test_attention_mask_rule():
    for Tq, M, sl, ml in [(5, 0, False, 0), (5, 3, False, 0), (5, 3, True, 4), (5, 3, True, 3), (4, 0, True, 2),
                          (3, 2, True, 10)]:
        mask = attention_mask(Tq, M, "cpu", sl, ml)
        if M == 0 and not sl:
            assert mask is None
            continue
        for i in range(Tq):
            for j in range(M + Tq):
                dist = M + i - j
                assert bool(mask[i, j]) == (dist >= 0 and (not sl or dist < ml)), (Tq, M, sl, ml, i, j)


def test_softmax_attention_mask_none_is_bottom_right_causal_in_both_paths():
    """mask=None means causal with the query block at the end of the keys; fused == math even when S > T."""
    q, k, v, _ = rand_qkv(3)
    fused, _ = softmax_attention(q, k, v, None, None, 0.5)
    math_out, w = softmax_attention(q, k, v, None, None, 0.5, need_weights=True)
    torch.testing.assert_close(fused, math_out, atol=1e-6, rtol=1e-6)
    explicit, _ = softmax_attention(q, k, v, None, attention_mask(T, 3, "cpu"), 0.5)
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# the Elliptical estimator
# ----------------------------------------------------------------------------------------------------
V_SMALL = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 1.0]])[None, None]  # [1, 1, S=3, D=3]
VP_SMALL = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]])[None, None]
# |v - v_prev| = [[1, 2, 3], [0, 1, 0], [2, 1, 3]]; column means [1, 4/3, 2]; lower medians [1, 1, 3]


@pytest.mark.parametrize("kwargs, qlen, expected", [
    (dict(), 3, [[0.5, 2 / 3, 1.0]]),
    (dict(normalize="mean"), 3, [[9 / 13, 12 / 13, 18 / 13]]),  # means / (13/9)
    (dict(reduce="median"), 3, [[1 / 3, 1 / 3, 1.0]]),
    # causal, 1 memory position + 2 queries: query 0 sees rows 0-1 -> means [.5, 1.5, 1.5]; query 1 all rows
    (dict(estimator="causal"), 2, [[1 / 3, 1.0, 1.0], [0.5, 2 / 3, 1.0]]),
    # causal, no memory: query 0 sees row 0 only -> [1, 2, 3]/3; query 1 rows 0-1; query 2 all
    (dict(estimator="causal"), 3, [[1 / 3, 2 / 3, 1.0], [1 / 3, 1.0, 1.0], [0.5, 2 / 3, 1.0]]),
    (dict(estimator="causal", normalize="mean"), 2, [[0.5 / (7 / 6), 1.5 / (7 / 6), 1.5 / (7 / 6)],
                                                     [9 / 13, 12 / 13, 18 / 13]]),
])
def test_metric_hand_computed(kwargs, qlen, expected):
    m = elliptical_metric(V_SMALL, VP_SMALL, qlen, **kwargs)
    exp = torch.tensor(expected)[None, None]
    assert m.shape == exp.shape
    torch.testing.assert_close(m, exp)


@pytest.mark.parametrize("estimator", ["segment_mean", "causal"])
def test_metric_matches_loop_and_max_is_exactly_one(estimator):
    q, k, v, v_prev = rand_qkv(3)
    m = elliptical_metric(v, v_prev, T, estimator)
    ref = naive_metric(v, v_prev, T, estimator)
    torch.testing.assert_close(m.double().expand_as(ref), ref, atol=1e-6, rtol=1e-6)
    assert (m.amax(-1) == 1.0).all()  # exactly 1: the max entry is divided by itself
    assert (m > 0).all() and (m <= 1).all()


def test_metric_is_per_sequence_and_head():
    """One vector per (b, h): changing sequence 1 / head 1 leaves m̂ of sequence 0 / head 0 unchanged."""
    _, _, v, v_prev = rand_qkv(0)
    m = elliptical_metric(v, v_prev, T)
    v2 = v.clone()
    v2[1, 1] *= 5.0
    v2[1, 1, :, 0] += 3.0
    m2 = elliptical_metric(v2, v_prev, T)
    assert torch.equal(m[0], m2[0]) and torch.equal(m[1, 0], m2[1, 0])
    assert not torch.allclose(m[1, 1], m2[1, 1])


@pytest.mark.parametrize("estimator", ["segment_mean", "causal"])
def test_metric_has_no_gradient(estimator):
    mod = make_module("elliptical", {"estimator": estimator}, relative=True)
    q, k, v, v_prev = rand_qkv(3)
    q, k, v, v_prev = (t.clone().requires_grad_() for t in (q, k, v, v_prev))
    m = elliptical_metric(v, v_prev, T, estimator)
    assert not m.requires_grad
    ctx = make_ctx(T, 3, True)
    out, _ = mod.attend(q, k, v, ctx, LayerState(values=v_prev))
    gq, gk, gv, gp = torch.autograd.grad((out * torch.linspace(-1, 1, D)).sum(), [q, k, v, v_prev], allow_unused=True)
    assert gp is None or (gp == 0).all()  # the previous layer's values only enter through detached m̂
    # gradients w.r.t. q, k, v are those of attention with m̂ a constant: nothing flows through m̂(v)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _, _ = naive_attention(q2, k2, v2, M=3, m_hat=naive_metric(v, v_prev, T, estimator),
                                content_scale=1 / math.sqrt(D), relative=True, u=mod.r_w_bias.detach(),
                                vb=mod.r_r_bias.detach(), w_r=mod.r_net.weight.detach())
    rq, rk, rv = torch.autograd.grad((ref * torch.linspace(-1, 1, D, dtype=F64)).sum(), [q2, k2, v2])
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_metric_all_equal_values_gives_ones_and_finite_output():
    q, k, v, _ = rand_qkv(3)
    for estimator in ("segment_mean", "causal"):
        for normalize in ("max", "mean"):
            m = elliptical_metric(v, v.clone(), T, estimator, normalize)
            assert torch.equal(m, torch.ones_like(m))
    m = elliptical_metric(v, v.clone(), T, "segment_mean", reduce="median")
    assert torch.equal(m, torch.ones_like(m))
    mod = make_module("elliptical", {}, relative=True)
    out, _ = mod.attend(q, k, v, make_ctx(T, 3, True), LayerState(values=v.clone()))
    assert torch.isfinite(out).all()
    # a zero diff in some coordinates only (not the whole head) is fine too: those m̂_d are 0
    vp = v.clone()
    vp[..., 1] += 1.0
    m = elliptical_metric(v, vp, T)
    assert torch.isfinite(m).all() and (m[..., 1] == 1).all() and torch.allclose(m[..., 0], torch.zeros(()))


@pytest.mark.parametrize("relative", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("name, opts", [("elliptical", {}), ("elliptical", {"scale": "none"}),
                                        ("elliptical", {"estimator": "causal"})])
def test_layer0_without_prev_is_standard_attention(name, opts, relative):
    ell = make_module(name, opts, relative)
    std = make_module("softmax", {}, relative, seed=7)
    std.load_state_dict(ell.state_dict())  # same parameter names: the very same weights
    g = torch.Generator().manual_seed(3)
    h, mem = torch.randn(B, T, D_MODEL, generator=g), torch.randn(B, 3, D_MODEL, generator=g)
    for m, M in ((mem, 3), (None, 0)):
        ctx = make_ctx(T, M, relative) if (relative or M) else AttnContext()
        with torch.no_grad():
            a, sa = ell(h, m, ctx, None)
            b, sb = std(h, m, ctx, None)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sa.values, sb.values)


@pytest.mark.parametrize("relative", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("estimator", ["segment_mean", "causal"])
def test_unit_metric_equals_standard_attention(estimator, relative):
    """v_prev = v + 0.5 gives |diff| = 0.5 everywhere -> m̂ ≡ 1; with scale sqrt this is plain attention."""
    q, k, v, _ = rand_qkv(3)
    v_prev = v + 0.5
    m = elliptical_metric(v, v_prev, T, estimator)
    torch.testing.assert_close(m, torch.ones_like(m))
    ctx = make_ctx(T, 3, relative)
    ell = make_module("elliptical", {"scale": "sqrt", "estimator": estimator}, relative)
    std = make_module("softmax", {}, relative)
    std.load_state_dict(ell.state_dict())
    with torch.no_grad():
        a, _ = ell.attend(q, k, v, ctx, LayerState(values=v_prev))
        b, _ = std.attend(q, k, v, ctx, None)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        # the released WikiText code's scale (none) is a different, sharper attention
        c, _ = make_module("elliptical", {"scale": "none", "estimator": estimator}, relative).attend(
            q, k, v, ctx, LayerState(values=v_prev))
        assert not torch.allclose(c, b, atol=1e-3)


def test_metric_stretches_scores():
    """A non-trivial m̂ changes the output (the estimator is actually wired into the scores)."""
    q, k, v, v_prev = rand_qkv(0)
    mod = make_module("elliptical", {}, relative=False)
    ctx = make_ctx(T, 0, False)
    a, _ = mod.attend(q, k, v, ctx, LayerState(values=v_prev))
    b, _ = mod.attend(q, k, v, ctx, None)
    assert not torch.allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# QUEST / QKNorm
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("name", ["quest", "elliptical_quest", "qknorm"])
def test_key_scale_invariance(name, relative):
    mod = make_module(name, {}, relative)
    q, k, v, v_prev = rand_qkv(3)
    prev = LayerState(values=v_prev) if name == "elliptical_quest" else None
    ctx = make_ctx(T, 3, relative)
    with torch.no_grad():
        a, _ = mod.attend(q, k, v, ctx, prev)
        b, _ = mod.attend(q, k * 7.3, v, ctx, prev)
        # per-key positive scales too: each key is normalised on its own
        c, _ = mod.attend(q, k * torch.rand(1, 1, 8, 1).add(0.1), v, ctx, prev)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
    # via the module: scale the key rows of the qkv projection by a positive constant
    g = torch.Generator().manual_seed(4)
    h, mem = torch.randn(B, T, D_MODEL, generator=g), torch.randn(B, 3, D_MODEL, generator=g)
    prev_full = LayerState(values=torch.randn(B, H, 3 + T, D, generator=g)) if prev else None
    with torch.no_grad():
        o1, _ = mod(h, mem, ctx, prev_full)
        mod.qkv.weight[H * D:2 * H * D] *= 4.0
        o2, _ = mod(h, mem, ctx, prev_full)
    torch.testing.assert_close(o1, o2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("relative", [False, True], ids=["abs", "rel"])
def test_elliptical_quest_layer0_is_plain_quest(relative):
    """Without previous values Elliptical-QUEST is QUEST (normalised keys, scale 1), not softmax."""
    eq = make_module("elliptical_quest", {}, relative)
    quest = make_module("quest", {}, relative, seed=9)
    quest.load_state_dict(eq.state_dict())
    q, k, v, _ = rand_qkv(3)
    ctx = make_ctx(T, 3, relative)
    with torch.no_grad():
        a, _ = eq.attend(q, k, v, ctx, None)
        b, _ = quest.attend(q, k, v, ctx, None)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    ref, _, _ = run_reference(eq, "elliptical_quest", {}, q, k, v, None, (relative, 3, False, 0, -1), False)
    torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)


def test_softmax_is_not_key_scale_invariant():
    """Control for the test above: standard attention does change when keys grow."""
    mod = make_module("softmax", {}, False)
    q, k, v, _ = rand_qkv(0)
    a, _ = mod.attend(q, k, v, AttnContext(), None)
    b, _ = mod.attend(q, k * 7.3, v, AttnContext(), None)
    assert not torch.allclose(a, b, atol=1e-3)


def test_quest_query_norm_sets_sharpness():
    """QUEST keeps raw queries: scaling a query up sharpens its attention towards the best key."""
    mod = make_module("quest", {}, False)
    q, k, v, _ = rand_qkv(0)
    ctx = AttnContext(need_weights=True)
    _, w1 = mod.attend(q, k, v, ctx, None)
    _, w2 = mod.attend(q * 10, k, v, ctx, None)
    ent = lambda w: -(w * w.clamp_min(1e-30).log()).sum(-1)  # noqa: E731
    assert (ent(w2)[..., 1:] < ent(w1)[..., 1:]).all()


@pytest.mark.parametrize("L", [256, 16, 2])
def test_qknorm_gain_init(L):
    mod = build_attention("qknorm", d_model=D_MODEL, n_head=H, d_head=D, options={"init_len": L})
    assert mod.gain.ndim == 0 and mod.gain.requires_grad
    assert mod.gain.item() == pytest.approx(math.log2(L * L - L), rel=1e-6)
    assert build_attention("qknorm", d_model=D_MODEL, n_head=H, d_head=D).gain.item() == pytest.approx(
        math.log2(256 * 255), rel=1e-6)
    with pytest.raises(ConfigError, match="init_len"):
        build_attention("qknorm", d_model=D_MODEL, n_head=H, d_head=D, options={"init_len": 1})


# ----------------------------------------------------------------------------------------------------
# causality in the full model
# ----------------------------------------------------------------------------------------------------
def ell_model(estimator, pos="absolute", mem_len=0, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, pos=pos, mem_len=mem_len,
                      adaptive=False, cutoffs=[], init_std=0.3,
                      attention=AttentionConfig(name="elliptical", layers="1:", options={"estimator": estimator}))
    return TransformerLM(cfg, vocab_size=40).eval()


def change_after(tokens, i):
    t2 = tokens.clone()
    t2[:, i + 1:] = (t2[:, i + 1:] + 7) % 40
    return t2


@pytest.mark.parametrize("pos", ["absolute", "relative"])
def test_causal_estimator_is_causal(pos):
    mem_len = 6 if pos == "relative" else 0
    model = ell_model("causal", pos, mem_len)
    assert [type(b.attn).__name__ for b in model.layers] == ["SoftmaxAttention", "EllipticalAttention",
                                                              "EllipticalAttention"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (2, 10), generator=g)
    with torch.no_grad():
        mems = model(torch.randint(0, 40, (2, 6), generator=g)).mems if mem_len else None
        base = model(tokens, mems=mems, output_hidden_states=True)
        for i in (0, 3, 8):
            alt = model(change_after(tokens, i), mems=mems, output_hidden_states=True)
            for hb, ha in zip(base.hidden_states, alt.hidden_states):
                torch.testing.assert_close(ha[:, :i + 1], hb[:, :i + 1], atol=1e-6, rtol=1e-6)
                assert not torch.allclose(ha[:, i + 1:], hb[:, i + 1:])  # the change did reach later positions


@pytest.mark.parametrize("pos", ["absolute", "relative"])
def test_segment_mean_estimator_leaks_future(pos):
    """Documents the released code's behaviour: the segment-mean stretch of query i depends (detached)
    on later tokens, so an earlier position's output changes when a later token changes."""
    mem_len = 6 if pos == "relative" else 0
    model = ell_model("segment_mean", pos, mem_len)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (2, 10), generator=g)
    with torch.no_grad():
        mems = model(torch.randint(0, 40, (2, 6), generator=g)).mems if mem_len else None
        base = model(tokens, mems=mems, output_hidden_states=True)
        alt = model(change_after(tokens, 3), mems=mems, output_hidden_states=True)
    # layer 0 is standard attention: causal; the elliptical layers leak
    torch.testing.assert_close(alt.hidden_states[0][:, :4], base.hidden_states[0][:, :4], atol=1e-6, rtol=1e-6)
    diff = (alt.hidden_states[-1][:, :4] - base.hidden_states[-1][:, :4]).abs().max()
    assert diff > 1e-4


# ----------------------------------------------------------------------------------------------------
# the fused kernel is really used
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["absolute", "relative"])
@pytest.mark.parametrize("name, layers", [("elliptical", "1:"), ("quest", "all"), ("qknorm", "all"),
                                          ("elliptical_quest", "all")])
def test_fused_sdpa_path_is_used(name, layers, pos, monkeypatch):
    """A plain forward (no attention maps wanted) runs exactly one ``scaled_dot_product_attention`` per
    layer and never the explicit math path (no ``torch.softmax``, ``need_weights`` False, a float scale):
    absolute positions (is_causal, no mask), and relative positions over [memory; segment] (float bias
    mask). The fused outputs equal the math path's (``need_weights=True``)."""
    import lm.model.attention.base as base

    n_layer, mem_len = 3, (6 if pos == "relative" else 0)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=n_layer, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, pos=pos,
                      mem_len=mem_len, adaptive=False, cutoffs=[], init_std=0.3,
                      attention=AttentionConfig(name=name, layers=layers))
    model = TransformerLM(cfg, vocab_size=40).eval()
    assert [b.attn.name for b in model.layers] == cfg.attention_layers()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (2, 10), generator=g)
    with torch.no_grad():
        mems = model(torch.randint(0, 40, (2, 6), generator=g)).mems if mem_len else None
        assert mems is None or mems[0].size(1) == mem_len
        reference = model(tokens, mems=mems, need_weights=True)  # the explicit math path

    sdpa_calls, softmax_calls, attention_calls = [], [], []
    real_sdpa, real_attention = torch.nn.functional.scaled_dot_product_attention, base.softmax_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        sdpa_calls.append((tuple(q.shape), tuple(k.shape), attn_mask, is_causal))
        return real_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    def attention(q, k, v, bias, mask, scale, dropout_p=0.0, need_weights=False):
        attention_calls.append((need_weights, torch.is_tensor(scale)))
        return real_attention(q, k, v, bias, mask, scale, dropout_p, need_weights)

    def no_softmax(*a, **kw):
        softmax_calls.append(1)
        raise AssertionError("the explicit softmax (math) path was taken")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(base, "softmax_attention", attention)
    monkeypatch.setattr(torch, "softmax", no_softmax)
    with torch.no_grad():
        out = model(tokens, mems=mems)
    monkeypatch.undo()

    assert len(sdpa_calls) == n_layer and not softmax_calls
    assert attention_calls == [(False, False)] * n_layer  # need_weights False, scale a Python float
    assert out.attentions is None
    for q_shape, k_shape, attn_mask, is_causal in sdpa_calls:
        assert q_shape == (2, 2, 10, 8) and k_shape == (2, 2, 10 + mem_len, 8)
        if pos == "absolute":  # no memory: SDPA's own causal mask, nothing materialised
            assert is_causal and attn_mask is None
        else:  # XL: position term + memory mask as one float bias, -inf above the causal diagonal
            assert not is_causal and attn_mask.dtype == torch.float32 and attn_mask.shape[-2:] == (10, 10 + mem_len)
            assert torch.isinf(attn_mask[..., 0, mem_len + 1:]).all() and torch.isfinite(attn_mask[..., -1, :]).all()
    torch.testing.assert_close(out.hidden, reference.hidden, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------
def test_registry_has_all_variants():
    assert {"softmax", "elliptical", "quest", "qknorm", "elliptical_quest"} <= set(ATTENTION)


def test_unknown_variant_suggests_closest():
    with pytest.raises(ConfigError, match="Did you mean 'elliptical'") as e:
        build_attention("ellipitcal", d_model=D_MODEL, n_head=H, d_head=D)
    assert "ellipitcal" in str(e.value)
    with pytest.raises(ConfigError, match="Did you mean 'elliptical'"):  # and when the model is built
        TransformerLM(ModelConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, adaptive=False, cutoffs=[],
                                  attention=AttentionConfig(name="ellipitcal")), 10)


@pytest.mark.parametrize("name, options, names, suggestion", [
    ("elliptical", {"estimater": "causal"}, "estimater", "estimator"),
    ("elliptical", {"normalise": "max"}, "normalise", "normalize"),
    ("qknorm", {"init_length": 8}, "init_length", "init_len"),
    ("elliptical_quest", {"scael": "sqrt"}, "scael", "scale"),
])
def test_unknown_option_names_it_and_suggests(name, options, names, suggestion):
    with pytest.raises(ConfigError) as e:
        build_attention(name, d_model=D_MODEL, n_head=H, d_head=D, options=options)
    msg = str(e.value)
    assert f"'{names}'" in msg and f"Did you mean '{suggestion}'" in msg


def test_option_without_options_and_bad_values():
    with pytest.raises(ConfigError, match="no option 'scale'"):
        build_attention("softmax", d_model=D_MODEL, n_head=H, d_head=D, options={"scale": "none"})
    with pytest.raises(ConfigError, match="Did you mean 'sqrt'"):
        build_attention("elliptical", d_model=D_MODEL, n_head=H, d_head=D, options={"scale": "sqr"})
    with pytest.raises(ConfigError, match="Did you mean 'causal'"):
        build_attention("elliptical", d_model=D_MODEL, n_head=H, d_head=D, options={"estimator": "casual"})


def test_incompatible_options_fail_at_construction():
    with pytest.raises(ConfigError, match="median"):
        build_attention("elliptical", d_model=D_MODEL, n_head=H, d_head=D,
                        options={"estimator": "causal", "reduce": "median"})
    with pytest.raises(ConfigError, match="median"):  # and when the model is built
        TransformerLM(ModelConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, adaptive=False, cutoffs=[],
                                  attention=AttentionConfig(name="elliptical",
                                                            options={"estimator": "causal", "reduce": "median"})), 10)


def test_mismatched_previous_values_are_reported():
    mod = make_module("elliptical", {}, False)
    q, k, v, _ = rand_qkv(0)
    with pytest.raises(ConfigError, match="do not match"):
        mod.attend(q, k, v, AttnContext(), LayerState(values=torch.randn(B, H, T, D + 1)))


def test_options_dataclass_is_typed():
    """The parsed options are the variant's dataclass (defaults filled in)."""
    mod = build_attention("elliptical", d_model=D_MODEL, n_head=H, d_head=D, options={"scale": "none"})
    assert dataclasses.asdict(mod.opts) == dict(scale="none", estimator="segment_mean", normalize="max",
                                                reduce="mean", stretch_position=False)
    assert build_attention("elliptical_quest", d_model=D_MODEL, n_head=H, d_head=D).opts.scale == "none"


@pytest.mark.parametrize("estimator,reduce", [("segment_mean", "mean"), ("segment_mean", "median"), ("causal", "mean")])
def test_metric_with_key_mask_equals_metric_on_the_real_positions(estimator, reduce):
    # Left padding: row b's first n_pad[b] positions are pads. The masked estimate must equal the plain
    # estimate computed on that row's real positions alone (the sentence without padding).
    g = torch.Generator().manual_seed(3)
    B, H, S, D = 3, 2, 7, 5
    v, vp = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    n_pad = torch.tensor([0, 3, 5])
    keep = torch.arange(S)[None, :] >= n_pad[:, None]
    m = elliptical_metric(v, vp, S, estimator, "max", reduce, key_mask=keep)
    for b in range(B):
        p = int(n_pad[b])
        alone = elliptical_metric(v[b:b + 1, :, p:], vp[b:b + 1, :, p:], S - p, estimator, "max", reduce)
        got = m[b:b + 1] if estimator == "segment_mean" else m[b:b + 1, :, p:]
        torch.testing.assert_close(got, alone)


def test_softmax_family_variants_only_transform_scores():
    """Elliptical, Elliptical-QUEST, QUEST, QKNorm are ``score_transform`` variants: the base class's
    ``attend`` (fused/math paths, position term) is the only softmax attention, so none re-implements it."""
    from lm.model.attention.base import Attention

    for name in ("softmax", "elliptical", "elliptical_quest", "quest", "qknorm"):
        cls = ATTENTION[name]
        assert cls.attend is Attention.attend, f"{name} re-implements attend"
        for private_hook in ("key_transform", "content_scale"):
            assert not hasattr(cls, private_hook), f"{name}.{private_hook} is back"
