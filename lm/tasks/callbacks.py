"""Callbacks the CLI installs by default: run-directory checkpoints, token throughput (with a fit
summary JSON) and the resolved config saved beside the run."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lm.errors import ConfigError
from lm.utils import atomic_write_bytes, atomic_write_text


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable: the checkpoint is serialised in
    memory, written to a temporary file IN THE TARGET DIRECTORY, fsynced, then ``os.replace``d over the
    target. A crash or ``kill -9`` at any moment leaves the previous ``last.ckpt`` or the new one, never
    half of one. (Lightning's own save goes through an fsspec transaction whose temporary file lives in
    the system temp dir and is ``shutil.move``d: a plain copy, not a rename, when that is another
    filesystem, and never fsynced.) Remote paths (s3://, ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(fs._strip_protocol(str(path)), buf.getbuffer())


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes to ``<trainer.default_root_dir>/checkpoints`` (not into a
    per-version logger folder), so ``lm fit --ckpt_path last`` finds the run's ``last.ckpt`` again.

    A fresh ``fit`` (no ``--ckpt_path``) into a folder that already holds checkpoints stops with a
    message instead of overwriting them. Checkpoints are written atomically (``AtomicCheckpointIO``:
    temp file in the same directory + fsync + rename), so a kill while saving never breaks ``last.ckpt``.
    """

    def __init__(self, save_last: bool = True, every_n_train_steps: int | None = None, save_top_k: int = 1,
                 monitor: str | None = "val/loss", mode: str = "min", dirpath: str | None = None,
                 enable_version_counter: bool = False, **kwargs):
        super().__init__(dirpath=dirpath, save_last=save_last, every_n_train_steps=every_n_train_steps,
                         save_top_k=save_top_k, monitor=monitor, mode=mode,
                         enable_version_counter=enable_version_counter, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning saves on validation end, or on train-epoch end when validation runs once per epoch.
        # With an integer val_check_interval and max_steps falling between two validations, the steps
        # after the last validation were never saved (a 2000-step run left last.ckpt at step 1519).
        # A failed run never gets here (on_exception instead), so a non-finite state is never saved.
        super().on_train_end(trainer, pl_module)
        if self.save_last and not trainer.interrupted and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _ensure_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(Path(trainer.default_root_dir) / "checkpoints")

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # Lightning resolves `--ckpt_path last` before `setup`: point it at the run directory first.
        self._ensure_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._ensure_dirpath(trainer)
        # Only the plain default is replaced: a user's own CheckpointIO (or a sharded strategy's) stays.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
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


def logger_writes_now(trainer) -> bool:
    """Whether the logger writes the metrics of the current step (every ``log_every_n_steps``).

    Lightning's own predicate; it is private, so this is the one place the package reads it."""
    return bool(trainer._logger_connector.should_update_logs)


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens, under our own tag names. Every ``log_every_n_steps``
    it logs ``train/tokens_per_s`` and ``train/segments_per_s`` (all devices together; training time only,
    validation excluded): the rolling mean over the last ``window_size`` steps, or, until that many steps
    have run, the mean since the start of this fit (so a short run logs them too). At the end of each
    validation/test run it logs ``val/tokens_per_s`` / ``test/tokens_per_s`` (input tokens fed per second
    over the whole run; the results JSON's ``tokens_per_s`` counts scored tokens) at the step of ``val/loss``.
    Lightning's own keys (``train/device/items_per_sec``, ...) are not logged.

    At the end of a fit it also writes ``<default_root_dir>/results/train.json``: steps, tokens and
    training seconds of this session (validation time excluded, as in the logged rate), wall seconds
    of the whole fit, and the mean tokens/s; a resumed run appends its session to ``sessions``."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size)
        self._fit_t0: float | None = None
        self._step0 = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Tokens/s is this monitor's job; model FLOPs and MFU are counted exactly by scripts/bench.py.
        # Decide here so Lightning does not warn on every run that the module defines no flops_per_batch.
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._fit_t0, self._step0 = time.perf_counter(), trainer.global_step

    # Tag prefixes, as the module logs its losses (``val/loss`` also under `lm validate`).
    _PREFIX = {RunningStage.TRAINING: "train", RunningStage.VALIDATING: "val", RunningStage.TESTING: "test",
               RunningStage.PREDICTING: "predict"}

    def _rates(self, stage: RunningStage, world_size: int, whole_run: bool = False) -> dict[str, float]:
        """``Throughput.compute()`` renamed: its per-device rolling rates (times the world size) once its
        window is full, else (or with ``whole_run``) its totals over the time since the stage started."""
        m = self._throughputs[stage].compute()
        prefix = self._PREFIX.get(stage, str(stage.value))
        if "device/items_per_sec" in m and not whole_run:
            tokens, segments = m["device/items_per_sec"], m["device/samples_per_sec"]
        elif m.get("time", 0) > 0:
            tokens, segments = m.get("lengths", 0) / m["time"], m["samples"] / m["time"]
        else:
            return {}
        return {f"{prefix}/tokens_per_s": tokens * world_size, f"{prefix}/segments_per_s": segments * world_size}

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        # Lightning logs every evaluation batch under `<stage>/device/...` at an evaluation-batch step;
        # evaluation gets one value per run instead (_log_eval), at the step of `val/loss` / `test/loss`.
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING or not logger_writes_now(trainer):
            return
        trainer._logger_connector.log_metrics(self._rates(stage, trainer.world_size))

    def _log_eval(self, trainer) -> None:
        stage = trainer.state.stage
        if trainer.sanity_checking or stage not in self._throughputs or not self._throughputs[stage]._time:
            return
        rates = self._rates(stage, trainer.world_size, whole_run=True)
        rates.pop(f"{self._PREFIX.get(stage, stage.value)}/segments_per_s", None)
        trainer._logger_connector.log_metrics(rates)  # at the step Lightning logs `val/loss`/`test/loss` at

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        self._log_eval(trainer)
        super().on_validation_end(trainer, pl_module)

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        self._log_eval(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        stage = RunningStage.TRAINING
        if self._fit_t0 is None or stage not in self._t0s or not trainer.is_global_zero:
            return
        train_s = time.perf_counter() - self._t0s[stage]  # ThroughputMonitor shifts t0 past validation
        tokens = self._lengths.get(stage, 0) * trainer.world_size
        session = {"steps": trainer.global_step - self._step0, "tokens": tokens,
                   "train_s": round(train_s, 6), "wall_s": round(time.perf_counter() - self._fit_t0, 2),
                   "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
                   "world_size": trainer.world_size, "precision": str(trainer.precision)}
        path = Path(trainer.default_root_dir) / "results" / "train.json"
        sessions = []
        if path.exists():
            try:
                sessions = json.loads(path.read_text()).get("sessions", [])
            except (ValueError, OSError):
                sessions = []
        sessions.append(session)
        tot_tokens = sum(x["tokens"] for x in sessions)
        tot_train = sum(x["train_s"] for x in sessions)
        summary = {"global_step": trainer.global_step, "tokens": tot_tokens, "train_s": round(tot_train, 6),
                   "wall_s": round(sum(x["wall_s"] for x in sessions), 2),
                   "tokens_per_s": round(tot_tokens / tot_train, 1) if tot_train > 0 else None,
                   "sessions": sessions}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(summary, indent=2))


class RunDirConfig(SaveConfigCallback):
    """Also writes the fit config to ``<default_root_dir>/config.yaml`` beside ``checkpoints/`` (the
    standard copy goes to the logger's version folder), so ``validate --config <run>/config.yaml`` works
    and the hyper-parameters sit beside the checkpoints even with ``--trainer.logger false``."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
