"""The Elliptical paper's Table 1 baselines (lm/model/attention/baselines/).

Every variant's ``attend`` is checked against a naive per-query loop of its formula, written here
independently in float64 from the math (not from the implementation), with and without memory.
Then causality in a real 2-layer decoder, the variant-specific properties, and a short training run.
"""

from __future__ import annotations

import math

import pytest
import torch

from lm.config import AttentionConfig, ModelConfig
from lm.errors import ConfigError
from lm.model.attention import ATTENTION, AttnContext, build_attention
from lm.model.attention.base import causal
from lm.model.attention.baselines.performer import gaussian_features
from lm.model.attention.baselines.rkde import huber_irls
from lm.model.attention.baselines.spkde import project_simplex, spkde_weights
from lm.model.transformer import TransformerLM

VARIANTS = ["performer", "mgk", "fourier", "rkde", "spkde", "mom"]
H, D = 2, 8


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: tiny tensors, one thread


def make(name: str, **options):
    torch.manual_seed(0)
    return build_attention(name, d_model=16, n_head=H, d_head=D, options=options).double().eval()


def inputs(name: str, T: int, S: int, seed: int = 0, scale: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, T, D, generator=g, dtype=torch.float64) * scale
    kshape = (2, H, 2, S, D) if name == "mgk" else (2, H, S, D)
    k = torch.randn(*kshape, generator=g, dtype=torch.float64) * scale
    v = torch.randn(2, H, S, D, generator=g, dtype=torch.float64)
    return q, k, v


def ctx_for(T: int, S: int) -> AttnContext:
    return AttnContext() if S == T else AttnContext(mask=causal(T, S, "cpu"))


# ---------------------------------------------------------------- naive references (float64 loops)
def ref_performer(m, q, k, v, i, vis):
    w = m.omega.double()
    def phi(x):
        x = x * D ** -0.25
        return torch.exp(w @ x - x @ x / 2) / math.sqrt(w.size(0))
    num, den = torch.zeros(D, dtype=torch.float64), 0.0
    for j in vis:
        s = phi(q[i]) @ phi(k[j])
        num, den = num + s * v[j], den + s
    return num / den


def ref_mgk(m, h, q, k, v, i, vis):
    var = m.log_var.detach()[h].exp()
    pi = torch.softmax(m.mix_logits.detach()[h], 0)
    a = torch.stack([sum(pi[r] * torch.exp(-((q[i] - k[r, j]) ** 2).sum() / (2 * var[r])) for r in range(2))
                     for j in vis])
    return (a[:, None] * v[vis]).sum(0) / a.sum()


def ref_fourier(m, h, q, k, v, i, vis):
    R = m.r.detach()[h]
    a = torch.stack([torch.prod((torch.sin(R * (q[i] - k[j])) / (R * (q[i] - k[j]))) ** 4) for j in vis])
    return (a[:, None] * v[vis]).sum(0) / a.sum()


def gauss(x, y, sigma):
    return torch.exp(-((x - y) ** 2).sum(-1) / (2 * sigma**2))


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def rkde_ref_weights(kv, sigma, n_iters, threshold):
    """Kim & Scott's kernelised IRLS on the keys ``kv [n, D]`` (already unit-norm)."""
    n = kv.size(0)
    K = torch.stack([torch.stack([gauss(kv[a], kv[b], sigma) for b in range(n)]) for a in range(n)])
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    c = threshold
    for it in range(n_iters):
        r = torch.stack([(K[j, j] - 2 * (w * K[j]).sum() + w @ K @ w).clamp_min(0).sqrt() for j in range(n)])
        if c is None and it == 0:
            c = max(sorted(r.tolist())[(n - 1) // 2], 1e-4)  # lower median, floored
        u = torch.tensor([1.0 if rj <= c else c / rj for rj in r.tolist()], dtype=torch.float64)
        w = u / u.sum()
    return w


def simplex_bisect(u):
    """Projection onto the simplex by bisection on θ (Σ max(u − θ, 0) = 1): independent of sorting."""
    lo, hi = u.min().item() - 1.0, u.max().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        if (u - mid).clamp_min(0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return (u - (lo + hi) / 2).clamp_min(0)


def spkde_ref_weights(kv, sigma, beta, n_steps):
    n = kv.size(0)
    K = torch.stack([torch.stack([gauss(kv[a], kv[b], sigma) for b in range(n)]) for a in range(n)])
    t = beta / n * K.sum(1)
    L = K.sum(1).max()  # Gershgorin bound on λ_max
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(n_steps):
        w = simplex_bisect(w - (K @ w - t) / L)
    return w


def kde_attention(m, qi, kv, vv, w, sigma, w_num=None):
    """Σ_j w_num_j κ(q, k̂_j) v_j / Σ_j w_j κ(q, k̂_j) (q̂ with normalize_query); w_num = w: rows on the simplex."""
    kern = gauss(unit(qi) if m.opts.normalize_query else qi, kv, sigma)
    w_num = w if w_num is None else w_num
    return ((w_num * kern)[:, None] * vv).sum(0) / (w * kern).sum()


def joint(kv, vv):
    """The reference's joint vectors [k̂_j; v_j] (its ``torch.cat((k, v), -1)``)."""
    return torch.cat([kv, vv], -1)


def ref_rkde(m, h, q, k, v, i, vis):
    sigma = m.log_bandwidth.detach()[h].exp()
    kv = unit(k[vis])
    w = rkde_ref_weights(kv, sigma, m.opts.n_iters, m.opts.threshold)
    w_num = rkde_ref_weights(joint(kv, v[vis]), sigma, m.opts.n_iters, m.opts.threshold) \
        if m.opts.weighting == "joint" else None
    return kde_attention(m, q[i], kv, v[vis], w, sigma, w_num)


def ref_spkde(m, h, q, k, v, i, vis):
    sigma = m.log_bandwidth.detach()[h].exp()
    kv = unit(k[vis])
    w = spkde_ref_weights(kv, sigma, m.opts.beta, m.opts.n_steps)
    w_num = spkde_ref_weights(joint(kv, v[vis]), sigma, m.opts.beta, m.opts.n_steps) \
        if m.opts.weighting == "joint" else None
    return kde_attention(m, q[i], kv, v[vis], w, sigma, w_num)


def mom_block_scores(qs, ks, member, i, M, score):
    """Per block: Σ (or mean) over queries i' <= i and visible block keys of log κ = −‖q − k̂‖²/√D;
    None for a block with no key visible to query i."""
    out = []
    for blk in member:
        terms = [-((qs[a] - unit(ks[j])) ** 2).sum().item() / math.sqrt(D)
                 for a in range(i + 1) for j in range(M + a + 1) if blk[j]]
        if not any(blk[j] for j in range(M + i + 1)):
            out.append(None)
        else:
            out.append(sum(terms) / (len(terms) if score == "mean" else 1))
    return out


def mom_attend(qi, ks, vs, keys):
    """softmax over the chosen keys of −‖q − k̂‖²/√D (the reference's Gaussian kernel on unit keys)."""
    s = torch.stack([-((qi - unit(ks[j])) ** 2).sum() / math.sqrt(D) for j in keys])
    return (torch.softmax(s, 0)[:, None] * vs[keys]).sum(0)


def ref_mom(m, h, q, k, v, i, vis):
    if m.opts.mode == "random":
        member = m.partition(k.size(0), "cpu").tolist()  # the draw is an input; eval draws are seeded
        scores = mom_block_scores(q, k, member, i, len(vis) - i - 1, m.opts.block_score)
        ranked = sorted((sc, b) for b, sc in enumerate(scores) if sc is not None)
        b = ranked[len(ranked) // 2][1]  # the reference's argsort(likelihood)[K // 2]
        return mom_attend(q[i], k, v, [j for j in vis if member[b][j]])
    return ref_mom_contiguous(m, h, q, k, v, i, vis)


def ref_mom_contiguous(m, h, q, k, v, i, vis):
    n = len(vis)
    K = min(m.opts.n_blocks, n)
    blocks = [[vis[r] for r in range(n) if r * K // n == b] for b in range(K)]
    s = [(q[i] @ k[j]).item() / math.sqrt(D) for j in vis]
    means = [sum(math.exp((q[i] @ k[j]).item() / math.sqrt(D)) for j in blk) / len(blk) for blk in blocks]
    order = sorted(range(K), key=lambda b: (means[b], b))
    blk = blocks[order[(K - 1) // 2]]
    s = torch.stack([q[i] @ k[j] / math.sqrt(D) for j in blk])
    return (torch.softmax(s, 0)[:, None] * v[blk]).sum(0)


REFS = {"performer": ref_performer, "mgk": ref_mgk, "fourier": ref_fourier, "rkde": ref_rkde,
        "spkde": ref_spkde, "mom": ref_mom}

OPTIONS = {  # non-default settings exercise more of each formula
    "performer": {"n_features": 24, "chunk_size": 3},
    "mgk": {},
    "fourier": {"chunk_size": 2},  # several chunks
    "rkde": {"n_iters": 3},
    "spkde": {"n_steps": 6},
    "mom": {},
}
# each variant's default (with OPTIONS) plus the options that keep the earlier defaults reachable
CASES = [(name, OPTIONS[name]) for name in VARIANTS] + [
    ("rkde", {}),  # the reference's single IRLS step
    ("rkde", {"n_iters": 3, "weighting": "keys", "normalize_query": True, "bandwidth": 0.3, "learn_bandwidth": True}),
    ("spkde", {"n_steps": 6, "beta": 2.0, "weighting": "keys", "normalize_query": True, "bandwidth": 0.3}),
    ("mom", {"partition": "subsample", "block_score": "sum", "n_blocks": 4}),
    ("mom", {"mode": "contiguous", "n_blocks": 3}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in CASES]


def randomise(m):
    """Give learned scalars non-trivial values so the reference tests really read them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if hasattr(m, "log_var"):
            m.log_var.copy_(torch.randn(m.log_var.shape, generator=g, dtype=torch.float64) * 0.3 + 0.5)
            m.mix_logits.copy_(torch.randn(m.mix_logits.shape, generator=g, dtype=torch.float64))
        if hasattr(m, "r"):
            m.r.copy_(torch.rand(m.r.shape, generator=g, dtype=torch.float64) * 0.8 + 0.2)
        if hasattr(m, "log_bandwidth"):
            m.log_bandwidth.copy_(torch.tensor([math.log(0.4), math.log(0.7)]))


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("T,S", [(7, 7), (5, 9)], ids=["no-memory", "memory"])
def test_matches_naive_loop(name, options, T, S):
    m = make(name, **options)
    randomise(m)
    q, k, v = inputs(name, T, S)
    with torch.no_grad():
        out, _ = m.attend(q, k, v, ctx_for(T, S), None)
    M = S - T
    for b in range(q.size(0)):
        for h in range(H):
            for i in range(T):
                vis = list(range(M + i + 1))
                args = (q[b, h], k[b, h], v[b, h], i, vis)  # mgk: k[b, h] is [2 components, S, D]
                args = (m, *args) if name == "performer" else (m, h, *args)
                torch.testing.assert_close(out[b, h, i], REFS[name](*args), rtol=1e-6, atol=1e-6,
                                           msg=lambda s: f"{name} b={b} h={h} i={i}: {s}")


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_weights_path_agrees(name, options):
    """need_weights=True returns the same output and its weights: zero on hidden keys, rows on the
    simplex except for RKDE/SPKDE's joint weighting (numerator and denominator weights differ)."""
    T, S = 5, 8
    m = make(name, **options)
    q, k, v = inputs(name, T, S, seed=3)
    ctx = ctx_for(T, S)
    with torch.no_grad():
        out, none = m.attend(q, k, v, ctx, None)
        ctx.need_weights = True
        out_w, w = m.attend(q, k, v, ctx, None)
    assert none is None and w.shape == (2, H, T, S)
    torch.testing.assert_close(out_w, out)
    if getattr(m.opts, "weighting", "keys") == "keys":
        torch.testing.assert_close(w.sum(-1), torch.ones(2, H, T, dtype=w.dtype))
    else:
        assert (w.sum(-1) - 1).abs().amax() > 1e-3  # a real ratio of two densities, not a softmax
    assert (w >= 0).all() and (w[..., ~causal(T, S, "cpu")] == 0).all()
    torch.testing.assert_close(w @ v, out)


@pytest.mark.parametrize("name,options", [
    ("performer", {"chunk_size": 2}), ("mgk", {}), ("fourier", {"chunk_size": 2}), ("mom", {}),
    ("mom", {"mode": "contiguous"}),
    ("rkde", {"detach_weights": False, "threshold": 0.3}), ("spkde", {"detach_weights": False, "n_steps": 2}),
    ("rkde", {"detach_weights": False, "threshold": 0.3, "weighting": "keys"}),
])
def test_gradients(name, options):
    """Analytic gradients (incl. FourierFormer's hand-written backward) match finite differences."""
    m = make(name, **options)
    randomise(m)
    q, k, v = (x.requires_grad_() for x in inputs(name, 4, 6, seed=7))
    assert torch.autograd.gradcheck(lambda q, k, v: m.attend(q, k, v, ctx_for(4, 6), None)[0], (q, k, v))


# ---------------------------------------------------------------- causality
def tiny_model(name: str, **options) -> TransformerLM:
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[],
                      attention=AttentionConfig(name=name, layers="all", options=options))
    return TransformerLM(cfg, 50)


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_causal_in_decoder(name, options):
    torch.manual_seed(0)
    model = tiny_model(name, **options).eval()
    x = torch.randint(0, 50, (2, 20))
    i = 9
    y = x.clone()
    y[:, i + 1:] = torch.randint(0, 50, (2, 20 - i - 1))
    with torch.no_grad():
        hx, hy = model(x).hidden, model(y).hidden
    torch.testing.assert_close(hx[:, : i + 1], hy[:, : i + 1], rtol=0, atol=1e-6)
    assert (hx[:, i + 1:] - hy[:, i + 1:]).abs().amax() > 1e-3  # the perturbation did reach later positions


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_causal_with_memory(name, options):
    """Keys/values after query i's position (memory + segment <= i) do not change its output."""
    T, S, i = 6, 10, 2
    m = make(name, **options)
    q, k, v = inputs(name, T, S, seed=5)
    k2, v2 = k.clone(), v.clone()
    later = S - T + i + 1
    k2[..., later:, :] += torch.randn_like(k2[..., later:, :])
    v2[..., later:, :] += 1.0
    with torch.no_grad():
        a, _ = m.attend(q, k, v, ctx_for(T, S), None)
        b, _ = m.attend(q, k2, v2, ctx_for(T, S), None)
    torch.testing.assert_close(a[:, :, : i + 1], b[:, :, : i + 1], rtol=0, atol=1e-12)
    assert (a[:, :, i + 1:] - b[:, :, i + 1:]).abs().amax() > 1e-3


# ---------------------------------------------------------------- Performer
def test_performer_features_block_orthogonal():
    w = gaussian_features(20, 8, torch.Generator().manual_seed(0))
    for blk in (w[:8], w[8:16]):
        gram = blk @ blk.T
        torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(8, 8), atol=1e-4, rtol=0)


def test_performer_approaches_softmax():
    T, Dh = 12, 8
    errs = []
    for m_feat in (16, 256, 4096):
        e = []
        for seed in range(6):
            g = torch.Generator().manual_seed(100 + seed)
            q, k = torch.randn(1, 1, T, Dh, generator=g) * 0.5, torch.randn(1, 1, T, Dh, generator=g) * 0.5
            v = torch.randn(1, 1, T, Dh, generator=g)
            m = build_attention("performer", d_model=16, n_head=1, d_head=Dh, options={"n_features": m_feat})
            m.omega.copy_(gaussian_features(m_feat, Dh, torch.Generator().manual_seed(seed)))
            out, _ = m.attend(q, k, v, AttnContext(), None)
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            e.append((out - ref).abs().mean().item())
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.02, errs


def test_performer_stable_for_large_keys():
    """Stabilisation: no overflow, and no row lost to underflow, for keys far larger than at init."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 32, generator=g) * 5 for _ in range(3))
    m = build_attention("performer", d_model=16, n_head=2, d_head=32, options={"n_features": 64})
    out, _ = m.attend(q, k, v, AttnContext(), None)
    assert torch.isfinite(out).all() and (out.abs().amax(-1) > 0).all()


def test_performer_redraw_schedule():
    m = build_attention("performer", d_model=16, n_head=H, d_head=D, options={"redraw_every": 2, "n_features": 8})
    h = torch.randn(1, 4, 16)
    seen = [m.omega.clone()]
    m.train()
    for _ in range(5):
        m(h, None, AttnContext())
        seen.append(m.omega.clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, False, True, False, True]  # redrawn before the 3rd and 5th training forwards
    m.eval()
    m(h, None, AttnContext())
    assert torch.equal(m.omega, seen[-1])  # fixed in eval
    fresh = build_attention("performer", d_model=16, n_head=H, d_head=D, options={"redraw_every": 2, "n_features": 8})
    fresh.load_state_dict(m.state_dict())  # a checkpoint carries the features and the schedule
    assert torch.equal(fresh.omega, m.omega) and int(fresh.n_calls) == 5


# ---------------------------------------------------------------- RKDE / SPKDE / MoM
@pytest.mark.parametrize("normalize_query", [False, True])
def test_rkde_zero_iters_is_gaussian_kernel_attention(normalize_query):
    T = 7
    m = make("rkde", n_iters=0, normalize_query=normalize_query)
    q, k, v = inputs("rkde", T, T, seed=2)
    sigma = m.log_bandwidth.detach().exp()[None, :, None, None]
    if not normalize_query:  # the reference's exp(−‖q − k̂‖²/√D)
        torch.testing.assert_close(2 * sigma**2, torch.full_like(sigma, math.sqrt(D)))
    with torch.no_grad():
        out, _ = m.attend(q, k, v, AttnContext(), None)
    d2 = (((unit(q) if normalize_query else q)[:, :, :, None] - unit(k)[:, :, None]) ** 2).sum(-1)
    a = torch.exp(-d2 / (2 * sigma**2)) * causal(T, T, "cpu")
    torch.testing.assert_close(out, (a / a.sum(-1, keepdim=True)) @ v)


def outlier_keys(n=12, outliers=(3, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, n, D, generator=g, dtype=torch.float64) * 0.05
    k[..., 0] += 1.0  # a cluster around e1 ...
    for j in outliers:
        k[..., j, :] = torch.randn(D, generator=g, dtype=torch.float64) * 0.05
        k[..., j, 0] -= 1.0  # ... and a few keys on the far side of the sphere
    k = unit(k)
    return k, torch.exp((k @ k.transpose(-1, -2) - 1) / 0.3**2)


def test_rkde_downweights_outliers():
    k, gram = outlier_keys()
    allowed = causal(12, 12, "cpu")
    w0 = huber_irls(gram, allowed, 0, None)[0, 0, -1]
    w3 = huber_irls(gram, allowed, 3, None)[0, 0, -1]
    torch.testing.assert_close(w0, torch.full((12,), 1 / 12, dtype=torch.float64))
    inliers = [j for j in range(12) if j not in (3, 8)]
    assert (w3[[3, 8]] < w0[[3, 8]]).all()
    assert w3[[3, 8]].max() < w3[inliers].min()
    # the reweighting is per query: query 4 sees one outlier among 5 keys and down-weights it too
    w3_q4 = huber_irls(gram, allowed, 3, None)[0, 0, 4]
    assert w3_q4[3] < 1 / 5 and (w3_q4[5:] == 0).all()


def test_spkde_weights_on_simplex_and_drop_outliers():
    k, gram = outlier_keys()
    allowed = causal(12, 12, "cpu")
    w = spkde_weights(gram, allowed, beta=2.0, n_steps=30)[0, 0]
    assert (w >= 0).all() and (w[~allowed] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(12, dtype=torch.float64))
    assert (w[-1, [3, 8]] < 1e-3).all() and w[-1].max() > 1 / 12
    # the sort-based projection agrees with bisection on random rows
    u = torch.randn(5, 9, dtype=torch.float64) * 2
    allowed = torch.ones(5, 9, dtype=torch.bool).tril(3)
    p = project_simplex(u, allowed)
    for r in range(5):
        n = int(allowed[r].sum())
        torch.testing.assert_close(p[r, :n], simplex_bisect(u[r, :n]))


def test_mom_contiguous_picks_median_block():
    """mode: contiguous (the earlier default), hand-computed."""
    m = build_attention("mom", d_model=16, n_head=1, d_head=2, options={"mode": "contiguous", "n_blocks": 3}).double()
    x = torch.tensor([3.0, 3.0, -3.0, -3.0, 0.0, 1.0], dtype=torch.float64)  # scores q·k/√2 = x
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 1, 6, 2)
    k = torch.stack([x * math.sqrt(2), torch.zeros(6, dtype=torch.float64)], -1)[None, None]
    v = torch.eye(6, dtype=torch.float64)[None, None]  # out = the attention row
    out, _ = m.attend(q, k, v, AttnContext(), None)
    # last query: blocks {0,1} mean e^3, {2,3} mean e^-3, {4,5} mean (1+e)/2 -> median is {4,5}
    torch.testing.assert_close(out[0, 0, 5], torch.tensor([0, 0, 0, 0, 1 / (1 + math.e), math.e / (1 + math.e)],
                                                          dtype=torch.float64))
    # query 1 sees 2 keys: 2 one-key blocks, the lower median is the lower one (tie -> first)
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64))
    # query 3 sees 4 keys -> 3 blocks {0,1},{2},{3}: means e^3, e^-3, e^-3 -> median (rank 1) is {3}
    torch.testing.assert_close(out[0, 0, 3], torch.tensor([0, 0, 0, 1.0, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("S,K", [(10, 3), (2, 3), (9, 9)])
def test_mom_disjoint_partition(S, K):
    """Disjoint random blocks: every key position in exactly one block, sizes within one of each other."""
    m = make("mom", n_blocks=K)
    member = m.partition(S, "cpu")
    assert member.shape == (min(K, S), S) and (member.sum(0) == 1).all()
    sizes = member.sum(1)
    assert int(sizes.max() - sizes.min()) <= 1


def test_mom_subsample_partition():
    """partition: subsample (the stored reference's divide_batch): K subsets of ⌊(1 − ε)·S⌋ keys each."""
    m = make("mom", partition="subsample", n_blocks=5, outlier_fraction=0.2)
    member = m.partition(40, "cpu")
    assert member.shape == (5, 40) and (member.sum(1) == 32).all()
    assert (member.sum(0) > 1).any()  # blocks overlap


def test_mom_eval_deterministic_training_redraws():
    """Eval draws the blocks from a seed (same output on every call, whatever ran before); training
    draws fresh blocks per forward from the run's generator (seeded runs repeat)."""
    T = 24
    m = make("mom")
    q, k, v = inputs("mom", T, T, seed=4)
    with torch.no_grad():
        first = m.attend(q, k, v, AttnContext(), None)[0]
        m.train()
        torch.manual_seed(1)
        draws = [m.partition(T, "cpu") for _ in range(3)]
        trained = [m.attend(q, k, v, AttnContext(), None)[0] for _ in range(3)]
        torch.manual_seed(1)
        again = [m.partition(T, "cpu") for _ in range(3)]
        m.eval()
        second = m.attend(q, k, v, AttnContext(), None)[0]
    assert torch.equal(first, second)
    assert not torch.equal(draws[0], draws[1]) and all(torch.equal(a, b) for a, b in zip(draws, again))
    assert not torch.equal(trained[0], trained[1])
    other = make("mom", seed=7)  # another eval seed, another (fixed) draw
    assert not torch.equal(other.partition(T, "cpu"), m.partition(T, "cpu"))
    assert torch.equal(other.partition(T, "cpu"), other.partition(T, "cpu"))


def test_mom_choose_batch():
    """choose: batch sums each block's score over the batch and the heads: one block per query for all."""
    T, S = 5, 8
    m = make("mom", choose="batch", block_score="sum")
    q, k, v = inputs("mom", T, S, seed=6)
    with torch.no_grad():
        out, w = m.attend(q, k, v, AttnContext(mask=causal(T, S, "cpu"), need_weights=True), None)
    member = m.partition(S, "cpu").tolist()
    M = S - T
    for i in range(T):
        per_bh = [mom_block_scores(q[b, h], k[b, h], member, i, M, "sum") for b in range(2) for h in range(H)]
        scores = [None if s is None else sum(p[bi] for p in per_bh) for bi, s in enumerate(per_bh[0])]
        ranked = sorted((sc, bi) for bi, sc in enumerate(scores) if sc is not None)
        blk = ranked[len(ranked) // 2][1]
        keys = [j for j in range(M + i + 1) if member[blk][j]]
        for b in range(2):
            for h in range(H):
                torch.testing.assert_close(out[b, h, i], mom_attend(q[b, h, i], k[b, h], v[b, h], keys))
                assert set(torch.nonzero(w[b, h, i]).flatten().tolist()) == set(keys)


def test_spkde_beta_from_outlier_fraction():
    assert make("spkde").opts.beta == pytest.approx(1 / 0.95)  # the reference's outlier_fraction = 0.05
    assert make("spkde", outlier_fraction=0.2).opts.beta == pytest.approx(1.25)
    assert make("spkde", beta=1.5).opts.beta == 1.5  # the earlier default, still reachable
    with pytest.raises(ConfigError, match="not both"):
        make("spkde", beta=1.5, outlier_fraction=0.1)


@pytest.mark.parametrize("name", ["rkde", "spkde"])
def test_joint_weighting_equals_keys_when_values_coincide(name):
    """With every value equal the joint kernel is the key kernel: both weightings give the same output;
    with distinct values they differ (the joint weights do read the values)."""
    T = 7
    q, k, v = inputs(name, T, T, seed=8)
    same = v[:, :, :1].expand_as(v).clone()
    outs = {}
    for weighting in ("joint", "keys"):
        m = make(name, weighting=weighting, n_iters=2) if name == "rkde" else make(name, weighting=weighting)
        with torch.no_grad():
            outs[weighting] = (m.attend(q, k, same, AttnContext(), None)[0], m.attend(q, k, v, AttnContext(), None)[0])
    torch.testing.assert_close(outs["joint"][0], outs["keys"][0])
    assert (outs["joint"][1] - outs["keys"][1]).abs().amax() > 1e-3


# ---------------------------------------------------------------- options, construction, training
@pytest.mark.parametrize("mem_len", [8, 0])
@pytest.mark.parametrize("name", VARIANTS)
def test_relative_positions_rejected_at_construction(name, mem_len):
    """Memory in the decoder needs model.pos: relative, which these variants refuse with an error that
    names both problems (relative positions, memory) and the fix."""
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[], pos="relative",
                      mem_len=mem_len, attention=AttentionConfig(name=name, layers="1:"))
    with pytest.raises(ConfigError) as e:
        TransformerLM(cfg, 50)
    msg = str(e.value)
    assert f"attention '{name}' (layer 1) supports absolute positions only" in msg
    assert "memory (model.mem_len > 0" in msg
    assert "Set model.pos: absolute and model.mem_len: 0" in msg
    alternatives = {n.strip(" .") for n in msg.rsplit(":", 1)[1].split(",")}
    assert {"softmax", "elliptical", "quest", "qknorm", "elliptical_quest"} <= alternatives
    assert not alternatives & set(VARIANTS)


@pytest.mark.parametrize("name,bad,match", [
    ("performer", {"n_featurs": 8}, "n_features"),
    ("performer", {"n_features": 0}, ">= 1"),
    ("mgk", {"n_components": 0}, ">= 1"),
    ("mgk", {"init_variance": -1.0}, "> 0"),
    ("fourier", {"power": 3}, "even"),
    ("rkde", {"n_iters": -1}, ">= 0"),
    ("rkde", {"threshold": 0.0}, "> 0"),
    ("spkde", {"beta": 1.0}, "> 1"),
    ("mom", {"n_blocks": 0}, ">= 1"),
    ("mom", {"n_blocks": "4"}, "integer"),
    ("mom", {"mode": "median"}, "one of random, contiguous"),
    ("mom", {"partition": "blocks"}, "one of disjoint, subsample"),
    ("mom", {"outlier_fraction": 1.0}, r"\[0, 1\)"),
    ("mom", {"mode": "contiguous", "choose": "batch"}, "belong to mode: random"),
    ("rkde", {"weighting": "both"}, "one of joint, keys"),
    ("rkde", {"bandwidth": 0.0}, "> 0"),
    ("spkde", {"outlier_fraction": 1.0}, r"\(0, 1\)"),
    ("spkde", {"beta": 2.0, "outlier_fraction": 0.1}, "not both"),
])
def test_options_validated(name, bad, match):
    with pytest.raises(ConfigError, match=match):
        build_attention(name, d_model=16, n_head=H, d_head=D, options=bad)


def test_all_registered():
    assert set(VARIANTS) <= set(ATTENTION)
    for name in VARIANTS:
        assert not ATTENTION[name].supports_relative


@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_model_trains(name):
    torch.manual_seed(0)
    model = tiny_model(name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = torch.randint(0, 50, (8, 1))
    seq = (start * 7 + 3 * torch.arange(17)) % 50  # a learnable rule: next = previous + 3 (mod 50)
    x, y = seq[:, :-1], seq[:, 1:]
    losses = []
    for _ in range(20):
        loss = model.nll(model(x).hidden, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
