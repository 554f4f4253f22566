"""A minimal plain-PyTorch decoder: the yardstick the framework's speed is measured against.

Same architecture as ``lm.model.transformer.TransformerLM`` in the Elliptical paper's setting
(absolute sinusoidal positions added to embeddings scaled by sqrt(d_model), post-LayerNorm blocks,
bias-free q/k/v/o, FFN Linear-ReLU-Dropout-Linear-Dropout, no memory), written without the
framework's registry, configs, layer states or Lightning: one ``F.scaled_dot_product_attention`` call
per layer, with the Elliptical rescaling of the query (segment mean, max-normalised) or the QUEST key
normalisation done inline.

What is deliberately shared with the framework, so that the comparison measures framework overhead and
not a different model:
- the input/output layer: ``lm.model.adaptive.AdaptiveEmbedding`` and ``AdaptiveLogSoftmax`` (the same
  adaptive softmax, tied), and for MoE models ``lm.model.moe.MoEFFN`` (the same expert dispatch);
- parameter names: they mirror ``TransformerLM``'s, so ``ref.load_state_dict(framework.state_dict())``
  gives the two models identical weights (``tests/test_bench.py`` checks that they then give the same
  loss).

``train_steps`` is the plain training loop the benchmark times: batches from the same
``OrderedStreams``, forward, adaptive-softmax NLL, backward, gradient-norm clipping, Adam, LR schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.model.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from lm.model.moe import MoEFFN

KINDS = ("softmax", "elliptical", "quest", "elliptical_quest")


def sinusoid(T: int, d_model: int, device) -> Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=device) / d_model))
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class RefAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_head: int, kind: str, scale: str):
        super().__init__()
        self.h, self.d, self.kind, self.scale = n_head, d_head, kind, scale
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.o = nn.Linear(n_head * d_head, d_model, bias=False)

    def forward(self, x: Tensor, v_prev: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        scale = 1.0 / math.sqrt(self.d)
        elliptical = self.kind in ("elliptical", "elliptical_quest") and v_prev is not None
        if elliptical:
            with torch.no_grad():  # m_d = mean_n |v_n,d - v_prev_n,d|, divided by its max over d
                m = (v.float() - v_prev.float()).abs().mean(dim=2, keepdim=True)
                m = (m / m.amax(dim=-1, keepdim=True).clamp_min(1e-30)).to(q.dtype)
            q = q * m
            if self.scale == "none":
                scale = 1.0
        if self.kind in ("quest", "elliptical_quest"):
            k = F.normalize(k, dim=-1)
            scale = 1.0 if (self.kind == "quest" or self.scale == "none") else scale
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.o(out.transpose(1, 2).reshape(B, T, self.h * self.d)), v


class RefFFN(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(d_inner, d_model), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class RefBlock(nn.Module):
    def __init__(self, attn: RefAttention, ffn: nn.Module, d_model: int, dropout: float):
        super().__init__()
        self.attn, self.ffn = attn, ffn
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, v_prev: Tensor | None) -> tuple[Tensor, Tensor]:
        a, v = self.attn(h, v_prev)
        h = self.norm1(h + self.drop(a))
        return self.norm2(h + self.ffn(h)), v


class ReferenceDecoder(nn.Module):
    """``kind`` on layers ``>= first_variant_layer`` (the paper: layer 0 standard), softmax below.

    ``moe``: None (dense FFN) or a dict of ``MoEFFN`` arguments applied on every layer (Switch)."""

    def __init__(self, vocab_size: int, n_layer: int, d_model: int, n_head: int, d_head: int, d_inner: int,
                 cutoffs: list[int], kind: str = "softmax", first_variant_layer: int = 0, scale: str = "sqrt",
                 dropout: float = 0.1, moe: dict | None = None, init_std: float = 0.02):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"reference decoder kind must be one of {KINDS}, got {kind!r}")
        self.d_model = d_model
        self.embed = AdaptiveEmbedding(vocab_size, d_model, d_model, cutoffs, 1, init_std)
        self.head = AdaptiveLogSoftmax(vocab_size, d_model, d_model, cutoffs, 1, tie_to=self.embed,
                                       init_std=init_std)
        self.drop = nn.Dropout(dropout)
        blocks = []
        for i in range(n_layer):
            k = kind if i >= first_variant_layer else ("quest" if kind == "elliptical_quest" else "softmax")
            ffn = MoEFFN(d_model, d_inner, dropout, **moe) if moe else RefFFN(d_model, d_inner, dropout)
            blocks.append(RefBlock(RefAttention(d_model, n_head, d_head, k, scale), ffn, d_model, dropout))
        self.layers = nn.ModuleList(blocks)
        for m in self.layers.modules():  # the blocks; embedding/softmax tables initialise themselves
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """Mean NLL over all tokens, and the summed MoE auxiliary loss (None for dense models)."""
        T = tokens.size(1)
        h = self.embed(tokens)
        h = self.drop(h + sinusoid(T, self.d_model, tokens.device).to(h.dtype))
        v = None
        for block in self.layers:
            h, v = block(h, v)
        nll = self.head.nll(self.drop(h), target).mean()
        aux = [b.ffn.aux_loss for b in self.layers if getattr(b.ffn, "aux_loss", None) is not None]
        return nll, (torch.stack(aux).sum() if aux else None)


def warmup_cosine(opt, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_steps(model: ReferenceDecoder, batches: Iterable[dict], n_steps: int, lr: float = 1e-3,
                clip: float = 0.25, bf16: bool = False, warmup: int = 200, total: int = 3000) -> list[float]:
    """The plain training loop; returns ``perf_counter()`` after each optimizer step (with the losses
    synchronised, like Lightning's ``.item()`` on the logged loss)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = warmup_cosine(opt, warmup, total)
    ends = []
    it = iter(batches)
    device = next(model.parameters()).device
    for _ in range(n_steps):
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in next(it).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, aux = model(batch["input"], batch["target"])
            total_loss = loss if aux is None else loss + aux
        total_loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss.item()
        ends.append(time.perf_counter())
    return ends
