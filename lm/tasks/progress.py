"""Progress that reads well in a log file.

Lightning's bar redraws one line with carriage returns: right in a terminal, unreadable in a log (a
batch job, ``| tee``, a notebook's captured output). ``LineProgress`` takes over when the trainer has no
bar (``--trainer.enable_progress_bar false``, which ``lm`` defaults to when stderr is not a terminal):
one plain line at the first training step and evaluation batch, then every ``every_n_steps`` steps /
``every_n_batches`` batches or every ``every_s`` seconds, whichever comes first (a slow run is not silent
for half an hour), with the loss, the rate and the time left; and one summary line at the end of each
stage (training, each validation, test), however short the run.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import Callback


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _total(value) -> int | None:
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if 0 < v < 10**12 else None  # inf / unknown lengths


class LineProgress(Callback):
    def __init__(self, every_n_steps: int = 50, every_n_batches: int = 50, every_s: float = 30.0, stream=None):
        self.every_n_steps, self.every_n_batches, self.every_s = every_n_steps, every_n_batches, every_s
        self.stream = stream
        self._t0: dict[str, float] = {}
        self._last: dict[str, float] = {}  # when each stage last printed a line

    def _due(self, stage: str, done: int, every_n: int) -> bool:
        """A line for the first step/batch, every ``every_n``, and once ``every_s`` seconds passed since the last."""
        now = time.perf_counter()
        if done == 1 or done % every_n == 0 or now - self._last.get(stage, now) >= self.every_s:
            self._last[stage] = now
            return True
        return False

    def _on(self, trainer) -> bool:
        return trainer.progress_bar_callback is None and trainer.is_global_zero

    def _say(self, msg: str) -> None:
        print(msg, file=self.stream or sys.stderr, flush=True)

    def _line(self, what: str, done: int, total: int | None, t0: float, extra: str = "") -> str:
        elapsed = time.perf_counter() - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{what} {done}/{total} ({100 * done / total:.0f}%)" if total else f"{what} {done}"
        eta = f", {_fmt_time((total - done) / rate)} left" if total and rate > 0 else ""
        return f"{head}{extra} | {rate:.2f}/s, {_fmt_time(elapsed)} elapsed{eta}"

    # ----- training ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._t0["train"] = self._last["train"] = time.perf_counter()
        self._step0 = trainer.global_step  # a resumed run counts its rate from here

    @staticmethod
    def _train_metrics(trainer) -> str:
        metrics = trainer.callback_metrics
        return "".join(f", {k.split('/')[-1]} {float(metrics[k]):.4g}"
                       for k in ("train/loss", "train/ppl", "train/bpc") if k in metrics)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (not self._on(trainer) or step == self._step0 or getattr(self, "_said", -1) == step
                or not self._due("train", step - self._step0, self.every_n_steps)):
            return
        self._said = step
        extra = self._train_metrics(trainer)
        total = _total(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else \
            _total(trainer.estimated_stepping_batches)
        line = self._line("step", step - self._step0, (total - self._step0) if total else None,
                          self._t0["train"], extra)
        self._say(line.replace(f"step {step - self._step0}/", f"step {step}/", 1) if self._step0 else line)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._on(trainer) or "train" not in self._t0:
            return
        steps = trainer.global_step - self._step0
        elapsed = time.perf_counter() - self._t0["train"]
        rate = f", {steps / elapsed:.2f} steps/s" if elapsed > 0 else ""
        self._say(f"train done: {steps} steps (global step {trainer.global_step}) in {_fmt_time(elapsed)}{rate}"
                  + self._train_metrics(trainer))

    # ----- evaluation -------------------------------------------------------------------------
    def _eval_start(self, stage: str) -> None:
        self._t0[stage] = self._last[stage] = time.perf_counter()

    def _eval_batch(self, trainer, stage: str, batch_idx: int, totals) -> None:
        done = batch_idx + 1
        if not self._on(trainer) or not self._due(stage, done, self.every_n_batches):
            return
        self._say(self._line(f"{stage} batch", done, _total(totals[0] if totals else None), self._t0[stage]))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start("validation")

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start("test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch(trainer, "validation", batch_idx, trainer.num_val_batches)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(trainer, "test", batch_idx, trainer.num_test_batches)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._on(trainer) and not trainer.sanity_checking:
            self._end(trainer, "validation", "val/")

    def on_test_end(self, trainer, pl_module) -> None:
        if self._on(trainer):
            self._end(trainer, "test", "test/")

    def _end(self, trainer, stage: str, prefix: str) -> None:
        m = trainer.callback_metrics
        vals = ", ".join(f"{k[len(prefix):]} {float(v):.4g}" for k, v in m.items()
                         if k.startswith(prefix) and k[len(prefix):] in ("loss", "ppl", "bpc", "acc", "accuracy"))
        self._say(f"{stage} done in {_fmt_time(time.perf_counter() - self._t0.get(stage, time.perf_counter()))}"
                  + (f": {vals}" if vals else ""))
