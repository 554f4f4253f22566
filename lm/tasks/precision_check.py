"""A warning where a recipe's bf16-mixed would make CPU training slower instead of faster."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_warn

from lm.utils import cpu_bf16_native


def bf16_on_slow_cpu(trainer: L.Trainer) -> bool:
    return (isinstance(trainer.accelerator, CPUAccelerator) and "bf16" in str(trainer.precision)
            and cpu_bf16_native() is False)


class PrecisionCheck(L.Callback):
    """Warns once, at set-up, when bf16 runs on a CPU without bf16 matrix instructions (see
    ``lm.utils.cpu_bf16_native``). A warning, not a silent switch: the precision is part of the
    recipe's protocol, so changing it is the user's call (`--trainer.precision 32-true`)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if bf16_on_slow_cpu(trainer):
            rank_zero_warn(
                f"trainer.precision={trainer.precision} on a CPU without bf16 matrix instructions (no avx512_bf16 "
                f"or amx_bf16 in /proc/cpuinfo): PyTorch falls back to a scalar bf16 matmul that is many times "
                f"slower than float32 on such a CPU. Pass --trainer.precision 32-true (the quickstart does so "
                f"by itself on such machines).")
