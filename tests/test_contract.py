"""Contracts every registered variant keeps, iterated over the registries themselves (``ATTENTION``,
the corruption ``RECIPES``), so a newly registered one is tested without editing a list here."""

from __future__ import annotations

import pytest
import torch

from corruptions.recipes import RECIPES, corrupt_text
from corruptions.word_swap import SAMPLINGS
from lm.config import AttentionConfig, ModelConfig
from lm.errors import ConfigError
from lm.model.attention import ATTENTION, AttnContext, LayerState, build_attention
from lm.model.transformer import TransformerLM

V = 30


def model(name: str, pos: str = "absolute", seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, pos=pos, adaptive=False,
                      cutoffs=[], attention=AttentionConfig(name=name, layers="all"))
    return TransformerLM(cfg, vocab_size=V)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_is_causal_and_differentiable_in_the_decoder(name):
    m = model(name).eval()
    x = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % V  # change only the future of position 5
    with torch.no_grad():
        a, b = m(x).hidden, m(y).hidden
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:])  # and the changed tokens do matter
    m.train()
    m.nll(m(x).hidden, y).mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if ".attn." in n and p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    for proj in ("qkv", "o"):  # the projections every variant owns are trained
        assert all(f"layers.{i}.attn.{proj}.weight" in grads for i in range(2)), sorted(grads)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_hands_its_values_on(name):
    """Any mix of variants across layers works: every variant hands its value projection to the next."""
    mod = build_attention(name, d_model=16, n_head=2, d_head=8, layer_idx=1).eval()
    h = torch.randn(2, 5, 16)
    with torch.no_grad():
        out, state = mod(h, None, AttnContext(), LayerState(values=torch.randn(2, 2, 5, 8)))
    assert out.shape == h.shape and isinstance(state, LayerState) and state.values.shape == (2, 2, 5, 8)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_rejects_an_unknown_option_and_declares_relative_support(name):
    with pytest.raises(ConfigError, match="no option 'not_an_option'"):
        build_attention(name, d_model=16, n_head=2, d_head=8, options={"not_an_option": 1})
    if ATTENTION[name].supports_relative:
        m = model(name, pos="relative").eval()
        with torch.no_grad():
            assert torch.isfinite(m(torch.randint(0, V, (2, 6))).hidden).all()
    else:
        with pytest.raises(ConfigError, match="absolute positions only"):
            model(name, pos="relative")


TEXT = "\n".join(["the quick brown fox jumps over the lazy dog near the river bank"] * 20) + "\n"


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_corruption_is_seeded_keeps_token_structure_and_records_its_swaps(recipe, sampling):
    kw = dict(rate=0.3, sampling=sampling)
    a, stats, swaps = corrupt_text(TEXT, recipe, seed=3, **kw)
    b, _, swaps_b = corrupt_text(TEXT, recipe, seed=3, **kw)
    c, _, _ = corrupt_text(TEXT, recipe, seed=4, **kw)
    assert a == b and swaps == swaps_b and a != c  # the seed decides, and it matters
    old_lines, new_lines = TEXT.splitlines(), a.splitlines()
    assert len(new_lines) == len(old_lines)
    changed = set()
    for li, (o, n) in enumerate(zip(old_lines, new_lines)):
        ot, nt = o.split(), n.split()
        assert len(ot) == len(nt)  # words are edited in place, never split or merged
        changed |= {(li, wi) for wi, (x, y) in enumerate(zip(ot, nt)) if x != y}
    recorded = {(sw[0], sw[1]) for sw in swaps}
    assert changed and changed <= recorded  # every edit is in the swap list
    for li, wi, start, original, new in swaps:
        assert old_lines[li][start:start + len(original)] == original
        assert new != original and new in new_lines[li]  # (offsets are the original line's)
