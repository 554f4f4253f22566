"""Sequence classification (SST-2) on top of a pretrained decoder (docs/sst2.md).

The pretrained ``TransformerLM`` blocks are transferred (``lm.tasks.pretrained``); the decoder is built
without the LM softmax. The sentence is
read at the FINAL position of the left-padded input (``pooling: last``: the causal decoder's last
real token has seen the whole sentence) or averaged over the real tokens (``pooling: mean``), then
the paper's head ``Linear - Tanh - Dropout - Linear`` (with ``pre_head: log_softmax`` it reads
``log_softmax(Linear(d, d)(h))``, as the paper's code does). Adam, lr 1e-4.

Padding. The decoder is causal and has no padding mask of its own, so with left padding the real
tokens would see the pad tokens before them as context, and absolute positions would be shifted by
the amount of padding: the prediction would depend on what a sentence is batched with. Two ways out:

- the data module's ``batching: length`` puts only same-length sentences in a batch, so there is no
  padding at all and the decoder runs unchanged (its own ``forward``);
- with padding (``batching: pad``) and ``mask_padding: true``, the classifier passes the decoder a
  key mask (``TransformerLM.forward(key_mask=...)``): no query attends a pad key (a pad query attends
  only itself, so its row is never empty), and absolute positions count from the first real token.
  Relative positions are shift-invariant already. MoE layers do not route pad positions: pads take no
  expert capacity and stay out of the load-balancing loss. The result equals the unpadded computation
  for attention variants that honour ``AttnContext.mask`` (softmax, qknorm, QUEST, ...), with dense or
  dropless MoE FFNs; Elliptical's per-sequence estimate of m̂ (segment mean, median or causal prefix)
  is taken over the real tokens only (``AttnContext.key_mask``), so it is exact too.

MoE capacity. An MoE layer with a finite capacity factor keeps at most ``ceil(cf * n_tokens * k / E)``
tokens per expert, counted over the whole batch, so which tokens are dropped (and hence a sentence's
prediction) depends on the other sentences of its batch, with or without padding. The classifier logs
a warning at construction for such a checkpoint; ``dropless_moe: true`` removes the capacity limits
(training and evaluation) so that every prediction is a function of its sentence alone.

``mask_padding: false`` is a decoder that reads pads as ordinary context tokens (positions from the
first pad), which is what an unmasked implementation of the paper's protocol computes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lm.checkpoint import check_fits
from lm.errors import ConfigError, unknown
from lm.model.moe import MoEFFN
from lm.tasks.lightning_compat import attached_trainer
from lm.tasks.pretrained import build_decoder
from lm.tasks.records import run_record
from lm.tasks.sst2_head import build_pre_head
from lm.utils import atomic_write_text

log = logging.getLogger(__name__)
POOLING = ("last", "mean")
VOCAB_MODES = ("reuse", "fresh")


class SequenceClassifier(L.LightningModule):
    """A pretrained decoder + classification head.

    Args:
        pretrained: checkpoint written by ``lm fit`` (its vocabulary travels inside); None trains from
            scratch with the architecture in ``model`` (then ``vocab`` must be ``fresh``).
        vocab: ``reuse`` (the checkpoint's vocabulary: embeddings transfer) or ``fresh`` (a new
            lower-cased SST-2 vocabulary: the paper's code; blocks transfer, the embedding is new).
        load_weights: False keeps the pretrained architecture and vocabulary but starts from random
            weights (the from-scratch control of a pretrained run).
        vocab_size: from the data module (``data.vocab_size``); do not set by hand.
        model: architecture for ``pretrained: null`` (``ModelConfig`` fields, e.g. n_layer, d_model).
        pooling: ``last`` (final position of the left-padded input) or ``mean`` (over real tokens).
        pre_head: ``none`` (the head reads the decoder's hidden states) or ``log_softmax`` (the paper's code:
            ``log_softmax(Linear(d, d)(h))`` first; see ``lm.tasks.sst2_head``).
        mask_padding: make left padding invisible to the decoder (see the module docstring).
        dropless_moe: run the MoE layers without capacity limits (capacity_factor and
            eval_capacity_factor None), so no prediction depends on its batch (see the module docstring).
        moe_aux_loss: add the MoE layers' load-balancing loss to the training loss (the paper's finetuning
            scripts: ``--load_balance 0.00``, i.e. false).
        n_classes: number of labels.
        head_dropout: dropout between the head's Tanh and its output layer.
        dropout: override the decoder's dropout for finetuning (None: keep the pretrained value).
        lr: Adam learning rate (the paper: 1e-4).
        weight_decay: Adam weight decay.
        warmup_steps: linear learning-rate warm-up, then constant (the paper: none).
        freeze_embeddings: do not train the (transferred) input embedding.
        results_dir: where the dev-result JSON goes (default: the run directory).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        vocab: str = "reuse",
        load_weights: bool = True,
        vocab_size: int = 0,
        model: dict[str, Any] | None = None,
        pooling: str = "last",
        pre_head: str = "none",
        mask_padding: bool = True,
        dropless_moe: bool = False,
        moe_aux_loss: bool = True,
        n_classes: int = 2,
        head_dropout: float = 0.1,
        dropout: float | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        freeze_embeddings: bool = False,
        results_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if vocab not in VOCAB_MODES:
            raise unknown("model.vocab", vocab, VOCAB_MODES)
        if pooling not in POOLING:
            raise unknown("model.pooling", pooling, POOLING)
        if n_classes < 2:
            raise ConfigError(f"model.n_classes must be >= 2, got {n_classes}.")
        if lr <= 0:
            raise ConfigError(f"model.lr must be > 0, got {lr}.")
        for name, p in (("head_dropout", head_dropout), ("dropout", dropout)):
            if p is not None and not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {p}.")
        self.pretrained, self.vocab_mode, self.pooling, self.mask_padding = pretrained, vocab, pooling, mask_padding
        self.lr, self.weight_decay, self.warmup_steps, self.results_dir = lr, weight_decay, warmup_steps, results_dir
        self.moe_aux_loss = moe_aux_loss
        self.net, self.transfer = build_decoder(pretrained, vocab, load_weights, vocab_size, model, dropout,
                                                dropless_moe)
        if freeze_embeddings:
            self.net.embed.requires_grad_(False)
        self._warn_moe_capacity()
        d = self.net.cfg.d_model
        self.pre_head = build_pre_head(pre_head, d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Dropout(head_dropout), nn.Linear(d, n_classes))
        self.val_loss, self.val_acc = MeanMetric(), MulticlassAccuracy(n_classes, average="micro")
        self.val_n = SumMetric()  # sentences scored (fewer than the dev file holds with data.drop_last)
        self.history: list[dict[str, Any]] = []
        self._t0: float | None = None
        self.result_path: str | None = None
        self._ckpt_step: int | None = None  # global_step of a loaded checkpoint (validate records it)
        self._last_entry: dict[str, Any] | None = None  # the fit's latest dev result, rewritten at the fit's end

    # ----- building and transferring -----------------------------------------------------------------
    def _warn_moe_capacity(self) -> None:
        """Warn that finite MoE capacities make predictions batch-dependent (``dropless_moe`` removes them)."""
        limited = [(i, b.ffn) for i, b in enumerate(self.net.layers) if isinstance(b.ffn, MoEFFN)
                   and (b.ffn.capacity_factor is not None or b.ffn.eval_capacity_factor is not None)]
        if limited:
            i, m = limited[0]
            log.warning(
                "The decoder has %d MoE layer(s) with a finite capacity (layer %d: capacity_factor %s, "
                "eval_capacity_factor %s): each expert keeps at most ceil(cf * tokens in the batch * top_k / "
                "n_experts) tokens, so which tokens are dropped, and hence a sentence's prediction, depends on "
                "the other sentences of its batch. Set model.dropless_moe: true for batch-independent "
                "predictions.", len(limited), i, m.capacity_factor, m.eval_capacity_factor)

    # ----- forward ---------------------------------------------------------------------------------
    def hidden(self, tokens: Tensor, n_pad: Tensor | None = None) -> Tensor:
        """Final hidden states ``[B, T, d]`` of left-padded ``tokens``; see the module docstring."""
        key_mask = None
        if n_pad is not None and self.mask_padding:
            key_mask = torch.arange(tokens.size(1), device=tokens.device)[None, :] >= n_pad[:, None]
        return self.net(tokens, mem_len=0, key_mask=key_mask).hidden

    def forward(self, tokens: Tensor, n_pad: Tensor | None = None) -> Tensor:
        """Class logits ``[B, n_classes]``."""
        h = self.hidden(tokens, n_pad)
        if self.pre_head is not None:
            h = self.pre_head(h)
        if self.pooling == "last":
            pooled = h[:, -1]
        else:
            T = tokens.size(1)
            n_pad = torch.zeros(tokens.size(0), dtype=torch.long, device=tokens.device) if n_pad is None else n_pad
            real = (torch.arange(T, device=tokens.device)[None, :] >= n_pad[:, None]).to(h.dtype)
            pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)

    def _step(self, batch: dict) -> tuple[Tensor, Tensor]:
        logits = self(batch["input"], batch.get("n_pad"))
        return logits, F.cross_entropy(logits.float(), batch["label"])

    # ----- training / validation ---------------------------------------------------------------------
    def on_fit_start(self):
        self._t0 = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int):
        logits, loss = self._step(batch)
        aux = self.net.aux_loss() if self.moe_aux_loss else None
        total = loss if aux is None else loss + aux
        bs = batch["label"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/acc", (logits.argmax(-1) == batch["label"]).float().mean(), batch_size=bs)
        return total

    def on_validation_epoch_start(self):
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_n.reset()

    def validation_step(self, batch: dict, batch_idx: int):
        logits, loss = self._step(batch)
        n = batch["label"].size(0)
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(logits.argmax(-1), batch["label"])
        self.val_n.update(n)

    def on_validation_epoch_end(self):
        loss, acc = self.val_loss.compute(), self.val_acc.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/acc", acc, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        entry = {"epoch": int(self.current_epoch), "step": int(self.global_step), "dev_acc": float(acc),
                 "dev_loss": float(loss), "dev_scored": int(self.val_n.compute()),
                 "wall_s": round(time.perf_counter() - self._t0, 1) if self._t0 is not None else None}
        validate_only = self.trainer.state.fn == "validate"
        if not validate_only:
            self.history.append(entry)
            self._last_entry = entry
        self._write_result(entry, validate_only)

    def on_fit_end(self):
        # Only a fit that ran to its end gets here (a stop or a crash raises past it): its dev result is
        # rewritten with the checkpoint it selected and, if nothing limited or stopped it, complete: true.
        if self._last_entry is not None:
            self._write_result(self._last_entry, validate_only=False, finished=True)

    def _write_result(self, entry: dict, validate_only: bool, finished: bool = False) -> None:
        if not self.trainer.is_global_zero:
            return
        if validate_only:
            record = run_record(self.trainer, "val", self._ckpt_step)
        else:  # the step of these dev numbers; at the fit's end the checkpoint holding them and the selected one
            cb = self.trainer.checkpoint_callback
            record = run_record(self.trainer, "val", entry["step"],
                                checkpoint=(getattr(cb, "last_model_path", None) or None) if finished else None)
            record["best_checkpoint"] = (getattr(cb, "best_model_path", None) or None) if finished else None
            if not finished:
                record["complete"] = False
                record["incomplete"] = "; ".join(filter(None, [record.get("incomplete"), (
                    "the fit is still running, or was stopped: this file is rewritten with complete: true when the "
                    "fit ends")]))
        dm = self.trainer.datamodule
        data = dm.describe() if hasattr(dm, "describe") else {}
        best = min(self.history, key=lambda e: e["dev_loss"]) if self.history else None
        result = {
            "task": "sst2", "split": "dev", "stage": "validate" if validate_only else "fit", **entry,
            "unk_rate": data.get("unk_rate"), "vocab_mode": self.vocab_mode, "pretrained": self.pretrained,
            "load_weights": self.hparams.load_weights, "pooling": self.pooling, "mask_padding": self.mask_padding,
            "transfer": self.transfer,
            "hparams": {k: v for k, v in self.hparams.items() if not k.startswith("_")}, "data": data,
            "best_by_dev_loss": best, "history": self.history,
            **record,
        }
        out_dir = Path(self.results_dir or self.trainer.default_root_dir) / "results"
        path = out_dir / ("sst2-dev-validate.json" if validate_only else "sst2-dev.json")
        atomic_write_text(path, json.dumps(result, indent=2, default=str))
        self.result_path = str(path)
        log.info("SST-2 dev: acc %.4f, loss %.4f (epoch %d); unknown-word rate %s -> %s", entry["dev_acc"],
                 entry["dev_loss"], entry["epoch"], data.get("unk_rate"), path)

    # ----- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        # Lightning's mixed-precision plugin refuses gradient clipping with a fused optimizer (the fused step
        # unscales by itself), and bf16-mixed finetuning clips (configs/sst2): the plain kernel there.
        fused = "mixed" not in str(getattr(attached_trainer(self), "precision", ""))
        try:  # the fused kernel is ~8x faster on CPU (a 33k-word embedding dominates the update)
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        except (RuntimeError, TypeError):  # a device/dtype without a fused kernel
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return opt
        w = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / w))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- checkpoints -----------------------------------------------------------------------------
    def _data_vocab(self) -> dict[str, Any] | None:
        dm = getattr(attached_trainer(self), "datamodule", None)
        v = getattr(dm, "vocabulary", None) if dm is not None else None
        if v is None:
            return None
        return {"mode": self.vocab_mode, "unit": v.unit, "size": v.size, "sha256": v.sha256}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sst2_vocab"] = self._data_vocab()
        checkpoint["sst2_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint that does not fit, listing every mismatch (before Lightning's strict load)."""
        saved, mine = checkpoint.get("sst2_vocab"), self._data_vocab()
        vocab = []
        if saved and mine and saved.get("sha256") != mine["sha256"]:
            vocab = [f"vocabulary: the checkpoint was finetuned with a {saved.get('mode')} {saved.get('unit')} "
                     f"vocabulary of {saved.get('size')} entries (sha256 {str(saved.get('sha256'))[:12]}), the data "
                     f"now gives a {mine['mode']} {mine['unit']} vocabulary of {mine['size']} entries (sha256 "
                     f"{mine['sha256'][:12]})"]
        check_fits(
            checkpoint.get("state_dict", {}), self.state_dict(), "The checkpoint does not fit this classifier",
            "It was finetuned with another pretrained model, vocabulary mode or architecture; use the config.yaml "
            "saved in its run directory (lm finetune validate --config <run>/config.yaml --ckpt_path <ckpt>).",
            also=vocab)
        self.history = list(checkpoint.get("sst2_history") or [])
        self._ckpt_step = checkpoint.get("global_step")


__all__ = ["SequenceClassifier"]
