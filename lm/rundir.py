"""Checks the ``lm fit/validate/test`` and ``lm finetune`` command lines make before anything is written.

* One writer per run directory: ``fit`` holds an exclusive ``flock`` on ``<run>/.lock`` from parsing to exit,
  so a second concurrent ``fit`` into the same folder is refused instead of silently replacing the first's
  files. (The kernel drops the lock when the process dies, ``kill -9`` included: no stale-lock cleanup.)
* A fresh ``fit`` into a folder that already holds checkpoints is refused before ``config.yaml`` or
  ``tokenizer.json`` are touched (``RunCheckpoint.on_fit_start`` refuses too, but only after those writes).
* ``validate``/``test`` without ``--ckpt_path`` use the run's own ``last.ckpt`` or refuse: they never score
  the random weights of a freshly built model (and overwrite a real result with that).
* Stop signals: SIGTERM ends a Lightning run at the next batch boundary (Lightning's own handler, then
  ``SIGTERMException``); the first Ctrl-C (SIGINT) is routed to that same graceful stop, a second one
  interrupts at once. The CLI exits ``128 + signal`` (143 / 130), never 0.
* A window (``data.tgt_len``, ``data.eval.tgt_len``) whose attention scores exceed the machine is refused;
  ``--model.*`` values replaced by a checkpoint's hyper-parameters are named in a warning.
* Write failures (full disk, read-only filesystem, a file in the way) become one paragraph (``write_error``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
from pathlib import Path

from lm.errors import CheckpointError, ConfigError

# Write failures caused by the machine or the paths given, not by a bug: reported in one paragraph.
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
                errno.EEXIST: "a file of that name is in the way", errno.EISDIR: "it is a folder, not a file"}


def write_error(exc: OSError) -> ConfigError | None:
    """One paragraph for an ``OSError`` from writing a file or folder (full disk, read-only filesystem, a path
    through a file); None for other OSErrors (those stay bugs with a traceback)."""
    why = WRITE_ERRNOS.get(exc.errno)
    if why is None:
        return None
    where = exc.filename or "(unknown path)"
    return ConfigError(
        f"Cannot write {where}: {why} ({exc.strerror}). Nothing half-written was left behind (files are written "
        f"atomically). Free disk space, or point the option that names this path (--trainer.default_root_dir, "
        f"--data.cache_dir, --out, ...) at a writable folder, then rerun; a fit resumes with --ckpt_path last."
    )


def other_rank() -> bool:
    """True in a process that a distributed launcher started for a rank other than 0 (Lightning's DDP
    launcher re-runs the command with LOCAL_RANK set; torchrun/SLURM set RANK/NODE_RANK): the run directory
    belongs to rank 0, which takes its lock and makes its checks."""
    return any(int(os.environ.get(k) or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``. Creating the folder and the lock file also
    proves the run directory is writable, before any real file is written."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        path = self.run_dir / ".lock"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            err = write_error(e)
            if err is None:
                raise
            raise ConfigError(f"The run directory {self.run_dir} cannot be used: {err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"Another `lm fit` is writing to {self.run_dir} right now (it holds {path}). Two runs in one folder "
                f"would overwrite each other's checkpoints, config.yaml and tokenizer.json: wait for it to finish "
                f"(or stop it), or train into another folder with --trainer.default_root_dir runs/NEW."
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def refuse_used_run_dir(run_dir: str | os.PathLike) -> None:
    """A fresh fit (no ``--ckpt_path``) into a folder that already holds checkpoints."""
    ckpts = Path(run_dir) / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        raise ConfigError(
            f"{ckpts} already holds checkpoints from an earlier run. Resume it with `--ckpt_path last`, or start "
            f"a new run in another folder (`--trainer.default_root_dir runs/NEW`). Nothing was written."
        )


def eval_checkpoint(sub: str, ckpt_path: str | None, run_dir: str | os.PathLike) -> str:
    """The checkpoint ``validate``/``test`` score: the given one, or the run's ``last.ckpt`` for none/``last``.
    Without one this is an error: a fresh model's random weights would be scored (and written as a result)."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if ckpt_path not in (None, "last"):
        return ckpt_path
    if last.is_file():
        return str(last)
    given = "--ckpt_path last was given" if ckpt_path == "last" else "no --ckpt_path was given"
    raise CheckpointError(
        f"`{sub}` needs trained weights, but {given} and {last} does not exist (the run folder is "
        f"--trainer.default_root_dir, here {run_dir}). Pass the checkpoint to score with --ckpt_path "
        f"runs/<name>/checkpoints/last.ckpt (or a best-* file), or set --trainer.default_root_dir to the run's folder."
    )


class StopSignals:
    """Routes the first SIGINT to Lightning's graceful SIGTERM stop while a Trainer runs; records which signal
    arrived so the CLI can exit 128 + signal. Outside a Trainer, SIGINT stays a KeyboardInterrupt."""

    def __init__(self):
        self.received: int | None = None
        self._old = None

    def __enter__(self) -> StopSignals:
        try:
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _on_sigint(self, signum, frame) -> None:
        self.received = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        term = signal.getsignal(signal.SIGTERM)
        if callable(term):  # Lightning's handler, installed while a Trainer runs: stop at the next batch end
            term(signal.SIGTERM, frame)
        else:
            raise KeyboardInterrupt

    def exit_code(self) -> int:
        return 128 + int(self.received or signal.SIGTERM)

    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGTERM).name


def check_window_memory(model, stage: str, device, train_batch: int = 1) -> None:
    """Refuse a segment/window the machine cannot hold, before anything is written: the guard shared with
    ``lm evaluate`` and ``lm analyze`` (``lm.data.window_memory``), for the training segment (fit) and the
    evaluation window."""
    from lm.data.window_memory import Window, check_windows

    cfg, e = model.cfg, model.eval_cfg
    windows = []
    if stage == "fit":
        windows.append(Window("data.tgt_len", "data.batch_size", model.tgt_len, train_batch, cfg.mem_len))
    mem = (e.mem_len if e.mem_len is not None else cfg.mem_len) if e.protocol == "memory" else 0
    windows.append(Window("data.eval.tgt_len (default: data.tgt_len)", "data.eval.batch_size",
                          e.tgt_len or model.tgt_len, e.batch_size, mem))
    check_windows(windows, cfg.n_head, device)


# Model settings that do not change what an evaluation computes, or that the data sets (linked).
_NOT_ARCHITECTURE = {"optim", "eval", "results_dir", "compile", "vocab_size", "unit", "tgt_len", "pretrained"}


def _plain_ns(value):
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain_ns(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain_ns(v) for v in value]
    return value


def warn_replaced_model_options(model_cfg, hparams: dict, path: str) -> None:
    """LightningCLI rebuilds the model from the checkpoint's hyper-parameters, silently replacing the
    ``--model.*`` values of the command line and config. Say which ones differed (the checkpoint's win: its
    weights only fit its own architecture)."""
    if model_cfg is None or not hparams:
        return
    mine = _plain_ns(model_cfg)
    if not isinstance(mine, dict) or "init_args" in mine:  # subclass mode: nothing comparable
        return
    diff = [f"model.{k}: {mine[k]!r} -> {hparams[k]!r}" for k in sorted(set(mine) & set(hparams))
            if k not in _NOT_ARCHITECTURE and _plain_ns(hparams[k]) != mine[k]]
    if diff:
        print(f"lm: warning: the model is rebuilt from {path}, so these settings of the config/command line are "
              f"replaced by the checkpoint's: {'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}. To score "
              f"another architecture, pass a checkpoint trained with it.", file=sys.stderr)
