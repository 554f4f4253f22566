"""Transformer-MoM (Han et al., NeurIPS 2023): median-of-means kernel density estimate.

A median of block means is a robust estimate of a mean: a few outlying keys can spoil only the blocks
that contain them, and the median block ignores those. Exactly what is implemented, per head and
per query i (causal; with memory the memory keys come first in the order):

1. V_i = the keys query i may see, in position order, n_i = |V_i|; K_i = min(K, n_i) blocks.
2. The key of rank r (0-based within V_i) goes to block b = ⌊r · K_i / n_i⌋: K_i contiguous,
   non-empty blocks whose sizes differ by at most one.
3. Block likelihood: the mean softmax kernel of the query over the block's keys,
       L_b = (1/|B_b|) Σ_{j∈B_b} exp(q_iᵀk_j / √D)      (compared as log-mean-exp, no overflow).
4. The median block b* is the one of rank ⌊(K_i − 1)/2⌋ in ascending L_b (for even K_i the lower of
   the two middle blocks; ties broken by position).
5. out_i = Σ_{j∈B_b*} softmax_{j∈B_b*}(q_iᵀk_j / √D) v_j   (softmax over that block's keys only).

The block choice is discrete (no gradient flows through it); gradients flow through the softmax over
the chosen block. Everything in steps 1–5 depends only on V_i, so the output is strictly causal.
Relative positions are not supported (Table 1 uses absolute positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.model.attention.base import Attention, AttnContext, LayerState, register
from lm.model.attention.baselines.common import at_least_float32, positive_int, visible


@dataclass
class MoMOptions:
    """n_blocks: K, the number of contiguous key blocks per query (fewer while n_i < K)."""

    n_blocks: int = 4

    def __post_init__(self):
        positive_int("mom", "n_blocks", self.n_blocks)


def block_ids(allowed: Tensor, n_blocks: int) -> tuple[Tensor, Tensor]:
    """Block index of every key per query (``[T, S]``, −1 where hidden) and K_i (``[T, 1]``)."""
    rank = allowed.long().cumsum(-1) - 1
    n = allowed.long().sum(-1, keepdim=True)
    k = n.clamp(max=n_blocks)
    ids = torch.div(rank * k, n.clamp_min(1), rounding_mode="floor")
    return ids.masked_fill(~allowed, -1), k


@torch.no_grad()
def median_block(scores: Tensor, allowed: Tensor, n_blocks: int) -> Tensor:
    """Bool ``[B, H, T, S]``: the keys of each query's median block (steps 1–4)."""
    ids, k = block_ids(allowed, n_blocks)
    means = []
    for b in range(n_blocks):
        in_b = ids == b  # [T, S]
        size = in_b.sum(-1)  # [T]
        lme = torch.logsumexp(scores.masked_fill(~in_b, float("-inf")), dim=-1) - size.clamp_min(1).log()
        means.append(lme.masked_fill(size == 0, float("inf")))  # empty blocks sort last
    means = torch.stack(means, dim=-1)  # [B, H, T, K]
    order = means.argsort(dim=-1, stable=True)
    rank = ((k - 1) // 2).expand(*means.shape[:-1], 1)  # [B, H, T, 1]
    chosen = order.gather(-1, rank)
    return ids == chosen


@register("mom")
class MoMAttention(Attention):
    Options = MoMOptions
    supports_relative = False

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, prev: LayerState | None):
        T, S = q.size(-2), k.size(-2)
        allowed = visible(ctx, T, S, q.device)
        scores = at_least_float32(q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
        chosen = median_block(scores, allowed, self.opts.n_blocks)
        w = torch.softmax(scores.masked_fill(~chosen, float("-inf")), dim=-1).to(v.dtype)
        p = self.dropatt if self.training else 0.0
        out = (F.dropout(w, p) if p > 0 else w) @ v
        return out, (w if ctx.need_weights else None)
