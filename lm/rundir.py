"""Checks the ``lm fit/validate/test`` and ``lm finetune`` command lines make before anything is written.

* One writer per folder: ``fit`` holds an exclusive lock (``filelock``: ``flock`` on POSIX, ``msvcrt`` on Windows)
  on ``<run>/.lock`` from parsing to exit, ``lm evaluate`` on ``<out>/.lock``, so a second concurrent run into
  the same folder is refused instead of silently replacing the first's files. (The OS drops the lock when the
  process dies, ``kill -9`` included: no stale-lock cleanup.)
* A fresh ``fit`` into a folder that already holds checkpoints is refused before ``config.yaml`` or
  ``tokenizer.json`` are touched (``RunCheckpoint.on_fit_start`` refuses too, but only after those writes).
* ``validate``/``test`` without ``--ckpt_path`` use the run's own ``last.ckpt`` or refuse: they never score
  the random weights of a freshly built model (and overwrite a real result with that).
* Stop signals: SIGTERM ends a Lightning run at the next batch boundary (Lightning's own handler, then
  ``SIGTERMException``); the first Ctrl-C (SIGINT) is routed to that same graceful stop, a second one
  interrupts at once. Outside a Trainer, SIGTERM raises ``StopRequested`` at once (``with`` blocks clean their
  temporary folders). A stop Lightning swallows (one in an evaluation's last batch) is still recorded, so the
  CLI exits ``128 + signal`` (143 / 130), never 0, and no result written under it claims ``complete``.
* A window (``data.tgt_len``, ``data.eval.tgt_len``) whose attention scores exceed the machine is refused;
  ``--model.*`` values replaced by a checkpoint's hyper-parameters are named in a warning.
* Write failures (full disk, read-only filesystem, a file in the way) become one paragraph (``write_error``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from lm.errors import CheckpointError, ConfigError, StopRequested
from lm.utils import RunLock, write_error  # noqa: F401  (the CLI's names for them; they live in the base layer)


def other_rank() -> bool:
    """True in a process that a distributed launcher started for a rank other than 0 (Lightning's DDP
    launcher re-runs the command with LOCAL_RANK set; torchrun/SLURM set RANK/NODE_RANK): the run directory
    belongs to rank 0, which takes its lock and makes its checks."""
    return any(int(os.environ.get(k) or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def refuse_used_run_dir(run_dir: str | os.PathLike) -> None:
    """A fresh fit (no ``--ckpt_path``) into a folder that already holds checkpoints."""
    ckpts = Path(run_dir) / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        raise ConfigError(
            f"{ckpts} already holds checkpoints from an earlier run. Resume it with `--ckpt_path last`, or start "
            f"a new run in another folder (`--trainer.default_root_dir runs/NEW`). Nothing was written."
        )


def refuse_named_ckpt(sub: str, ckpt_path: str | None, names: tuple[str, ...]) -> None:
    """Lightning's ``--ckpt_path`` names that mean nothing for ``sub`` in ``lm`` (Lightning would raise a raw
    ValueError after the run folder was touched): ``hpc`` (SLURM requeue files, which ``lm`` never writes) and,
    for ``fit``, ``best`` (a fresh Trainer has no best checkpoint)."""
    if ckpt_path not in names:
        return
    use = ("`--ckpt_path last` (resume the run in --trainer.default_root_dir) or the .ckpt file to start from"
           if sub == "fit" else "`--ckpt_path best` or `last` (the run in --trainer.default_root_dir) or a .ckpt file")
    what = ("names SLURM's requeue checkpoints (hpc_ckpt_*.ckpt), which `lm` never writes" if ckpt_path == "hpc"
            else "has no meaning for a new fit: no checkpoint has been judged best yet")
    raise CheckpointError(f"`lm {sub} --ckpt_path {ckpt_path}` {what}. Pass {use}. Nothing was written.")


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The run's best-by-validation checkpoint: what its ``last.ckpt`` records as ``best_model_path`` (moved
    folders: the same file name beside it), else the only checkpoint in the folder other than ``last.ckpt``."""
    from lm import checkpoint

    ckpts = Path(run_dir) / "checkpoints"
    last = ckpts / "last.ckpt"
    if last.is_file():
        for state in (checkpoint.read(last).get("callbacks") or {}).values():
            best = (state or {}).get("best_model_path") if isinstance(state, dict) else None
            for cand in (Path(best), ckpts / Path(best).name) if best else ():
                if cand.is_file():
                    return cand
    others = [p for p in sorted(ckpts.glob("*.ckpt")) if p.name != "last.ckpt"]
    return others[0] if len(others) == 1 else None


def eval_checkpoint(sub: str, ckpt_path: str | None, run_dir: str | os.PathLike) -> str:
    """The checkpoint ``validate``/``test`` score: the given one, the run's ``last.ckpt`` for none/``last``, its
    best-by-validation one for ``best``. Without one this is an error: a fresh model's random weights would be
    scored (and written as a result)."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if ckpt_path == "best":
        best = best_checkpoint(run_dir)
        if best is None:
            raise CheckpointError(
                f"`{sub} --ckpt_path best` needs the best-by-validation checkpoint of the run in {run_dir} "
                f"(--trainer.default_root_dir), but {Path(run_dir) / 'checkpoints'} holds none that last.ckpt names "
                f"and not exactly one besides last.ckpt. Pass the checkpoint file to score with --ckpt_path.")
        return str(best)
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
    """Records every SIGTERM/SIGINT so the CLI can exit 128 + signal and results can say they are incomplete.

    While a Trainer runs, Lightning's SIGTERM handler is in charge (it stops at the next batch boundary and
    calls ours, which only records); the first SIGINT is routed to that same graceful stop. Outside a Trainer
    SIGTERM raises ``StopRequested`` and SIGINT ``KeyboardInterrupt``. Lightning ignores a SIGTERM in the last
    batch of an evaluation (and every new Trainer resets its flag): ``received`` still has it."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        try:
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _ours(self) -> bool:
        """True when no Trainer runs: SIGTERM's handler is ours, not Lightning's (which calls ours after its own)."""
        return getattr(signal.getsignal(signal.SIGTERM), "__func__", None) is StopSignals._on_sigterm

    def _on_sigterm(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.SIGTERM
        if self._ours():
            raise StopRequested(signal.SIGTERM)

    def _on_sigint(self, signum, frame) -> None:
        self.received = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        term = signal.getsignal(signal.SIGTERM)
        if callable(term) and not self._ours():  # Lightning's handler, installed while a Trainer runs
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
    from lm.data.window_memory import Window, check_windows, eval_window

    cfg = model.cfg
    windows = []
    if stage == "fit":
        windows.append(Window("data.tgt_len", "data.batch_size", model.tgt_len, train_batch, cfg.mem_len))
    windows.append(eval_window("data.eval.tgt_len (default: data.tgt_len)", "data.eval.batch_size", model.eval_cfg,
                               cfg, model.tgt_len))
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
