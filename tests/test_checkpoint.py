"""A checkpoint round trip reproduces the model exactly.

A tiny LanguageModel is trained a few steps (high constant learning rate, so the weights move far from
their initialisation) on a generated WikiText-2-style corpus, saved with ``trainer.save_checkpoint`` and
reloaded with ``LanguageModel.load_from_checkpoint``. The reloaded model must give bit-identical
log-probabilities and per-token NLL on a fixed batch (``torch.equal``, no tolerance): for a word-level
model with an adaptive softmax (tail clusters of reduced width), and for a Transformer-XL model
(relative positions, memory) over two consecutive segments, starting from the training memory the
checkpoint carries.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import write_corpus  # the tiny generated WikiText-2 corpus

from lm.config import EvalConfig
from lm.data.datamodule import LMDataModule
from lm.tasks.lm_module import LanguageModel

TGT_LEN = 8
ARCH = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.1,
            optim={"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"})
VARIANTS = {
    # 42 words (40 + <eos> + <unk>): head of 10, tail clusters 10-29 (d 8) and 30-41 (d 4)
    "adaptive": dict(pos="absolute", mem_len=0, adaptive=True, cutoffs=[10, 30], div_val=2),
    "xl-memory": dict(pos="relative", mem_len=TGT_LEN, adaptive=False, cutoffs=[]),
}


def build(dm: LMDataModule, variant: str, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(vocab_size=dm.vocab_size, unit=dm.unit, tgt_len=TGT_LEN, **ARCH, **VARIANTS[variant])


def scores(model: LanguageModel, batch: dict, mems=None):
    """Log-probs [B, T, V] and per-token NLL [B, T] of one segment, and the memory it leaves."""
    model.eval()
    with torch.no_grad():
        out = model.net(batch["input"], mems)
        return model.net.log_prob(out.hidden), model.net.nll(out.hidden, batch["target"]), out.mems


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> LMDataModule:
    tmp = tmp_path_factory.mktemp("ckpt-data")
    root = write_corpus(tmp / "data")
    # evaluation batches as wide as training ones: the training memory can precede them
    return LMDataModule(root=str(root), cache_dir=str(tmp / "cache"), batch_size=2, tgt_len=TGT_LEN,
                        eval=EvalConfig(batch_size=2))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_round_trip_reproduces_log_probs_exactly(data, tmp_path, variant):
    model = build(data, variant)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    path = Path(tmp_path) / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = LanguageModel.load_from_checkpoint(path, map_location="cpu")
    assert loaded.net.head.n_tail == model.net.head.n_tail == len(VARIANTS[variant]["cutoffs"])
    assert loaded.cfg == model.cfg
    assert loaded.state_dict().keys() == model.state_dict().keys()

    # Two consecutive segments of the validation stream (fixed data, independent of training order).
    seg = [b for _, b in zip(range(2), data.val_dataloader())]
    assert seg[0]["input"].shape == seg[1]["input"].shape == (2, TGT_LEN)
    mems = mems2 = None
    if variant == "xl-memory":
        # The training memory travels in the checkpoint and comes back as it was.
        assert model.mems is not None and loaded.mems is not None
        assert len(loaded.mems) == len(model.mems) == ARCH["n_layer"]
        assert all(torch.equal(a, b) for a, b in zip(model.mems, loaded.mems))
        mems, mems2 = model.mems, loaded.mems
    for batch in seg:
        lp, nll, mems = scores(model, batch, mems)
        lp2, nll2, mems2 = scores(loaded, batch, mems2)
        assert torch.equal(lp, lp2)
        assert torch.equal(nll, nll2)
        assert torch.isfinite(nll).all()
        # the NLL is the log-prob of the target, read off the full distribution
        torch.testing.assert_close(nll, -lp.gather(-1, batch["target"].unsqueeze(-1)).squeeze(-1))
        if variant == "xl-memory":
            assert mems is not None and all(torch.equal(a, b) for a, b in zip(mems, mems2))
            assert all(m.shape[1] == TGT_LEN for m in mems)

    # The weights restored are the trained ones, not a re-initialisation: an identically seeded,
    # untrained model scores the same batch differently.
    fresh = build(data, variant)
    _, nll_fresh, _ = scores(fresh, seg[0], None)
    _, nll_loaded, _ = scores(loaded, seg[0], None)
    assert not torch.allclose(nll_fresh, nll_loaded, atol=1e-3)
