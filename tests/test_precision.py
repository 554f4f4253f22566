"""bf16-mixed at the Trainer level: a real ``lightning.Trainer`` step of the ``LanguageModel`` with
``precision='bf16-mixed'`` against ``'32-true'`` from identical weights on the same batch, for every
registered attention variant and for an MoE model; and evaluation under bf16-mixed.

(Module-level autocast checks of the decoder, adaptive softmax and MoE live in test_model.py,
test_adaptive.py and test_moe.py; this file checks what a user runs: the Trainer's precision plugin,
fp32 master weights, gradient clipping and the optimizer step.)
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import Loader  # a plain iterable of ready batches

from lm.config import AttentionConfig, EvalConfig, FFNConfig, OptimConfig
from lm.model.attention import ATTENTION
from lm.tasks.lm_module import LanguageModel

V, B, T = 400, 4, 16
VARIANTS = sorted(ATTENTION)


def attention(variant: str) -> AttentionConfig:
    if variant in ("elliptical", "elliptical_quest"):  # the paper: layer 0 ordinary attention
        return AttentionConfig(name=variant, layers="1:", default="quest" if variant == "elliptical_quest" else "softmax")
    return AttentionConfig(name=variant)


def make_model(variant: str = "softmax", ffn: FFNConfig | None = None, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(vocab_size=V, tgt_len=T, n_layer=3, d_model=32, n_head=2, d_head=16, d_inner=64,
                         dropout=0.0, cutoffs=[50, 200], attention=attention(variant), ffn=ffn or FFNConfig(),
                         optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                         eval=EvalConfig(protocol="sliding", tgt_len=T, stride=4, batch_size=4))


def batches(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    # Zipf-like ids so the adaptive softmax's tail clusters are exercised too
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    x = torch.multinomial(p / p.sum(), n * B * (T + 1), replacement=True, generator=g).view(n, B, T + 1)
    return [{"input": x[i, :, :-1], "target": x[i, :, 1:], "first": i == 0} for i in range(n)]


class Capture(Callback):
    def __init__(self):
        self.losses, self.qkv_dtypes, self._hook = [], [], None

    def on_train_start(self, trainer, pl_module):
        attn = pl_module.net.layers[-1].attn
        self._hook = attn.qkv.register_forward_hook(lambda m, i, o: self.qkv_dtypes.append(o.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()


def fit(model: LanguageModel, precision: str, data: list[dict]) -> Capture:
    cap = Capture()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=len(data), gradient_clip_val=0.25,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[cap])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=Loader(data))
    return cap


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_bf16_mixed_step_matches_fp32(variant):
    data = batches(1)
    m32 = make_model(variant)
    m16 = copy.deepcopy(m32)
    before = {n: p.detach().clone() for n, p in m32.named_parameters()}
    c32, c16 = fit(m32, "32-true", data), fit(m16, "bf16-mixed", data)
    assert c32.qkv_dtypes == [torch.float32] and c16.qkv_dtypes == [torch.bfloat16]  # autocast really ran
    l32, l16 = c32.losses[0], c16.losses[0]
    assert torch.isfinite(torch.tensor([l32, l16])).all()
    assert abs(l16 - l32) < 0.02 * abs(l32), (variant, l16, l32)
    # fp32 master weights: parameters stay float32, are finite, and the step moved them like fp32's did
    moved32 = moved16 = 0.0
    for (n, p32), (_, p16) in zip(m32.named_parameters(), m16.named_parameters()):
        assert p16.dtype == torch.float32, n
        assert torch.isfinite(p16).all(), n
        moved32 += (p32.detach() - before[n]).abs().sum().item()
        moved16 += (p16.detach() - before[n]).abs().sum().item()
    assert moved16 > 0 and abs(moved16 - moved32) < 0.1 * moved32, (moved16, moved32)


@pytest.mark.parametrize("variant", ["softmax", "elliptical"])
def test_bf16_mixed_training_tracks_fp32(variant):
    data = batches(6)
    m32 = make_model(variant)
    m16 = copy.deepcopy(m32)
    l32, l16 = fit(m32, "32-true", data).losses, fit(m16, "bf16-mixed", data).losses
    assert l32[-1] < l32[0]  # it learns (repeated Zipf batches)
    for a, b in zip(l32, l16):
        assert abs(a - b) < 0.03 * abs(a), (l32, l16)


@pytest.mark.parametrize("name", ["switch", "glam"])
def test_bf16_mixed_moe_step(name):
    ffn = FFNConfig(name=name, n_experts=4, capacity_factor=None, eval_capacity_factor=None)
    data = batches(2)
    m32 = make_model("elliptical", ffn=ffn)
    m16 = copy.deepcopy(m32)
    l32, l16 = fit(m32, "32-true", data).losses, fit(m16, "bf16-mixed", data).losses
    assert all(map(lambda x: torch.isfinite(torch.tensor(x)), l16))
    assert abs(l16[0] - l32[0]) < 0.02 * abs(l32[0]), (l16, l32)
    assert all(p.dtype == torch.float32 for p in m16.parameters())


def test_bf16_mixed_evaluation_close_to_fp32(tmp_path):
    model = make_model("elliptical")
    tokens = batches(1, seed=3)[0]["input"].reshape(-1)
    from lm.data.protocols import eval_batches

    results = {}
    for precision in ("32-true", "bf16-mixed"):
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.validate(model, dataloaders=eval_batches(tokens, model.eval_cfg, T), verbose=False)
        results[precision] = dict(model.last_result)
    a, b = results["32-true"], results["bf16-mixed"]
    assert a["tokens_scored"] == b["tokens_scored"] == tokens.numel() - 1
    assert abs(a["nll"] - b["nll"]) < 0.02 * a["nll"], (a["nll"], b["nll"])
