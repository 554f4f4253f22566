"""Padding is an input of the decoder: ``TransformerLM.forward(key_mask=...)``.

The oracle is the same row computed alone at its real length: with the key mask, a row padded in
front (the SST-2 classifier's left padding) or at the end (the last evaluation segment or window)
must give its real positions exactly the hidden states it has alone -- for every attention variant
that honours the attention mask, Elliptical's per-sequence m̂ included, with dense or dropless MoE
FFNs. Controls show that the mask is what makes the difference.
"""

from __future__ import annotations

import pytest
import torch

from lm.config import AttentionConfig, EvalConfig, FFNConfig, ModelConfig
from lm.data.protocols import eval_batches
from lm.model.transformer import TransformerLM

V = 40
ATTN = {
    "softmax": AttentionConfig(),
    "elliptical": AttentionConfig(name="elliptical", layers="1:"),
    "elliptical-causal": AttentionConfig(name="elliptical", layers="1:", options={"estimator": "causal"}),
    "elliptical-median": AttentionConfig(name="elliptical", layers="1:", options={"reduce": "median"}),
    "quest": AttentionConfig(name="quest"),
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def model(attn="elliptical", pos="absolute", mem_len=0, moe=False, seed=0) -> TransformerLM:
    torch.manual_seed(seed)
    ffn = FFNConfig(name="switch", n_experts=4, capacity_factor=None, eval_capacity_factor=None) if moe else FFNConfig()
    cfg = ModelConfig(n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, pos=pos, mem_len=mem_len,
                      adaptive=False, cutoffs=[], init_std=0.3, attention=ATTN[attn], ffn=ffn)
    return TransformerLM(cfg, V).eval()


def rows(lengths=(9, 4, 6), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def padded(seqs, side: str, width: int | None = None, pad_id: int = 0):
    T = width or max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for r, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        x[r, sl], real[r, sl] = s, True
    return x, real


def real_part(h: torch.Tensor, real: torch.Tensor, r: int) -> torch.Tensor:
    return h[r][real[r]]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "dropless-moe"])
@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("pos", ["absolute", "relative"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_row_equals_the_row_alone(side, pos, attn, moe):
    net, seqs = model(attn, pos, moe=moe), rows()
    x, real = padded(seqs, side, width=11, pad_id=3)
    with torch.no_grad():
        h = net(x, key_mask=real).hidden
        for r, s in enumerate(seqs):
            alone = net(s[None]).hidden[0]
            torch.testing.assert_close(real_part(h, real, r), alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["elliptical", "elliptical-median"])
def test_without_the_mask_end_padding_enters_elliptical_m_hat(attn):
    # The control for evaluation padding: causal attention never looks ahead, so only the per-sequence
    # statistic (segment mean / median of the value changes) lets trailing pads change real positions.
    net, seqs = model(attn), rows()
    x, real = padded(seqs, "right", width=11)
    with torch.no_grad():
        alone = net(seqs[1][None]).hidden[0]
        counted = real_part(net(x).hidden, real, 1)
        masked = real_part(net(x, key_mask=real).hidden, real, 1)
    assert not torch.allclose(counted, alone, atol=1e-4)
    torch.testing.assert_close(masked, alone, atol=2e-5, rtol=1e-4)


def test_memory_positions_count_as_real():
    # Transformer-XL evaluation: the last segment of a stream is padded at the end; it reads the memory
    # of the previous (full) segment, and its real positions must not see the padding in m̂.
    net = model("elliptical", pos="relative", mem_len=8)
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    real = torch.ones(2, 8, dtype=torch.bool)
    real[0, 5:] = False
    with torch.no_grad():
        first = net(x[:, :8])
        h = net(x[:, 8:], first.mems, key_mask=real).hidden
        alone = net(x[:1, 8:13], [m[:1] for m in first.mems]).hidden[0]
        full = net(x[1:, 8:], [m[1:] for m in first.mems]).hidden[0]
    torch.testing.assert_close(h[0, :5], alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(h[1], full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pos", ["absolute", "relative"])
def test_an_all_true_mask_is_the_plain_forward_bit_for_bit(pos):
    net = model("elliptical", pos)
    x = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(net(x, key_mask=torch.ones(3, 7, dtype=torch.bool)).hidden, net(x).hidden)


def test_moe_does_not_route_pads():
    net, seqs = model("softmax", moe=True), rows()
    x, real = padded(seqs, "left", width=12)
    with torch.no_grad():
        net(x, key_mask=real)
    moe = net.layers[0].ffn
    assert moe.stats["expert_load"].sum() == pytest.approx(1.0)
    assert moe.stats["dropped_fraction"] == 0
    # f_e counts real tokens only: the same loads as the real tokens packed without any padding
    with torch.no_grad():
        net(torch.cat(seqs)[None])
    assert torch.equal(net.layers[0].ffn.stats["expert_load"], moe.stats["expert_load"])


@pytest.mark.parametrize("protocol, extra", [("segments", {}), ("sliding", {"stride": 3}), ("memory", {})])
def test_protocol_batches_mark_their_padding(protocol, extra):
    # `real` is the key mask: True exactly where the input holds a token of the stream.
    toks = torch.arange(1, 30)  # no token is 0, the padding id
    for b in eval_batches(toks, EvalConfig(protocol=protocol, batch_size=3, **extra), train_tgt_len=5):
        assert torch.equal(b["real"], b["input"] != 0)
        assert not (b["mask"] & ~b["real"]).any()  # every scored target is read at a real position


def test_evaluation_keeps_padding_out_of_m_hat():
    # LanguageModel's evaluation step passes the batches' key mask: the padded last segment of the
    # segments protocol scores exactly what its real part scores alone.
    from lm.tasks.lm_module import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(vocab_size=V, tgt_len=8, n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=32,
                       dropout=0.0, adaptive=False, cutoffs=[], init_std=0.3,
                       attention={"name": "elliptical", "layers": "1:"}, eval=EvalConfig(batch_size=4)).eval()
    toks = torch.randint(1, V, (29,), generator=torch.Generator().manual_seed(3))  # 28 targets: 8 + 8 + 8 + 4
    batches = list(eval_batches(toks, lm.eval_cfg, 8))
    with torch.no_grad():
        lm._eval_start()
        for b in batches:
            lm._eval_step(b)
        got = lm.eval_nll.compute()
        nll = []
        for start in range(0, 28, 8):
            seg = toks[start:min(start + 8, 28) + 1]
            nll.append(lm.net.nll(lm.net(seg[None, :-1]).hidden, seg[None, 1:]))
        want = torch.cat(nll, dim=1).mean()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
