"""Performer / FAVOR+ (Choromanski et al., ICLR 2021): softmax attention in linear time.

    exp(qᵀk / √D) = E_ω[φ(x_q) φ(x_k)],   φ(x) = exp(ωᵀx − ‖x‖²/2) / √m,   x = D^(-1/4) · q (or k)

with m random features ω ~ N(0, I_D), drawn block-orthogonal (each block of D rows orthonormal, rows
rescaled by chi(D)-distributed norms so each row keeps the Gaussian's length distribution) -- lower
variance than i.i.d. draws. Positive features keep the normaliser positive (the trigonometric features
of Rahimi & Recht do not). Causal attention is then prefix sums:

    out_i = φ(q_i)ᵀ Σ_{j≤i} φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_{j≤i} φ(k_j)

computed chunk by chunk (exact: inside a chunk the masked m-feature product, across chunks a running
sum of φ(k)vᵀ) so cost is O(S·m·D) and memory O(S·m + (S/chunk)·m·D) instead of one [S, m, D]
cumulative sum. With
memory, the M memory keys are visible to every query: their sums are a constant added to every prefix.

Stabilisation. The paper's code subtracts, before exp, a per-query max for queries (cancels exactly:
numerator and denominator of query i are scaled by the same factor) and a max over *all* positions for
keys. That key max is a function of later tokens, so here the keys use a data-independent bound
instead: ωᵀx − ‖x‖²/2 ≤ ‖ω‖²/2 for every x, so subtracting c = max_f ‖ω_f‖²/2 − 60 keeps every key
feature ≤ e^60 (sums over S keys times |v| stay below float32's 3.4e38 while S·|v| < 1e12; the 60
nats of headroom are taken from the underflow side), and because c is the same for every key it
cancels exactly between numerator and denominator. No key's features depend on any other token:
strictly causal. Features are computed in float32 or wider (half precision would underflow). Caveat:
a key whose ‖x‖²/2 exceeds c by more than ~160 (float32's e^-103) has all features underflow to 0
and drops out; if every visible key does, the output is 0 (the denominator is guarded, never NaN).

Random features are a buffer (one draw per layer, shared by its heads, as in the paper's code),
redrawn every ``redraw_every`` training forwards (the paper redraws periodically so the model does
not fit one draw; with gradient accumulation a forward is a micro-batch) and fixed in eval.
Draw k is a deterministic function of a seed buffer and k, so a resumed run and all data-parallel
ranks use the same features.

Not supported: relative positions (an additive score bias cannot pass through the feature map) and
attention dropout (there is no attention matrix to drop entries from); ``dropatt`` is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lm.errors import ConfigError
from lm.model.attention.base import Attention, AttnContext, LayerState, causal, register
from lm.model.attention.baselines.common import at_least_float32, boolean, positive_int, visible

_HEADROOM = 60.0  # key features <= e^60, see the module docstring


@dataclass
class PerformerOptions:
    """
    n_features: m, the number of random features (the approximation error falls like 1/√m).
    redraw_every: training forwards between feature redraws; 0 = never redraw.
    orthogonal: block-orthogonal features (FAVOR+); false = i.i.d. Gaussian rows.
    chunk_size: block length of the exact chunked prefix sums (memory/speed trade-off only).
    """

    n_features: int = 64
    redraw_every: int = 1000
    orthogonal: bool = True
    chunk_size: int = 64

    def __post_init__(self):
        positive_int("performer", "n_features", self.n_features)
        positive_int("performer", "redraw_every", self.redraw_every, minimum=0)
        boolean("performer", "orthogonal", self.orthogonal)
        positive_int("performer", "chunk_size", self.chunk_size)


def gaussian_features(m: int, d: int, generator: torch.Generator, orthogonal: bool = True) -> Tensor:
    """``[m, d]`` random feature directions ω (float32, CPU)."""
    if not orthogonal:
        return torch.randn(m, d, generator=generator)
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
        # Sign fix makes Q Haar-distributed, so every row's direction is uniform on the sphere.
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    w = torch.cat(blocks)[:m]
    # Orthonormal rows rescaled by chi(d) norms: each row is marginally N(0, I_d), rows orthogonal.
    return w * torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)


def positive_features(x: Tensor, omega: Tensor, is_query: bool) -> Tensor:
    """φ(x) for ``x [..., L, D]`` (already scaled by D^(-1/4)), float32, ``[..., L, m]``."""
    a = x @ omega.T - (x * x).sum(-1, keepdim=True) / 2
    if is_query:
        shift = a.amax(-1, keepdim=True).detach()  # per query: cancels in out_i
    else:
        shift = (omega * omega).sum(-1).amax() / 2 - _HEADROOM  # data-independent: cancels, stays causal
    return torch.exp(a - shift) / math.sqrt(omega.size(0))


def causal_linear_attention(fq: Tensor, fk: Tensor, v: Tensor, chunk: int) -> Tensor:
    """``out_i = fq_i · Σ_{j ≤ M+i} fk_j v_jᵀ / fq_i · Σ_{j ≤ M+i} fk_j`` for fq ``[B,H,T,m]``,
    fk ``[B,H,S,m]``, v ``[B,H,S,D]``, S = M + T (the first M keys are memory)."""
    B, H, T, m = fq.shape
    M = fk.size(2) - T
    kv0 = fk[:, :, :M].transpose(-1, -2) @ v[:, :, :M]  # memory: [B,H,m,D], seen by all queries
    z0 = fk[:, :, :M].sum(-2)  # [B,H,m]
    fk, v = fk[:, :, M:], v[:, :, M:]
    n = math.ceil(T / chunk)
    pad = n * chunk - T
    if pad:  # zero rows after the last query: they only reach padded queries, which are dropped
        fq, fk, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v))
    fq, fk, v = (x.reshape(B, H, n, chunk, x.size(-1)) for x in (fq, fk, v))
    kv = fk.transpose(-1, -2) @ v  # [B,H,n,m,D] per-chunk sums
    z = fk.sum(-2)  # [B,H,n,m]
    kv_before = kv.cumsum(2) - kv + kv0[:, :, None]  # sums over memory and all earlier chunks
    z_before = z.cumsum(2) - z + z0[:, :, None]
    a = (fq @ fk.transpose(-1, -2)).tril()  # inside the chunk: keys <= query only
    num = fq @ kv_before + a @ v
    den = (fq * z_before[:, :, :, None, :]).sum(-1) + a.sum(-1)
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]
    return out.reshape(B, H, n * chunk, -1)[:, :, :T]


@register("performer")
class PerformerAttention(Attention):
    Options = PerformerOptions
    supports_relative = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("feature_seed", torch.randint(0, 2**62, ()))
        self.register_buffer("n_draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("omega", self._draw(0))

    def _draw(self, k: int) -> Tensor:
        g = torch.Generator().manual_seed((int(self.feature_seed) + 1_000_003 * k) % 2**63)
        return gaussian_features(self.opts.n_features, self.d_head, g, self.opts.orthogonal)

    @torch.no_grad()
    def redraw(self) -> None:
        self.n_draws += 1
        self.omega.copy_(self._draw(int(self.n_draws)))

    def forward(self, h: Tensor, mem: Tensor | None, ctx: AttnContext, prev: LayerState | None = None):
        every = self.opts.redraw_every
        if self.training and every > 0:
            if int(self.n_calls) > 0 and int(self.n_calls) % every == 0:
                self.redraw()
            self.n_calls += 1
        return super().forward(h, mem, ctx, prev)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, prev: LayerState | None):
        T, S = q.size(-2), k.size(-2)
        if ctx.mask is not None and not torch.equal(ctx.mask, causal(T, S, q.device)):
            raise ConfigError("attention 'performer' supports only the causal mask over [memory; segment] "
                              "(prefix sums); model.same_length is not supported.")
        scale = self.d_head ** -0.25  # x = D^(-1/4)·q, D^(-1/4)·k, so φ(q)·φ(k) ≈ exp(qᵀk/√D)
        q, k, v_f = at_least_float32(q), at_least_float32(k), at_least_float32(v)
        omega = self.omega.to(q.dtype)
        fq = positive_features(q * scale, omega, is_query=True)
        fk = positive_features(k * scale, omega, is_query=False)
        out = causal_linear_attention(fq, fk, v_f, min(self.opts.chunk_size, T))
        weights = None
        if ctx.need_weights:  # the implied attention map, for analysis only (O(T·S·m))
            a = (fq @ fk.transpose(-1, -2)).masked_fill(~visible(ctx, T, S, q.device), 0.0)
            weights = (a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)).to(q.dtype)
        return out.to(v.dtype), weights
