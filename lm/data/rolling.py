"""Rolling validation (``data.eval.val_protocol: rolling``): the MoE authors' validation during training.

Their ``train.py`` calls ``trainer.train_iteration(..., eval_only=True)`` on the validation data after every
"epoch" of ``--nbatches`` training steps. That data is ``data._batchify(valid, --batch-sz)``: ``B`` columns of
``C = N // B`` tokens (the ``N mod B`` tail dropped; rank r of W takes rows ``[r*B/W, (r+1)*B/W)``). Each
validation runs ``n = min(max(1, nbatches // 10), ceil(C / T))`` blocks of ``T`` (``val_blocks`` is that first
number); block p is ``columns[:, p : p+T]`` with targets one further. After each block ``p += T``; once
``p >= C - T`` the position restarts at ``random.randrange(T)`` and the cache is zero-filled. Position and cache
(``data_pos[1]``, ``hid_cache[1]``) are carried from one validation to the next; the first validation starts
at 0 with a zero cache. The reported loss is the mean of the blocks' mean losses; all blocks have ``B*T``
targets, so it is the token mean the project computes.

Here: ``RollingBlocks`` hands those blocks out (``first`` True on a block that starts from a zero cache: the
very first one and every one after a restart); the LightningModule carries its evaluation memory between
validations. The restart offset is drawn from ``numpy.random.default_rng([seed, k])`` for the k-th restart
(theirs: the unseeded global ``random``), so a resumed run draws the same offsets. The position is
``state_dict()`` (saved by the data module in every checkpoint), so a resumed fit validates where the
interrupted one would have; the authors' resume restarts it at 0 with a zero cache. Validation during
Lightning's sanity check is a dry run: it scores the blocks the first validation will score and moves nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from lm.config import EvalConfig
from lm.errors import ConfigError, DataError


def rolling_active(trainer: Any, cfg: EvalConfig) -> bool:
    """True while ``trainer`` runs a fit whose validation is rolling (``lm validate``/``test`` keep ``protocol``)."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return cfg.val_protocol == "rolling" and fn is not None and getattr(fn, "value", fn) == "fit"


class RollingBlocks:
    """The next ``len(self)`` validation blocks of one rank at every ``iter()`` (see the module docstring).

    Batches: ``{"input", "target": LongTensor[b, T], "mask", "real": all-True BoolTensor[b, T], "first": bool}``.
    ``dry_run``: a callable; when it returns True at ``iter()``, the blocks are handed out without moving on.
    """

    def __init__(self, tokens, cfg: EvalConfig, train_tgt_len: int, rank: int = 0, world_size: int = 1,
                 seed: int | None = None, dry_run: Callable[[], bool] | None = None):
        tokens = tokens if torch.is_tensor(tokens) else torch.as_tensor(np.asarray(tokens))
        tokens = tokens.reshape(-1)
        B, T, n = cfg.batch_size, cfg.tgt_len or train_tgt_len, int(tokens.numel())
        C = n // B
        if cfg.val_blocks is None or cfg.val_blocks < 1:
            raise ConfigError("eval.val_protocol: rolling needs eval.val_blocks >= 1.")
        if C < 2 * T:
            # A restart offset may be T - 1, and the block there needs T + 1 tokens of its column.
            raise DataError(f"Rolling validation cuts the {n} validation tokens into {B} columns of {C}, shorter than "
                            f"two blocks of {T}: a block after a restart would not fit. Lower data.eval.batch_size "
                            f"or the block length (data.eval.tgt_len / data.tgt_len).")
        if world_size < 1 or not 0 <= rank < world_size or B < world_size:
            raise ConfigError(f"eval.batch_size={B} (columns) must be >= world_size={world_size} for rolling "
                              f"validation, and rank {rank} in the world.")
        self.N, self.B, self.T, self.C = n, B, T, C
        rows = slice(rank * B // world_size, (rank + 1) * B // world_size)
        self.columns = tokens[: B * C].reshape(B, C)[rows]  # a view: no copy of the split
        self.per_validation = min(cfg.val_blocks, math.ceil(C / T))  # their cap: ceil(data.size(1) / block)
        self.seed = int(torch.initial_seed() if seed is None else seed) % 2**63
        self.dry_run = dry_run or (lambda: False)
        self.targets, self.scored = n - 1, B * T * self.per_validation
        self.pos, self.restarts, self.fresh = 0, 0, True  # next block; restarts so far; next starts from zeros

    def __len__(self) -> int:
        return self.per_validation

    def restart_offset(self, k: int) -> int:
        """Where the position restarts after the k-th (0-based) pass through the columns: in ``[0, T)``."""
        return int(np.random.default_rng([self.seed, k]).integers(self.T))

    def step(self, pos: int, restarts: int) -> tuple[int, int, bool]:
        """(next position, restarts, next starts from a zero cache) after the block at ``pos``."""
        pos += self.T
        if pos >= self.C - self.T:
            return self.restart_offset(restarts), restarts + 1, True
        return pos, restarts, False

    def block(self, pos: int, first: bool) -> dict[str, Any]:
        seg = self.columns[:, pos : pos + self.T + 1]
        ones = torch.ones(seg.shape[0], self.T, dtype=torch.bool)
        # Copies, never views of the split: an in-place op on a batch must not change later validations.
        return {"input": seg[:, :-1].long().clone(), "target": seg[:, 1:].long().clone(), "mask": ones,
                "real": ones.clone(), "first": first}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._generate(self.pos, self.restarts, self.fresh, bool(self.dry_run()))

    def _generate(self, pos: int, restarts: int, fresh: bool, dry: bool) -> Iterator[dict[str, Any]]:
        for _ in range(self.per_validation):
            batch = self.block(pos, fresh)
            pos, restarts, fresh = self.step(pos, restarts)
            if not dry:  # moved on when the block is handed out, so state_dict() points past it
                self.pos, self.restarts, self.fresh = pos, restarts, fresh
            yield batch

    def _fingerprint(self) -> dict[str, int]:
        return {"n_tokens": self.N, "batch_size": self.B, "tgt_len": self.T}

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "restarts": self.restarts, "fresh": self.fresh, "seed": self.seed,
                **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            raise ConfigError(
                f"Cannot resume the rolling validation: the checkpoint was written with {saved}, this run has "
                f"{self._fingerprint()} (validation tokens, data.eval.batch_size, block length). Resume with the same "
                f"validation data and settings, or start a new run initialised from the checkpoint's weights.")
        self.pos, self.restarts = int(state["pos"]), int(state["restarts"])
        self.fresh, self.seed = bool(state["fresh"]), int(state["seed"])
