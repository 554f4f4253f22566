"""Transformer-MGK (Nguyen et al., ICML 2022): every key is a mixture of Gaussians.

Each position j has R keys k_{j,1..R} (the first from the shared q/k/v projection, the others from an
extra Linear), each the mean of a Gaussian with a learned per-head, per-component variance σ_r² and
mixing weight π_r = softmax(learned logits)_r. The attention weight of query i on position j is

    a_ij = Σ_r π_r exp(−‖q_i − k_{j,r}‖² / 2σ_r²)  /  Σ_{j' visible} Σ_r π_r exp(−‖q_i − k_{j',r}‖² / 2σ_r²)

i.e. a softmax over the R·S (key, component) pairs, with values repeated per component. Expanding the
square, the logit of the pair (j, r) is

    log π_r − ‖q_i‖²/2σ_r² + q_iᵀk_{j,r}/σ_r² − ‖k_{j,r}‖²/2σ_r².

Only when all components share one σ does the ‖q_i‖² term cancel per row; with a learned σ_r per
component it does not (it shifts component r of every key by the same amount, changing the balance
between components). So the whole logit is written as one dot product of augmented vectors,

    q̃_i = [q_i, ‖q_i‖², 1],   k̃_{j,r} = [k_{j,r}/σ_r², −1/2σ_r², log π_r − ‖k_{j,r}‖²/2σ_r²],

and attention is one fused ``scaled_dot_product_attention`` call (scale 1) over R·S keys of width
D + 2 with the boolean causal mask repeated per component -- exact, no [T, S] float bias to build.

Init: σ_r² = √D, π uniform, so with R = 1 and equal key norms MGK is standard softmax(qᵀk/√D).
Memory works like softmax attention: keys over [memory; segment] under the decoder's mask.
Relative positions are not implemented (the paper's Table 1 uses absolute positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.model.attention.base import Attention, AttnContext, LayerState, register
from lm.model.attention.baselines.common import at_least_float32, boolean, positive_float, positive_int, visible


@dataclass
class MGKOptions:
    """
    n_components: R, Gaussian keys per position (the paper: 2); R - 1 extra key projections.
    init_variance: σ_r² at init; null = √D (matches standard attention's temperature).
    learn_variance: learn log σ_r² per head and component (else fixed at init_variance).
    learn_mixing: learn π_r per head (else uniform).
    """

    n_components: int = 2
    init_variance: float | None = None
    learn_variance: bool = True
    learn_mixing: bool = True

    def __post_init__(self):
        positive_int("mgk", "n_components", self.n_components)
        if self.init_variance is not None:
            positive_float("mgk", "init_variance", self.init_variance)
        boolean("mgk", "learn_variance", self.learn_variance)
        boolean("mgk", "learn_mixing", self.learn_mixing)


@register("mgk")
class MGKAttention(Attention):
    Options = MGKOptions
    supports_relative = False

    def __init__(self, d_model: int, n_head: int, d_head: int, *args, **kwargs):
        super().__init__(d_model, n_head, d_head, *args, **kwargs)
        R = self.opts.n_components
        self.k_extra = nn.Linear(d_model, (R - 1) * n_head * d_head, bias=False) if R > 1 else None
        var0 = self.opts.init_variance or math.sqrt(d_head)
        self.log_var = nn.Parameter(torch.full((n_head, R), math.log(var0)), requires_grad=self.opts.learn_variance)
        self.mix_logits = nn.Parameter(torch.zeros(n_head, R), requires_grad=self.opts.learn_mixing)

    def project(self, h: Tensor, mem: Tensor | None):
        """q ``[B,H,T,D]``, keys with a component axis ``[B,H,R,S,D]``, v ``[B,H,S,D]``."""
        q, k, v = super().project(h, mem)
        if self.k_extra is None:
            return q, k[:, :, None], v
        x = h if mem is None or mem.size(1) == 0 else torch.cat([mem, h], dim=1)
        B, S, _ = x.shape
        extra = self.k_extra(x).view(B, S, -1, self.n_head, self.d_head).permute(0, 3, 2, 1, 4)
        return q, torch.cat([k[:, :, None], extra], dim=2), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, prev: LayerState | None):
        B, H, R, S, D = k.shape
        T = q.size(-2)
        var = self.log_var.exp().to(q.dtype)[None, :, :, None, None]  # [1,H,R,1,1]
        log_pi = torch.log_softmax(self.mix_logits, dim=-1).to(q.dtype)[None, :, :, None, None]
        q_aug = torch.cat([q, (q * q).sum(-1, keepdim=True), torch.ones_like(q[..., :1])], dim=-1)
        k_aug = torch.cat([k / var, (-0.5 / var).expand(B, H, R, S, 1),
                           log_pi - (k * k).sum(-1, keepdim=True) / (2 * var)], dim=-1)
        k_aug = k_aug.reshape(B, H, R * S, D + 2)  # component-major: [comp 0 keys; comp 1 keys; ...]
        v_rep = v.repeat(1, 1, R, 1)
        allowed = visible(ctx, T, S, q.device).repeat(1, R)  # [T, R·S]
        p = self.dropatt if self.training else 0.0
        if not ctx.need_weights:
            return F.scaled_dot_product_attention(q_aug, k_aug, v_rep, attn_mask=allowed, dropout_p=p, scale=1.0), None
        logits = at_least_float32(q_aug @ k_aug.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        w = torch.softmax(logits, dim=-1).to(q.dtype)
        out = (F.dropout(w, p) if p > 0 else w) @ v_rep
        return out, w.view(B, H, T, R, S).sum(3)  # weight of position j = sum over its components
