"""Attention variants side by side, behind one registry (``ATTENTION``, ``build_attention``).

Importing this package registers every variant."""

from lm.model.attention import elliptical, qknorm, quest, softmax  # noqa: F401  (registration)
from lm.model.attention import baselines  # noqa: F401  (registration: Table 1 baselines)
from lm.model.attention.base import ATTENTION, Attention, AttnContext, LayerState, build_attention, register

__all__ = ["ATTENTION", "Attention", "AttnContext", "LayerState", "build_attention", "register"]
