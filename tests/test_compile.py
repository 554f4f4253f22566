"""``model.compile: true`` compiles every decoder block in place: same parameter names (checkpoints are
interchangeable with eager ones), same loss and gradients as eager on a fixed batch."""

from __future__ import annotations

import shutil

import pytest
import torch

from lm.tasks.lm_module import LanguageModel


def make(compile: bool, **kw) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(vocab_size=50, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[],
                         dropout=0.0, compile=compile, **kw)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("attention", ["softmax", "elliptical"])
def test_compiled_blocks_match_eager(attention):
    eager = make(False, attention={"name": attention, "layers": "1:"})
    comp = make(True, attention={"name": attention, "layers": "1:"})
    assert list(eager.state_dict()) == list(comp.state_dict())  # no _orig_mod prefixes
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    losses = []
    for m in (eager, comp):
        loss = m.net.nll(m(x).hidden, y).mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    comp.load_state_dict(eager.state_dict())  # an eager checkpoint loads into a compiled model
