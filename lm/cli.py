"""The ``lm`` command.

    lm fit | validate | test   LightningCLI over LanguageModel + LMDataModule (one YAML per recipe)
    lm corrupt                 word-swap / char-swap a test split (corruptions package)
    lm evaluate                clean vs corrupted evaluation of one or more checkpoints
    lm finetune                SST-2 sequence classification from a pretrained checkpoint
    lm analyze                 representation collapse, head redundancy, attention entropy/maps

Config flows one way: YAML (omegaconf interpolation) -> jsonargparse -> typed signatures/dataclasses.
Errors caused by user input are printed as one paragraph, without a traceback, exit code 2: an
``LMError`` (also when jsonargparse or Lightning wrapped it in another exception), Lightning's own
``MisconfigurationException``, and a ``--ckpt_path`` that is missing, unreadable or of another model
class (checked before LightningCLI reads it). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import inspect
import pickle
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lm.errors import CheckpointError, LMError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
# `--ckpt_path` values Lightning resolves itself (not file names).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def parser_kwargs() -> dict:
    # Subcommand parsers take their own kwargs in LightningCLI: give each the omegaconf mode.
    # allow_abbrev=False: argparse would otherwise read a misspelt `--trainer.max_step 5` silently as
    # `--trainer.max_steps 5`; a typo must be an error that names the option.
    kw = {"parser_mode": "omegaconf", "allow_abbrev": False}
    return {**kw, **{s: dict(kw) for s in LIGHTNING_SUBCOMMANDS}}


def check_ckpt_path(path: str | None, model_class: type | None = None) -> None:
    """Fail early, with one paragraph, on a ``--ckpt_path`` that is missing, unreadable (truncated, not a
    checkpoint) or written for another model class. Without this, Lightning's own ``torch.load`` of the
    file raises a raw OSError/RuntimeError/UnpicklingError deep inside ``LightningCLI``."""
    if path is None or str(path) in SPECIAL_CKPT_PATHS or str(path).startswith("registry") or "://" in str(path):
        return
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"--ckpt_path {path}: no such file. Pass a .ckpt written by `lm fit` (e.g. runs/<name>/checkpoints/"
            f"last.ckpt), or `--ckpt_path last` to resume the run in --trainer.default_root_dir."
        )
    try:
        try:  # mmap: only the pickled structure is read, not the tensor data
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):  # a legacy (non-zip) file cannot be mmapped
                raise
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            # (LightningCLI itself reads the file's hyper-parameters with weights_only=True, whatever
            # --weights_only says, so there is no switch to offer.)
            raise CheckpointError(
                f"Checkpoint {path} holds pickled Python objects, not only tensors and plain containers, so it "
                f"cannot be loaded safely (torch.load weights_only). `lm` reads the checkpoints written by `lm fit` "
                f"and `lm finetune fit`; re-save this one as a plain state (tensors, numbers, strings, dicts)."
            ) from None
        raise CheckpointError(
            f"Cannot read checkpoint {path} ({type(e).__name__}: {gist}). The file is truncated (an interrupted "
            f"copy or download) or not a checkpoint; use another one, e.g. last.ckpt or the best-by-validation "
            f"file in the same checkpoints folder."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds no state_dict). Pass a .ckpt written "
                              f"by `lm fit` or `lm finetune fit`.")
    hparams = ckpt.get("hyper_parameters") or {}
    if model_class is not None and hparams:
        params = inspect.signature(model_class.__init__).parameters
        takes_any = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
        foreign = [] if takes_any else sorted(k for k in hparams if not str(k).startswith("_") and k not in params)
        if foreign:
            raise CheckpointError(
                f"{path} was written by another kind of model than {model_class.__name__} (its hyper-parameters "
                f"{', '.join(foreign[:4])} are not {model_class.__name__}'s). A language-model checkpoint (from "
                f"`lm fit`) goes to `lm fit/validate/test --ckpt_path` or `lm finetune fit --model.pretrained`; an "
                f"SST-2 classifier checkpoint (from `lm finetune fit`) goes to `lm finetune validate --ckpt_path`."
            )


class CheckedCkptPathMixin:
    """Checks ``--ckpt_path`` right after parsing, before LightningCLI loads hyper-parameters from it."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub or self.config.get(sub) is None:
            return
        cfg = self.config[sub]
        path = cfg.get("ckpt_path")
        if path == "last":  # the run's own last.ckpt (RunCheckpoint's folder), when it is there
            root = cfg.get("trainer.default_root_dir") or "."
            last = Path(root) / "checkpoints" / "last.ckpt"
            path = str(last) if last.is_file() else None
        check_ckpt_path(path, self.model_class)


def user_error(exc: BaseException) -> Exception | None:
    """The user-input error behind ``exc``: an ``LMError`` anywhere in its cause/context chain (jsonargparse
    wraps a dataclass's ConfigError in a ValueError about Union subtypes), or Lightning's own
    ``MisconfigurationException``; None for anything else (a bug: keep the traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, LMError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return exc if isinstance(exc, MisconfigurationException) else None


class LMCLI(CheckedCkptPathMixin, LightningCLI):
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

    return LMCLI(
        LanguageModel,
        LMDataModule,
        trainer_defaults={
            "callbacks": [RunCheckpoint(), TokenThroughput()],
            "use_distributed_sampler": False,  # ordered streams shard themselves per rank
        },
        seed_everything_default=1111,  # the paper's seed
        parser_kwargs=parser_kwargs(),
        save_config_callback=RunDirConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else None
    try:
        if cmd == "corrupt":
            from corruptions.cli import corrupt_cli

            corrupt_cli(argv[1:])  # the source positionally (as in the README) or with --src
        elif cmd == "evaluate":
            from lm.eval.evaluate import evaluate_cli

            evaluate_cli(argv[1:])
        elif cmd == "finetune":
            from lm.tasks.finetune_cli import finetune_cli

            finetune_cli(argv[1:])
        elif cmd == "analyze":
            from lm.analysis.cli import analyze_cli

            analyze_cli(argv[1:])
        else:
            lm_cli(None if from_console else argv)
    except Exception as exc:
        e = user_error(exc)
        if e is None:
            raise
        print(f"lm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
