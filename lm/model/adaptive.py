"""Adaptive input embedding and adaptive softmax (Baevski & Auli 2019; Grave et al. 2017).

Re-implemented after Transformer-XL's ``AdaptiveEmbedding`` / ``ProjectedAdaptiveLogSoftmax``.
The vocabulary (sorted by frequency) is split by ``cutoffs`` into clusters
``[0, c0), [c0, c1), ..., [c_last, n_token)``. Frequent words (cluster 0, the "shortlist") get
wide vectors; with ``div_val > 1`` cluster ``i`` is ``div_val**i`` times narrower, which is where
most of the parameters and compute of a 267k-word vocabulary are saved. Every cluster is projected
to/from the model width ``d_proj``.

The softmax factorises ``p(w) = p(cluster(w)) * p(w | cluster(w))``: the head scores the shortlist
words plus one "cluster token" per tail cluster, and each tail cluster has its own small softmax.

Parameter naming (shared by both classes so that tying is a plain Parameter assignment):
  * div_val == 1: one table of width ``d_embed`` for the whole vocabulary (``emb_layers[0]`` /
    ``out_layers[0]``) and at most one projection (none when ``d_embed == d_proj``);
  * div_val > 1: ``emb_layers[i]`` / ``out_layers[i]`` per cluster, each with a projection
    ``emb_projs[i]`` / ``out_projs[i]`` of shape ``[d_proj, d_embed // div_val**i]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import ConfigError


def _check_cutoffs(n_token: int, cutoffs: list[int], div_val: int, d_embed: int) -> list[int]:
    """Validate the clustering and return the cluster boundaries ``[0, c0, ..., n_token]``."""
    cutoffs = [int(c) for c in cutoffs]
    hint = "use e.g. cutoffs: [2000, 10000] for WikiText-2 or [] for plain softmax"
    if any(c >= n_token for c in cutoffs):
        raise ConfigError(
            f"model.cutoffs {cutoffs} must all be smaller than the vocabulary size {n_token}; "
            f"{hint}"
        )
    if any(c <= 0 for c in cutoffs) or any(a >= b for a, b in zip(cutoffs, cutoffs[1:])):
        raise ConfigError(
            f"model.cutoffs {cutoffs} must be positive and strictly increasing "
            f"(vocabulary size {n_token}); {hint}"
        )
    if int(div_val) != div_val or div_val < 1:
        raise ConfigError(f"model.div_val must be an integer >= 1, got {div_val}")
    if d_embed // div_val ** len(cutoffs) < 1:
        raise ConfigError(
            f"model.div_val {div_val} makes the last of {len(cutoffs) + 1} clusters narrower "
            f"than 1 (d_embed {d_embed} // {div_val}**{len(cutoffs)}); "
            "lower div_val or raise d_embed"
        )
    return [0, *cutoffs, n_token]


def _new_param(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class AdaptiveEmbedding(nn.Module):
    """Token ids ``[*]`` -> embeddings ``[*, d_proj]``, scaled by ``sqrt(d_proj)`` like XL."""

    def __init__(
        self,
        n_token: int,
        d_embed: int,
        d_proj: int,
        cutoffs: list[int],
        div_val: int = 1,
        init_std: float = 0.02,
        scale: bool = True,
    ):
        super().__init__()
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoff_ends = _check_cutoffs(n_token, cutoffs, div_val, d_embed)
        self.cutoffs = self.cutoff_ends[1:-1]
        # XL's emb_scale: keeps embeddings on the same scale as the (unit-variance) positions. ``scale=False``:
        # the MoE authors' plain nn.Embedding (model.embed_scale: false).
        self.emb_scale = d_proj**0.5 if scale else 1.0

        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            # One table: cluster boundaries only matter to the softmax, not to the lookup.
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(_new_param(d_proj, d_embed, std=init_std))
        else:
            for i, (lo, hi) in enumerate(zip(self.cutoff_ends, self.cutoff_ends[1:])):
                d_emb_i = d_embed // div_val**i
                self.emb_layers.append(nn.Embedding(hi - lo, d_emb_i))
                self.emb_projs.append(_new_param(d_proj, d_emb_i, std=init_std))
        for emb in self.emb_layers:
            nn.init.normal_(emb.weight, std=init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.div_val == 1:
            out = self.emb_layers[0](tokens)
            if len(self.emb_projs):
                out = F.linear(out, self.emb_projs[0])
            return out * self.emb_scale

        # Clusters have different widths, so look each one up separately on the tokens that
        # fall into it, project to d_proj and scatter the rows back into place.
        flat = tokens.reshape(-1)
        pieces = []
        for i, (lo, hi) in enumerate(zip(self.cutoff_ends, self.cutoff_ends[1:])):
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():
                emb = self.emb_layers[i](flat.index_select(0, idx) - lo)
                emb = F.linear(emb, self.emb_projs[i])
                pieces.append((idx, emb))
        # Under autocast the projections come out in bf16; allocate in whatever they produced.
        dtype = pieces[0][1].dtype if pieces else self.emb_projs[0].dtype
        out = torch.zeros(flat.numel(), self.d_proj, dtype=dtype, device=flat.device)
        for idx, emb in pieces:
            out = out.index_copy(0, idx, emb.to(dtype))
        return out.view(*tokens.shape, self.d_proj) * self.emb_scale


class AdaptiveLogSoftmax(nn.Module):
    """Adaptive softmax over ``n_token`` words from hidden states of width ``d_proj``.

    With ``tie_to`` the output word vectors *are* the embedding's Parameters (and, with
    ``tie_projs``, so are the projections); only the biases and the cluster tokens are owned here.
    Empty ``cutoffs`` gives a plain (optionally tied) softmax.
    """

    def __init__(
        self,
        n_token: int,
        d_embed: int,
        d_proj: int,
        cutoffs: list[int],
        div_val: int = 1,
        tie_to: AdaptiveEmbedding | None = None,
        tie_projs: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoff_ends = _check_cutoffs(n_token, cutoffs, div_val, d_embed)
        self.cutoffs = self.cutoff_ends[1:-1]
        self.shortlist_size = self.cutoff_ends[1]
        self.n_tail = len(self.cutoffs)
        if tie_to is not None:
            mine = (n_token, d_embed, d_proj, self.cutoffs, div_val)
            theirs = (tie_to.n_token, tie_to.d_embed, tie_to.d_proj, tie_to.cutoffs, tie_to.div_val)
            if mine != theirs:
                raise ConfigError(
                    "Cannot tie the adaptive softmax to an embedding with a different layout: "
                    f"(n_token, d_embed, d_proj, cutoffs, div_val) {mine} vs {theirs}"
                )

        # One extra head entry per tail cluster: "the word is somewhere in cluster i".
        if self.n_tail:
            self.cluster_weight = _new_param(self.n_tail, d_embed, std=init_std)
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_tail))
        else:
            self.register_parameter("cluster_weight", None)
            self.register_parameter("cluster_bias", None)

        # Output layers mirror the embedding's layout (see module docstring).
        if div_val == 1:
            sizes_widths = [(n_token, d_embed)]
        else:
            sizes_widths = [
                (hi - lo, d_embed // div_val**i)
                for i, (lo, hi) in enumerate(zip(self.cutoff_ends, self.cutoff_ends[1:]))
            ]
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        for i, (size, width) in enumerate(sizes_widths):
            layer = nn.Linear(width, size)
            nn.init.zeros_(layer.bias)
            if tie_to is not None:
                # Assigning the Parameter registers the *same* object here: one storage, and its
                # gradient accumulates from both the input and the output side.
                layer.weight = tie_to.emb_layers[i].weight
            else:
                nn.init.normal_(layer.weight, std=init_std)
            self.out_layers.append(layer)
            if div_val > 1 or width != d_proj:
                if tie_to is not None and tie_projs:
                    self.out_projs.append(tie_to.emb_projs[i])
                else:
                    self.out_projs.append(_new_param(d_proj, width, std=init_std))

    # -- parameters of one cluster -------------------------------------------------------------

    def _clusters(self) -> list[tuple]:
        """(weight, bias, proj) scoring the words of every cluster; proj None = no projection."""
        if self.div_val == 1:
            layer = self.out_layers[0]
            sizes = [hi - lo for lo, hi in zip(self.cutoff_ends, self.cutoff_ends[1:])]
            proj = self.out_projs[0] if len(self.out_projs) else None
            # ONE split of the single table (views, so gradients reach the shared weight). Per-cluster
            # slices would each allocate, zero-fill and accumulate a full-size [n_token, d] gradient in
            # backward; a split's backward writes the table's gradient once.
            return [(w, b, proj) for w, b in zip(layer.weight.split(sizes), layer.bias.split(sizes))]
        return [(layer.weight, layer.bias, self.out_projs[i]) for i, layer in enumerate(self.out_layers)]

    def _head_params(self, clusters: list[tuple]):
        weight, bias, proj = clusters[0]
        if self.n_tail:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        return weight, bias, proj

    @staticmethod
    def _log_softmax(hidden, weight, bias, proj) -> torch.Tensor:
        # hidden [N, d_proj] -> (project down to this cluster's width) -> logits.
        if proj is not None:
            hidden = hidden @ proj
        logits = F.linear(hidden, weight, bias)
        # bf16 logits are fine, a bf16 normaliser over 20k+ words is not: reduce in float32.
        return F.log_softmax(logits.float(), dim=-1)

    # -- public API ----------------------------------------------------------------------------

    def nll(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood ``[*]`` (float32) of ``target [*]`` given ``hidden [*, d_proj]``.

        The head is scored for every position; a tail cluster only for the rows whose target lies
        in it, so the cost of the big rare-word clusters scales with how often they occur.
        """
        shape = target.shape
        hidden = hidden.reshape(-1, self.d_proj)
        target = target.reshape(-1)
        if hidden.size(0) != target.size(0):
            raise ValueError(f"hidden has {hidden.size(0)} rows but target has {target.size(0)}")

        clusters = self._clusters()
        head_logprob = self._log_softmax(hidden, *self._head_params(clusters))
        # Shortlist words are scored directly by the head; for a tail word the head column is that
        # of its cluster token (clamped so the gather is valid, then overwritten below).
        head_col = target.clamp(max=self.shortlist_size - 1)
        for i in range(1, self.n_tail + 1):
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            in_cluster = (target >= lo) & (target < hi)
            head_col = torch.where(in_cluster, self.shortlist_size + i - 1, head_col)
        nll = -head_logprob.gather(1, head_col.unsqueeze(1)).squeeze(1)

        for i in range(1, self.n_tail + 1):
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            rows = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            tail_logprob = self._log_softmax(hidden.index_select(0, rows), *clusters[i])
            tail_nll = -tail_logprob.gather(1, (target.index_select(0, rows) - lo).unsqueeze(1))
            nll = nll.index_add(0, rows, tail_nll.squeeze(1))
        return nll.view(shape)

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full log-distribution ``[*, n_token]`` (float32); O(N * n_token), for analysis/tests."""
        lead = hidden.shape[:-1]
        hidden = hidden.reshape(-1, self.d_proj)
        clusters = self._clusters()
        head_logprob = self._log_softmax(hidden, *self._head_params(clusters))
        parts = [head_logprob[:, : self.shortlist_size]]
        for i in range(1, self.n_tail + 1):
            cluster_logprob = head_logprob[:, self.shortlist_size + i - 1 : self.shortlist_size + i]
            parts.append(cluster_logprob + self._log_softmax(hidden, *clusters[i]))
        return torch.cat(parts, dim=1).view(*lead, self.n_token)
