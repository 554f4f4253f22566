"""Checks that only a CUDA GPU can run (marked ``gpu``; skipped without one). ``scripts/gpu_check.sh`` runs
them with ``pytest -m gpu`` on a GPU machine.

- every registered attention variant gives the same fp32 outputs on the GPU as on the CPU (same weights);
- a bf16-autocast loss on the GPU stays within 2% of the fp32 loss of the same batch;
- the causal fused path runs under the flash kernel alone (no silent fallback to the math kernel), so
  bf16 training on a GPU really gets flash attention for softmax and the softmax-family variants.
"""

from __future__ import annotations

import pytest
import torch

from lm.config import AttentionConfig, ModelConfig
from lm.model.attention import ATTENTION
from lm.model.transformer import TransformerLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]
V = 97


def tiny(variant: str = "softmax", **kw) -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, d_head=16, d_inner=128, dropout=0.0, adaptive=False,
                      cutoffs=[], attention=AttentionConfig(name=variant), **kw)
    return TransformerLM(cfg, V).eval()


@pytest.mark.parametrize("variant", sorted(ATTENTION))
def test_cuda_matches_cpu_in_fp32(variant):
    net = tiny(variant)
    tokens = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(tokens).hidden
        got = net.cuda()(tokens.cuda()).hidden.cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


def test_bf16_loss_close_to_fp32_on_cuda():
    net = tiny().cuda()
    tokens = torch.randint(0, V, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        fp32 = net.nll(net(x).hidden, y).mean().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = net.nll(net(x).hidden, y).mean().item()
    assert abs(bf16 - fp32) / fp32 < 0.02, (bf16, fp32)


def test_softmax_attention_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = tiny().cuda().train()
    tokens = torch.randint(0, V, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(tokens[:, :-1])
        net.nll(out.hidden, tokens[:, 1:]).mean().backward()  # raises if flash cannot take our call
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
