"""Dropout whose mask is cheap to draw on a CPU.

``nn.Dropout`` on a CPU draws one double-precision Bernoulli sample per element from torch's Mersenne
Twister, one element at a time (oneMKL's vectorised generator is used only on Intel CPUs), then
multiplies by a float mask: 9-16% of a tiny float32 training step on the AMD EPYCs this project runs on
(docs/performance.md). Here one 64-bit seed is drawn from torch's generator per mask, numpy's Philox
(counter-based, Random123; the generator family CUDA's dropout uses) turns it into 16 random bits per
element, and an element is kept when its bits clear a threshold: about 4x less time for the mask, and
the mask kept for backward is 1 byte per element instead of 4.

What a seed gives: the run is still a function of ``torch.manual_seed`` alone (checkpoints save and
restore torch's generator, which is all this draws from), but the masks are not those ``nn.Dropout``
drew, and the drop probability is ``p`` rounded to a multiple of 1/65536 (0.1 -> 0.1000061); the kept
values are scaled by the exact ``1 / (1 - p_used)``, so the expected output is still the input. On
other devices (CUDA's fused Philox kernel is already fast) and under ``torch.compile`` this is
``F.dropout``, and so it is for tensors under ``MIN_ELEMENTS`` (65,536) elements, where torch's mask is
the cheaper one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16  # 16 random bits decide each element
# Below this many elements torch's own dropout is faster (this path costs ~0.2 ms per call in seeding numpy,
# the autograd Function and its profiler scope; measured crossover ~64k elements on the 2-core AMD EPYC).
MIN_ELEMENTS = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[Tensor, float]:
    """A boolean CPU mask of ``shape`` (True = keep) and the scale of the kept values.

    The drop probability is ``round(p * 65536) / 65536``; the scale is ``1 / (1 - that)``."""
    drop = round(p * _LEVELS)
    n = int(np.prod(shape, dtype=np.int64))
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # the only draw from torch's generator
    bits = np.random.Philox(key=seed).random_raw((n + 3) // 4).view(np.int16)[:n]  # 4 x 16 bits per draw
    # int16 is uniform on [-32768, 32767]: P(bits < drop - 32768) = drop / 65536 exactly.
    keep = torch.from_numpy(bits).reshape(shape) >= drop - _LEVELS // 2
    return keep, _LEVELS / (_LEVELS - drop)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return x
    if (x.device.type != "cpu" or x.numel() < MIN_ELEMENTS or torch.compiler.is_compiling()
            or not 0 < round(p * _LEVELS) < _LEVELS):  # (a p within 1/131072 of 0 or 1: 16 bits cannot say it)
        return F.dropout(x, p, True)
    with torch.profiler.record_function("lm::dropout_mask"):  # scripts/profile_step.py counts it as dropout
        keep, scale = keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, scale)


class _MaskedScale(torch.autograd.Function):
    """``where(keep, x, 0) * scale`` forward and the same on the gradient: two passes each way, no float
    copy of the mask (aten's ``native_dropout_backward`` casts it and multiplies twice), and only the
    boolean mask is kept for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, validation and train/eval behaviour; still an ``nn.Dropout`` to code that
    looks for one) with the cheap CPU mask above."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
