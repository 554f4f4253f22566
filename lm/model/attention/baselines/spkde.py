"""Transformer-SPKDE (Han et al., NeurIPS 2023): scaled-and-projected KDE weights for the keys.

SPKDE (Vandermeulen & Scott 2014) makes a KDE robust by scaling it up by β > 1 and projecting it back
onto the convex hull of the data's feature maps: with φ the Gaussian kernel's feature map over the n
keys that query i may see (memory + segment keys ≤ i),

    w_i = argmin_{w ∈ simplex} ‖Σ_j w_j φ(k_j) − β (1/n) Σ_j φ(k_j)‖²
        = argmin_{w ∈ simplex} wᵀKw − 2 wᵀt,     t_j = (β/n) Σ_l k(k_j, k_l)

The scaled target lies outside the hull; the projection keeps keys in dense regions and drops
(w_j = 0) keys in sparse ones -- the outliers. Solved batched in torch for every query at once, by
``n_steps`` of projected gradient descent from uniform weights,

    w ← Π_simplex(w − (Kw − t) / L_i),     L_i = max_j Σ_{l visible} K_jl ≥ λ_max(K)   (Gershgorin)

(1/L_i is a safe step for the objective's gradient 2(Kw − t), whose Lipschitz constant is 2λ_max),
with the sort-based Euclidean projection onto the simplex (Duchi et al. 2008) restricted to each
query's visible keys. A fixed step count keeps it a plain tensor program: no solver, no CPU round
trip, causal because every sum runs over visible keys only. Attention then uses the weights exactly
like RKDE (same kernel options), by default with joint [k̂; v] weights in the numerator and key weights in the denominator
(``weighting: joint``, the reference's ``SPKDEAttention``), or key weights in both (``weighting: keys``).

β: the reference sets β = 1/(1 − ε) from an outlier fraction ε = 0.05 (β ≈ 1.0526); give either
``outlier_fraction`` or ``beta`` (not both). The project's earlier default was β = 1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lm.model.attention.base import register
from lm.model.attention.baselines.common import one_of, positive_float, positive_int, require
from lm.model.attention.baselines.rkde import KernelDensityAttention, kernel_options, uniform_weights


@dataclass
class SPKDEOptions:
    """
    beta: scale β > 1 of the KDE before projection; null = 1/(1 − outlier_fraction).
    outlier_fraction: ε in (0, 1); null = 0.05 (the reference) unless beta is given.
    n_steps: projected-gradient steps per forward.
    weighting, normalize_query, bandwidth, learn_bandwidth, detach_weights: as for rkde.
    """

    beta: float | None = None
    outlier_fraction: float | None = None
    n_steps: int = 10
    weighting: str = "joint"
    normalize_query: bool = False
    bandwidth: float | None = None
    learn_bandwidth: bool = False
    detach_weights: bool = True

    def __post_init__(self):
        require(self.beta is None or self.outlier_fraction is None, "spkde",
                "give option beta or option outlier_fraction (beta = 1/(1 - outlier_fraction)), not both.")
        if self.beta is None:
            eps = 0.05 if self.outlier_fraction is None else self.outlier_fraction
            require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1, "spkde",
                    f"option outlier_fraction must be a number in (0, 1), got {eps!r}.")
            self.beta = 1.0 / (1.0 - eps)
        positive_float("spkde", "beta", self.beta)
        require(self.beta > 1, "spkde", f"option beta must be > 1 (SPKDE scales the KDE up), got {self.beta}.")
        positive_int("spkde", "n_steps", self.n_steps, minimum=0)
        one_of("spkde", "weighting", self.weighting, ("joint", "keys"))
        kernel_options("spkde", self)


def project_simplex(u: Tensor, allowed: Tensor) -> Tensor:
    """Euclidean projection of each row of ``u [..., T, S]`` onto the simplex over its allowed entries
    (``allowed [T, S]``); disallowed entries come out exactly 0.

    Sort the allowed entries descending (s_1 ≥ s_2 ≥ ...), ρ = max{k : s_k − (Σ_{m≤k} s_m − 1)/k > 0},
    θ = (Σ_{m≤ρ} s_m − 1)/ρ, w = max(u − θ, 0)."""
    s = u.masked_fill(~allowed, float("-inf")).sort(dim=-1, descending=True).values
    css = s.cumsum(-1)  # -inf past the allowed entries; those positions never satisfy the test below
    ks = torch.arange(1, u.size(-1) + 1, device=u.device, dtype=u.dtype)
    rho = (s - (css - 1) / ks > 0).sum(-1, keepdim=True)  # the test holds for a prefix (NaN/-inf: false)
    theta = (css.gather(-1, rho - 1) - 1) / rho
    return (u - theta).clamp_min(0.0) * allowed


def spkde_weights(gram: Tensor, allowed: Tensor, beta: float, n_steps: int) -> Tensor:
    """Per-query SPKDE weights ``[B, H, T, S]`` by projected gradient descent (module docstring)."""
    a = allowed.to(gram.dtype)
    row = a @ gram  # Σ_{l visible to i} k(k_l, k_j), [B,H,T,S]
    n = a.sum(-1, keepdim=True)
    t = beta * row / n
    step = 1.0 / row.masked_fill(~allowed, 0.0).amax(-1, keepdim=True)
    w = uniform_weights(allowed, gram.dtype).expand_as(row)
    for _ in range(n_steps):
        w = project_simplex(w - step * (w @ gram - t), allowed)
    return w


@register("spkde")
class SPKDEAttention(KernelDensityAttention):
    Options = SPKDEOptions

    def key_weights(self, k_hat, gram, allowed):
        return spkde_weights(gram, allowed, self.opts.beta, self.opts.n_steps)
