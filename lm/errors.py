"""User-facing errors: one paragraph that names the problem and the fix.

Every error a user can trigger with bad input (a config typo, a missing corpus, a checkpoint from
another model) is raised as an ``LMError`` subclass. The CLI catches ``LMError`` and prints only its
message, so a user never sees a traceback from deep inside torch for a mistake in their input.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LMError(Exception):
    """Base class for errors caused by user input; the CLI prints the message without a traceback."""


class ConfigError(LMError, ValueError):
    """An invalid or incompatible configuration value."""


class DataError(LMError):
    """A missing, empty or malformed data file."""


class CheckpointError(LMError):
    """A checkpoint that cannot be read or does not fit the model/vocabulary."""


class NonFiniteLossError(LMError):
    """Training produced NaN/inf; raised with the step and the last good checkpoint."""


class StopRequested(BaseException):
    """SIGTERM outside a running Trainer (``lm.rundir.StopSignals``): raised at once, a BaseException like
    KeyboardInterrupt so that no ``except Exception`` swallows it; ``with`` blocks clean up, the CLI exits 143."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> ConfigError:
    choices = sorted(choices)
    return ConfigError(
        f"Unknown {kind} '{name}'.{did_you_mean(name, choices)} Valid choices: {', '.join(choices)}."
    )
