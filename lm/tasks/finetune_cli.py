"""``lm finetune``: SST-2 classification from a pretrained checkpoint (REFERENCE §7).

    lm finetune fit --config configs/sst2/finetune.yaml --model.pretrained runs/<lm run>/checkpoints/last.ckpt
    lm finetune validate --config runs/<sst2 run>/config.yaml --ckpt_path runs/<sst2 run>/checkpoints/last.ckpt

A LightningCLI over ``SequenceClassifier`` + ``SST2DataModule``. The model decides where the
vocabulary comes from (``model.pretrained`` and ``model.vocab`` are linked into the data module,
which reads the checkpoint's vocabulary or counts a fresh one); the data then hands its vocabulary
size back to the model. Checkpoints go to ``<default_root_dir>/checkpoints``: the best by dev loss
(the paper's selection) and ``last.ckpt``; the dev result JSON to ``<default_root_dir>/results``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lm.cli import CheckedCkptPathMixin  # --ckpt_path checked before LightningCLI loads it
from lm.tasks.callbacks import RunDirConfig

SUBCOMMANDS = ("fit", "validate")


def _parser_kwargs() -> dict:
    from lm.cli import parser_kwargs

    kw = parser_kwargs()
    return {k: v for k, v in kw.items() if k not in ("test",)}


class FinetuneCLI(CheckedCkptPathMixin, LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model chooses the vocabulary source; the data module builds it; its size goes back.
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments("model.vocab", "data.vocab")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def finetune_cli(argv: list[str] | None = None, run: bool = True) -> FinetuneCLI:
    from lm.data.sst2 import SST2DataModule
    from lm.tasks.callbacks import RunCheckpoint
    from lm.tasks.classifier import SequenceClassifier

    return FinetuneCLI(
        SequenceClassifier,
        SST2DataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        trainer_defaults={
            # Best checkpoint by dev loss (the paper) plus last.ckpt, in <default_root_dir>/checkpoints.
            "callbacks": [RunCheckpoint(monitor="val/loss", mode="min", save_last=True, save_top_k=1)],
            "default_root_dir": "runs/sst2",
            "max_epochs": 5,
            "use_distributed_sampler": False,  # the data module's batch sampler shards itself
        },
        seed_everything_default=1111,
        save_config_callback=RunDirConfig,
        parser_kwargs=_parser_kwargs(),
        save_config_kwargs={"overwrite": True},
        args=argv,
        run=run,
    )


__all__ = ["FinetuneCLI", "finetune_cli"]
