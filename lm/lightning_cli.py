"""The LightningCLI commands: ``lm fit | validate | test`` (``LMCLI``) and ``lm finetune fit | validate``
(``FinetuneCLI``): what is checked right after parsing (``CheckedCkptPathMixin``: ``--ckpt_path``, the run
directory's lock, ``precision: auto`` resolved), their pre-run checks and default callbacks.

Kept apart from ``lm.cli`` (the entry point) because importing Lightning takes seconds: ``lm --help``,
``lm corrupt`` and the other commands that need no Trainer never import this module.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lm import checkpoint
from lm.errors import CheckpointError, ConfigError
from lm.trainer import Trainer

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")


def parser_kwargs() -> dict:
    # Subcommand parsers take their own kwargs in LightningCLI: give each the omegaconf mode.
    # allow_abbrev=False: argparse would otherwise read a misspelt `--trainer.max_step 5` silently as
    # `--trainer.max_steps 5`; a typo must be an error that names the option.
    # prog: the usage lines read `lm fit ...` also when `lm.cli.main` runs inside another program (tests).
    kw = {"parser_mode": "omegaconf", "allow_abbrev": False}
    return {**kw, "prog": "lm", **{s: dict(kw) for s in LIGHTNING_SUBCOMMANDS}}


def check_ckpt_path(path: str | None, model_class: type | None = None) -> dict | None:
    """Fail early, with one paragraph, on a ``--ckpt_path`` that is a URL (never fetched: see
    ``checkpoint.local_path``), missing, unreadable (truncated, pickled objects, not a checkpoint) or written for
    another model class. Without this, Lightning's own load raises a raw OSError/RuntimeError/UnpicklingError deep
    inside ``LightningCLI`` (and would unpickle a URL's contents without weights_only)."""
    if path is None:
        return None
    ckpt = checkpoint.read(path, given_as="--ckpt_path", hint=f"Pass {checkpoint.LM_FIT_CKPT}, or `--ckpt_path "
                           f"last` to resume the run in --trainer.default_root_dir.")
    if model_class is not None:
        checkpoint.check_model_class(ckpt, path, model_class)
    return ckpt


class CheckedCkptPathMixin:
    """Checks ``--ckpt_path`` and the run directory right after parsing, before LightningCLI loads
    hyper-parameters from the checkpoint and before anything is written (``lm.rundir``): ``fit`` locks the run
    directory and refuses a used one without ``--ckpt_path``; ``validate``/``test`` score the run's
    ``last.ckpt`` when no checkpoint is given, or refuse."""

    def __init__(self, *args, **kwargs):
        self._run_lock, self._ckpt_vocab = None, None
        try:
            super().__init__(*args, **kwargs)
        finally:  # the whole run (LightningCLI runs inside its constructor) holds the lock
            if self._run_lock is not None:
                self._run_lock.release()

    def parse_arguments(self, parser, args) -> None:
        from lm.rundir import (RunLock, eval_checkpoint, other_rank, refuse_named_ckpt, refuse_used_run_dir,
                               warn_replaced_model_options)

        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub or self.config.get(sub) is None:
            return
        cfg = self.config[sub]
        path = cfg.get("ckpt_path")
        root = cfg.get("trainer.default_root_dir") or "."
        if sub == "fit":
            refuse_named_ckpt(sub, path, ("best", "hpc"))
            if path == "last":
                # The run's own last.ckpt (RunCheckpoint's folder) when it is there, else a fresh start, as
                # Lightning's `last`: resolved here so Lightning never has to search checkpoint folders.
                last = Path(root) / "checkpoints" / "last.ckpt"
                path = str(last) if last.is_file() else None
                cfg["ckpt_path"] = path
            ckpt = check_ckpt_path(path, self.model_class)
            self._remember_vocab(ckpt)
            if path is not None:  # a file:// URL as the local path it names (the only URL that is read)
                cfg["ckpt_path"] = path = str(checkpoint.local_path(path))
            self._resolve_precision(cfg, ckpt, path)
            if not other_rank():  # DDP's other ranks re-run this command: rank 0 holds the run's lock
                self._run_lock = RunLock(root)
                self._run_lock.acquire()
                if cfg.get("ckpt_path") is None:
                    refuse_used_run_dir(root)
            return
        refuse_named_ckpt(sub, path, ("hpc",))
        path = eval_checkpoint(sub, path, root)
        ckpt = check_ckpt_path(path, self.model_class)
        self._remember_vocab(ckpt)
        cfg["ckpt_path"] = path = str(checkpoint.local_path(path))
        warn_replaced_model_options(cfg.get("model"), (ckpt or {}).get("hyper_parameters") or {}, path)
        self._resolve_precision(cfg, ckpt, path)
        if cfg.get("trainer.logger") in (None, True):
            # An evaluation writes its result JSON; a TensorBoard version folder per `lm test` inside the run
            # (lightning_logs/version_N) held only that same number.
            cfg["trainer.logger"] = False

    def _resolve_precision(self, cfg, ckpt: dict | None, path: str | None) -> None:
        """``trainer.precision: auto`` (``lm.precision``) becomes what runs before anything is built, so the run's
        config.yaml and the results record it, never ``auto``: the checkpoint's own precision when one is scored,
        resumed or finetuned from (``model.pretrained``), else what fits this machine. One line says which."""
        from lm import precision as lm_precision
        from lm.rundir import other_rank

        asked = cfg.get("trainer.precision")
        if asked is None or lm_precision.canonical(asked) != lm_precision.AUTO:
            return
        if ckpt is None and path is None and cfg.get("model.pretrained"):  # lm finetune fit
            path = cfg.get("model.pretrained")
            try:
                ckpt = checkpoint.read(path, given_as="--model.pretrained")
            except CheckpointError:
                path = None  # reported by the classifier when it loads it, with the fix
        trained = lm_precision.trained_precision(ckpt, path) if ckpt is not None else None
        chosen, why = lm_precision.resolve(asked, cfg.get("trainer.accelerator"), trained)
        cfg["trainer.precision"] = chosen
        if not other_rank():
            print(f"lm: precision auto -> {chosen} ({why})", file=sys.stderr, flush=True)

    def _remember_vocab(self, ckpt: dict | None) -> None:
        self._ckpt_vocab = (ckpt or {}).get("lm_vocab")

    def _check_vocab(self) -> None:
        """The checkpoint's vocabulary against the data's, before the Trainer starts: the module's own check
        (on_load_checkpoint) comes after the run directory's tokenizer.json and logs were written."""
        dm, theirs = getattr(self, "datamodule", None), self._ckpt_vocab
        if not theirs or dm is None or not hasattr(dm, "vocab") or theirs.get("sha256") == dm.vocab.sha256:
            return
        raise CheckpointError(
            f"The checkpoint was trained with another vocabulary ({theirs.get('size')} entries, sha256 "
            f"{str(theirs.get('sha256'))[:12]}) than this data gives ({dm.vocab.size} entries, sha256 "
            f"{dm.vocab.sha256[:12]}): another data root or corpus. Use the run's own data (data.root in its "
            f"config.yaml), or reuse its vocabulary with --data.tokenizer <run dir>/tokenizer.json. Nothing was "
            f"written."
        )


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
    """``lm finetune fit|validate``: SST-2 classification from a pretrained checkpoint (docs/sst2.md).

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
