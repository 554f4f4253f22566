"""Evaluation batches for the three protocols of docs/methods.md.

Every batch is ``{"input": LongTensor[b, T], "target": LongTensor[b, T], "mask": BoolTensor[b, T],
"real": BoolTensor[b, T], "first": bool}``; ``target[i, t]`` is the token after ``input[i, t]`` and
only ``mask``-ed targets count. Over the union of all ranks every target index ``1..N-1`` of the token
stream is scored exactly once (index 0 has no context and is never a target). Padding (token 0,
``real`` False) only ever sits at the END of a row, so with causal attention no scored target sees
it; ``real`` is the decoder's key mask, which also keeps it out of per-sequence statistics
(Elliptical's m̂) and MoE routing. A step must therefore report SUMS (NLL sum, number of scored
targets), never per-batch means: a batch may score zero targets.

- ``segments``: the stream cut into non-overlapping segments of T; the last one shorter -> padded.
  No context across segments: ``first`` is True on every batch.
- ``memory``: XL evaluation. ``batch_size`` ordered streams; stream i scores targets
  ``[i*L+1, (i+1)*L]`` with ``L = ceil((N-1)/batch_size)``: unlike XL's ``batchify``, the tail is not
  dropped; the last stream(s) are shorter and padded (possibly empty). Streams are cut into segments of
  T in order (the last segment may be narrower than T); ``first`` is True only on the first batch.
- ``full_eval``: the MoE authors' ``trainer.full_eval`` (``data._batchify`` + the block loop). The stream
  is cut into ``batch_size`` columns of ``C = N // batch_size`` tokens (the last ``N mod batch_size``
  tokens dropped); column i is ``tokens[i*C : (i+1)*C]``. Blocks of T start at ``p = 0, T, 2T, ...``;
  block p is run and scored only if ``p == 0`` or ``p < C - T`` (their loop breaks once the next start
  reaches ``C - T``), so only whole blocks are scored and the tail of every column is not. Memory runs
  through the blocks (``first`` only on the first; the span host starts from a zero cache). Their
  reported loss is the mean of per-block mean losses; every block has the same ``batch_size * T``
  targets, so that equals the token mean the project computes. ``scored`` / ``targets`` say how much
  of the split was scored (about 90% of WikiText-103 test with 48 columns and T = 512).
- ``sliding``: window W = T, stride S. Window k reads ``tokens[kS : kS+W]``; the first window scores
  all its targets, later windows only their last S, so each scored target after the first window has
  at least W - S tokens of context. The last window is cut at the end of the stream and padded.

Sharding over ``world_size`` ranks. ``memory`` and ``full_eval``: the global ``batch_size`` streams are split into
contiguous blocks of rows (rank r gets rows ``[r*B//W, (r+1)*B//W)``), so the result does not depend on
W. ``segments``/``sliding``: global batch j goes to rank ``j % W`` (round robin); ranks with one batch
fewer get a final all-masked filler batch, so every rank runs the same number of steps (a DDP
collective inside the model cannot hang).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lm.config import EvalConfig, ModelConfig
from lm.errors import ConfigError, DataError

# Protocols that carry each layer's memory from one batch to the next.
MEMORY_PROTOCOLS = ("memory", "full_eval")


def check_protocol(e: EvalConfig, model: ModelConfig) -> None:
    """Refuse a protocol the model cannot run, in one paragraph."""
    if e.protocol in MEMORY_PROTOCOLS and model.pos not in ("relative", "span"):
        raise ConfigError(f"eval.protocol '{e.protocol}' carries memory across segments and needs a model with "
                          f"memory (model.pos: relative or span); use 'segments' or 'sliding' for "
                          f"absolute-position models.")
    if e.val_protocol == "rolling" and model.pos not in ("relative", "span"):
        raise ConfigError("eval.val_protocol: rolling carries memory from one validation block to the next and needs "
                          "a model with memory (model.pos: relative or span); remove it for absolute-position models.")
    if model.pos == "span" and e.mem_len is not None and e.mem_len != model.mem_len:
        raise ConfigError(f"model.pos: span attends to exactly model.mem_len={model.mem_len} previous tokens (its "
                          f"key_pe table has that many entries), so eval.mem_len={e.mem_len} cannot be used; leave "
                          f"eval.mem_len unset.")


def resolve(cfg: EvalConfig, train_tgt_len: int) -> tuple[int, int]:
    """(T, S): window/segment length and stride; EvalConfig's None falls back to training values."""
    T = cfg.tgt_len or train_tgt_len
    S = (cfg.stride or T) if cfg.protocol == "sliding" else T
    if T < 1:
        raise ConfigError(f"eval.tgt_len must be >= 1, got {T}.")
    if not 1 <= S <= T:
        raise ConfigError(f"eval.stride must be in [1, tgt_len={T}], got {S}.")
    return T, S


class EvalBatches:
    """Re-iterable evaluation batches of one rank (see the module docstring)."""

    def __init__(self, tokens, cfg: EvalConfig, train_tgt_len: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens if torch.is_tensor(tokens) else torch.as_tensor(np.asarray(tokens))
        self.tokens = self.tokens.reshape(-1)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.T, self.S = resolve(cfg, train_tgt_len)
        n = self.N = int(self.tokens.numel())
        if n < 2:
            raise DataError(f"An evaluation split needs at least 2 tokens to score anything, got {n}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}.")
        B, T, S = cfg.batch_size, self.T, self.S
        # Targets in the split and how many the protocol scores over all ranks: all but under full_eval.
        self.targets = self.scored = n - 1
        if cfg.protocol == "full_eval":
            self._init_full_eval(n, B, T, rank, world_size)
            return
        if cfg.protocol == "memory":
            if B < world_size:
                raise ConfigError(f"eval.batch_size={B} (streams) must be >= world_size={world_size} for "
                                  f"the memory protocol, so every rank owns at least one stream.")
            self.L = math.ceil((n - 1) / B)
            rows = np.arange(rank * B // world_size, (rank + 1) * B // world_size)
            self.row_start = rows * self.L
            self.row_targets = np.clip(n - 1 - rows * self.L, 0, self.L)
            self._len = math.ceil(self.L / T)
            return
        if cfg.protocol == "segments":
            starts = np.arange(0, n - 1, T)
            score_from = np.zeros_like(starts)
        else:  # sliding: windows until one reaches the last target index n-1
            k = 1 + max(0, math.ceil((n - 1 - T) / S))
            starts = np.arange(k) * S
            score_from = np.where(starts == 0, 0, T - S)
        self.starts, self.score_from = starts, score_from
        self.lengths = np.minimum(T, n - 1 - starts)  # targets available in each row
        n_global = math.ceil(len(starts) / B)
        self.global_batches = list(range(rank, n_global, world_size))
        self._len = math.ceil(n_global / world_size)  # same on every rank; the gap is a filler batch

    def _init_full_eval(self, n: int, B: int, T: int, rank: int, world_size: int) -> None:
        C = n // B
        if C <= T:
            raise DataError(f"eval.protocol full_eval cuts the {n} tokens into {B} columns of {C}, not longer than "
                            f"one block of {T}: nothing whole can be scored. Lower eval.batch_size or eval.tgt_len.")
        if B < world_size:
            raise ConfigError(f"eval.batch_size={B} (columns) must be >= world_size={world_size} for full_eval.")
        self.L = C
        # Blocks p = kT with k = 0 or kT < C - T: k = 0 .. ceil((C - T) / T) - 1 (C > T, so at least one).
        self._len = math.ceil((C - T) / T)
        rows = np.arange(rank * B // world_size, (rank + 1) * B // world_size)
        self.row_start = rows * C
        self.scored = B * T * self._len

    def __len__(self) -> int:
        return self._len

    def _rows(self, start: np.ndarray, length: np.ndarray, score_from: np.ndarray, width: int) -> dict:
        ar = torch.arange(width)
        start, length = torch.as_tensor(start).long(), torch.as_tensor(length).long()
        idx = start[:, None] + ar
        valid = ar < length[:, None]
        last = self.N - 1
        inp = torch.where(valid, self.tokens[idx.clamp(max=last)].long(), 0)
        tgt = torch.where(valid, self.tokens[(idx + 1).clamp(max=last)].long(), 0)
        mask = valid & (ar >= torch.as_tensor(score_from).long()[:, None])
        return {"input": inp, "target": tgt, "mask": mask, "real": valid}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        T, B = self.T, self.cfg.batch_size
        if self.cfg.protocol == "full_eval":
            full = np.full(len(self.row_start), T)
            for j in range(self._len):
                yield {**self._rows(self.row_start + j * T, full, np.zeros_like(full), T), "first": j == 0}
            return
        if self.cfg.protocol == "memory":
            for j in range(self._len):
                c = j * T
                width = min(T, self.L - c)
                length = np.clip(self.row_targets - c, 0, width)
                batch = self._rows(self.row_start + c, length, np.zeros_like(length), width)
                yield {**batch, "first": j == 0}
            return
        for j in self.global_batches:
            sl = slice(j * B, (j + 1) * B)
            yield {**self._rows(self.starts[sl], self.lengths[sl], self.score_from[sl], T), "first": True}
        for _ in range(self._len - len(self.global_batches)):
            filler = self._rows(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), T)
            yield {**filler, "first": True}


def eval_batches(tokens, cfg: EvalConfig, train_tgt_len: int, rank: int = 0, world_size: int = 1) -> EvalBatches:
    """Evaluation batches of ``tokens`` (1-D) under ``cfg``'s protocol for one rank."""
    return EvalBatches(tokens, cfg, train_tgt_len, rank, world_size)
