"""The attention interface, its registry, and the softmax-family machinery every variant shares.

A variant is one class registered under a name. The host decoder builds one instance per layer and
calls ``forward(h, mem, ctx, prev) -> (out, state)``:

- ``h [B, T, d_model]``: this segment; ``mem [B, M, d_model] | None``: the layer's memory (detached);
- ``ctx`` (``AttnContext``): what all layers share in one forward: the mask, relative positions, and
  whether attention maps are wanted;
- ``prev`` (``LayerState | None``): what the previous attention layer handed on — its value
  projection, which Elliptical's estimator needs. Every variant hands its values on, so any mix of
  variants across layers works.

Softmax-family variants only override ``score_transform``: it receives the ``Scores`` record (content
query, keys, content scale, and, in the relative setting, the position-term query and its scale) plus
the values, the context and the previous layer's state, and returns the record changed (rescale q,
normalise k, change a scale); the base class then runs the fused ``scaled_dot_product_attention``
kernel, or an explicit math path that also returns the attention weights. Variants that are not
softmax over ``q·k`` (Performer, FourierFormer, ...) override ``attend``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.errors import ConfigError, did_you_mean, unknown
from lm.model.positions import rel_shift, span_skew

ATTENTION: dict[str, type["Attention"]] = {}


def register(name: str):
    """Class decorator: make a variant available as ``model.attention.name: <name>``."""

    def deco(cls):
        cls.name = name
        ATTENTION[name] = cls
        return cls

    return deco


@dataclass
class AttnContext:
    """Built once per forward by the decoder and shared by all layers."""

    mask: Tensor | None = None  # bool [T, S] or [B, 1, T, S] (padding), True = may attend; None = causal, no memory
    rel_pos: Tensor | None = None  # [S, d_model] sinusoids of distances S-1..0 (relative setting)
    need_weights: bool = False  # math path, return attention maps (analysis)
    key_mask: Tensor | None = None  # bool [B, S], False = padding: left out of per-sequence statistics
    key_pe: Tensor | None = None  # [1, D, span] learned position table shared by all layers (span setting)
    span_index: Tensor | None = None  # long [B, 1, T, S]: key_pe column per (query, key) under leading padding


@dataclass
class LayerState:
    """Handed from one attention layer to the next."""

    values: Tensor | None = None  # this layer's value projection over [memory; segment], [B, H, S, D]
    weights: Tensor | None = None  # attention map [B, H, T, S] when ctx.need_weights


@dataclass(frozen=True)
class Scores:
    """What a softmax-family variant may change: the scores are
    ``scale · q kᵀ + pos_scale · q_posᵀ W_R R_{i-j}`` (the second term only in the relative setting;
    in the span setting it is ``pos_scale · q_posᵀ key_pe[:, span - (i-j)]`` with ``q_pos = q``).

    The base class fills it with standard attention (``q`` = XL content query ``q + u``, ``q_pos`` =
    ``q + v``, content scale ``1/sqrt(D)``, ``pos_scale=None``); variants return a copy with
    ``dataclasses.replace``. ``pos_scale=None`` divides the position term by ``sqrt(D)`` and a float
    multiplies it: the two differ in the last bit when ``sqrt(D)`` is not a power of two, and each is
    what trained checkpoints were computed with (softmax family: divide; Elliptical: multiply).
    """

    q: Tensor  # [B, H, T, D] content query
    k: Tensor  # [B, H, S, D]
    scale: float | Tensor  # content-term scale: a float keeps the fused kernel; a tensor forces the math path
    q_pos: Tensor | None = None  # [B, H, T, D] position-term query; None in the absolute setting
    pos_scale: float | None = None  # position-term scale; None = the standard 1/sqrt(D)


@dataclass
class NoOptions:
    pass


class Attention(nn.Module):
    """Multi-head causal attention with bias-free q/k/v/o projections (the paper's setting).

    With ``relative=True`` it is Transformer-XL's relative attention: the content term uses
    ``q + u`` and a position term ``(q + v)ᵀ W_R R_{i-j}`` is added as a score bias.
    With ``span=True`` it is the adaptive-span Transformer's attention (the MoE authors' host): no
    u/v biases and no ``W_R``; the position term is ``qᵀ key_pe`` over the span (``ctx.key_pe``, owned
    by the decoder), both terms divided by sqrt(D); the decoder's mask picks the span keys.
    """

    name: ClassVar[str] = "?"
    Options: ClassVar[type] = NoOptions
    supports_relative: ClassVar[bool] = True
    # None: as supports_relative (a variant that overrides ``attend`` has no position term for either host).
    supports_span: ClassVar[bool | None] = None

    @classmethod
    def span_capable(cls) -> bool:
        return cls.supports_relative if cls.supports_span is None else cls.supports_span

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        dropatt: float = 0.0,
        layer_idx: int = 0,
        relative: bool = False,
        options: dict[str, Any] | None = None,
        span: bool = False,
    ):
        super().__init__()
        self.opts = self.parse_options(options or {})
        if relative and span:
            raise ConfigError("an attention layer is built for Transformer-XL relative positions or for the span "
                              "host's key_pe, not both (model.pos chooses one).")
        if span and not self.span_capable():
            raise ConfigError(f"attention '{self.name}' (layer {layer_idx}) has no key_pe position term, so it cannot "
                              f"run with model.pos: span; choose model.pos: absolute or another variant.")
        if relative and not self.supports_relative:
            # Decoder memory (model.mem_len > 0) exists only with relative positions (ModelConfig enforces
            # it), so this is also the error a memory config with such a variant ends in: name both.
            others = ", ".join(sorted(n for n, c in ATTENTION.items() if c.supports_relative))
            raise ConfigError(
                f"attention '{self.name}' (layer {layer_idx}) supports absolute positions only: it has no "
                f"Transformer-XL relative position term, so it cannot run with model.pos: relative or with "
                f"decoder memory (model.mem_len > 0, which needs relative positions). Set model.pos: absolute "
                f"and model.mem_len: 0 (the Elliptical paper's Table-1 setting), or choose a variant that "
                f"supports relative positions and memory: {others}."
            )
        self.n_head, self.d_head, self.layer_idx, self.relative = n_head, d_head, layer_idx, relative
        self.span = span
        self.dropatt = dropatt
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.o = nn.Linear(n_head * d_head, d_model, bias=False)
        if relative:
            self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
            self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))  # u: content bias
            self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))  # v: position bias

    # ----- options ---------------------------------------------------------------------------------
    @classmethod
    def parse_options(cls, options: dict[str, Any]):
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        for key in options:
            if key not in fields:
                valid = ", ".join(fields) or "(none)"
                raise ConfigError(
                    f"attention '{cls.name}' has no option '{key}'.{did_you_mean(key, fields)} "
                    f"Its options: {valid}."
                )
        try:
            return cls.Options(**options)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"attention '{cls.name}': bad options {options}: {e}") from None

    # ----- forward ---------------------------------------------------------------------------------
    def project(self, h: Tensor, mem: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q over the segment, k/v over [memory; segment], each ``[B, H, len, D]``."""
        B, T, _ = h.shape
        x = h if mem is None or mem.size(1) == 0 else torch.cat([mem, h], dim=1)
        q, k, v = self.qkv(x).view(B, x.size(1), 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        return q[:, :, -T:], k, v

    def position_scores(self, qp: Tensor, ctx: AttnContext) -> Tensor:
        """Unscaled XL position term ``qpᵀ W_R R_{i-j}`` aligned to ``[B, H, T, S]``; ``qp = q + v``.
        Span setting: ``qpᵀ key_pe`` ``[B, H, T, span]`` skewed onto the span keys of ``[B, H, T, span+T]``."""
        if self.span:
            pos = torch.matmul(qp, ctx.key_pe[0].to(qp.dtype))  # [B, H, T, span]
            if ctx.span_index is None:
                return span_skew(pos)
            B, H, T, _ = pos.shape  # padded rows: distances counted over real positions (positions.span_padding)
            return torch.gather(pos, -1, ctx.span_index.expand(B, H, T, ctx.span_index.size(-1)))
        r = self.r_net(ctx.rel_pos).view(-1, self.n_head, self.d_head)  # [S, H, D]
        return rel_shift(torch.einsum("bhtd,shd->bhts", qp, r))

    def forward(self, h: Tensor, mem: Tensor | None, ctx: AttnContext, prev: LayerState | None = None):
        B, T, _ = h.shape
        q, k, v = self.project(h, mem)
        out, weights = self.attend(q, k, v, ctx, prev)
        out = self.o(out.transpose(1, 2).reshape(B, T, self.n_head * self.d_head))
        return out, LayerState(values=v, weights=weights)

    # ----- the softmax family ----------------------------------------------------------------------
    def score_transform(self, s: Scores, v: Tensor, ctx: AttnContext, prev: LayerState | None) -> Scores:
        """Variant hook: standard attention in, this variant's scores out (see ``Scores``)."""
        return s

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, prev: LayerState | None):
        """Raw projections in, ``(out [B, H, T, D], weights | None)`` out."""
        standard = 1.0 / math.sqrt(self.d_head)
        if self.relative:  # XL: content query q + u, position query q + v
            s = Scores(q + self.r_w_bias[:, None, :], k, standard, q + self.r_r_bias[:, None, :])
        elif self.span:  # adaptive-span host: the same query reads keys and key_pe
            s = Scores(q, k, standard, q)
        else:
            s = Scores(q, k, standard)
        s = self.score_transform(s, v, ctx, prev)
        bias = None
        if s.q_pos is not None:
            pos = self.position_scores(s.q_pos, ctx)
            bias = pos / math.sqrt(self.d_head) if s.pos_scale is None else pos * s.pos_scale
        return self.softmax(s.q, s.k, v, bias, ctx, s.scale)

    def softmax(self, q, k, v, bias, ctx: AttnContext, scale):
        p = self.dropatt if self.training else 0.0
        return softmax_attention(q, k, v, bias, ctx.mask, scale, p, ctx.need_weights)


def softmax_attention(q, k, v, bias, mask, scale, dropout_p=0.0, need_weights=False):
    """``softmax(scale · q kᵀ + bias, masked) v``: fused SDPA, or the math path returning weights.

    ``scale`` is a float or a tensor broadcastable to the scores (QKNorm's learned gain); ``mask`` is
    bool ``[T, S]`` (True = attend) or None for plain causal attention over the segment.
    """
    if not need_weights and not torch.is_tensor(scale):
        # SDPA's is_causal is top-left aligned, so it only equals ``causal`` (bottom-right) when T == S.
        if bias is None and mask is None and q.size(-2) == k.size(-2):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale), None
        allowed = mask if mask is not None else causal(q.size(-2), k.size(-2), q.device)
        attn_mask = allowed
        if bias is not None:
            attn_mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale), None
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    allowed = mask if mask is not None else causal(q.size(-2), k.size(-2), q.device)
    weights = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
    out = torch.matmul(F.dropout(weights, dropout_p) if dropout_p > 0 else weights, v)
    return out, weights


def causal(t: int, s: int, device) -> Tensor:
    """Bool ``[T, S]``: query i (at position S-T+i) may attend keys ``<= S-T+i``."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def build_attention(name: str, **kwargs) -> Attention:
    if name not in ATTENTION:
        raise unknown("attention variant", name, ATTENTION)
    return ATTENTION[name](**kwargs)
