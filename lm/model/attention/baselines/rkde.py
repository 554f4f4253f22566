"""Transformer-RKDE (Han et al., NeurIPS 2023): attention with a robust kernel density estimate.

Attention as Nadaraya–Watson regression with a Gaussian kernel on L2-normalised keys k̂,

    k(x, y) = exp(−‖x − y‖² / 2σ²),     k(k̂_j, k̂_l) = exp((k̂_jᵀk̂_l − 1) / σ²)

where the plain KDE gives every visible key the same weight. The robust KDE (Kim & Scott 2012) instead
weights the keys so that outlying keys count less: with φ the kernel's feature map, IRLS on the Huber
loss of the RKHS residuals r_j = ‖φ(x_j) − Σ_l w_l φ(x_l)‖,

    r_j² = k(x_j, x_j) − 2 Σ_l w_l k(x_j, x_l) + Σ_{l,l'} w_l w_l' k(x_l, x_l')
    w_j  ← u_j / Σ_l u_l,   u_j = ψ(r_j)/r_j = min(1, c / r_j)                    (Huber, threshold c)

starting from uniform w, for ``n_iters`` steps (default 1, the reference's num_iter). Causality: the
sums run over the keys query i may see (memory + segment keys ≤ i), so every query has its own weight
vector w_i· (a [T, S] matrix per head, one [T,S]x[S,S] matmul per step: no [T, S, S] tensor).

Numerator and denominator weights (``weighting``). The reference code (``aaronhan223/robust_transformer``,
``RobustAttention``/``RBFMultiHeadAttn``) solves the weights twice: on the joint vectors
x_j = [k̂_j; v_j] (k(x_j, x_l) = k(k̂_j, k̂_l)·exp(−‖v_j − v_l‖²/2σ²)) for the numerator and on the keys
x_j = k̂_j for the denominator -- the ratio of a robust joint density to a robust marginal one:

    out_i = Σ_j w^kv_ij k(q_i, k̂_j) v_j / Σ_j w^k_ij k(q_i, k̂_j)            (weighting: joint, default)

whose weights on the keys need not sum to 1. ``weighting: keys`` uses w^k in both: rows on the
simplex, softmax_j(q_iᵀk̂_j/σ² + log w_ij) (the per-row ‖q_i‖² and ‖k̂_j‖² = 1 terms cancel), one fused
SDPA call -- the project's earlier default. n_iters = 0 is plain kernel attention (uniform w).

Kernel (``normalize_query``, ``bandwidth``). The reference keeps the query raw and uses
exp(−‖q − k̂‖²/√D), i.e. σ² = √D/2, fixed: the defaults (normalize_query false, bandwidth null,
learn_bandwidth false). The project's earlier kernel normalised the query too and learned σ per head
from 0.3 (normalize_query: true, bandwidth: 0.3, learn_bandwidth: true): with unit vectors 1/σ² is then
the softmax temperature (σ = 0.3 gives ≈ 11, similar to QKNorm's learned gain at short lengths).

c: a fixed number, or (default) per query the median residual under uniform weights (Kim & Scott's
choice), kept fixed over the iterations, without gradient, and floored at 1e-4 (a lone key has
residual 0). docs/baselines.md explains why the residual and the threshold are not the reference's.
The weights are computed without gradient by default (treated as data weights for the regression).
Relative positions are not supported (Table 1 uses absolute positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.model.attention.base import Attention, AttnContext, LayerState, register
from lm.model.attention.baselines.common import (at_least_float32, boolean, masked_log, one_of, positive_float,
                                                 positive_int, visible)


@dataclass
class RKDEOptions:
    """
    n_iters: IRLS reweighting steps (0 = plain key-normalised Gaussian-kernel attention; 1 = the reference).
    weighting: joint (numerator weights from [k̂; v], denominator from k̂: the reference) | keys (k̂ for both).
    threshold: Huber threshold c on the RKHS residual (in [0, 2] for unit vectors); null = per-query
        median residual under uniform weights.
    normalize_query: L2-normalise the query too (the reference: false).
    bandwidth: σ (at init, per head); null = sqrt(√D/2), the reference's exp(−‖q − k̂‖²/√D).
    learn_bandwidth: learn σ (the reference: fixed).
    detach_weights: compute the key weights without gradient.
    """

    n_iters: int = 1
    weighting: str = "joint"
    threshold: float | None = None
    normalize_query: bool = False
    bandwidth: float | None = None
    learn_bandwidth: bool = False
    detach_weights: bool = True

    def __post_init__(self):
        positive_int("rkde", "n_iters", self.n_iters, minimum=0)
        one_of("rkde", "weighting", self.weighting, ("joint", "keys"))
        if self.threshold is not None:
            positive_float("rkde", "threshold", self.threshold)
        kernel_options("rkde", self)


def kernel_options(variant: str, o) -> None:
    """Validation of the kernel options RKDE and SPKDE share."""
    boolean(variant, "normalize_query", o.normalize_query)
    if o.bandwidth is not None:
        positive_float(variant, "bandwidth", o.bandwidth)
    boolean(variant, "learn_bandwidth", o.learn_bandwidth)
    boolean(variant, "detach_weights", o.detach_weights)


class KernelDensityAttention(Attention):
    """Shared by RKDE and SPKDE: Gaussian kernel on unit vectors, per-query key weights."""

    supports_relative = False

    def __init__(self, d_model: int, n_head: int, d_head: int, *args, **kwargs):
        super().__init__(d_model, n_head, d_head, *args, **kwargs)
        sigma = self.opts.bandwidth or math.sqrt(math.sqrt(d_head) / 2)  # 2σ² = √D: exp(−‖q − k̂‖²/√D)
        self.log_bandwidth = nn.Parameter(torch.full((n_head,), math.log(sigma)),
                                          requires_grad=self.opts.learn_bandwidth)

    def inv_var(self) -> Tensor:
        return torch.exp(-2 * self.log_bandwidth)[:, None, None]  # 1/σ², [H, 1, 1]

    def key_weights(self, k_hat: Tensor, gram: Tensor, allowed: Tensor) -> Tensor:
        """Variant hook: ``[B, H, T, S]`` weights, each row on the simplex over its visible keys."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, prev: LayerState | None):
        T, S = q.size(-2), k.size(-2)
        q_hat = F.normalize(q, dim=-1) if self.opts.normalize_query else q
        k_hat = F.normalize(k, dim=-1)
        inv_var = self.inv_var().to(q.dtype)
        allowed = visible(ctx, T, S, q.device)
        joint = self.opts.weighting == "joint"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.opts.detach_weights):
            kf = at_least_float32(k_hat)  # the weights are solved in float32 even under autocast
            iv = self.inv_var().to(kf.dtype)
            gram = torch.exp((kf @ kf.transpose(-1, -2) - 1) * iv)  # k(k_j, k_l)
            w = self.key_weights(kf, gram, allowed)
            if joint:  # k([k̂_j; v_j], [k̂_l; v_l]) = k(k̂_j, k̂_l) · exp(−‖v_j − v_l‖²/2σ²)
                vf = at_least_float32(v)
                vv = (vf * vf).sum(-1)
                d2 = (vv[..., :, None] + vv[..., None, :] - 2 * vf @ vf.transpose(-1, -2)).clamp_min(0.0)
                w_kv = self.key_weights(kf, gram * torch.exp(-0.5 * d2 * iv), allowed)
        p = self.dropatt if self.training else 0.0
        if not joint and not ctx.need_weights:
            bias = masked_log(w, allowed).to(q.dtype)
            out = F.scaled_dot_product_attention(q_hat * inv_var, k_hat, v, attn_mask=bias, dropout_p=p, scale=1.0)
            return out, None
        logits = at_least_float32((q_hat * inv_var) @ k_hat.transpose(-1, -2))
        den = torch.logsumexp(logits + masked_log(w, allowed), dim=-1, keepdim=True)  # log Σ_j w^k_ij k_ij
        a = torch.exp(logits + masked_log(w_kv if joint else w, allowed) - den).to(v.dtype)
        return (F.dropout(a, p) if p > 0 else a) @ v, (a if ctx.need_weights else None)


def uniform_weights(allowed: Tensor, dtype) -> Tensor:
    a = allowed.to(dtype)
    return a / a.sum(-1, keepdim=True)


def huber_irls(gram: Tensor, allowed: Tensor, n_iters: int, threshold: float | None) -> Tensor:
    """Per-query robust KDE weights ``[B, H, T, S]`` (see the module docstring)."""
    w = uniform_weights(allowed, gram.dtype).expand(*gram.shape[:2], *allowed.shape)
    c = threshold
    for it in range(n_iters):
        kw = w @ gram  # Σ_l w_il k(k_l, k_j), only visible l contribute
        quad = (w * kw).sum(-1, keepdim=True)  # w_iᵀ K w_i
        r = torch.sqrt((1.0 - 2.0 * kw + quad).clamp_min(0.0) + 1e-12)  # k(x, x) = 1
        if c is None and it == 0:
            c = r.detach().masked_fill(~allowed, float("nan")).nanmedian(dim=-1, keepdim=True).values.clamp_min(1e-4)
        u = torch.minimum(torch.ones_like(r), c / r) * allowed
        w = u / u.sum(-1, keepdim=True)
    return w


@register("rkde")
class RKDEAttention(KernelDensityAttention):
    Options = RKDEOptions

    def key_weights(self, k_hat, gram, allowed):
        return huber_irls(gram, allowed, self.opts.n_iters, self.opts.threshold)
