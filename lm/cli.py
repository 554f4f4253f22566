"""The ``lm`` command.

    lm fit | validate | test   LightningCLI over LanguageModel + LMDataModule (one YAML per recipe)
    lm corrupt                 word-swap / char-swap a test split (corruptions package)
    lm evaluate                clean vs corrupted evaluation of one or more checkpoints
    lm finetune                SST-2 sequence classification from a pretrained checkpoint
    lm analyze                 representation collapse, head redundancy, attention entropy/maps

Config flows one way: YAML (omegaconf interpolation) -> jsonargparse -> typed signatures/dataclasses.
Errors caused by user input (``LMError``) are printed as one paragraph, without a traceback.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from lm.errors import LMError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")


def parser_kwargs() -> dict:
    # Subcommand parsers take their own kwargs in LightningCLI: give each the omegaconf mode.
    return {"parser_mode": "omegaconf", **{s: {"parser_mode": "omegaconf"} for s in LIGHTNING_SUBCOMMANDS}}


class LMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data decides the vocabulary, the unit and the evaluation protocol; the model follows.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.unit", "model.unit", apply_on="instantiate")
        parser.link_arguments("data.tgt_len", "model.tgt_len")
        parser.link_arguments("data.eval", "model.eval")


def lm_cli(args=None, run: bool = True) -> LMCLI:
    from lm.data.datamodule import LMDataModule
    from lm.tasks.callbacks import RunCheckpoint, TokenThroughput
    from lm.tasks.lm_module import LanguageModel

    return LMCLI(
        LanguageModel,
        LMDataModule,
        trainer_defaults={
            "callbacks": [RunCheckpoint(), TokenThroughput(), LearningRateMonitor(logging_interval="step")],
            "use_distributed_sampler": False,  # ordered streams shard themselves per rank
        },
        seed_everything_default=1111,  # the paper's seed
        parser_kwargs=parser_kwargs(),
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
            from jsonargparse import CLI

            from corruptions.cli import corrupt

            CLI(corrupt, args=argv[1:], as_positional=False)
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
    except LMError as e:
        print(f"lm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
