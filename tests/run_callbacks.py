"""Callbacks the tests plug into real runs through the config (``class_path: run_callbacks.<Name>``): to slow,
crash, poison or watch a run. A real module in tests/ (on sys.path in pytest; subprocesses get tests/ on their
PYTHONPATH from ``subprocess_env``)."""

import os
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

TESTS = Path(__file__).resolve().parent


def subprocess_env(*paths: Path) -> dict[str, str]:
    """The environment for a real ``python -m lm.cli`` child: the repository, tests/ (this module) and ``paths``
    importable."""
    parts = [*(str(p) for p in paths), str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


class Sleep(Callback):
    """Slows every step down so that a test can kill the run between steps."""

    def __init__(self, seconds: float = 0.25):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


class CrashAt(Callback):
    """Dies right before optimizer step ``step`` (after the checkpoint of the step before was written)."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash before step {self.step}")


class PoisonGradAt(Callback):
    """Sets the first gradient to NaN after the backward pass of optimizer step ``step`` (finite loss)."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad.fill_(float("nan"))


class PoisonAt(Callback):
    """Sets every embedding weight to NaN right before optimizer step ``step``."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))

class Beat(Callback):
    """After every optimizer step, writes the step to ``path`` (so a test knows how far the run got), then
    sleeps so that a signal lands between steps."""

    def __init__(self, path: str, seconds: float = 0.2):
        self.path, self.seconds = Path(path), seconds

    def on_train_batch_end(self, trainer, *args, **kwargs):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        tmp.replace(self.path)
        time.sleep(self.seconds)


class WorseVal(Callback):
    """Makes every validation loss higher than the one before: the module's running mean NLL gets a large,
    growing extra term (callbacks' on_validation_epoch_end runs before the module's, which logs val/loss)."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.eval_nll.update(torch.tensor(10.0 + trainer.global_step), weight=1e6)
