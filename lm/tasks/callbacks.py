"""Callbacks the CLI installs by default: run-directory checkpoints, token throughput (with a fit
summary JSON) and the resolved config saved beside the run.

Public Lightning API only: what Lightning keeps private (the logger's step predicate) is reproduced in
``lm/tasks/lightning_compat.py``, whose test fails when Lightning's behaviour moves away from it."""

from __future__ import annotations

import io
import json
import os
import time
from collections import deque
from pathlib import Path

import torch
from fsspec.core import strip_protocol
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from lm import checkpoint
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
        atomic_write_bytes(strip_protocol(str(path)), buf.getbuffer())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        # Restores go through the package's one reader: local files only, weights_only=True, one-paragraph
        # errors (lm.checkpoint). Tensors come back on the CPU; Lightning moves the model's state itself.
        return checkpoint.read(path, given_as="--ckpt_path", mmap=False)


def run_checkpoint_dir(default_root_dir: str | os.PathLike) -> str:
    """Where ``RunCheckpoint`` writes: ``<default_root_dir>/checkpoints`` (resolved, as Lightning does)."""
    return os.path.realpath(Path(default_root_dir) / "checkpoints")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes to ``<trainer.default_root_dir>/checkpoints`` (not into a
    per-version logger folder), so ``lm fit --ckpt_path last`` finds the run's ``last.ckpt`` again (the
    CLI resolves ``last`` to that file itself, see ``lm.cli``).

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
        self._saved_at_step = -1  # global step of this session's latest save (any checkpoint)

    def _save_last_now(self, trainer) -> None:
        """``last.ckpt`` at the current step, unless a checkpoint was saved at it already."""
        if self.save_last and trainer.global_step > self._saved_at_step:
            path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path, self.save_weights_only)  # collective: every rank calls it
            self.last_model_path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        # Lightning writes last.ckpt after a validation only when a top-k file was written at that step: a
        # validation that did not improve the monitored loss left last.ckpt at the previous best (a kill at
        # step 48 resumed from 30 although validations ran at 35, 40, 45). last.ckpt follows every validation.
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run:
            self._save_last_now(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # A SIGTERM (or the first Ctrl-C, routed to it by the CLI) stops Lightning's loops at a batch boundary
        # with SIGTERMException: the state is that of a finished step, so it is saved as last.ckpt (Lightning's
        # fault-tolerant pattern) and the stop loses nothing. Any other exception (a crash, a non-finite loss)
        # may leave a half-updated or NaN state: never saved, the previous last.ckpt stays.
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._save_last_now(trainer)
        if self.last_model_path and trainer.is_global_zero:
            exception.add_note(f"{self.last_model_path} holds step {trainer.global_step}: resume with "
                               f"`--ckpt_path last` (same --trainer.default_root_dir).")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = run_checkpoint_dir(trainer.default_root_dir)
        if stage == "fit" and trainer.is_global_zero:  # a kill during a save leaves atomic_write's temp file
            for tmp in Path(self.dirpath).glob(".*.ckpt.*.tmp"):
                tmp.unlink(missing_ok=True)
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

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Called on every rank for every checkpoint the trainer writes (ours and any other callback's).
        self._saved_at_step = trainer.global_step
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning saves on validation end, or on train-epoch end when validation runs once per epoch.
        # With an integer val_check_interval and max_steps falling between two validations, the steps
        # after the last validation were never saved (a 2000-step run left last.ckpt at step 1519).
        # A failed run never gets here (on_exception instead), so a non-finite state is never saved.
        super().on_train_end(trainer, pl_module)
        if self.save_last and not trainer.interrupted and trainer.global_step > self._saved_at_step:
            path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path, self.save_weights_only)  # collective: every rank calls it
            self.last_model_path = path


class TokenThroughput(Callback):
    """Tokens per second. Every training step it logs ``train/tokens_per_s`` and ``train/segments_per_s``
    (all devices together; training time only, validation excluded): the rolling mean over the last
    ``window_size`` steps, or, until that many steps have run, the mean since the start of this fit (so a
    short run logs them too); the logger writes them every ``log_every_n_steps`` like the losses. At the
    end of each validation/test run it logs ``val/tokens_per_s`` / ``test/tokens_per_s`` (input tokens fed
    per second over the whole run; the results JSON's ``tokens_per_s`` counts scored tokens) beside
    ``val/loss`` / ``test/loss``.

    At the end of a fit it also writes ``<default_root_dir>/results/train.json``: steps, tokens and
    training seconds of this session (validation time excluded, as in the logged rate), wall seconds
    of the whole fit, and the mean tokens/s; a resumed run appends its session to ``sessions``."""

    def __init__(self, window_size: int = 20):
        if window_size < 2:
            raise ConfigError(f"TokenThroughput window_size must be >= 2 (a rate needs two points), got {window_size}.")
        self.window_size = window_size

    @staticmethod
    def _now(trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":  # the step's kernels are done, not just queued
            torch.cuda.synchronize()
        return time.perf_counter()

    # ----- training ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_t0 = self._mark = time.perf_counter()
        self._step0 = trainer.global_step
        self._train_s, self._tokens, self._segments = 0.0, 0, 0
        self._window: deque[tuple[float, int, int]] = deque(maxlen=self.window_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(trainer)
        self._train_s += now - self._mark
        self._mark = now
        self._tokens += int(batch["input"].numel())
        self._segments += int(batch["input"].size(0))
        self._window.append((self._train_s, self._tokens, self._segments))
        if len(self._window) == self.window_size:  # rolling: first to last point of the window
            (t0, n0, s0), (t1, n1, s1) = self._window[0], self._window[-1]
            dt, tokens, segments = t1 - t0, n1 - n0, s1 - s0
        else:  # until the window is full: everything since the fit started
            dt, tokens, segments = self._train_s, self._tokens, self._segments
        if dt > 0:
            w = trainer.world_size
            pl_module.log("train/tokens_per_s", tokens / dt * w, on_step=True, on_epoch=False)
            pl_module.log("train/segments_per_s", segments / dt * w, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation inside fit is not training time: the next step's interval starts now.
        if getattr(self, "_mark", None) is not None and not trainer.sanity_checking:
            self._mark = time.perf_counter()

    # ----- evaluation -------------------------------------------------------------------------------
    def _eval_start(self, trainer) -> None:
        self._eval_t0, self._eval_tokens = self._now(trainer), 0

    def _eval_batch(self, batch) -> None:
        self._eval_tokens += int(batch["input"].numel())

    def _eval_end(self, trainer, pl_module, prefix: str) -> None:
        dt = self._now(trainer) - self._eval_t0
        if self._eval_tokens and dt > 0:
            pl_module.log(f"{prefix}/tokens_per_s", self._eval_tokens / dt * trainer.world_size)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._eval_end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._eval_end(trainer, pl_module, "test")

    # ----- the fit summary --------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        self._write_session(trainer, "finished")

    def on_exception(self, trainer, pl_module, exception) -> None:
        # An interrupted session (SIGTERM, Ctrl-C, a crash) trained too: it used to be left out of train.json,
        # which then undercounted the run's steps and time. Recorded with how it ended.
        if trainer.state.fn == "fit":
            name = type(exception).__name__
            self._write_session(trainer, "SIGTERM" if name == "SIGTERMException" else name)

    def _write_session(self, trainer, ended: str) -> None:
        if getattr(self, "_fit_t0", None) is None or not trainer.is_global_zero:
            return
        self._fit_t0, t0 = None, self._fit_t0  # once per session
        tokens = self._tokens * trainer.world_size
        train_s = self._train_s
        session = {"steps": trainer.global_step - self._step0, "tokens": tokens, "ended": ended,
                   "train_s": round(train_s, 6), "wall_s": round(time.perf_counter() - t0, 2),
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
                   # the fit ran to its end (a SIGTERM in the last step lets it finish, but the CLI exits 143)
                   "complete": ended == "finished" and not trainer.received_sigterm,
                   "sessions": sessions}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(summary, indent=2))


class RunDirConfig(SaveConfigCallback):
    """Also writes the fit config to ``<default_root_dir>/config.yaml`` beside ``checkpoints/`` (the
    standard copy goes to the logger's version folder), so ``validate --config <run>/config.yaml`` works
    and the hyper-parameters sit beside the checkpoints even with ``--trainer.logger false``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Deferred to on_train_start: by then a resumed checkpoint was restored and checked (vocabulary,
        # shapes) and RunCheckpoint.on_fit_start has refused a used folder, so a refused fit writes no config.
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "config.yaml"
        atomic_write_text(path, self.parser.dump(self.config, skip_none=False))
