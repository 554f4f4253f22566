"""Adaptive input embedding / adaptive softmax: normalisation, exactness of the fast NLL, tying."""

from __future__ import annotations

import math

import pytest
import torch

from lm.errors import ConfigError
from lm.model.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax

N_TOKEN, CUTOFFS = 50, [10, 20, 35]
# (div_val, d_embed, d_proj, cutoffs): covers no projection, a single projection, per-cluster
# projections, and the plain-softmax case.
LAYOUTS = [
    (1, 16, 16, CUTOFFS),
    (1, 8, 16, CUTOFFS),
    (2, 16, 12, CUTOFFS),
    (1, 16, 16, []),
    (2, 16, 12, []),
]
LAYOUT_IDS = ["div1-noproj", "div1-proj", "div2", "plain", "plain-div2"]


def make(div_val, d_embed, d_proj, cutoffs, tied, tie_projs=True):
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(N_TOKEN, d_embed, d_proj, cutoffs, div_val=div_val, init_std=0.3)
    crit = AdaptiveLogSoftmax(
        N_TOKEN, d_embed, d_proj, cutoffs, div_val=div_val,
        tie_to=emb if tied else None, tie_projs=tie_projs, init_std=0.3,
    )
    # Non-zero biases, so that a bias mixed up between clusters would show in the tests.
    with torch.no_grad():
        for name, p in crit.named_parameters():
            if "bias" in name:
                p.normal_(std=0.5)
    return emb, crit


def every_token_batch(d_proj):
    """A batch whose targets are every word of the vocabulary (so every cluster is hit)."""
    g = torch.Generator().manual_seed(1)
    target = torch.randperm(N_TOKEN, generator=g)
    return torch.randn(N_TOKEN, d_proj, generator=g), target


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_log_prob_normalised_and_nll_exact(layout, tied):
    div_val, d_embed, d_proj, cutoffs = layout
    _, crit = make(div_val, d_embed, d_proj, cutoffs, tied)
    hidden, target = every_token_batch(d_proj)
    logp = crit.log_prob(hidden)
    assert logp.shape == (N_TOKEN, N_TOKEN) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(N_TOKEN), atol=1e-5, rtol=0)
    nll = crit.nll(hidden, target)
    expected = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=0)


def test_nll_accepts_leading_dims():
    _, crit = make(2, 16, 12, CUTOFFS, tied=True)
    hidden, target = every_token_batch(12)
    flat = crit.nll(hidden, target)
    batched = crit.nll(hidden.view(5, 10, 12), target.view(5, 10))
    torch.testing.assert_close(batched, flat.view(5, 10))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_tied_weights_share_storage_and_get_both_gradients(layout):
    div_val, d_embed, d_proj, cutoffs = layout
    emb, crit = make(div_val, d_embed, d_proj, cutoffs, tied=True)
    for e, o in zip(emb.emb_layers, crit.out_layers, strict=True):
        assert o.weight is e.weight and o.weight.data_ptr() == e.weight.data_ptr()
    for ep, op in zip(emb.emb_projs, crit.out_projs, strict=True):
        assert op is ep
    assert len(crit.out_projs) == len(emb.emb_projs)

    # The tied table's gradient is the sum of the output-side and input-side contributions.
    hidden, target = every_token_batch(d_proj)
    tokens = torch.arange(N_TOKEN)
    w = emb.emb_layers[-1].weight

    def grad_of(use_in, use_out):
        w.grad = None
        loss = torch.zeros(())
        if use_in:
            loss = loss + emb(tokens).square().sum()
        if use_out:
            loss = loss + crit.nll(hidden, target).sum()
        loss.backward()
        return w.grad.clone()

    g_in, g_out, g_both = grad_of(True, False), grad_of(False, True), grad_of(True, True)
    assert g_in.abs().sum() > 0 and g_out.abs().sum() > 0
    torch.testing.assert_close(g_both, g_in + g_out)


def test_untied_projection_sharing_is_optional():
    emb, crit = make(2, 16, 12, CUTOFFS, tied=True, tie_projs=False)
    assert all(o.weight is e.weight for e, o in zip(emb.emb_layers, crit.out_layers))
    assert all(op is not ep for ep, op in zip(emb.emb_projs, crit.out_projs))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_every_parameter_gets_gradient(layout, tied):
    div_val, d_embed, d_proj, cutoffs = layout
    emb, crit = make(div_val, d_embed, d_proj, cutoffs, tied)
    _, target = every_token_batch(d_proj)
    tokens = torch.arange(N_TOKEN).roll(7)
    loss = crit.nll(emb(tokens) + 0.1, target).sum()
    loss.backward()
    params = dict(emb.named_parameters(prefix="emb")) | dict(crit.named_parameters(prefix="crit"))
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Each embedding row was used once, so every row has a gradient (no cluster is skipped).
    for layer in emb.emb_layers:
        assert (layer.weight.grad.abs().sum(1) > 0).all()


def test_embedding_div1_no_projection_is_plain_lookup_scaled():
    emb = AdaptiveEmbedding(N_TOKEN, 16, 16, CUTOFFS)
    assert len(emb.emb_projs) == 0
    tokens = torch.randint(0, N_TOKEN, (3, 7))
    out = emb(tokens)
    assert out.shape == (3, 7, 16)
    torch.testing.assert_close(out, emb.emb_layers[0].weight[tokens] * math.sqrt(16))


def test_embedding_div2_matches_per_cluster_lookup():
    emb = AdaptiveEmbedding(N_TOKEN, 16, 12, CUTOFFS, div_val=2)
    assert [l.weight.shape for l in emb.emb_layers] == [(10, 16), (10, 8), (15, 4), (15, 2)]
    tokens = torch.tensor([[0, 9, 10, 19], [20, 34, 35, 49]])
    out = emb(tokens)
    ends = emb.cutoff_ends
    for t, row in zip(tokens.reshape(-1).tolist(), out.reshape(-1, 12)):
        i = next(i for i in range(len(ends) - 1) if ends[i] <= t < ends[i + 1])
        ref = emb.emb_layers[i].weight[t - ends[i]] @ emb.emb_projs[i].T * math.sqrt(12)
        torch.testing.assert_close(row, ref)


@pytest.mark.parametrize("cls", [AdaptiveEmbedding, AdaptiveLogSoftmax])
@pytest.mark.parametrize("cutoffs", [[20000, 40000, 200000], [10, 60], [20, 10], [10, 10], [0, 10]])
def test_bad_cutoffs_raise_config_error(cls, cutoffs):
    with pytest.raises(ConfigError, match=f"vocabulary size {N_TOKEN}") as info:
        cls(N_TOKEN, 16, 16, cutoffs)
    assert str(cutoffs) in str(info.value)


def test_bad_cutoffs_message_matches_reference_wording():
    with pytest.raises(ConfigError) as info:
        AdaptiveEmbedding(33278, 16, 16, [20000, 40000, 200000])
    assert str(info.value) == (
        "model.cutoffs [20000, 40000, 200000] must all be smaller than the vocabulary size 33278; "
        "use e.g. cutoffs: [2000, 10000] for WikiText-2 or [] for plain softmax"
    )


def test_too_large_div_val_raises():
    with pytest.raises(ConfigError, match="div_val"):
        AdaptiveEmbedding(N_TOKEN, 4, 4, CUTOFFS, div_val=4)


def test_tie_to_mismatched_embedding_raises():
    emb = AdaptiveEmbedding(N_TOKEN, 16, 16, CUTOFFS)
    with pytest.raises(ConfigError, match="different layout"):
        AdaptiveLogSoftmax(N_TOKEN, 16, 16, [10, 20], tie_to=emb)


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_bf16_autocast_close_to_float32(layout):
    div_val, d_embed, d_proj, cutoffs = layout
    emb, crit = make(div_val, d_embed, d_proj, cutoffs, tied=True)
    _, target = every_token_batch(d_proj)
    tokens = torch.arange(N_TOKEN).roll(3)
    ref = crit.nll(emb(tokens), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = emb(tokens)
        nll = crit.nll(h, target)
        logp = crit.log_prob(h)
    assert nll.dtype == torch.float32 and logp.dtype == torch.float32
    assert torch.isfinite(nll).all()
    # bf16 has ~3 significant digits; the loss values here are O(1-10).
    torch.testing.assert_close(nll, ref, atol=0.1, rtol=0.02)
    torch.testing.assert_close(nll.mean(), ref.mean(), atol=0.02, rtol=0.005)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(N_TOKEN), atol=1e-4, rtol=0)
