"""Analysis metrics of ``lm analyze`` (the Elliptical paper's), each a small pure function of model intermediates.

- representation collapse: per layer, mean pairwise cosine similarity between the token outputs of
  a sequence (strict lower triangle), averaged over sequences; higher = more collapse;
- head redundancy: mean pairwise L2 distance between the flattened attention maps of different heads;
  lower = more redundant heads;
- attention entropy per head (nats), averaged over query positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def collapse(hidden: Tensor) -> Tensor:
    """``hidden [B, T, d]`` -> mean pairwise token cosine similarity per sequence ``[B]``."""
    x = F.normalize(hidden.float(), dim=-1)
    sim = x @ x.transpose(-1, -2)  # [B, T, T]
    t = sim.size(-1)
    idx = torch.tril_indices(t, t, offset=-1, device=sim.device)
    return sim[:, idx[0], idx[1]].mean(dim=-1)


def head_redundancy(weights: Tensor) -> Tensor:
    """``weights [B, H, T, S]`` -> mean L2 distance between the maps of every pair of heads ``[B]``."""
    flat = weights.float().flatten(2)  # [B, H, T*S]
    d = torch.cdist(flat, flat)  # [B, H, H]
    h = d.size(-1)
    idx = torch.triu_indices(h, h, offset=1, device=d.device)
    return d[:, idx[0], idx[1]].mean(dim=-1)


def attention_entropy(weights: Tensor) -> Tensor:
    """``weights [B, H, T, S]`` (rows sum to 1) -> entropy per head averaged over queries ``[B, H]``."""
    w = weights.float()
    ent = -(w * torch.log(w.clamp_min(1e-30))).sum(dim=-1)  # [B, H, T]
    return ent.mean(dim=-1)
