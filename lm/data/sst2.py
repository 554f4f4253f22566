"""GLUE SST-2 for sequence classification (REFERENCE §7).

Files: ``<root>/glue/SST-2/{train,dev}.tsv`` with the header ``sentence<TAB>label`` (GLUE release);
the roots are searched like the language-modelling corpora (``data.root``, $LM_DATA_DIR, ./data,
../shared/data next to the working directory and next to the checkout). ``source: hub`` writes the
Hugging Face ``glue/sst2`` copy to local TSV files first (offline: a DataError, never a traceback).

Vocabulary (``vocab``):

- ``reuse`` (default): the pretraining vocabulary stored in the checkpoint, so the embeddings transfer.
  SST-2 is lower-cased and PTB-tokenised, WikiText is cased and writes ``don 't`` / ``well @-@ made``;
  a word absent from the vocabulary is mapped to WikiText's spelling (``normalize``), then tried
  lower-cased, Capitalised and UPPER-cased before it becomes ``<unk>``. The unknown-word rate is logged and goes
  into the result JSON. Byte-level checkpoints read the sentence as UTF-8 bytes.
- ``fresh`` (the paper's code): a new lower-cased word vocabulary counted on SST-2 train
  (``<pad>``, ``<eos>``, ``<unk>``, then words by decreasing frequency); the blocks transfer, the
  embedding is new.

Padding and batching (``batching``):

- ``length`` (default): every batch holds sentences of the SAME token length, so there is no padding
  at all. The prediction for a sentence cannot depend on what it is batched with, for every attention
  variant (Elliptical's segment statistics included; an MoE layer with a finite capacity still shares
  its capacity across the sentences of a batch: use `model.dropless_moe: true` for batch-independent predictions).
- ``pad``: random batches, LEFT-padded to the longest sentence (the paper's protocol), so the final
  position is every sentence's real last token. Batches carry ``n_pad``; the classifier masks padding
  keys and counts absolute positions from the first real token (``model.mask_padding``), which makes
  padding invisible to softmax-family attention; see ``lm.tasks.classifier``.

Batches are ``{"input": LongTensor[B, T], "n_pad": LongTensor[B], "label": LongTensor[B]}``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
from torch.utils.data import DataLoader

from lm.data.corpora import resolve_roots
from lm.data.tokenizer import EOS, UNK, Vocab
from lm.errors import CheckpointError, ConfigError, DataError, unknown
from lm.utils import atomic_write_text

PAD = "<pad>"
SPLITS = ("train", "dev")
VOCAB_MODES = ("reuse", "fresh")
BATCHING = ("length", "pad")
SOURCES = ("local", "hub")
HOW_TO_GET = ("download SST-2.zip with the GLUE download script (or from https://dl.fbaipublicfiles.com/glue/"
              "data/SST-2.zip) and unzip it so that <root>/glue/SST-2/train.tsv and dev.tsv exist")
BYTE_PAD = 10  # '\n': what precedes a line in a byte stream


# ----- files ----------------------------------------------------------------------------------------
def find_sst2(root: str | None = None, source: str = "local", cache_dir: str = ".cache") -> dict[str, Path]:
    """Paths of the train and dev TSVs (each split searched independently over the roots)."""
    if source not in SOURCES:
        raise unknown("data.source", source, SOURCES)
    roots = [materialise_hub(cache_dir)] if source == "hub" else resolve_roots(root)
    out, looked = {}, []
    for split in SPLITS:
        tried = [r / "glue" / "SST-2" / f"{split}.tsv" for r in roots]
        looked += tried
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            places = "\n  ".join(str(p) for p in tried)
            raise DataError(f"The SST-2 {split} split was not found. Looked in:\n  {places}\nTo get it: "
                            f"{HOW_TO_GET}; then set data.root (or LM_DATA_DIR) to that root, or use "
                            f"data.source: hub when the Hugging Face hub is reachable.")
        out[split] = found
    return out


def read_tsv(path: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of a GLUE SST-2 TSV; any malformed row is a DataError with its line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e.strerror}.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {e.start}). Re-download the GLUE SST-2 "
                        f"files; they are UTF-8 text.") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path} is empty. Re-download the GLUE SST-2 files.")
    if lines[0].strip().split("\t") != ["sentence", "label"]:
        raise DataError(f"{path}, line 1: expected the header 'sentence<TAB>label', found {lines[0][:80]!r}. "
                        f"Use the GLUE train.tsv/dev.tsv (test.tsv has no labels).")
    sentences, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}, line {n}: expected 2 tab-separated columns (sentence, label), found "
                            f"{len(parts)}: {line[:80]!r}. Fix or delete that line (a sentence must not contain "
                            f"a tab), or re-download the GLUE SST-2 files.")
        sentence, label = parts[0].strip(), parts[1].strip()
        if label not in ("0", "1"):
            raise DataError(f"{path}, line {n}: the label must be 0 or 1, found {label[:20]!r}. Fix that line "
                            f"or re-download the GLUE SST-2 files.")
        if not sentence:
            raise DataError(f"{path}, line {n}: the sentence is empty. Fix or delete that line.")
        sentences.append(sentence)
        labels.append(int(label))
    if not sentences:
        raise DataError(f"{path} has a header but no rows. Re-download the GLUE SST-2 files.")
    return sentences, labels


def materialise_hub(cache_dir: str) -> Path:
    """Write the hub's ``glue/sst2`` train/validation splits as GLUE TSVs under ``<cache_dir>/hub``."""
    root = Path(cache_dir).expanduser().resolve() / "hub"
    for split, hub_split in (("train", "train"), ("dev", "validation")):
        target = root / "glue" / "SST-2" / f"{split}.tsv"
        if target.is_file():
            continue
        try:
            import datasets

            ds = datasets.load_dataset("glue", "sst2", split=hub_split)
            rows = [(str(s).replace("\t", " ").strip(), int(y)) for s, y in zip(ds["sentence"], ds["label"])]
        except Exception as e:  # offline, auth, API changes: all the same to the user
            first = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"Could not load SST-2 (glue/sst2, split {hub_split}) from the Hugging Face hub: "
                            f"{type(e).__name__}: {first}. The hub is unreachable offline; use data.source: "
                            f"local and {HOW_TO_GET}.") from None
        atomic_write_text(target, "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows))
    return root


# ----- vocabulary -------------------------------------------------------------------------------------
def checkpoint_vocab(path: str) -> Vocab:
    """The pretraining vocabulary stored in a ``lm fit`` checkpoint (key ``lm_vocab``)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass the .ckpt written by `lm fit` "
                              f"(e.g. runs/<name>/checkpoints/last.ckpt) as model.pretrained.")
    try:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}. The file is "
                              f"truncated or not a checkpoint; use another (e.g. last.ckpt).") from None
    state = ckpt.get("lm_vocab") if isinstance(ckpt, dict) else None
    if not state:
        raise CheckpointError(f"Checkpoint {path} holds no vocabulary (lm_vocab); it was not written by `lm fit`. "
                              f"Use a language-model checkpoint, or data.vocab: fresh.")
    return Vocab.from_state(state)


def fresh_vocab(sentences: list[str], min_freq: int = 1) -> Vocab:
    """The paper's vocabulary: lower-cased words of SST-2 train, most frequent first (ties: first seen)."""
    counter: Counter[str] = Counter()
    for s in sentences:
        counter.update(s.lower().split())
    words = [w for w, c in counter.most_common() if c >= min_freq and w not in (PAD, EOS, UNK)]
    return Vocab.from_words([PAD, EOS, UNK] + words)


_NUMBER = re.compile(r"^\d[\d,.]*\d$")


def wikitext_spelling(words: list[str]) -> list[str]:
    """SST-2 (PTB) tokens in WikiText-103's spelling: ``do n't`` -> ``don 't``, ``\u0060\u0060``/``''`` -> ``"``,
    ``-lrb-`` -> ``(``, ``well-made`` -> ``well @-@ made``, ``1,000`` -> ``1 @,@ 000``. Applied only to
    words the pretraining vocabulary lacks (see ``SST2Encoder``)."""
    out: list[str] = []
    for w in words:
        if w == "n't" and out:
            prev = out.pop()
            out += [{"ca": "can", "wo": "won", "sha": "shan"}.get(prev, prev + "n"), "'t"]
        elif w in ("``", "''"):
            out.append('"')
        elif w == "`":
            out.append("'")
        elif w in ("-lrb-", "-lsb-", "-lcb-"):
            out.append("(")
        elif w in ("-rrb-", "-rsb-", "-rcb-"):
            out.append(")")
        elif _NUMBER.match(w):
            out += re.sub(r"([,.])", r" @\1@ ", w).split()
        elif "-" in w.strip("-") and len(w) > 2:
            parts = w.split("-")
            out += [x for p in parts[:-1] for x in (p, "@-@") if x] + ([parts[-1]] if parts[-1] else [])
        else:
            out.append(w)
    return out


class SST2Encoder:
    """Sentence -> ids under one vocabulary mode, counting unknown words and fallbacks."""

    def __init__(self, vocab: Vocab, mode: str, add_eos: bool = True, normalize: bool = True):
        self.vocab, self.mode, self.add_eos, self.normalize = vocab, mode, add_eos, normalize
        self.byte = vocab.unit == "byte"
        self._cache: dict[str, tuple[int, str]] = {}  # word -> (id, how: exact|case|unk)
        if self.byte:
            self.pad_id, self.eos_id = BYTE_PAD, BYTE_PAD
        else:
            pad = vocab.token_to_id(PAD)
            # A reused LM vocabulary has no <pad>: use <eos> (what precedes a line in the LM's stream).
            self.pad_id = pad if pad is not None else vocab.eos_id
            self.eos_id = vocab.eos_id

    def _lookup(self, w: str) -> tuple[int, str]:
        hit = self._cache.get(w)
        if hit is None:
            tok = self.vocab.token_to_id
            i = tok(w)
            if i is not None:
                hit = (i, "exact")
            elif self.mode == "reuse":
                i = tok(w.lower())
                if i is None:
                    i = tok(w[:1].upper() + w[1:].lower())
                if i is None:
                    i = tok(w.upper())  # tv -> TV, usa -> USA
                hit = (i, "case") if i is not None else (self.vocab.unk_id, "unk")
            else:
                hit = (self.vocab.unk_id, "unk")
            self._cache[w] = hit
        return hit

    def encode(self, sentences: list[str]) -> tuple[list[list[int]], dict[str, Any]]:
        stats = Counter()
        out: list[list[int]] = []
        for s in sentences:
            if self.byte:
                ids = list(s.encode("utf-8"))
                if self.add_eos:
                    ids.append(self.eos_id)
                out.append(ids)
                continue
            words = s.lower().split() if self.mode == "fresh" else s.split()
            if self.mode == "reuse" and self.normalize:
                words = self._normalise(words, stats)
            ids = []
            for w in words:
                i, how = self._lookup(w)
                ids.append(i)
                stats[how] += 1
            stats["words_in"] += len(s.split())
            if self.add_eos:
                ids.append(self.eos_id)
            out.append(ids)
        n = sum(stats[k] for k in ("exact", "case", "unk"))
        info = {"sentences": len(sentences), "words": n, "unk": stats["unk"],
                "unk_rate": stats["unk"] / n if n else 0.0, "case_fallback": stats["case"],
                "respelled": stats["respelled"]}
        return out, info

    def _normalise(self, words: list[str], stats: Counter) -> list[str]:
        # Only words the vocabulary lacks in every casing are re-spelled (and "n't" with its host word),
        # and only when every re-spelled piece is known.
        def known(w: str) -> bool:
            return self._lookup(w)[1] != "unk"

        if "n't" not in words and all(known(w) for w in words):
            return words
        out: list[str] = []
        j = 0
        while j < len(words):
            w = words[j]
            group = [w, "n't"] if j + 1 < len(words) and words[j + 1] == "n't" and w != "n't" else [w]
            if len(group) == 2 or not known(w):
                new = wikitext_spelling(group)
                if new != group and all(known(x) for x in new):
                    stats["respelled"] += 1
                    out += new
                    j += len(group)
                    continue
            out.append(w)
            j += 1
        return out


# ----- batching ---------------------------------------------------------------------------------------
class LengthBatches:
    """Batches of indices. ``length``: same-length sentences only (no padding); ``pad``: any lengths.

    Shuffled per epoch with ``seed + epoch`` when ``shuffle`` (Lightning calls ``set_epoch``); each of
    ``world_size`` ranks takes every ``world_size``-th batch (the count is made divisible by repeating
    the first batches), so a sentence is still seen once per epoch per process group.
    """

    def __init__(self, lengths: list[int], batch_size: int, mode: str, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.mode, self.shuffle = np.asarray(lengths), batch_size, mode, shuffle
        self.seed, self.epoch, self.rank, self.world_size = seed, 0, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        n, b = len(self.lengths), self.batch_size
        if self.mode == "pad":
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            out = [order[i : i + b].tolist() for i in range(0, n, b)]
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
        source: ``local`` files or ``hub`` (Hugging Face ``glue/sst2``, written to local files first).
        pretrained: the pretraining checkpoint (linked from ``model.pretrained``; do not set by hand).
        vocab: ``reuse`` (the checkpoint's vocabulary) or ``fresh`` (lower-cased SST-2 train words);
            linked from ``model.vocab``.
        batch_size: sentences per training batch.
        eval_batch_size: sentences per dev batch (default: ``batch_size``).
        batching: ``length`` (same-length batches, no padding) or ``pad`` (random left-padded batches).
        max_len: longest input in tokens; longer sentences keep their END (the last ``max_len`` tokens).
        add_eos: end every sentence with ``<eos>`` (a newline byte for byte-level models), as in pretraining.
        normalize: with ``reuse``, re-spell PTB tokens the vocabulary lacks in WikiText's form.
        min_freq: with ``fresh``, the least frequent word kept (1 = every train word).
        limit_train: use only the first N train sentences (smoke tests; None = all).
        cache_dir: where ``source: hub`` writes its files.
        num_workers: DataLoader workers.
        seed: shuffling seed (the epoch is added).
    """

    def __init__(
        self,
        root: str | None = None,
        source: str = "local",
        pretrained: str | None = None,
        vocab: str = "reuse",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        batching: str = "length",
        max_len: int = 256,
        add_eos: bool = True,
        normalize: bool = True,
        min_freq: int = 1,
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
            self._files = find_sst2(self.root, self.source, self.cache_dir)
        return self._files

    def raw(self, split: str) -> tuple[list[str], list[int]]:
        if split not in self._raw:
            sentences, labels = read_tsv(self.files[split])
            if split == "train" and self.limit_train:
                sentences, labels = sentences[: self.limit_train], labels[: self.limit_train]
            self._raw[split] = (sentences, labels)
        return self._raw[split]

    @property
    def vocabulary(self) -> Vocab:
        if self._vocab is None:
            if self.vocab_mode == "reuse":
                self._vocab = checkpoint_vocab(self.pretrained)
            else:
                self._vocab = fresh_vocab(self.raw("train")[0], self.min_freq)
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
            self._encoder = SST2Encoder(self.vocabulary, self.vocab_mode, self.add_eos, self.normalize)
        return self._encoder

    @property
    def pad_id(self) -> int:
        return self.encoder.pad_id

    def encoded(self, split: str) -> tuple[list[list[int]], list[int]]:
        if split not in self._data:
            sentences, labels = self.raw(split)
            ids, info = self.encoder.encode(sentences)
            truncated = sum(len(x) > self.max_len for x in ids)
            ids = [x[-self.max_len :] for x in ids]  # keep the end: the last position is what is read
            info["truncated"] = truncated
            info["mean_len"] = float(np.mean([len(x) for x in ids]))
            self.stats[split] = info
            self._data[split] = (ids, labels)
            rank_zero_info(
                f"SST-2 {split}: {len(ids)} sentences, {info['words']} words, unknown-word rate "
                f"{100 * info['unk_rate']:.2f}% ({info['case_fallback']} case fallbacks, {info['respelled']} "
                f"re-spelled, {truncated} truncated to {self.max_len} tokens); vocab {self.vocab_mode} "
                f"({self.vocabulary.unit}, {self.vocabulary.size} entries)")
        return self._data[split]

    # ----- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.encoded("train")
        self.encoded("dev")

    def _rank_world(self) -> tuple[int, int]:
        t = self._trainer if hasattr(self, "_trainer") else None
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        ids, labels = self.encoded(split)
        rank, world = self._rank_world()
        sampler = LengthBatches([len(x) for x in ids], batch_size, self.batching, shuffle, self.seed, rank, world)
        return DataLoader(_Examples(ids, labels), batch_sampler=sampler, collate_fn=_Collate(self.pad_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", False, self.eval_batch_size)

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
            "limit_train": self.limit_train, "unk_rate": {s: self.stats[s]["unk_rate"] for s in self.stats},
            "stats": self.stats,
        }
