"""Trained language models as starting points: loading an ``lm fit`` checkpoint (evaluation, analysis)
and building the SST-2 classifier's decoder from one (docs/sst2.md).

The classifier's decoder is built from a config, never patched after construction: the pretrained
``ModelConfig`` with the finetuning changes applied (no memory, the dropout override, dropless MoE, a
plain embedding for a fresh vocabulary), without the LM softmax (``TransformerLM(lm_head=False)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from lm import checkpoint
from lm.config import ModelConfig
from lm.data.tokenizer import Vocab
from lm.errors import CheckpointError, ConfigError
from lm.model.transformer import TransformerLM
from lm.tasks.lm_module import LanguageModel


def load_language_model(path: str, **overrides: Any) -> tuple[LanguageModel, Vocab, dict[str, Any]]:
    """The ``LanguageModel`` of an ``lm fit`` checkpoint (eval mode), its vocabulary and the raw checkpoint.

    ``overrides`` replace hyper-parameters that do not shape the weights (``eval``, ``results_dir``), so
    the model is built as it will be used instead of being patched afterwards.
    """
    ckpt = checkpoint.read(path)
    vocab = Vocab.from_state(checkpoint.vocab_state(ckpt, path))
    hp = dict(ckpt.get("hyper_parameters", {}))
    hp.pop("_instantiator", None)
    hp.pop("_class_path", None)
    model = LanguageModel(**{**hp, **overrides})
    model.on_load_checkpoint(ckpt)  # lists every tensor that does not fit, before the strict load
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, vocab, ckpt


def decoder_config(cfg: ModelConfig, fresh_vocab: bool, dropout: float | None, dropless_moe: bool) -> ModelConfig:
    """The pretrained architecture with the finetuning changes: no memory (one sentence at a time), a
    plain embedding for a fresh vocabulary (adaptive clusters belong to the pretraining vocabulary), the
    dropout override, and MoE layers without capacity limits when ``dropless_moe``."""
    # same_length only shapes which remembered keys a query sees: without memory it has nothing to do (and
    # ModelConfig refuses it), so a recipe pretrained with it (the MoE recipes) finetunes without it. The span
    # host keeps mem_len: it is its key_pe size (each sentence sees a zero cache).
    if cfg.pos != "span":
        cfg = dataclasses.replace(cfg, mem_len=0, same_length=False)
    if fresh_vocab:
        cfg = dataclasses.replace(cfg, adaptive=False, cutoffs=[], div_val=1, tie_weight=False)
    if dropout is not None:
        cfg = dataclasses.replace(cfg, dropout=dropout)
    if dropless_moe:
        cfg = dataclasses.replace(cfg, ffn=dataclasses.replace(cfg.ffn, capacity_factor=None,
                                                               eval_capacity_factor=None))
    return cfg


def build_decoder(pretrained: str | None, vocab: str, load_weights: bool, vocab_size: int,
                  model: dict[str, Any] | None, dropout: float | None = None,
                  dropless_moe: bool = False) -> tuple[TransformerLM, dict[str, Any]]:
    """The classifier's decoder and a record of what was transferred (see ``SequenceClassifier``)."""
    if pretrained is None:
        if vocab != "fresh":
            raise ConfigError("model.pretrained is null (training from scratch), so there is no pretraining "
                              "vocabulary to reuse: set model.vocab: fresh, or pass model.pretrained.")
        if vocab_size < 1:
            raise ConfigError("model.vocab_size is unset: it comes from the data module (run through "
                              "`lm finetune`, or pass vocab_size=data.vocab_size).")
        cfg = ModelConfig(**{"adaptive": False, "cutoffs": [], "mem_len": 0, **(model or {})})
        cfg = decoder_config(cfg, False, dropout, dropless_moe)
        return TransformerLM(cfg, vocab_size, lm_head=False), {"pretrained": None, "transferred": [],
                                                                "new": ["everything"]}
    if model:
        raise ConfigError("model.model (an architecture) is only used with model.pretrained: null; the "
                          "architecture of a pretrained run comes from its checkpoint. Remove one of the two.")
    lm, lm_vocab, _ = load_language_model(pretrained)
    src = lm.net
    if lm_vocab.size != src.vocab_size:
        raise CheckpointError(
            f"Checkpoint {pretrained}: its vocabulary (lm_vocab) has {lm_vocab.size} entries but its embedding "
            f"has {src.vocab_size} rows, so the stored vocabulary is not the one it was trained with. Use "
            f"model.vocab: fresh (a new SST-2 vocabulary; only the blocks transfer) or another checkpoint.")
    if vocab == "reuse":
        if vocab_size and vocab_size != lm_vocab.size:
            raise CheckpointError(
                f"model.vocab: reuse, but the data's vocabulary has {vocab_size} entries and checkpoint "
                f"{pretrained} has {lm_vocab.size}: the data module did not read this checkpoint's vocabulary. "
                f"Run through `lm finetune` (which links model.pretrained to the data), or use vocab: fresh.")
        vocab_size = lm_vocab.size
    elif vocab_size < 1:
        raise ConfigError("model.vocab_size is unset: with vocab: fresh it comes from the data module "
                          "(run through `lm finetune`, or pass vocab_size=data.vocab_size).")
    net = TransformerLM(decoder_config(src.cfg, vocab == "fresh", dropout, dropless_moe), vocab_size, lm_head=False)
    new = ["embed"] if vocab == "fresh" else []
    keys = [k for k in net.state_dict() if k.split(".")[0] not in new]
    transfer = {"pretrained": pretrained, "load_weights": load_weights, "lm_vocab_sha256": lm_vocab.sha256,
                "lm_vocab_size": lm_vocab.size, "unit": lm_vocab.unit,
                "new": new if load_weights else sorted({k.split(".")[0] for k in net.state_dict()}),
                "transferred": sorted({k.split(".")[0] for k in keys}) if load_weights else []}
    if load_weights:
        transfer_weights(src.state_dict(), net, keys, pretrained)
    return net, transfer


def transfer_weights(src: dict[str, Tensor], net: nn.Module, keys: list[str], where: str) -> None:
    """Copy ``keys`` from ``src`` into ``net``; any missing key or wrong shape is a CheckpointError listing all."""
    dst = net.state_dict()
    checkpoint.check_fits(
        src, dst, f"Checkpoint {where} does not fit the classifier's decoder",
        "The checkpoint's tensors disagree with its own hyper-parameters (a modified or truncated checkpoint?); "
        "use another checkpoint, e.g. last.ckpt of a finished `lm fit` run.", keys=keys)
    with torch.no_grad():
        for k in keys:
            dst[k].copy_(src[k])
