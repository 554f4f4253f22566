"""Transformer-MoM (Han et al., NeurIPS 2023): median-of-means kernel density estimate.

A median of block means is a robust estimate of a mean: a few outlying keys can spoil only the blocks
that contain them, and the median block ignores those. Two modes (docs/baselines.md compares them with
the reference code, ``aaronhan223/robust_transformer`` imagenet/models.py ``MomAttention``):

``mode: random`` (default, the reference code's algorithm made causal). Per head, with the Gaussian
kernel on L2-normalised keys k̂ (queries raw), log κ(q, k̂) = −‖q − k̂‖²/√D:

1. Partition: the S key positions ([memory; segment]) are split into K random blocks, one draw per
   forward (per layer), shared by the batch and the heads. ``partition: disjoint`` deals a random
   permutation into K blocks of sizes ⌊S/K⌋ or ⌈S/K⌉; ``partition: subsample`` draws K independent
   subsets of ⌊(1 − ε)·S⌋ keys each (the stored reference's ``divide_batch``; blocks overlap).
   Training draws from torch's global generator (seeded by the run, like dropout); eval draws from a
   generator seeded by ``seed`` and the layer index, so evaluation is deterministic.
2. Block score for query i: the log-likelihood of the block's keys under the queries seen so far,
   over the visible (query, key) pairs: ℓ_b(i) = Σ_{i' ≤ i} Σ_{j ∈ b, j visible to i'} log κ(q_i', k̂_j),
   as a mean over those pairs (``block_score: mean``, default) or the plain sum (``sum``). At the last
   query of a segment this is the reference's per-block sum over all (query, key) pairs, restricted
   to the causal ones. ``choose: sequence`` scores per sequence and head; ``choose: batch`` adds the
   scores over the batch and the heads (one block for all, as the reference sums).
3. Median: among the blocks with at least one key visible to i (n_i of them), the one of rank
   ⌊n_i/2⌋ in ascending score (the reference's ``argsort(likelihood)[K // 2]``; ties by block index).
4. out_i = Σ_{j ∈ b*, visible} softmax_j(−‖q_i − k̂_j‖²/√D) v_j = softmax_j(2 q_iᵀk̂_j/√D) v_j (the
   ‖q_i‖² and ‖k̂_j‖² = 1 terms are constant in j).
Steps 2–4 only use (query, key) pairs that query i may see, so the output is strictly causal.

``mode: contiguous`` (the project's earlier default, kept as an option): per query i, the visible
keys in position order are cut into K_i = min(K, n_i) contiguous blocks (key of rank r in block
⌊r·K_i/n_i⌋), each block scored by its mean softmax kernel (1/|B|) Σ_{j∈B} exp(q_iᵀk_j/√D), the block
of rank ⌊(K_i − 1)/2⌋ ascending (lower median) is attended with softmax(q_iᵀk_j/√D).

The block choice is discrete (no gradient flows through it); gradients flow through the softmax over
the chosen block. Relative positions are not supported (Table 1 uses absolute positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.model.attention.base import Attention, AttnContext, LayerState, register
from lm.model.attention.baselines.common import at_least_float32, one_of, positive_int, require, visible


@dataclass
class MoMOptions:
    """
    mode: random (reference: random blocks, median by key log-likelihood) | contiguous (per-query
        median of contiguous blocks, the earlier default).
    n_blocks: K; null = 3 for random (the reference's num_blocks), 4 for contiguous.
    partition: disjoint | subsample (K overlapping subsets of ⌊(1 − outlier_fraction)·S⌋ keys); random only.
    outlier_fraction: ε of partition: subsample.
    block_score: mean | sum of the log-likelihood over a block's visible (query, key) pairs; random only.
    choose: sequence (one median block per sequence and head) | batch (one for the whole batch); random only.
    seed: seed of the eval-time partition (training draws from the run's generator).
    """

    mode: str = "random"
    n_blocks: int | None = None
    partition: str = "disjoint"
    outlier_fraction: float = 0.05
    block_score: str = "mean"
    choose: str = "sequence"
    seed: int = 0

    def __post_init__(self):
        one_of("mom", "mode", self.mode, ("random", "contiguous"))
        if self.n_blocks is None:
            self.n_blocks = 3 if self.mode == "random" else 4
        positive_int("mom", "n_blocks", self.n_blocks)
        one_of("mom", "partition", self.partition, ("disjoint", "subsample"))
        require(isinstance(self.outlier_fraction, (int, float)) and not isinstance(self.outlier_fraction, bool)
                and 0 <= self.outlier_fraction < 1, "mom",
                f"option outlier_fraction must be a number in [0, 1), got {self.outlier_fraction!r}.")
        one_of("mom", "block_score", self.block_score, ("mean", "sum"))
        one_of("mom", "choose", self.choose, ("sequence", "batch"))
        positive_int("mom", "seed", self.seed, minimum=0)
        if self.mode == "contiguous":
            require((self.partition, self.block_score, self.choose) == ("disjoint", "mean", "sequence"), "mom",
                    "options partition, block_score and choose belong to mode: random; mode: contiguous "
                    "takes only n_blocks.")


# ----------------------------------------------------------------------------- mode: random
def random_blocks(s: int, n_blocks: int, partition: str, eps: float, generator) -> Tensor:
    """Bool ``[K, S]`` block membership of the S key positions (CPU)."""
    if partition == "disjoint":
        k = min(n_blocks, s)
        perm = torch.randperm(s, generator=generator)
        block = torch.empty(s, dtype=torch.long)
        block[perm] = torch.arange(s) * k // s  # the r-th drawn position goes to block ⌊r·K/S⌋
        return block[None] == torch.arange(k)[:, None]
    size = max(1, int(s * (1 - eps)))
    out = torch.zeros(n_blocks, s, dtype=torch.bool)
    for b in range(n_blocks):
        out[b, torch.randperm(s, generator=generator)[:size]] = True
    return out


@torch.no_grad()
def choose_blocks(ll: Tensor, allowed: Tensor, member: Tensor, score: str, per: str) -> Tensor:
    """Index ``[B|1, H|1, T]`` of each query's median block (steps 2–3); ``ll [B,H,T,S]`` log-kernels."""
    mf, af = member.to(ll.dtype), allowed.to(ll.dtype)
    total = (ll.masked_fill(~allowed, 0.0) @ mf.T).cumsum(-2)  # Σ_{i'≤i} Σ_{j∈b visible to i'} ℓ, [B,H,T,K]
    if per == "batch":
        total = total.sum((0, 1), keepdim=True)
    seen = af @ mf.T  # [T, K] keys of block b visible to query i
    if score == "mean":
        pairs = seen.cumsum(0)  # visible (query, key) pairs of block b up to query i
        total = total / (pairs * (1 if per == "sequence" else ll.size(0) * ll.size(1))).clamp_min(1)
    nonempty = seen > 0
    order = total.masked_fill(~nonempty, float("inf")).argsort(dim=-1, stable=True)  # empty blocks last
    rank = (nonempty.sum(-1) // 2).expand(*order.shape[:-1])  # upper median, as argsort()[K // 2]
    return order.gather(-1, rank[..., None])[..., 0]


# ----------------------------------------------------------------------------- mode: contiguous
def block_ids(allowed: Tensor, n_blocks: int) -> tuple[Tensor, Tensor]:
    """Block index of every key per query (``[T, S]``, −1 where hidden) and K_i (``[T, 1]``)."""
    rank = allowed.long().cumsum(-1) - 1
    n = allowed.long().sum(-1, keepdim=True)
    k = n.clamp(max=n_blocks)
    ids = torch.div(rank * k, n.clamp_min(1), rounding_mode="floor")
    return ids.masked_fill(~allowed, -1), k


@torch.no_grad()
def median_block(scores: Tensor, allowed: Tensor, n_blocks: int) -> Tensor:
    """Bool ``[B, H, T, S]``: the keys of each query's median contiguous block."""
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

    def partition(self, s: int, device) -> Tensor:
        """This forward's block membership ``[K, S]``: fresh in training, seeded (fixed) in eval."""
        g = None
        if not self.training:
            g = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + self.layer_idx)
        o = self.opts
        return random_blocks(s, o.n_blocks, o.partition, o.outlier_fraction, g).to(device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, prev: LayerState | None):
        T, S = q.size(-2), k.size(-2)
        allowed = visible(ctx, T, S, q.device)
        if self.opts.mode == "contiguous":
            scores = at_least_float32(q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
            chosen = median_block(scores, allowed, self.opts.n_blocks)
        else:
            qf, kf = at_least_float32(q), at_least_float32(F.normalize(k, dim=-1))
            dot = qf @ kf.transpose(-1, -2)
            with torch.no_grad():
                ll = -((qf * qf).sum(-1, keepdim=True) - 2 * dot + 1) / math.sqrt(self.d_head)  # log κ(q, k̂)
                member = self.partition(S, q.device)
                idx = choose_blocks(ll, allowed, member, self.opts.block_score, self.opts.choose)
                chosen = member[idx] & allowed  # [B|1, H|1, T, S]
            scores = 2 * dot / math.sqrt(self.d_head)
        w = torch.softmax(scores.masked_fill(~chosen, float("-inf")), dim=-1).to(v.dtype)
        p = self.dropatt if self.training else 0.0
        out = (F.dropout(w, p) if p > 0 else w) @ v
        return out, (w if ctx.need_weights else None)
