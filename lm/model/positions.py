"""Positional encodings: absolute sinusoids (the Elliptical paper's setting) and Transformer-XL's
relative sinusoids with the relative shift and the segment-memory masks."""

from __future__ import annotations

import torch
from torch import Tensor


def sinusoid(pos: Tensor, d_model: int) -> Tensor:
    """Sinusoidal embeddings of (float) positions ``pos [S]`` -> ``[S, d_model]`` (XL layout: sin | cos)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=pos.device) / d_model))
    angles = pos.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def relative_positions(klen: int, clamp_len: int, device) -> Tensor:
    """Distances ``klen-1 … 0`` (XL's ``pos_seq``): index p encodes distance ``klen-1-p``."""
    pos = torch.arange(klen - 1, -1, -1.0, device=device)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    return pos


def rel_shift(x: Tensor) -> Tensor:
    """Align relative scores: ``x[..., i, p]`` (p indexes distance ``S-1-p``) becomes
    ``out[..., i, j]`` = score for distance ``(S-T+i) - j`` between query i and key j.

    The zero-pad/reshape trick of Transformer-XL: one copy instead of a gather. Entries for keys after
    the query (negative distance) are garbage and must be masked by the caller.
    """
    *lead, t, s = x.shape
    padded = torch.cat([x.new_zeros(*lead, t, 1), x], dim=-1).view(*lead, s + 1, t)
    return padded[..., 1:, :].reshape(*lead, t, s)


def attention_mask(qlen: int, mlen: int, device, same_length: bool = False, mem_len: int = 0) -> Tensor | None:
    """Boolean ``[T, M+T]`` mask, True where query i may attend key j.

    Causal over ``[memory; segment]``: query i sees the M memory positions and segment positions
    ``<= i``. ``same_length`` (XL) also hides the oldest keys so every query sees the same number of
    keys. Returns None for plain causal attention without memory, so SDPA can use ``is_causal``.
    """
    klen = qlen + mlen
    if mlen == 0 and not same_length:
        return None
    ones = torch.ones(qlen, klen, dtype=torch.bool, device=device)
    blocked = torch.triu(ones, diagonal=1 + mlen)
    if same_length:
        mask_len = klen - mem_len
        shift = qlen - mask_len if mask_len > 0 else qlen
        blocked = blocked | torch.tril(ones, diagonal=-shift)
    return ~blocked


def padding_mask(mask: Tensor | None, key_mask: Tensor, qlen: int) -> Tensor:
    """``mask`` (``[T, S]`` or None = causal without memory) with padding keys blocked: bool ``[B, 1, T, S]``.

    ``key_mask [B, S]`` is False at padding. A query still attends its own position, so the row of a pad
    query is never empty (its output is unused, but an all -inf row would be NaN).
    """
    klen = key_mask.size(1)
    q = torch.arange(klen - qlen, klen, device=key_mask.device)[:, None]  # each query's key index
    k = torch.arange(klen, device=key_mask.device)[None, :]
    allowed = k <= q if mask is None else mask
    return (allowed[None] & (key_mask[:, None, :] | (k == q)[None]))[:, None]


def span_mask(qlen: int, span: int, device) -> Tensor:
    """Bool ``[T, span+T]`` over ``[cache; segment]`` (cache of exactly ``span`` positions): query i (at key
    index span+i) may attend keys ``i .. i+span-1``, the ``span`` tokens before it and NOT itself, as the
    adaptive-span Transformer's ``_unskew`` selects them."""
    j = torch.arange(span + qlen, device=device)[None, :]
    i = torch.arange(qlen, device=device)[:, None]
    return (j >= i) & (j < i + span)


def span_skew(x: Tensor) -> Tensor:
    """Place span scores on the key axis: ``x[..., i, l]`` (l = 0 is distance span, l = span-1 distance 1)
    becomes ``out[..., i, i+l]`` of ``[..., T, span+T]``; every other entry is 0 and must be masked
    (``span_mask``). Zero-pad and reshape, one copy instead of a scatter."""
    *lead, t, s = x.shape
    padded = torch.nn.functional.pad(x, (0, t + 1)).reshape(*lead, t * (s + t + 1))
    return padded[..., : t * (s + t)].reshape(*lead, t, s + t)


def span_padding(keys: Tensor, qlen: int, span: int) -> tuple[Tensor, Tensor]:
    """The span host under LEADING padding (``keys [B, S]``, False = pad; the cache counts as real): keys and
    distances counted over real positions only, so a padded row attends what it attends alone.

    Returns the mask ``[B, 1, T, S]`` (query i may attend real keys 1..span real positions before it) and,
    for the position term, the ``key_pe`` column of every (query, key) pair ``[B, 1, T, S]`` (span - distance,
    clamped where masked). A pad query whose window holds no real key may attend any key (finite row; its
    output is never used).
    """
    pos = keys.long().cumsum(1) - 1  # real position of every key
    dist = pos[:, -qlen:, None] - pos[:, None, :]  # [B, T, S]
    mask = keys[:, None, :] & (dist >= 1) & (dist <= span)
    mask = mask | ~mask.any(-1, keepdim=True)
    return mask[:, None], (span - dist).clamp(0, span - 1)[:, None]
