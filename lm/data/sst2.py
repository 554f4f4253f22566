"""GLUE SST-2 for sequence classification (docs/sst2.md).

Files (``lm.data.sst2_files``): GLUE's ``<root>/glue/SST-2/{train,dev}.tsv``, downloaded when missing.
Vocabulary (``vocab``, ``lm.data.sst2_vocab``): ``reuse`` (default) the pretraining vocabulary stored in
the checkpoint, so the embeddings transfer; ``fresh`` a new lower-cased vocabulary counted on SST-2 train,
or on train + dev as the paper's code (``vocab_count``). The unknown-word rate is printed (``lm: data:`` lines) and goes into
the result JSON.

Padding and batching (``batching``):

- ``length`` (default): every batch holds sentences of the SAME token length, so there is no padding
  at all. The prediction for a sentence cannot depend on what it is batched with, for every attention
  variant (Elliptical's segment statistics included; an MoE layer with a finite capacity still shares
  its capacity across the sentences of a batch: use `model.dropless_moe: true` for batch-independent predictions).
- ``pad``: batches LEFT-padded to the longest sentence (id 0 with a fresh vocabulary, as the paper's
  code), so the final position is every sentence's real last token; random batches, or file order
  (``shuffle: false``). Batches carry ``n_pad``; the classifier masks padding keys and counts absolute
  positions from the first real token (``model.mask_padding``), which makes padding invisible to
  softmax-family attention; see ``lm.tasks.classifier``.

The paper's framing ``<CLS> words <S>`` (``cls_framing``), file order and the dropped last partial
batch (``shuffle``, ``drop_last``) live in ``lm.data.sst2_protocol``; docs/sst2.md lists the protocol.

Batches are ``{"input": LongTensor[B, T], "n_pad": LongTensor[B], "label": LongTensor[B]}``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lm.data.datamodule import note
from lm.data.sst2_files import SOURCES, SPLITS, find_sst2, read_tsv
from lm.data.sst2_protocol import VOCAB_COUNTS, drop_partial
from lm.data.sst2_vocab import SST2Encoder, checkpoint_vocab, fresh_vocab
from lm.data.tokenizer import Vocab
from lm.errors import ConfigError, unknown

VOCAB_MODES = ("reuse", "fresh")
BATCHING = ("length", "pad")


# ----- batching ---------------------------------------------------------------------------------------
class LengthBatches:
    """Batches of indices. ``length``: same-length sentences only (no padding); ``pad``: any lengths.

    Shuffled per epoch with ``seed + epoch`` when ``shuffle`` (Lightning calls ``set_epoch``), else in
    file order; ``drop_last`` leaves out a final batch smaller than ``batch_size`` (``pad`` mode). Each of
    ``world_size`` ranks takes every ``world_size``-th batch (the count is made divisible by repeating
    the first batches), so a sentence is still seen once per epoch per process group.
    """

    def __init__(self, lengths: list[int], batch_size: int, mode: str, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.lengths, self.batch_size, self.mode, self.shuffle = np.asarray(lengths), batch_size, mode, shuffle
        self.seed, self.epoch, self.rank, self.world_size = seed, 0, rank, world_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        n, b = len(self.lengths), self.batch_size
        if self.mode == "pad":
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            out = [order[i : i + b].tolist() for i in range(0, n, b)]
            if self.drop_last:
                out = drop_partial(out, b)
        else:
            out = []
            for length in np.unique(self.lengths):
                idx = np.flatnonzero(self.lengths == length)
                if self.shuffle:
                    idx = rng.permutation(idx)
                out += [idx[i : i + b].tolist() for i in range(0, len(idx), b)]
            if self.shuffle:
                out = [out[i] for i in rng.permutation(len(out))]
        if self.world_size > 1:
            out += out[: (-len(out)) % self.world_size]
            out = out[self.rank :: self.world_size]
        return out

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class _Examples(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.labels[i]


def left_pad(items: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to the longest sequence: the final column is every sequence's real last token."""
    T = max(len(ids) for ids, _ in items)
    x = torch.full((len(items), T), pad_id, dtype=torch.long)
    n_pad = torch.empty(len(items), dtype=torch.long)
    for r, (ids, _) in enumerate(items):
        x[r, T - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        n_pad[r] = T - len(ids)
    return {"input": x, "n_pad": n_pad, "label": torch.tensor([y for _, y in items], dtype=torch.long)}


class _Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return left_pad(items, self.pad_id)


# ----- the data module --------------------------------------------------------------------------------
class SST2DataModule(L.LightningDataModule):
    """GLUE SST-2 (train / dev) for ``lm finetune``.

    Args:
        root: data root holding ``glue/SST-2/``; searched before $LM_DATA_DIR, ./data and ../shared/data.
        source: ``auto`` (local files, else download ``nyu-mll/glue`` sst2 into the data root once),
            ``local`` (never download) or ``download`` (only the data root).
        pretrained: the pretraining checkpoint (linked from ``model.pretrained``; do not set by hand).
        vocab: ``reuse`` (the checkpoint's vocabulary) or ``fresh`` (lower-cased SST-2 train words);
            linked from ``model.vocab``.
        batch_size: sentences per training batch.
        eval_batch_size: sentences per dev batch (default: ``batch_size``).
        batching: ``length`` (same-length batches, no padding) or ``pad`` (left-padded batches).
        max_len: longest input in tokens; longer sentences keep their END (the last ``max_len`` tokens).
        add_eos: end every sentence with ``<eos>`` (a newline byte for byte-level models), as in pretraining.
        cls_framing: frame every sentence ``<CLS> words <S>`` (the paper's code: the last position read by
            the classifier is ``<S>``); needs ``vocab: fresh`` and ``add_eos: false``.
        normalize: with ``reuse``, re-spell PTB tokens the vocabulary lacks in WikiText's form.
        min_freq: with ``fresh``, the least frequent word kept (1 = every counted word).
        vocab_count: with ``fresh``, the splits the vocabulary is counted on: ``train`` (dev words unseen in
            train become ``<unk>``) or ``train+dev`` (the paper's code: no dev word is unknown).
        shuffle: reshuffle the training batches every epoch; false keeps file order (the paper's code).
        drop_last: leave out the last partial batch of each split (the paper's code: 864 of the 872 dev
            sentences are scored at batch 16); needs ``batching: pad``.
        limit_train: use only the first N train sentences (smoke tests; None = all).
        cache_dir: kept for configs that set it (downloads go to the data root).
        num_workers: DataLoader workers.
        seed: shuffling seed (the epoch is added).
    """

    def __init__(
        self,
        root: str | None = None,
        source: str = "auto",
        pretrained: str | None = None,
        vocab: str = "reuse",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        batching: str = "length",
        max_len: int = 256,
        add_eos: bool = True,
        cls_framing: bool = False,
        normalize: bool = True,
        min_freq: int = 1,
        vocab_count: str = "train",
        shuffle: bool = True,
        drop_last: bool = False,
        limit_train: int | None = None,
        cache_dir: str = ".cache",
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise unknown("data.source", source, SOURCES)
        if vocab not in VOCAB_MODES:
            raise unknown("vocab mode (model.vocab)", vocab, VOCAB_MODES)
        if batching not in BATCHING:
            raise unknown("data.batching", batching, BATCHING)
        if vocab_count not in VOCAB_COUNTS:
            raise unknown("data.vocab_count", vocab_count, VOCAB_COUNTS)
        if vocab == "reuse" and (cls_framing or vocab_count != "train"):
            what = "data.cls_framing: true" if cls_framing else f"data.vocab_count: {vocab_count}"
            raise ConfigError(f"{what} builds a new SST-2 vocabulary, but model.vocab is reuse (the pretraining "
                              f"vocabulary, which has no <CLS>/<S> and cannot be recounted). Set model.vocab: "
                              f"fresh, or drop {what.split(':')[0]}.")
        if cls_framing and add_eos:
            raise ConfigError("data.cls_framing: true frames a sentence <CLS> words <S> and data.add_eos: true "
                              "appends <eos>: the classifier would read <eos>, not <S>. Set data.add_eos: false "
                              "with cls_framing (the paper's framing), or cls_framing: false.")
        if drop_last and batching != "pad":
            raise ConfigError("data.drop_last: true needs data.batching: pad (with same-length batches every "
                              "length would lose its last partial batch). Set data.batching: pad, or drop_last: "
                              "false.")
        if vocab == "reuse" and pretrained is None:
            raise ConfigError("vocab: reuse takes the vocabulary from the pretrained checkpoint, but "
                              "model.pretrained is not set. Pass --model.pretrained runs/<name>/checkpoints/"
                              "last.ckpt, or use --model.vocab fresh to train on a new SST-2 vocabulary.")
        for name, v in (("batch_size", batch_size), ("max_len", max_len), ("min_freq", min_freq)):
            if v < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {v}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}.")
        self.root, self.source, self.pretrained, self.vocab_mode = root, source, pretrained, vocab
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.batching, self.max_len, self.add_eos, self.normalize = batching, max_len, add_eos, normalize
        self.cls_framing, self.vocab_count, self.shuffle, self.drop_last = cls_framing, vocab_count, shuffle, drop_last
        self.min_freq, self.limit_train, self.cache_dir = min_freq, limit_train, cache_dir
        self.num_workers, self.seed = num_workers, seed
        self.save_hyperparameters()
        self._files: dict[str, Path] | None = None
        self._raw: dict[str, tuple[list[str], list[int]]] = {}
        self._vocab: Vocab | None = None
        self._encoder: SST2Encoder | None = None
        self._data: dict[str, tuple[list[list[int]], list[int]]] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self._file_info: dict[str, dict[str, str]] | None = None

    # ----- lazily built -----------------------------------------------------------------------------
    @property
    def files(self) -> dict[str, Path]:
        if self._files is None:
            self._files = find_sst2(self.root, self.source)  # announces a download itself (lm.data.download)
            note(f"SST-2: train.tsv and dev.tsv in {self._files['train'].parent}")
        return self._files

    def raw(self, split: str) -> tuple[list[str], list[int]]:
        if split not in self._raw:
            t0 = time.perf_counter()
            sentences, labels = read_tsv(self.files[split])
            n_file = len(sentences)
            if split == "train" and self.limit_train:
                sentences, labels = sentences[: self.limit_train], labels[: self.limit_train]
            kept = f" (the first {len(sentences)} kept: data.limit_train)" if len(sentences) < n_file else ""
            note(f"SST-2 {split}: read {n_file} sentences from {self.files[split].name} in "
                 f"{time.perf_counter() - t0:.1f} s{kept}")
            self._raw[split] = (sentences, labels)
        return self._raw[split]

    @property
    def vocabulary(self) -> Vocab:
        if self._vocab is None:
            if self.vocab_mode == "reuse":
                self._vocab = checkpoint_vocab(self.pretrained)
                note(f"SST-2 vocabulary: reused from {self.pretrained} ({self._vocab.unit}, "
                     f"{self._vocab.size} entries)")
            else:
                counted = self.raw("train")[0] + (self.raw("dev")[0] if self.vocab_count == "train+dev" else [])
                t0 = time.perf_counter()
                self._vocab = fresh_vocab(counted, self.min_freq, self.cls_framing)
                note(f"SST-2 vocabulary: counted on {self.vocab_count} ({len(counted)} sentences, min_freq "
                     f"{self.min_freq}): {self._vocab.size} entries in {time.perf_counter() - t0:.1f} s")
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return self.vocabulary.size

    @property
    def unit(self) -> str:
        return self.vocabulary.unit

    @property
    def encoder(self) -> SST2Encoder:
        if self._encoder is None:
            self._encoder = SST2Encoder(self.vocabulary, self.vocab_mode, self.add_eos, self.normalize,
                                        self.cls_framing)
        return self._encoder

    @property
    def pad_id(self) -> int:
        return self.encoder.pad_id

    def encoded(self, split: str) -> tuple[list[list[int]], list[int]]:
        if split not in self._data:
            sentences, labels = self.raw(split)
            encoder = self.encoder  # the vocabulary first: its own line comes before this split's
            t0 = time.perf_counter()
            ids, info = encoder.encode(sentences)
            truncated = sum(len(x) > self.max_len for x in ids)
            ids = [x[-self.max_len :] for x in ids]  # keep the end: the last position is what is read
            info["truncated"] = truncated
            info["mean_len"] = float(np.mean([len(x) for x in ids]))
            self.stats[split] = info
            self._data[split] = (ids, labels)
            note(f"SST-2 {split}: tokenised {len(ids)} sentences, {info['words']} words in "
                 f"{time.perf_counter() - t0:.1f} s; unknown-word rate {100 * info['unk_rate']:.2f}% "
                 f"({info['case_fallback']} case fallbacks, {info['respelled']} re-spelled, {truncated} truncated "
                 f"to {self.max_len} tokens); vocab {self.vocab_mode} ({self.vocabulary.unit}, "
                 f"{self.vocabulary.size} entries)")
        return self._data[split]

    # ----- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.encoded("train")
        self.encoded("dev")

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer  # LightningDataModule.trainer: None until a Trainer attaches it
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        ids, labels = self.encoded(split)
        rank, world = self._rank_world()
        sampler = LengthBatches([len(x) for x in ids], batch_size, self.batching, shuffle, self.seed, rank, world,
                                self.drop_last)
        return DataLoader(_Examples(ids, labels), batch_sampler=sampler, collate_fn=_Collate(self.pad_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", False, self.eval_batch_size)

    def scored(self, split: str) -> int:
        """Sentences of ``split`` that one epoch feeds (fewer than the file holds with ``drop_last``)."""
        n = len(self.encoded(split)[0])
        size = self.batch_size if split == "train" else self.eval_batch_size
        return n - n % size if self.drop_last else n

    # ----- provenance -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What the result JSON records about the data and the vocabulary."""
        v = self.vocabulary
        if self._file_info is None:
            self._file_info = {s: {"file": str(self.files[s]), "sha256": hashlib.sha256(
                self.files[s].read_bytes()).hexdigest()} for s in SPLITS}
        files = self._file_info
        return {
            "task": "sst2", "files": files, "vocab_mode": self.vocab_mode, "unit": v.unit, "vocab_size": v.size,
            "vocab_sha256": v.sha256, "pretrained": self.pretrained, "batching": self.batching,
            "max_len": self.max_len, "add_eos": self.add_eos, "normalize": self.normalize,
            "cls_framing": self.cls_framing, "vocab_count": self.vocab_count, "shuffle": self.shuffle,
            "drop_last": self.drop_last, "scored": {s: self.scored(s) for s in self._data},
            "limit_train": self.limit_train, "unk_rate": {s: self.stats[s]["unk_rate"] for s in self.stats},
            "stats": self.stats,
        }
