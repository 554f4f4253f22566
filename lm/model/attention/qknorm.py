"""QKNorm (Henry et al. 2020): L2-normalise q and k, multiply by one learned scalar g per layer,
initialised to log2(L² - L) for a typical training length L."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import ConfigError
from lm.model.attention.base import Attention, Scores, register


@dataclass
class QKNormOptions:
    init_len: int = 256  # L in g0 = log2(L² - L); use the training tgt_len

    def __post_init__(self):
        if self.init_len < 2:
            raise ConfigError(f"qknorm option init_len must be >= 2 (g0 = log2(L^2 - L)), got {self.init_len}.")


@register("qknorm")
class QKNormAttention(Attention):
    Options = QKNormOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        L = self.opts.init_len
        self.gain = nn.Parameter(torch.tensor(math.log2(L * L - L)))

    def score_transform(self, s: Scores, v, ctx, prev) -> Scores:
        # Folding g into the query keeps the scale a Python float, so the fused SDPA path is used.
        return replace(s, q=F.normalize(s.q, dim=-1) * self.gain, k=F.normalize(s.k, dim=-1), scale=1.0)
