"""FourierFormer (Nguyen et al., NeurIPS 2022): attention as a generalized Fourier integral estimator.

Attention read as Nadaraya–Watson regression with the Fourier integral kernel instead of a Gaussian:

    a_ij ∝ Π_d sinc(R_d (q_{i,d} − k_{j,d}))^p,   sinc(z) = sin(z)/z,   p = 4 (even, so a_ij ≥ 0)

normalised over the keys query i may see (causal; with memory, all memory keys too). R is a learned
per-head, per-dimension frequency vector.

Init of R: for small arguments log sinc(z)^4 ≈ −(2/3) z², so the kernel is ≈ exp(−(2/3) Σ_d R_d² (q_d −
k_d)²), a Gaussian of variance σ² = 3 / (4 R²). Standard attention corresponds to σ² = √D (exp(qᵀk/√D)
is a Gaussian kernel of that variance up to per-query/per-key norms), so R_0 = sqrt(3 / (4 √D)) by
default: the model starts out as a Gaussian-kernel attention with the usual temperature, and R·(q−k)
is O(1) for unit-scale q, k.

Numerics: the product of D factors in [0, 1] underflows easily, so it is computed in log space,
ℓ_ij = (p/2) Σ_d log(sinc(z_d)² + 1e-12), and normalised with a softmax (the row max is subtracted,
so the normaliser is ≥ 1 and needs no epsilon; the 1e-12 floor keeps log and its gradient finite at
the zeros of sinc and changes a factor only where |sinc| < 1e-6).

Cost: O(T·S·D) transcendental elementwise work, inherent to the kernel (no matmul form). The logits
are a custom autograd function that saves only q⊙R and k⊙R and recomputes the [chunk, S, D]
differences in backward (memory O(B·H·T·S), like softmax attention), in query chunks of about 2^20
elements so the intermediates stay in cache: ~9x faster on CPU than plain autograd over torch.sinc.
Relative positions are not supported (Table 1 uses absolute positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.model.attention.base import Attention, AttnContext, LayerState, register
from lm.model.attention.baselines.common import (at_least_float32, boolean, positive_float, positive_int, require,
                                                 visible)

_FLOOR = 1e-12


@dataclass
class FourierOptions:
    """
    power: p, an even exponent of sinc (the paper's generalized kernel uses 4).
    init_r: initial R_d; null = sqrt(3 / (4 sqrt(D))) (matches standard attention's temperature).
    learn_r: learn R per head and dimension.
    chunk_size: queries per chunk of the [B, H, chunk, S, D] difference tensor; null = about 2^20
        elements per chunk (cache-sized; only speed depends on it).
    """

    power: int = 4
    init_r: float | None = None
    learn_r: bool = True
    chunk_size: int | None = None

    def __post_init__(self):
        positive_int("fourier", "power", self.power, minimum=2)
        require(self.power % 2 == 0, "fourier", f"option power must be even (weights must be >= 0), got {self.power}.")
        if self.init_r is not None:
            positive_float("fourier", "init_r", self.init_r)
        boolean("fourier", "learn_r", self.learn_r)
        if self.chunk_size is not None:
            positive_int("fourier", "chunk_size", self.chunk_size)


def _sinc(z: Tensor) -> Tensor:
    """sin(z)/z with sinc(0) = 1 (0/0 is the only NaN a finite z can produce)."""
    return (torch.sin(z) / z).nan_to_num_(nan=1.0)


def _log_kernel(qr: Tensor, kr: Tensor, power: int) -> Tensor:
    z = qr[..., :, None, :] - kr[..., None, :, :]  # R ⊙ (q_i − k_j), [B, H, t, S, D]
    s = _sinc(z)
    return torch.log_(torch.addcmul(torch.full((), _FLOOR, dtype=s.dtype), s, s)).sum(-1) * (power / 2)


class _FourierLogits(torch.autograd.Function):
    """ℓ_ij = (p/2) Σ_d log(sinc(qr_id − kr_jd)² + floor); backward recomputes the differences.

    dℓ/dz = p · sinc(z) sinc'(z) / (sinc(z)² + floor),  sinc'(z) = (cos z − sinc z) / z  (0 at z = 0)."""

    @staticmethod
    def forward(ctx, qr: Tensor, kr: Tensor, power: int) -> Tensor:
        ctx.save_for_backward(qr, kr)
        ctx.power = power
        return _log_kernel(qr, kr, power)

    @staticmethod
    def backward(ctx, grad: Tensor):
        qr, kr = ctx.saved_tensors
        z = qr[..., :, None, :] - kr[..., None, :, :]
        s = _sinc(z)
        ds = ((torch.cos(z) - s) / z).nan_to_num_(nan=0.0)
        den = torch.addcmul(torch.full((), _FLOOR, dtype=s.dtype), s, s)
        g = s.mul_(ds).div_(den).mul_(grad[..., None] * ctx.power)  # dℓ/dz · upstream, in place
        return g.sum(-2), -g.sum(-3), None


def fourier_logits(q: Tensor, k: Tensor, r: Tensor, power: int, chunk: int) -> Tensor:
    """ℓ_ij = log Π_d sinc(R_d (q_id − k_jd))^p for q ``[B,H,T,D]``, k ``[B,H,S,D]``, r ``[H,D]``."""
    qr, kr = q * r[:, None, :], k * r[:, None, :]  # z = qr_i − kr_j: R folded in before the big tensor
    return torch.cat([_FourierLogits.apply(qc, kr, power) for qc in qr.split(chunk, dim=2)], dim=2)


@register("fourier")
class FourierAttention(Attention):
    Options = FourierOptions
    supports_relative = False

    def __init__(self, d_model: int, n_head: int, d_head: int, *args, **kwargs):
        super().__init__(d_model, n_head, d_head, *args, **kwargs)
        r0 = self.opts.init_r or math.sqrt(3.0 / (4.0 * math.sqrt(d_head)))
        self.r = nn.Parameter(torch.full((n_head, d_head), r0), requires_grad=self.opts.learn_r)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, prev: LayerState | None):
        T, S = q.size(-2), k.size(-2)
        B, H, _, D = q.shape
        chunk = self.opts.chunk_size or max(1, 2**20 // (B * H * S * D))
        qf, kf = at_least_float32(q), at_least_float32(k)  # the 1e-12 floor needs float32's range
        logits = fourier_logits(qf, kf, self.r.to(qf.dtype), self.opts.power, chunk)
        logits = logits.masked_fill(~visible(ctx, T, S, q.device), float("-inf"))
        w = torch.softmax(logits, dim=-1).to(v.dtype)
        p = self.dropatt if self.training else 0.0
        out = (F.dropout(w, p) if p > 0 else w) @ v
        return out, (w if ctx.need_weights else None)
