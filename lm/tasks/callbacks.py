"""Callbacks the CLI installs by default: run-directory checkpoints and token throughput."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

from lm.errors import ConfigError


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes to ``<trainer.default_root_dir>/checkpoints`` (not into a
    per-version logger folder), so ``lm fit --ckpt_path last`` finds the run's ``last.ckpt`` again.

    A fresh ``fit`` (no ``--ckpt_path``) into a folder that already holds checkpoints stops with a
    message instead of overwriting them. Lightning writes checkpoints atomically (temp file + rename).
    """

    def __init__(self, save_last: bool = True, every_n_train_steps: int | None = None, save_top_k: int = 1,
                 monitor: str | None = "val/loss", mode: str = "min", dirpath: str | None = None,
                 enable_version_counter: bool = False, **kwargs):
        super().__init__(dirpath=dirpath, save_last=save_last, every_n_train_steps=every_n_train_steps,
                         save_top_k=save_top_k, monitor=monitor, mode=mode,
                         enable_version_counter=enable_version_counter, **kwargs)

    def _ensure_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(Path(trainer.default_root_dir) / "checkpoints")

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # Lightning resolves `--ckpt_path last` before `setup`: point it at the run directory first.
        self._ensure_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._ensure_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module) -> None:
        # trainer.ckpt_path is known only once the checkpoint was restored, right before this hook.
        if trainer.ckpt_path is None and Path(self.dirpath).is_dir() and any(Path(self.dirpath).glob("*.ckpt")):
            raise ConfigError(
                f"{self.dirpath} already holds checkpoints from an earlier run. Resume it with "
                f"`--ckpt_path last`, or start a new run in another folder (`--trainer.default_root_dir runs/NEW`)."
            )
        super().on_fit_start(trainer, pl_module)


def _batch_size(batch) -> int:
    return int(batch["input"].size(0))


def _tokens(batch) -> int:
    return int(batch["input"].numel())


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs ``train|throughput/items_per_sec`` (= tokens/s)
    and ``samples_per_sec`` (= segments/s) every ``log_every_n_steps``."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size)
