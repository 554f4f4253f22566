"""QUEST (Govindarajan et al.): keys L2-normalised, raw queries, no temperature.

    out = softmax(Q K̄ᵀ) V,   k̄_j = k_j / ‖k_j‖

Each query's norm sets its own sharpness, and no key can grow its norm to steal attention from
every query. Also Elliptical-QUEST, the combination the QUEST paper reports: (q ⊙ m̂)·k̄.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F

from lm.model.attention.base import Attention, register
from lm.model.attention.elliptical import EllipticalAttention, EllipticalOptions


@register("quest")
class QuestAttention(Attention):
    def score_transform(self, q, k, v, prev):
        return q, F.normalize(k, dim=-1), 1.0


@dataclass
class EllipticalQuestOptions(EllipticalOptions):
    scale: str = "none"  # QUEST has no temperature


@register("elliptical_quest")
class EllipticalQuestAttention(EllipticalAttention):
    Options = EllipticalQuestOptions

    def key_transform(self, k):
        return F.normalize(k, dim=-1)

    def content_scale(self, stretched: bool) -> float:
        # Layer 0 (no previous values) is plain QUEST, so it keeps QUEST's scale too.
        return 1.0 / math.sqrt(self.d_head) if self.opts.scale == "sqrt" else 1.0
