"""The language-modelling LightningModule: training with segment memory, evaluation under a
recorded protocol, and a JSON result file for every test run."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from lm.checkpoint import check_fits, non_finite
from lm.config import AttentionConfig, EvalConfig, FFNConfig, ModelConfig, OptimConfig, coerce
from lm.data.protocols import MEMORY_PROTOCOLS, check_protocol
from lm.data.rolling import rolling_active
from lm.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from lm.model.transformer import TransformerLM
from lm.tasks.lightning_compat import attached_trainer, logger_writes_now
from lm.tasks.records import run_record
from lm.tasks.schedule import lr_factor
from lm.utils import atomic_write_text


# A resume restores the checkpoint's hyper-parameters, optimizer, schedule, data position and RNG, so it
# replays the same step unless a trainer setting changed; optimiser settings need a new run.
_NONFINITE_FIX = ("Set or lower --trainer.gradient_clip_val (or train in bf16/fp32 instead of fp16) and resume with "
                  "--ckpt_path last, or lower model.optim.lr / raise model.optim.warmup_steps in a new run (a resume "
                  "keeps the checkpoint's optimizer and schedule); also check the data around this step.")


class LanguageModel(L.LightningModule):
    """A Transformer-XL-style decoder (see ``ModelConfig`` for every architecture field).

    Args:
        vocab_size: set from the data module (``data.vocab_size``); do not set by hand.
        unit: ``word`` (report perplexity) or ``byte`` (report bits per character); from the data.
        tgt_len: training segment length, from the data; the default evaluation window.
        optim: optimiser and learning-rate schedule.
        eval: evaluation protocol, linked from ``data.eval``.
        results_dir: where ``lm test``/``lm validate`` write their JSON (default: the run directory).
        (every other argument is a ``ModelConfig`` field.)
    """

    def __init__(
        self,
        vocab_size: int = 0,
        unit: str = "word",
        tgt_len: int = 128,
        n_layer: int = 16,
        d_model: int = 128,
        n_head: int = 8,
        d_head: int = 16,
        d_inner: int = 2048,
        dropout: float = 0.1,
        dropatt: float = 0.0,
        pos: str = "absolute",
        mem_len: int = 0,
        clamp_len: int = -1,
        same_length: bool = False,
        norm: str = "post",
        adaptive: bool = True,
        cutoffs: list[int] | None = None,
        div_val: int = 1,
        d_embed: int | None = None,
        tie_weight: bool = True,
        init_std: float = 0.02,
        ln_init: str = "ones",
        abs_pos_order: str = "up",
        dropout_placement: str = "xl",
        weight_init: str = "normal",
        embed_scale: bool = True,
        attention: AttentionConfig | None = None,
        ffn: FFNConfig | None = None,
        optim: OptimConfig | None = None,
        eval: EvalConfig | None = None,
        results_dir: str | None = None,
        compile: bool = False,
    ):
        """``compile``: ``torch.compile`` every decoder block in place (parameter names, hence checkpoints,
        unchanged). The embedding and adaptive softmax stay eager: their data-dependent cluster
        gathers would only break the graph. Costs compilation time at the first steps (a C++ compiler is
        needed on CPU); see scripts/bench.py --compile for what it buys."""
        super().__init__()
        args = dict(locals())
        self.save_hyperparameters(_plain({k: v for k, v in args.items() if k not in ("self", "__class__")}))
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        arch = {k: v for k, v in args.items() if k in fields and v is not None}
        arch["attention"] = coerce(AttentionConfig, attention or AttentionConfig())
        arch["ffn"] = coerce(FFNConfig, ffn or FFNConfig())
        self.cfg = ModelConfig(**arch)
        if vocab_size < 1:
            raise ConfigError("model.vocab_size is unset: it comes from the data module (run through `lm`, "
                              "or pass vocab_size=data.vocab_size).")
        if unit not in ("word", "byte"):
            raise ConfigError(f"unit must be 'word' or 'byte', got '{unit}'.")
        self.unit, self.tgt_len, self.results_dir = unit, tgt_len, results_dir
        self.optim_cfg = coerce(OptimConfig, optim or OptimConfig())
        self.eval_cfg = coerce(EvalConfig, eval or EvalConfig())
        self.net = TransformerLM(self.cfg, vocab_size)
        if compile:
            for blk in self.net.layers:
                blk.compile()
        self.mems: list[torch.Tensor] | None = None  # training memory, per rank
        self._eval_mems: list[torch.Tensor] | None = None
        self._val_mems: list[torch.Tensor] | None = None  # rolling validation: memory carried between validations
        self.eval_nll = MeanMetric()
        self._eval_t0 = 0.0
        self._ckpt_step: int | None = None  # global_step of the checkpoint loaded into this module (records)

    # ----- training --------------------------------------------------------------------------------
    def forward(self, tokens, mems=None, **kw):
        return self.net(tokens, mems, **kw)

    def training_step(self, batch: dict, batch_idx: int):
        if batch.get("first", False):
            self.mems = None
        out = self.net(batch["input"], self.mems)
        self.mems = out.mems
        nll = self.net.nll(out.hidden, batch["target"])
        loss = nll.mean()
        total = loss if out.aux_loss is None else loss + out.aux_loss
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"The training loss became {total.item()} at step {self.global_step}. Training stopped; the last "
                f"good checkpoint is {self._last_checkpoint()} and was not touched. {_NONFINITE_FIX}"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log(f"train/{'ppl' if self.unit == 'word' else 'bpc'}", self._metric(loss.detach()))
        # The learning rate, logged here rather than by LearningRateMonitor, which fails without a logger.
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0)
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss)
            self._log_moe_stats()
        return total

    def on_before_optimizer_step(self, optimizer):
        # A finite loss can still have non-finite gradients (an overflow in backward): one such update puts
        # NaN into the weights and into the next checkpoint. Stop before it is applied. (fp16 with a
        # GradScaler skips those steps by design: leave them to the scaler.)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        # A per-tensor sum is non-finite iff the tensor holds an inf/NaN (short of ~1e38 magnitudes) and,
        # unlike abs().amax(), needs no full-size temporary: ~10x cheaper (50 ms/step on the tiny CPU model).
        if grads and not torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads])).all():
            bad = next(n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all())
            raise NonFiniteLossError(
                f"The gradients became non-finite at step {self.global_step} (first in {bad}) although the loss was "
                f"finite. Training stopped before the update; the last good checkpoint is {self._last_checkpoint()} "
                f"and was not touched. {_NONFINITE_FIX}"
            )

    def _last_checkpoint(self) -> str:
        paths = [getattr(c, "last_model_path", "") for c in self.trainer.checkpoint_callbacks]
        return next((p for p in paths if p), "(none saved yet)")

    def _log_moe_stats(self):
        loads = {}
        for i, blk in enumerate(self.net.layers):
            stats = getattr(blk.ffn, "stats", None)
            if not stats:
                continue
            self.log(f"moe/layer{i}/dropped_fraction", stats["dropped_fraction"])
            self.log(f"moe/layer{i}/balance_loss", stats["balance_loss"])
            self.log(f"moe/layer{i}/z_loss", stats["z_loss"])
            load = stats["expert_load"]
            self.log(f"moe/layer{i}/load_max_over_mean", load.max() / load.mean().clamp_min(1e-9))
            loads[i] = load
        # Each expert's share of the layer's top-k assignments (f_e, before capacity; sums to 1 per layer).
        # E x layers self.log calls cost real time, and the logger only writes on its interval: log them
        # only on steps the logger writes, from one device-to-host copy (the logger's .item() calls on these
        # steps would sync anyway), so other steps pay nothing.
        if loads and (logger_writes_now(self.trainer) or self.trainer.fast_dev_run):
            host = torch.cat([f.float() for f in loads.values()]).cpu().split([f.numel() for f in loads.values()])
            for i, row in zip(loads, host):
                for j, share in enumerate(row):
                    self.log(f"moe/layer{i}/expert{j}_load", share)

    def _metric(self, mean_nll: torch.Tensor) -> torch.Tensor:
        return torch.exp(mean_nll) if self.unit == "word" else mean_nll / math.log(2)

    def on_train_epoch_start(self):
        self.mems = None

    # ----- evaluation ------------------------------------------------------------------------------
    def _check_protocol(self):
        check_protocol(self.eval_cfg, self.cfg)

    def _rolling(self) -> bool:
        """This is a rolling validation of a fit (data.eval.val_protocol: rolling, lm/data/rolling.py)."""
        trainer = attached_trainer(self)
        return trainer is not None and not trainer.testing and rolling_active(trainer, self.eval_cfg)

    def _eval_start(self):
        self._check_protocol()
        # A rolling validation goes on with the memory the previous one ended with (the authors' hid_cache[1]).
        self._eval_mems = self._val_mems if self._rolling() else None
        self.eval_nll.reset()
        self._eval_t0 = time.perf_counter()

    def _eval_step(self, batch: dict):
        e = self.eval_cfg
        rolling = self._rolling()
        memory = e.protocol in MEMORY_PROTOCOLS or rolling
        if batch.get("first", False) or not memory:
            self._eval_mems = None
        mem_len = (e.mem_len if e.mem_len is not None else self.cfg.mem_len) if memory else 0
        clamp_len = e.clamp_len if e.clamp_len is not None else self.cfg.clamp_len
        # key_mask: the padding at the end of the last segment/window stays out of per-sequence statistics
        # (Elliptical's m̂) and MoE routing, as if the row ended there.
        out = self.net(batch["input"], self._eval_mems, mem_len=mem_len, clamp_len=clamp_len,
                       key_mask=batch.get("real"))
        self._eval_mems = out.mems
        if rolling and not self.trainer.sanity_checking:  # the sanity check is a dry run (lm/data/rolling.py)
            self._val_mems = out.mems
        mask = batch.get("mask")
        if mask is not None and not bool(mask.all()):
            # Score only the counted targets: a stride-S sliding window counts S of its T positions, so
            # running the softmax over all T would cost T/S times more than needed.
            nll = self.net.nll(out.hidden[mask], batch["target"][mask])
        else:
            nll = self.net.nll(out.hidden, batch["target"])
        n = torch.tensor(nll.numel(), device=nll.device)
        if n > 0:
            self.eval_nll.update(nll.sum() / n, weight=n)

    def _eval_end(self, stage: str):
        mean_nll = self.eval_nll.compute()
        weight = self.eval_nll.weight.detach().clone()
        if self.trainer.world_size > 1:  # compute() synced the mean, but .weight is this rank's count
            weight = self.trainer.strategy.reduce(weight, reduce_op="sum")
        tokens = int(weight.item())
        wall = time.perf_counter() - self._eval_t0
        name = "ppl" if self.unit == "word" else "bpc"
        value = self._metric(mean_nll)
        self.log(f"{stage}/loss", mean_nll, sync_dist=False)
        self.log(f"{stage}/{name}", value, prog_bar=True, sync_dist=False)
        targets = self._split_targets(stage)
        self.last_result = {
            "stage": stage, "unit": self.unit, "metric": name, name: float(value), "nll": float(mean_nll),
            "tokens_scored": tokens, "targets_in_split": targets,
            "scored_fraction": round(tokens / targets, 6) if targets else None, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
            "protocol": self.protocol_description(),
            # checkpoint, step, precision, batches scored, complete (false for a limited or stopped run)
            **run_record(self.trainer, "test" if stage == "test" else "val",
                         self.global_step if self.trainer.state.fn == "fit" else self._ckpt_step),
        }
        if stage == "test" or (stage == "val" and self.trainer.state.fn == "validate"):
            if self.eval_cfg.protocol == "full_eval" and targets and self.trainer.is_global_zero:
                # Not every target is scored under full_eval: say how many, beside the number.
                print(f"full_eval scored {tokens} of the {targets} targets of the split "
                      f"({100 * tokens / targets:.2f}%); the exact protocols score all of them.", flush=True)
            self._write_result(stage)

    def _split_targets(self, stage: str) -> int | None:
        """Targets in the evaluated split (tokens - 1), when a data module with the split is attached."""
        dm = getattr(self.trainer, "datamodule", None)
        try:
            return int(dm.tokens(stage).numel()) - 1 if dm is not None and hasattr(dm, "tokens") else None
        except (DataError, ConfigError, OSError):  # provenance only: a split it cannot read records None
            return None

    def protocol_description(self) -> dict[str, Any]:
        e = self.eval_cfg
        window = e.tgt_len or self.tgt_len
        rolling = self._rolling()
        return {
            "protocol": "rolling" if rolling else e.protocol, "window": window,
            "stride": (e.stride or window) if e.protocol == "sliding" and not rolling else window,
            "mem_len": (e.mem_len if e.mem_len is not None else self.cfg.mem_len)
            if e.protocol in MEMORY_PROTOCOLS or rolling else 0,
            "clamp_len": e.clamp_len if e.clamp_len is not None else self.cfg.clamp_len,
            "batch_size": e.batch_size, "normalised_by": "token" if self.unit == "word" else "byte",
            **({"val_blocks": e.val_blocks} if rolling else {}),
        }

    def _write_result(self, stage: str):
        if not math.isfinite(self.last_result["nll"]):
            # A NaN in the JSON would replace a real result and poison every table built from it.
            bad = non_finite(self.named_parameters())
            why = (f"the checkpoint's weights are non-finite ({len(bad)} tensors, e.g. {bad[0]}): it was saved after "
                   f"training diverged; score an earlier checkpoint") if bad else (
                   "the weights are finite, so the evaluation overflowed: evaluate in 32-true precision")
            raise NonFiniteLossError(
                f"The {stage} loss of {getattr(self.trainer, 'ckpt_path', None) or 'this model'} is "
                f"{self.last_result['nll']}: {why}. No result was written.")
        if not self.trainer.is_global_zero:
            return
        dm = self.trainer.datamodule
        result = dict(self.last_result)
        result["data"] = getattr(dm, "describe", lambda s: {})(stage)
        out_dir = Path(self.results_dir or self.trainer.default_root_dir) / "results"
        fname = f"{stage}-{self.eval_cfg.protocol}.json"
        if result["data"].get("file_tag"):
            fname = f"{stage}-{result['data']['file_tag']}-{self.eval_cfg.protocol}.json"
        atomic_write_text(out_dir / fname, json.dumps(result, indent=2))
        self.result_path = str(out_dir / fname)

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    # ----- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        opt = torch.optim.Adam(self.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                               weight_decay=o.weight_decay, fused=self._fused_adam())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, o=o, total=total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_adam(self) -> bool | None:
        """Adam's fused kernel: one pass over each parameter instead of ~10 element-wise ops (~8x faster
        on CPU, where it was ~5% of a tiny fp32 step; docs/performance.md). Same update to float32
        rounding (tests/test_step_speed_equiv.py), not bit for bit. Not under Lightning's mixed precision
        (bf16-mixed, 16-mixed: the plugins with a ``scaler``): they refuse gradient clipping with an optimizer
        that could unscale internally, as fused ones can."""
        if hasattr(self.trainer.precision_plugin, "scaler"):
            return None
        ok = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.float16,
                                                                   torch.bfloat16) for p in self.parameters())
        return True if ok else None

    # ----- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Memories are part of the training state: resuming mid-epoch must continue with them.
        checkpoint["lm_mems"] = [m.detach().cpu() for m in self.mems] if self.mems else None
        checkpoint["lm_val_mems"] = [m.detach().cpu() for m in self._val_mems] if self._val_mems else None
        # So is the RNG (dropout, MoE jitter): Lightning does not save it, so a resumed run would draw other
        # dropout masks than an uninterrupted one. Tensors only: the file stays loadable with weights_only.
        checkpoint["lm_rng"] = {"torch": torch.get_rng_state(),  # + this process's GPU, the one it trains on
                                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}
        # The vocabulary travels inside the checkpoint, so evaluation/finetuning need nothing else.
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "vocab"):
            checkpoint["lm_vocab"] = dm.vocab.state()
            checkpoint["lm_data"] = {"corpus": dm.hparams.get("corpus"), "unit": dm.unit,
                                     "tgt_len": dm.hparams.get("tgt_len"), "batch_size": dm.hparams.get("batch_size")}

    def _datamodule(self):
        return getattr(attached_trainer(self), "datamodule", None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ckpt_step = checkpoint.get("global_step")
        dm, vocab = self._datamodule(), checkpoint.get("lm_vocab")
        if dm is not None and vocab is not None and hasattr(dm, "vocab") and vocab.get("sha256") != dm.vocab.sha256:
            raise CheckpointError(
                f"The checkpoint was trained with another vocabulary ({vocab.get('size')} entries, sha256 "
                f"{str(vocab.get('sha256'))[:12]}) than the data module builds ({dm.vocab.size} entries, sha256 "
                f"{dm.vocab.sha256[:12]}). Evaluate it on its own corpus, or reuse its vocabulary with "
                f"--data.tokenizer <run dir>/tokenizer.json."
            )
        mems = checkpoint.get("lm_mems")
        self.mems = [m.to(self.device) for m in mems] if mems else None
        rng, trainer = checkpoint.get("lm_rng"), attached_trainer(self)
        val_mems = checkpoint.get("lm_val_mems")  # a rolling validation's carried memory (resuming a fit)
        if val_mems and trainer is not None and getattr(trainer.state.fn, "value", None) == "fit":
            self._val_mems = [m.to(self.device) for m in val_mems]
        if rng and trainer is not None and getattr(trainer.state.fn, "value", None) == "fit":  # resuming training
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        check_fits(checkpoint.get("state_dict", {}), self.state_dict(), "The checkpoint does not fit this model",
                   "It was trained with another architecture or vocabulary; use the config saved beside it "
                   "(config.yaml in its run directory).")


def _plain(value: Any) -> Any:
    """Hyper-parameters as plain data (dicts, lists, numbers), never pickled objects."""
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
