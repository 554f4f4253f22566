"""Analysis metrics against hand-computed values, and `analyze_model` on a tiny model."""

import math

import pytest
import torch

from lm.analysis.cli import analyze_model
from lm.analysis.metrics import attention_entropy, collapse, head_redundancy
from lm.config import AttentionConfig
from lm.tasks.lm_module import LanguageModel


def test_collapse_hand_computed():
    # tokens: e1, e1, e2 -> pairs (1,0): cos 1, (2,0): 0, (2,1): 0 -> mean 1/3
    h = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    assert collapse(h).item() == pytest.approx(1 / 3)
    # all tokens identical up to scale: complete collapse
    assert collapse(torch.tensor([[[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]]])).item() == pytest.approx(1.0)


def test_head_redundancy_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    w = torch.stack([a, a, b])[None]  # heads 0 and 1 identical, head 2 differs by sqrt(2)
    expected = (0.0 + math.sqrt(2) + math.sqrt(2)) / 3
    assert head_redundancy(w).item() == pytest.approx(expected)


def test_attention_entropy_hand_computed():
    w = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # one head: entropies 0 and ln 2
    assert attention_entropy(w)[0, 0].item() == pytest.approx(math.log(2) / 2)


def test_analyze_model_shapes_and_ranges():
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=50, n_layer=3, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[],
                          attention=AttentionConfig(name="elliptical", layers="1:"))
    tokens = torch.randint(0, 50, (400,))
    r = analyze_model(model, tokens, seq_len=16, n_sequences=5, batch_size=2)
    assert r["n_sequences"] == 5
    assert len(r["collapse_per_layer"]) == 3 and all(-1 <= c <= 1 for c in r["collapse_per_layer"])
    assert len(r["entropy_per_layer_head"]) == 3 and len(r["entropy_per_layer_head"][0]) == 2
    # causal attention over T keys: entropy between 0 and ln T
    assert all(0 <= e <= math.log(16) for row in r["entropy_per_layer_head"] for e in row)
    assert r["attention_per_layer"] == ["softmax", "elliptical", "elliptical"]


def test_analyze_model_reports_expert_load_of_moe_layers():
    from lm.config import FFNConfig

    torch.manual_seed(0)
    model = LanguageModel(vocab_size=50, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[],
                          ffn=FFNConfig(name="switch", n_experts=4, eval_capacity_factor=None))
    tokens = torch.randint(0, 50, (400,))
    # Independent count: the router's argmax on each MoE layer's input, captured by a hook.
    counts = {i: torch.zeros(4) for i in range(2)}

    def hook(i):
        def f(mod, args):
            h = args[0].reshape(-1, args[0].size(-1)).float()
            counts[i] += torch.bincount((h @ mod.router.weight.float().t()).argmax(-1), minlength=4).float()
        return f

    handles = [blk.ffn.register_forward_pre_hook(hook(i)) for i, blk in enumerate(model.net.layers)]
    r = analyze_model(model, tokens, seq_len=16, n_sequences=6, batch_size=4)
    for h in handles:
        h.remove()
    assert [m["layer"] for m in r["moe"]] == [0, 1]
    for m in r["moe"]:
        expected = counts[m["layer"]] / counts[m["layer"]].sum()
        assert torch.allclose(torch.tensor(m["expert_load"]), expected, atol=1e-4)
        assert m["load_max_over_mean"] == pytest.approx(float(expected.max() / expected.mean()), rel=1e-3)
        assert m["dropped_fraction"] == 0.0  # dropless at evaluation
    dense = LanguageModel(vocab_size=50, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[])
    assert analyze_model(dense, tokens, seq_len=16, n_sequences=2)["moe"] == []
