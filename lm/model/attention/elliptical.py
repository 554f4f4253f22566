"""Elliptical attention (Nielsen et al., NeurIPS 2024): attention in a Mahalanobis neighbourhood.

    out_i = Σ_j softmax_j(s · q_iᵀ M k_j) v_j,    M = diag(m̂)

m̂ is estimated, parameter free and without gradient, from how much each value coordinate changes
between consecutive layers: m_d = mean_n |v^ℓ_{n,d} - v^{ℓ-1}_{n,d}|, then m̂ = m / max_d m_d.
Coordinates where the values vary little get stretched (m̂ near 1 keeps them, small m̂ shrinks them).
Since qᵀ diag(m̂) k = (q ⊙ m̂)ᵀ k, this is standard attention on a rescaled query: it runs on the
fused SDPA kernels at the cost of one O(S·D) reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lm.errors import ConfigError, unknown
from lm.model.attention.base import Attention, AttnContext, LayerState, Scores, register


@dataclass
class EllipticalOptions:
    """
    scale: ``sqrt`` = 1/sqrt(D) as in the paper's equation (and its MoE/image code); ``none`` = 1, as
        in the released WikiText code.
    estimator: ``segment_mean`` = mean over all memory+segment positions (faithful to the released
        code; query i's stretch depends, detached, on later tokens of the segment); ``causal`` = prefix
        mean up to each query's position (a per-query m̂_i, no information from later tokens).
    normalize: ``max`` (paper: largest entry exactly 1) or ``mean`` (alternative in the code).
    reduce: ``mean`` over positions (paper) or ``median`` (alternative; segment estimator only).
    stretch_position: also stretch the query of Transformer-XL's position term (relative setting).
    """

    scale: str = "sqrt"
    estimator: str = "segment_mean"
    normalize: str = "max"
    reduce: str = "mean"
    stretch_position: bool = False

    def __post_init__(self):
        for name, choices in (("scale", ("sqrt", "none")), ("estimator", ("segment_mean", "causal")),
                              ("normalize", ("max", "mean")), ("reduce", ("mean", "median"))):
            if getattr(self, name) not in choices:
                raise unknown(f"elliptical option {name}", getattr(self, name), choices)
        if self.estimator == "causal" and self.reduce == "median":
            raise ConfigError("elliptical: reduce='median' has no causal (prefix) form; use reduce='mean' "
                              "with estimator='causal', or estimator='segment_mean'.")


@torch.no_grad()
def elliptical_metric(v: Tensor, v_prev: Tensor, qlen: int, estimator: str = "segment_mean",
                      normalize: str = "max", reduce: str = "mean", key_mask: Tensor | None = None) -> Tensor:
    """m̂ from this layer's and the previous layer's values ``[B, H, S, D]`` (same positions).

    Returns ``[B, H, 1, D]`` (segment estimator) or ``[B, H, qlen, D]`` (causal: the query at segment
    position i uses the prefix of the S - qlen memory positions and segment positions <= i).
    ``key_mask`` (bool ``[B, S]``, False = padding): padded positions are left out of the mean / median /
    prefix mean, so a padded sentence gets the m̂ it has alone (finetuning with padded batches).
    Detached; a head whose values did not change at all gets m̂ = 1 (no stretch) instead of 0/0.
    """
    # abs_ in place on the fresh difference: one [B, H, S, D] temporary instead of two (the second
    # allocation made this reduction ~10x slower than the arithmetic; see scripts/bench_attention.py).
    diff = (v.float() - v_prev.float()).abs_()
    if key_mask is not None:
        return _normalise(_masked_mean(diff, key_mask, qlen, estimator, reduce), normalize).to(v.dtype)
    if estimator == "segment_mean":
        m = diff.median(dim=2, keepdim=True).values if reduce == "median" else diff.mean(dim=2, keepdim=True)
    else:
        s = diff.size(2)
        count = torch.arange(s - qlen + 1, s + 1, device=v.device, dtype=diff.dtype)
        m = diff.cumsum(dim=2)[:, :, s - qlen:] / count[:, None]
    return _normalise(m, normalize).to(v.dtype)


def _normalise(m: Tensor, normalize: str) -> Tensor:
    denom = m.amax(dim=-1, keepdim=True) if normalize == "max" else m.mean(dim=-1, keepdim=True)
    tiny = torch.finfo(m.dtype).tiny
    return torch.where(denom > tiny, m / denom.clamp_min(tiny), torch.ones_like(m))


def _masked_mean(diff: Tensor, key_mask: Tensor, qlen: int, estimator: str, reduce: str) -> Tensor:
    """The estimator over real positions only (``key_mask`` [B, S], True = real)."""
    keep = key_mask[:, None, :, None].to(diff.dtype)  # [B, 1, S, 1]
    if estimator == "segment_mean":
        if reduce == "median":
            return diff.masked_fill(keep == 0, float("nan")).nanmedian(dim=2, keepdim=True).values.nan_to_num(0.0)
        return (diff * keep).sum(dim=2, keepdim=True) / keep.sum(dim=2, keepdim=True).clamp_min(1.0)
    s = diff.size(2)
    # A pad query (no real position up to it) gets an all-zero estimate -> m̂ = 1; its output is unused.
    return ((diff * keep).cumsum(dim=2)[:, :, s - qlen:]
            / keep.cumsum(dim=2)[:, :, s - qlen:].clamp_min(1.0))


@register("elliptical")
class EllipticalAttention(Attention):
    Options = EllipticalOptions

    def metric(self, v: Tensor, prev: LayerState | None, qlen: int, key_mask: Tensor | None = None) -> Tensor | None:
        """m̂, or None where there is no previous layer (layer 0 is ordinary attention)."""
        if prev is None or prev.values is None:
            return None
        if prev.values.shape != v.shape:
            raise ConfigError(f"elliptical layer {self.layer_idx}: previous layer's values {tuple(prev.values.shape)} "
                              f"do not match this layer's {tuple(v.shape)}; all layers need the same n_head, d_head.")
        o = self.opts
        return elliptical_metric(v, prev.values, qlen, o.estimator, o.normalize, o.reduce, key_mask)

    def score_transform(self, s: Scores, v: Tensor, ctx: AttnContext, prev: LayerState | None) -> Scores:
        m_hat = self.metric(v, prev, s.q.size(-2), ctx.key_mask)
        standard = 1.0 / math.sqrt(self.d_head)
        if s.q_pos is not None:
            # Elliptical multiplies its position term by the scale (see ``Scores.pos_scale``).
            s = replace(s, pos_scale=standard)
        if m_hat is None:  # no previous layer (layer 0): ordinary attention
            return s
        scale = s.scale if self.opts.scale == "sqrt" else 1.0
        s = replace(s, q=s.q * m_hat, scale=scale)
        if s.q_pos is not None and self.opts.stretch_position:
            s = replace(s, q_pos=s.q_pos * m_hat, pos_scale=scale)
        return s
