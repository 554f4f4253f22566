"""Transformer-XL ordered training streams, sharded across data-parallel ranks and resumable.

The token stream is cut into ``batch_size`` (GLOBAL) contiguous streams, dropping the ``N mod B``
tail as XL's ``batchify`` does; stream i holds tokens ``[i*L, (i+1)*L)`` with ``L = N // B``. Batch k
is the k-th ``tgt_len`` segment of every stream, target = input shifted by one, so memory carried
from batch k to k+1 continues the same text. Rank r of W owns streams ``[r*B/W, (r+1)*B/W)``: all
ranks together see every stream exactly once per epoch, in the same order as one process would.

The last partial segment of an epoch is DROPPED (XL includes it shorter): shapes stay fixed, which
keeps compiled graphs and memory tensors static; it loses at most ``tgt_len - 1`` targets per stream.

Resuming (Lightning 2.6): the fit loop stores ``state_dict()`` of every train loader that has
``state_dict``/``load_state_dict`` in the checkpoint (``FitLoop.on_save_checkpoint`` ->
``CombinedLoader._state_dicts``) and calls ``load_state_dict`` on the new loader before it calls
``iter()`` (``FitLoop.setup_data``). Because this class has ``__len__``, Lightning's
``_PrefetchDataFetcher`` does NOT prefetch, so at checkpoint time the batches handed out equal the
batches trained on, and ``position`` is exactly the next unseen batch. ``__len__`` must stay the full
epoch length: on resume Lightning adds the batches already seen to its fetch count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lm.errors import ConfigError, DataError


class OrderedStreams:
    """Iterable of ``{"input": LongTensor[b, T], "target": LongTensor[b, T], "first": bool}`` with
    ``b = batch_size // world_size``; ``first`` is True on the first segment of every epoch (the model
    resets its memory there)."""

    def __init__(self, tokens, batch_size: int, tgt_len: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or tgt_len < 1:
            raise ConfigError(f"batch_size ({batch_size}) and tgt_len ({tgt_len}) must be >= 1.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}.")
        if batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={batch_size} (the global number of streams) must be divisible by the "
                f"number of data-parallel processes world_size={world_size}; e.g. use batch_size="
                f"{(batch_size // world_size + 1) * world_size}."
            )
        tokens = torch.as_tensor(np.asarray(tokens)) if not torch.is_tensor(tokens) else tokens
        n = int(tokens.numel())
        self.stream_len = n // batch_size
        self.batch_size, self.tgt_len, self.rank, self.world_size = batch_size, tgt_len, rank, world_size
        self.n_tokens = n
        per = batch_size // world_size
        streams = tokens[: self.stream_len * batch_size].reshape(batch_size, self.stream_len)
        self.streams = streams[rank * per : (rank + 1) * per]  # a view: no copy of the corpus
        # Segment k needs targets up to k*T + T, i.e. stream positions < L.
        self.n_batches = max(self.stream_len - 1, 0) // tgt_len
        if self.n_batches == 0:
            raise DataError(
                f"The training split ({n:,} tokens) is too small for batch_size={batch_size} x "
                f"tgt_len={tgt_len}: each stream has {self.stream_len} tokens, fewer than tgt_len + 1."
            )
        self.position = 0  # batches handed out in the current epoch
        self._resume_at: int | None = None

    def __len__(self) -> int:
        return self.n_batches

    def batch(self, k: int) -> dict[str, Any]:
        s = k * self.tgt_len
        seg = self.streams[:, s : s + self.tgt_len + 1]
        # Copies, never views of the corpus: an in-place op on a batch must not corrupt later epochs.
        return {"input": seg[:, :-1].long().clone(), "target": seg[:, 1:].long().clone(), "first": k == 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self._resume_at or 0
        self._resume_at = None
        # A checkpoint taken after the last batch of an epoch resumes at the next epoch's start;
        # Lightning likewise counts that epoch as finished.
        self.position = start if start < self.n_batches else 0
        return self._generate(self.position)

    def _generate(self, start: int) -> Iterator[dict[str, Any]]:
        for k in range(start, self.n_batches):
            self.position = k + 1  # set when batch k is handed out, so state_dict() points past it
            yield self.batch(k)

    def _fingerprint(self) -> dict[str, int]:
        # Global quantities only: a resume on a different number of ranks keeps the same order.
        return {"n_tokens": self.n_tokens, "batch_size": self.batch_size, "tgt_len": self.tgt_len}

    def state_dict(self) -> dict[str, Any]:
        # A loaded but not yet iterated position is still the truth (e.g. a checkpoint saved
        # before the first batch of the resumed run).
        pos = self._resume_at if self._resume_at is not None else self.position
        return {"position": pos, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            raise ConfigError(
                f"Cannot resume the training stream: the checkpoint was written with {saved}, this run "
                f"has {self._fingerprint()}. Resume with the same corpus, data.batch_size and data.tgt_len, "
                f"or start a new run initialised from the checkpoint's weights."
            )
        self._resume_at = int(state["position"])
