"""What sits between the decoder and the classification head (``model.pre_head``).

- ``none`` (default): the head reads the decoder's final hidden state.
- ``log_softmax``: the paper's code. Its finetuning model keeps the language model's output layer,
  re-shaped to a fresh ``Linear(H, H)`` (``out_emb``), and its ``log_softmax``, so the head
  Linear-Tanh-Dropout-Linear reads ``log_softmax(Linear(H, H)(h))`` at the last position
  (``models.TransformerSeq.forward`` with ``finetune=True`` in ``lazizcodes/smoe_expertcount``).
  The head's input is then a log-probability vector: every entry <= 0, ``logsumexp`` = 0.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lm.errors import unknown

PRE_HEADS = ("none", "log_softmax")


class LogSoftmaxProjection(nn.Module):
    """``log_softmax(Linear(d, d)(h))`` over the feature axis, position-wise."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)  # PyTorch's default init, like the authors' fresh out_emb

    def forward(self, h: Tensor) -> Tensor:
        return F.log_softmax(self.proj(h).float(), dim=-1).to(h.dtype)  # float: half-precision logsumexp


def build_pre_head(name: str, d: int) -> nn.Module | None:
    """The module for ``model.pre_head`` (None for ``none``)."""
    if name not in PRE_HEADS:
        raise unknown("model.pre_head", name, PRE_HEADS)
    return LogSoftmaxProjection(d) if name == "log_softmax" else None


__all__ = ["PRE_HEADS", "LogSoftmaxProjection", "build_pre_head"]
