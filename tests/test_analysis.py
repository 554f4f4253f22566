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
