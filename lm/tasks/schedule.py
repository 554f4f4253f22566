"""The learning-rate schedule as a pure function of the update index, so it can be tested by hand.

``lr_factor(n, optim, total)`` is the multiplier of ``optim.lr`` used by update ``n`` (0-based: the
first optimizer step is n = 0), for a run of ``total`` updates. ``LambdaLR`` calls it with the number
of scheduler steps taken so far, which under Lightning's ``interval: step`` is exactly n.

Two conventions (``OptimConfig.schedule_convention``):

- ``standard``: update n runs at (n + 1) / W during the W warm-up updates, so the first update is
  not at zero and update W - 1 reaches the full rate; the decay (cosine / linear) then spans the
  remaining ``total - W`` updates, ending at ``min_lr_ratio``.
- ``xl``: Transformer-XL's train.py, which the Elliptical paper's WikiText code keeps. There the
  warm-up rate is written *after* ``optimizer.step()``, so the first update runs at the full rate
  (the optimizer's initial lr); update n >= 1 runs at n / W while n < W; from n = W on the cosine is
  ``CosineAnnealingLR(T_max=total).step(n)``, i.e. measured from step 0, *including* the warm-up,
  so the first post-warm-up update is already below the full rate. With ``constant`` XL writes no
  rate after the warm-up, so the last warm-up rate (W - 1) / W stays for the rest of the run (kept
  here: it is what that code does). XL's train.py has no linear decay, so ``linear`` is refused.
"""

from __future__ import annotations

import math

from lm.config import OptimConfig


def lr_factor(n: int, o: OptimConfig, total: int) -> float:
    """Multiplier of ``o.lr`` for update ``n`` (0-based) of a ``total``-update run."""
    total = max(int(total), 1)
    w, floor = o.warmup_steps, o.min_lr_ratio
    if o.schedule_convention == "xl":
        if n == 0:
            return 1.0  # the first update runs before any warm-up rate is written
        if n < w:
            return n / w
        if o.schedule == "constant":
            # XL writes no rate after the warm-up, so the last warm-up rate (W-1)/W stays (1 if W <= 1).
            return (w - 1) / w if w > 1 else 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * n / total))
    if w and n < w:
        return (n + 1) / w
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (n - w) / max(1, total - w))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def short_run_notice(o: OptimConfig, total: int) -> str | None:
    """One line when a run of ``total`` updates ends inside its warm-up (``--trainer.max_steps 30`` with the tiny
    recipe's 200 warm-up steps trains at 0.5-15% of ``optim.lr``): what rate it reaches and how to change that."""
    if total <= 0 or o.warmup_steps <= 0 or total >= o.warmup_steps:
        return None
    last = lr_factor(total - 1, o, total)
    return (f"lm: note: this run's {total} steps end inside its {o.warmup_steps}-step learning-rate warm-up: its last "
            f"update runs at {last * o.lr:.3g} ({100 * last:.2g}% of model.optim.lr {o.lr:g}). For a short run at the "
            f"full rate, pass --model.optim.warmup_steps {max(1, total // 10)} or fewer.")
