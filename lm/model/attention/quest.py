"""QUEST (Govindarajan et al.): keys L2-normalised, raw queries, no temperature.

    out = softmax(Q K̄ᵀ) V,   k̄_j = k_j / ‖k_j‖

Each query's norm sets its own sharpness, and no key can grow its norm to steal attention from
every query. Also Elliptical-QUEST, the combination the QUEST paper reports: (q ⊙ m̂)·k̄.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn.functional as F

from lm.model.attention.base import Attention, Scores, register
from lm.model.attention.elliptical import EllipticalAttention, EllipticalOptions


@register("quest")
class QuestAttention(Attention):
    def score_transform(self, s: Scores, v, ctx, prev) -> Scores:
        # The position term (relative setting) keeps the standard 1/sqrt(D): QUEST changes the content term.
        return replace(s, k=F.normalize(s.k, dim=-1), scale=1.0)


@dataclass
class EllipticalQuestOptions(EllipticalOptions):
    scale: str = "none"  # QUEST has no temperature


@register("elliptical_quest")
class EllipticalQuestAttention(EllipticalAttention):
    Options = EllipticalQuestOptions

    def score_transform(self, s: Scores, v, ctx, prev) -> Scores:
        # QUEST keys and QUEST's (lack of) temperature first, so layer 0 (no previous values, no
        # stretch) is plain QUEST; then Elliptical stretches the query.
        s = replace(s, k=F.normalize(s.k, dim=-1), scale=s.scale if self.opts.scale == "sqrt" else 1.0)
        return super().score_transform(s, v, ctx, prev)
