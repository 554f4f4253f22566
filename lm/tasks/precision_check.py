"""The precision a run trains in: recorded in every checkpoint, and one warning line where it is slow."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator

from lm import precision as lm_precision


def bf16_on_slow_cpu(trainer: L.Trainer) -> bool:
    return (isinstance(trainer.accelerator, CPUAccelerator) and "bf16" in str(trainer.precision)
            and lm_precision.cpu_bf16() is False)


class PrecisionCheck(L.Callback):
    """Writes the run's precision into every checkpoint (``lm_precision``), so that ``lm test``, ``lm evaluate``
    and ``lm finetune`` with ``precision: auto`` score or continue it in the precision it was trained in
    (``lm.precision.resolve``).

    Warns once, at set-up, when bf16 runs on a CPU without bf16 matrix instructions (``precision: auto`` never
    chooses that; an explicit ``bf16-mixed`` does). A warning, not a silent switch: an explicit precision is the
    user's call. One line on stderr (rank zero), not a Python warning with a source line under it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if bf16_on_slow_cpu(trainer) and trainer.is_global_zero:
            print(f"lm: warning: trainer.precision={trainer.precision} on a CPU without bf16 matrix instructions (no "
                  f"avx512_bf16 or amx_bf16 in /proc/cpuinfo) runs many times slower than float32; "
                  f"--trainer.precision auto (or 32-true) trains in float32.", file=sys.stderr, flush=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["lm_precision"] = lm_precision.canonical(trainer.precision)
