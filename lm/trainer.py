"""The Trainer class of the ``lm`` command lines (``lm fit/validate/test``, ``lm finetune``)."""

from __future__ import annotations

import inspect
from typing import Literal, Union

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lm import checkpoint
from lm import precision as lm_precision
from lm.errors import ConfigError, LMError

# Lightning's own precision choices (from its public signature, so `--help` lists them) plus `auto`.
PrecisionSetting = Union[Literal["auto"], inspect.signature(L.Trainer.__init__).parameters["precision"].annotation]

# `ckpt_path` values Lightning resolves to a local file of the run itself (not file names).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


def safe_restore_args(ckpt_path, weights_only):
    """``(ckpt_path, True)`` for a Trainer entry point: every restore unpickles with ``weights_only=True``.

    Why here and not (only) in the CLI: ``fit/validate/test/predict`` are where every restore starts (LightningCLI,
    ``lm finetune``, a user's script), and Lightning hands ``weights_only`` on to whatever ``CheckpointIO`` or
    sharded strategy loads the file. An explicit True also beats the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    environment variable, which overrides only an unset (None) weights_only, and Lightning's own default of
    False for http(s) URLs. URLs are refused before Lightning sees them (``checkpoint.local_path``)."""
    if weights_only is False:
        raise ConfigError(
            "--weights_only false would let the checkpoint run code while it is unpickled. `lm` always restores "
            "with weights_only=True, and every checkpoint `lm fit` and `lm finetune fit` write loads that way: "
            "drop --weights_only.")
    if ckpt_path is not None and str(ckpt_path) not in LIGHTNING_CKPT_NAMES:
        ckpt_path = str(checkpoint.local_path(ckpt_path, "--ckpt_path"))
    return ckpt_path, True


class Trainer(L.Trainer):
    """Lightning's Trainer with these differences for the CLI. The ``limit_*_batches`` options are typed
    ``int | float`` instead of Lightning's ``float | int``. jsonargparse tries a union's types in order, so with
    Lightning's order ``--trainer.limit_val_batches 1`` became 1.0 = 100% of the batches; here an integer
    (``1``, ``20``) is a number of batches and a decimal (``1.0``, ``0.25``) a fraction, as in Lightning's docs.

    ``check_val_every_n_epoch`` defaults to None, which here means Lightning's 1 for a fractional (or
    unset) ``val_check_interval`` and "count steps across epochs" for an integer one: the stock recipes' 500
    steps then work on any corpus (with 1, a corpus under 500 batches per epoch was a ValueError). And any error
    Lightning raises while building the Trainer from the given settings (an unknown or unavailable
    accelerator, bad devices/precision) is reported as a configuration error, in one paragraph. Every
    ``fit/validate/test/predict`` restores its ``ckpt_path`` with ``weights_only=True`` and never from a URL
    (``safe_restore_args``).

    ``precision`` also takes ``auto`` (``lm.precision``): bf16-mixed where this machine computes bf16 natively,
    else 32-true. The CLI resolves it before the Trainer is built (so the run's config.yaml records what ran);
    here it is resolved for Trainers built in Python. And the default TensorBoard logger writes no
    ``hp_metric = -1`` placeholder scalar (``default_hp_metric=False``); it is otherwise Lightning's default.
    """

    def __init__(self, limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None, limit_predict_batches: int | float | None = None,
                 check_val_every_n_epoch: int | None = None,
                 precision: PrecisionSetting = None, **kwargs):
        if precision is not None and lm_precision.canonical(precision) == lm_precision.AUTO:
            precision = lm_precision.resolve(precision, kwargs.get("accelerator", "auto"))[0]
        if kwargs.get("logger") in (None, True) and not kwargs.get("barebones"):
            kwargs["logger"] = _default_logger(kwargs.get("default_root_dir"))
        vci = kwargs.get("val_check_interval")
        if check_val_every_n_epoch is None and (vci is None or isinstance(vci, float)):
            check_val_every_n_epoch = 1
        try:
            super().__init__(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                             limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
                             check_val_every_n_epoch=check_val_every_n_epoch, precision=precision, **kwargs)
        except LMError:
            raise
        except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as e:
            gist = " ".join(str(e).split())[:400]
            raise ConfigError(
                f"Lightning rejected the trainer settings: {gist} Check --trainer.accelerator (cpu, gpu/cuda, mps, "
                f"auto: only what this machine has), --trainer.devices and --trainer.precision; `lm fit --help` "
                f"lists the options."
            ) from None

    # Explicit signatures (not *args): LightningCLI builds each subcommand's options (--ckpt_path, ...) from them.
    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None,
            ckpt_path: str | None = None, weights_only: bool | None = None) -> None:
        ckpt_path, weights_only = safe_restore_args(ckpt_path, weights_only)
        return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

    def validate(self, model=None, dataloaders=None, ckpt_path: str | None = None, verbose: bool = True,
                 datamodule=None, weights_only: bool | None = None):
        ckpt_path, weights_only = safe_restore_args(ckpt_path, weights_only)
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def test(self, model=None, dataloaders=None, ckpt_path: str | None = None, verbose: bool = True,
             datamodule=None, weights_only: bool | None = None):
        ckpt_path, weights_only = safe_restore_args(ckpt_path, weights_only)
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(self, model=None, dataloaders=None, datamodule=None, return_predictions: bool | None = None,
                ckpt_path: str | None = None, weights_only: bool | None = None):
        ckpt_path, weights_only = safe_restore_args(ckpt_path, weights_only)
        return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)


for _name in ("fit", "validate", "test", "predict"):  # Lightning's docstrings: the options' help texts
    getattr(Trainer, _name).__doc__ = getattr(L.Trainer, _name).__doc__


def _default_logger(default_root_dir):
    """Lightning's default logger (TensorBoard where installed, in ``<default_root_dir>/lightning_logs``), without
    the ``hp_metric = -1`` scalar it would add to every run; True (Lightning's own choice) without TensorBoard."""
    import importlib.util
    import os

    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.loggers import TensorBoardLogger

    if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        return True
    return TensorBoardLogger(save_dir=default_root_dir or os.getcwd(), version=SLURMEnvironment.job_id(),
                             default_hp_metric=False)
