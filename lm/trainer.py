"""The Trainer class of the ``lm`` command lines (``lm fit/validate/test``, ``lm finetune``)."""

from __future__ import annotations

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lm.errors import ConfigError, LMError


class Trainer(L.Trainer):
    """Lightning's Trainer with three differences for the CLI. The ``limit_*_batches`` options are typed
    ``int | float`` instead of Lightning's ``float | int``. jsonargparse tries a union's types in order, so with
    Lightning's order ``--trainer.limit_val_batches 1`` became 1.0 = 100% of the batches; here an integer
    (``1``, ``20``) is a number of batches and a decimal (``1.0``, ``0.25``) a fraction, as in Lightning's docs.

    ``check_val_every_n_epoch`` defaults to None, which here means Lightning's 1 for a fractional (or
    unset) ``val_check_interval`` and "count steps across epochs" for an integer one: the stock recipes' 500
    steps then work on any corpus (with 1, a corpus under 500 batches per epoch was a ValueError). And any error
    Lightning raises while building the Trainer from the given settings (an unknown or unavailable
    accelerator, bad devices/precision) is reported as a configuration error, in one paragraph.
    """

    def __init__(self, limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None, limit_predict_batches: int | float | None = None,
                 check_val_every_n_epoch: int | None = None, **kwargs):
        vci = kwargs.get("val_check_interval")
        if check_val_every_n_epoch is None and (vci is None or isinstance(vci, float)):
            check_val_every_n_epoch = 1
        try:
            super().__init__(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                             limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
                             check_val_every_n_epoch=check_val_every_n_epoch, **kwargs)
        except LMError:
            raise
        except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as e:
            gist = " ".join(str(e).split())[:400]
            raise ConfigError(
                f"Lightning rejected the trainer settings: {gist} Check --trainer.accelerator (cpu, gpu/cuda, mps, "
                f"auto: only what this machine has), --trainer.devices and --trainer.precision; `lm fit --help` "
                f"lists the options."
            ) from None
