"""The one place that knows how Lightning behaves where it offers no public API.

The package uses Lightning's public API only. Where it needs to know something Lightning keeps private,
it reproduces the rule here from public state, and ``tests/test_lightning_compat.py`` checks the
reproduction against Lightning's private implementation on a real run, so a Lightning release that
changes the rule fails that test (with the installed version in the message) instead of silently
shifting what gets logged. The tested Lightning range is pinned in setup.cfg.
"""

from __future__ import annotations

TESTED_LIGHTNING = ">=2.6,<2.7"  # keep equal to setup.cfg's install_requires


def logger_writes_now(trainer) -> bool:
    """Whether the logger writes the metrics logged in the current training step (every
    ``log_every_n_steps``, and on the step where training stops).

    Lightning's predicate (``_LoggerConnector.should_update_logs``) counts optimizer steps taken before
    this batch, plus one; with one optimizer and automatic optimisation (``LanguageModel``) that count is
    ``trainer.global_step`` during ``training_step``. Call it from ``training_step`` only."""
    every = trainer.log_every_n_steps
    if every == 0:
        return False
    return (trainer.global_step + 1) % every == 0 or trainer.should_stop


def attached_trainer(module):
    """The module's trainer, or None when it runs on its own (``LightningModule.trainer`` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None
