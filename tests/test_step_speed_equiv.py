"""Issue 32's cheaper CPU training step gives the same training, to the stated tolerance.

- Adam's fused kernel (``LanguageModel.configure_optimizers``) against the per-parameter loop that ran
  before: the same weights after several steps to float32 rounding, not bit for bit.
- The dropout mask (``lm/model/dropout.py``) against what dropout must be: the drop rate ``p`` (to 1/65536),
  kept values scaled so the expectation is the input, the gradient through the same mask, independent
  elements, one seed -> one mask (restoring torch's generator state, as a resumed checkpoint does,
  redraws it), no dependence on the thread count, and a 1-byte mask kept for backward.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from lm.config import ModelConfig
from lm.model.dropout import Dropout, dropout, keep_mask
from lm.model.transformer import TransformerLM
from lm.tasks.lm_module import LanguageModel

P = 0.1
P_USED = round(P * 65536) / 65536  # 6554 / 65536


def tiny_lm(dropout: float = 0.0, **kw) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(vocab_size=300, tgt_len=16, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                         dropout=dropout, cutoffs=[50, 150], **kw)


def attach(lm: LanguageModel, plugin=None) -> None:
    lm._trainer = SimpleNamespace(precision_plugin=plugin or Precision(), estimated_stepping_batches=100)


# ------------------------------------------------------------------------------------------------
# fused Adam
# ------------------------------------------------------------------------------------------------
def test_language_model_uses_fused_adam_except_under_mixed_precision():
    lm = tiny_lm()
    attach(lm)  # 32-true
    assert lm.configure_optimizers()["optimizer"].defaults["fused"] is True
    attach(lm, MixedPrecision("bf16-mixed", "cpu"))  # refuses to clip gradients of a self-unscaling optimizer
    assert not lm.configure_optimizers()["optimizer"].defaults["fused"]


@pytest.mark.slow  # a real Lightning fit in bf16-mixed with gradient clipping (the recipes' setting)
def test_bf16_mixed_fit_with_clipping_runs(tmp_path):
    import lightning as L

    from lm.data.streams import OrderedStreams

    lm = tiny_lm()
    batches = OrderedStreams(torch.randint(0, 300, (2 * (16 * 2 + 1),)), 2, 16)
    L.Trainer(precision="bf16-mixed", max_steps=2, gradient_clip_val=0.25, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              default_root_dir=tmp_path).fit(lm, train_dataloaders=batches)
    assert lm.trainer.global_step == 2


def test_fused_adam_trains_like_the_loop_adam():
    # Same initial weights and batches, 8 updates (weight decay on, as recipes may set it): the weights agree
    # to float32 rounding. The loss of each step agrees likewise.
    weights, losses = [], []
    for fused in (False, True):
        lm = tiny_lm(optim=dict(lr=3e-3, warmup_steps=0, weight_decay=0.01))
        opt = torch.optim.Adam(lm.parameters(), lr=3e-3, weight_decay=0.01, fused=fused)
        g = torch.Generator().manual_seed(1)
        run = []
        for _ in range(8):
            x = torch.randint(0, 300, (4, 17), generator=g)
            loss = lm.net.nll(lm.net(x[:, :-1]).hidden, x[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.item())
        weights.append(torch.cat([p.detach().flatten() for p in lm.parameters()]))
        losses.append(run)
    assert losses[0][0] == losses[1][0]  # same start
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------
def test_the_models_dropouts_are_the_cheap_ones():
    for ffn in ({"name": "dense"}, {"name": "switch", "n_experts": 2}):
        net = TransformerLM(ModelConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=P,
                                        cutoffs=[50], ffn=ffn), 100)
        drops = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(type(m) is Dropout and m.p == P for m in drops), ffn


def test_rate_scale_and_gradient():
    torch.manual_seed(3)
    x = torch.randn(1 << 20, requires_grad=True)
    y = dropout(x, P)
    kept = y != 0
    n = x.numel()
    sd = (P_USED * (1 - P_USED) / n) ** 0.5
    assert abs((1 - kept.float().mean().item()) - P_USED) < 5 * sd
    scale = 65536 / (65536 - 6554)
    assert torch.equal(y[kept], (x * scale)[kept])  # exact: one float32 multiply by 1 / (1 - p_used)
    g = torch.randn(n)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * scale, 0.0))


def test_elements_are_independent():
    # Four elements share one 64-bit Philox output: neighbours must still drop independently (p^2 together).
    torch.manual_seed(4)
    keep, _ = keep_mask((1 << 20,), 0.5)
    drop = ~keep
    for lag in (1, 2, 3, 4, 5):
        both = (drop[lag:] & drop[:-lag]).float().mean().item()
        assert abs(both - 0.25) < 5 * (0.25 * 0.75 / (drop.numel() - lag)) ** 0.5, lag


def test_one_seed_one_mask_and_resume_redraws_it():
    torch.manual_seed(7)
    a = keep_mask((64, 33), P)[0]
    state = torch.get_rng_state()
    b = keep_mask((64, 33), P)[0]
    torch.set_rng_state(state)  # what a resumed checkpoint does (lm_rng)
    assert torch.equal(keep_mask((64, 33), P)[0], b)
    assert not torch.equal(a, b)
    torch.manual_seed(7)
    assert torch.equal(keep_mask((64, 33), P)[0], a)


def test_mask_does_not_depend_on_the_thread_count():
    n = torch.get_num_threads()
    try:
        masks = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(5)
            masks.append(keep_mask((300, 700), P)[0])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(*masks)


def test_backward_keeps_a_one_byte_mask_not_a_float_one():
    saved = []
    x = torch.randn(256, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        Dropout(P)(x)
    assert saved == [torch.bool]


def test_eval_mode_p0_and_bf16():
    x = torch.randn(4, 8)
    d = Dropout(P).eval()
    assert d(x) is x
    assert dropout(x, 0.0) is x
    xb = torch.randn(256, 256, dtype=torch.bfloat16)
    yb = Dropout(0.5).train()(xb)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb[yb != 0], (xb * 2)[yb != 0])


def test_small_tensors_keep_torchs_mask():
    # Under MIN_ELEMENTS torch's dropout is the faster one: the same seed gives exactly F.dropout's output.
    x = torch.randn(8, 100)
    torch.manual_seed(9)
    ours = Dropout(P)(x)
    torch.manual_seed(9)
    assert torch.equal(ours, torch.nn.functional.dropout(x, P, True))
    big = torch.randn(256, 256)
    torch.manual_seed(9)
    ours = Dropout(P)(big)
    torch.manual_seed(9)
    assert not torch.equal(ours, torch.nn.functional.dropout(big, P, True))


# ------------------------------------------------------------------------------------------------
# the dense FFN's ReLU
# ------------------------------------------------------------------------------------------------
def _graph(fn) -> set[str]:
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
    return {type(f).__name__ for f in seen}


def test_dense_ffn_backward_copies_no_slices_and_computes_the_same():
    from lm.model.moe import DenseFFN

    torch.manual_seed(0)
    f = DenseFFN(16, 64, 0.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = f(x)
    assert "CopySlices" not in _graph(y.grad_fn)  # an in-place ReLU on Linear's view put one here
    old = torch.nn.Sequential(f.net[0], torch.nn.ReLU(inplace=True), f.net[3])
    x2 = x.detach().clone().requires_grad_()
    y2 = old(x2)
    assert "CopySlices" in _graph(y2.grad_fn)  # (the check sees it)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)


# ------------------------------------------------------------------------------------------------
# scripts/bench.py --versus
# ------------------------------------------------------------------------------------------------
def test_versus_contenders_are_the_old_and_new_code_paths_on_the_same_weights():
    import bench_versus  # scripts/ is on sys.path (tests/conftest.py)

    shape = dict(bench_versus.recipe(), n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, vocab=500,
                 cutoffs=[100, 300])
    runs = bench_versus.contenders(shape, total=100, seed=3)
    drops = {k: {type(m) for m in net.modules() if isinstance(m, torch.nn.Dropout)} for k, (net, _, _) in runs.items()}
    assert drops == {"reference": {torch.nn.Dropout}, "before": {torch.nn.Dropout}, "after": {Dropout}}
    relus = {k: {m.inplace for m in net.modules() if isinstance(m, torch.nn.ReLU)} for k, (net, _, _) in runs.items()}
    assert relus == {"reference": {True}, "before": {True}, "after": {False}}
    fused = {k: step.__closure__ for k, (_, step, _) in runs.items()}
    opts = {k: next(c.cell_contents for c in cl if isinstance(c.cell_contents, torch.optim.Optimizer))
            for k, cl in fused.items()}
    assert {k: bool(o.defaults["fused"]) for k, o in opts.items()} == {"reference": False, "before": False, "after": True}
    states = {k: net.state_dict() for k, (net, _, _) in runs.items()}
    for k in ("before", "reference"):
        assert states[k].keys() == states["after"].keys()
        assert all(torch.equal(states[k][n], states["after"][n]) for n in states["after"])


@pytest.mark.slow  # runs scripts/bench.py end to end (three contenders, a few steps each)
def test_bench_versus_smoke(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "versus.json"
    p = subprocess.run([sys.executable, str(root / "scripts" / "bench.py"), "--versus", "--smoke", "--threads", "1",
                        "--out", str(out)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["schema"] == "bench_versus/1" and r["data"] == "synthetic"
    assert list(r["results"]) == ["reference", "before", "after"]
    for row in r["results"].values():
        assert row["train_tokens_per_s"] > 0 and [s for s, _ in row["val_ppl"]] == [2, 4]
        assert row["steps_to_target"] is not None  # the default target is a PPL every contender reached
    assert set(r["ratios"]) == {"after_vs_reference", "after_vs_before", "before_vs_reference"}
    assert all(v["tokens_per_s"] > 0 for v in r["ratios"].values())
    assert len(r["loadavg_per_round"]) == 2 and "cpu_flags" in r["machine"]
    assert "| after |" in p.stdout
