"""The LightningCLI commands: ``lm fit | validate | test`` (``LMCLI``) and ``lm finetune fit | validate``
(``FinetuneCLI``), with their pre-run checks and default callbacks.

Kept apart from ``lm.cli`` (the entry point) because importing Lightning takes seconds: ``lm --help``,
``lm corrupt`` and the other commands that need no Trainer never import this module.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lm.cli import LIGHTNING_SUBCOMMANDS, CheckedCkptPathMixin, parser_kwargs
from lm.errors import ConfigError
from lm.trainer import Trainer


class LMCLI(CheckedCkptPathMixin, LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `predict`: the language model has no predict_step to run.
        return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_SUBCOMMANDS}

    def _before(self, stage: str) -> None:
        from lm.rundir import check_window_memory

        self._check_vocab()
        if stage == "fit":
            self._check_val_interval()
            self._warn_short_warmup()
        per_device = max(1, self.datamodule.batch_size // max(1, self.trainer.world_size))
        check_window_memory(self.model, stage, self.trainer.strategy.root_device, per_device)

    def _warn_short_warmup(self) -> None:
        from lm.rundir import other_rank
        from lm.tasks.schedule import short_run_notice

        note = short_run_notice(self.model.optim_cfg, self.trainer.max_steps or 0)
        if note and not other_rank():
            print(note, file=sys.stderr, flush=True)

    def _check_val_interval(self) -> None:
        """Lightning refuses an integer val_check_interval beyond an epoch only at fit start, after the run
        folder got its tokenizer and logs: the same check, before anything is written."""
        t = self.trainer
        vci = t.val_check_interval
        if not isinstance(vci, int) or t.check_val_every_n_epoch is None or t.limit_val_batches == 0:
            return
        n = len(self.datamodule.train_dataloader())
        lim = t.limit_train_batches
        n = min(n, lim) if isinstance(lim, int) else int(n * lim)
        if vci > n:
            raise ConfigError(
                f"--trainer.val_check_interval {vci} is more than the {n} training batches of one epoch, and "
                f"--trainer.check_val_every_n_epoch {t.check_val_every_n_epoch} counts it within each epoch, so "
                f"validation would never run. Drop check_val_every_n_epoch (or set it to null: `lm` then counts "
                f"the interval in steps across epochs), or give a smaller interval or a fraction of an epoch (0.5).")

    def before_fit(self) -> None:
        self._before("fit")

    def before_validate(self) -> None:
        self._before("validate")

    def before_test(self) -> None:
        self._before("test")

    def add_arguments_to_parser(self, parser) -> None:
        # The data decides the vocabulary, the unit and the evaluation protocol; the model follows.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.unit", "model.unit", apply_on="instantiate")
        parser.link_arguments("data.tgt_len", "model.tgt_len")
        parser.link_arguments("data.eval", "model.eval")


def lm_cli(args=None, run: bool = True) -> LMCLI:
    from lm.data.datamodule import LMDataModule
    from lm.tasks.callbacks import RunCheckpoint, RunDirConfig, TokenThroughput
    from lm.tasks.lm_module import LanguageModel
    from lm.tasks.precision_check import PrecisionCheck
    from lm.tasks.progress import LineProgress

    return LMCLI(
        LanguageModel,
        LMDataModule,
        trainer_class=Trainer,
        trainer_defaults={
            "callbacks": [RunCheckpoint(), TokenThroughput(), PrecisionCheck(), LineProgress()],
            # Lightning's bar in a terminal; plain lines (LineProgress) in a log file.
            "enable_progress_bar": sys.stderr.isatty(),
            "use_distributed_sampler": False,  # ordered streams shard themselves per rank
        },
        seed_everything_default=1111,  # the paper's seed
        parser_kwargs=parser_kwargs(),
        save_config_callback=RunDirConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


class FinetuneCLI(CheckedCkptPathMixin, LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # fit and validate: the classifier's dev accuracy is its result; there is no SST-2 test split to score.
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        # The model chooses the vocabulary source; the data module builds it; its size goes back.
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments("model.vocab", "data.vocab")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def finetune_cli(argv: list[str] | None = None, run: bool = True) -> FinetuneCLI:
    """``lm finetune fit|validate``: SST-2 classification from a pretrained checkpoint (REFERENCE §7).

        lm finetune fit --config configs/sst2/finetune.yaml --model.pretrained runs/<lm run>/checkpoints/last.ckpt
        lm finetune validate --config runs/<sst2 run>/config.yaml --ckpt_path runs/<sst2 run>/checkpoints/last.ckpt

    The model decides where the vocabulary comes from (``model.pretrained`` and ``model.vocab`` are linked
    into the data module, which reads the checkpoint's vocabulary or counts a fresh one); the data then
    hands its vocabulary size back. Checkpoints go to ``<default_root_dir>/checkpoints``: the best by dev
    loss (the paper's selection) and ``last.ckpt``; the dev result JSON to ``<default_root_dir>/results``.
    """
    from lm.data.sst2 import SST2DataModule
    from lm.tasks.callbacks import RunCheckpoint, RunDirConfig
    from lm.tasks.classifier import SequenceClassifier
    from lm.tasks.precision_check import PrecisionCheck
    from lm.tasks.progress import LineProgress

    return FinetuneCLI(
        SequenceClassifier,
        SST2DataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        trainer_class=Trainer,  # integer limit_*_batches = batches
        trainer_defaults={
            # Best checkpoint by dev loss (the paper) plus last.ckpt, in <default_root_dir>/checkpoints.
            "callbacks": [RunCheckpoint(monitor="val/loss", mode="min", save_last=True, save_top_k=1), PrecisionCheck(),
                          LineProgress()],
            "enable_progress_bar": sys.stderr.isatty(),  # else LineProgress: plain lines in a log file
            "default_root_dir": "runs/sst2",
            "max_epochs": 5,
            "use_distributed_sampler": False,  # the data module's batch sampler shards itself
        },
        seed_everything_default=1111,
        save_config_callback=RunDirConfig,
        parser_kwargs={**{k: v for k, v in parser_kwargs().items() if k != "test"}, "prog": "lm finetune",
                       "description": "SST-2 sentiment classification from a pretrained `lm fit` checkpoint: `fit` "
                                      "trains it, `validate` scores a finetuned checkpoint on the GLUE dev set."},
        save_config_kwargs={"overwrite": True},
        args=argv,
        run=run,
    )
