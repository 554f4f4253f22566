"""What every result JSON says about how it was produced, so that no record overstates (issue 30).

``run_record`` gives the fields ``lm test``/``lm validate``, ``lm evaluate`` and ``lm finetune`` write beside their
numbers: the checkpoint and its training step, the Trainer's actual precision, how many batches were scored out
of how many, and ``complete``: true only when every batch of the split was scored and no stop signal arrived.
A ``--limit_batches``/``limit_*_batches`` run, or one a SIGTERM/Ctrl-C reached (Lightning lets a stop in the
last batch of an evaluation pass), is recorded with ``complete: false`` and says why in ``incomplete``.
"""

from __future__ import annotations

from typing import Any


def _count(loaders) -> int | None:
    """Batches the split's loaders hold (None when one has no length)."""
    if loaders is None:
        return None
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    try:
        return sum(len(dl) for dl in loaders)
    except TypeError:
        return None


def run_record(trainer, stage: str, step: int | None, checkpoint: str | None = None) -> dict[str, Any]:
    """``stage``: ``test`` or ``val``. ``step``: the training step of the weights (the checkpoint's
    ``global_step``; Lightning's ``trainer.global_step`` is 0 in validate/test, it restores only the weights)."""
    test = stage == "test"
    limit = trainer.limit_test_batches if test else trainer.limit_val_batches
    scored = trainer.num_test_batches if test else trainer.num_val_batches
    scored = list(scored) if isinstance(scored, (list, tuple)) else [scored]
    scored = None if any(n == float("inf") for n in scored) else sum(int(n) for n in scored)
    total = _count(trainer.test_dataloaders if test else trainer.val_dataloaders)
    why = []
    if (total is None or scored is None) and limit != 1.0 or None not in (total, scored) and scored < total:
        why.append(f"limited to {limit} batches (limit_{'test' if test else 'val'}_batches): "
                   f"{scored} of {total if total is not None else 'unknown'} batches scored")
    if trainer.received_sigterm:
        why.append("stopped by a signal (SIGTERM or Ctrl-C) while scoring")
    return {"checkpoint": checkpoint if checkpoint is not None else getattr(trainer, "ckpt_path", None),
            "step": None if step is None else int(step), "precision": str(trainer.precision),
            "limit_batches": limit, "batches_scored": scored, "batches_total": total,
            "complete": not why, **({"incomplete": "; ".join(why)} if why else {})}
