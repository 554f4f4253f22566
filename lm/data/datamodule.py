"""The LightningDataModule: corpus files -> vocabulary -> cached token ids -> ordered streams
(training) and protocol batches (validation/test)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lm.config import EvalConfig, coerce
from lm.data.cache import FORMAT_VERSION, TokenCache
from lm.data.corpora import CORPORA, SOURCES, SPLITS, CorpusFiles, decode_utf8, find_corpus, split_lines
from lm.data.streams import OrderedStreams
from lm.data.tokenizer import Vocab
from lm.errors import ConfigError, DataError, unknown
from lm.data.protocols import EvalBatches, eval_batches
from lm.data.rolling import RollingBlocks, rolling_active
from lm.utils import atomic_write_bytes

log = logging.getLogger(__name__)


@rank_zero_only
def note(msg: str) -> None:
    """One short progress line of data preparation on stderr (counting a vocabulary or tokenising WikiText-103 takes
    minutes, and was silent), from one process only."""
    print(f"lm: data: {msg}", file=sys.stderr, flush=True)


STAGE_SPLIT = {"val": "valid", "valid": "valid", "validate": "valid", "test": "test", "train": "train"}


class LMDataModule(L.LightningDataModule):
    """Language-modelling data: WikiText-2/103 (word level) or EnWik8 (bytes).

    Args:
        corpus: ``wikitext-2``, ``wikitext-103`` or ``enwik8``.
        root: data root holding ``<corpus>/...``; searched before $LM_DATA_DIR, ./data and ../shared/data.
        source: ``auto`` (local files, else download them into the data root once), ``local`` (never
            download) or ``download`` (only the data root: root, else $LM_DATA_DIR, else ./data).
        base_url: where EnWik8's ``enwik8.zip`` is downloaded from (default http://mattmahoney.net/dc/,
            or $LM_DATA_BASE_URL): a mirror or a local server.
        batch_size: GLOBAL number of training streams, divided across data-parallel processes.
        tgt_len: training segment length (also the default evaluation window).
        eval: evaluation protocol for validation and test (docs/methods.md, "Evaluation protocols").
        cache_dir: tokenized splits and the counted vocabulary go here.
        tokenizer: an existing ``tokenizer.json`` (e.g. from a pretraining run) to reuse instead of
            counting a vocabulary; required to evaluate WikiText-103 without its train split.
        valid_file: a file that replaces the valid split (e.g. a word-swapped copy); same vocabulary,
            unknown words map to ``<unk>``.
        test_file: a file that replaces the test split, likewise.
        vocab_splits: the splits the word vocabulary is counted on: ``[train]`` (default, the paper's) or
            ``[train, valid, test]`` as the MoE authors' ``data.Corpus`` does (no word of valid/test is then
            ``<unk>``-mapped by the vocabulary; WikiText already maps rare words to ``<unk>`` in all splits).
    """

    def __init__(
        self,
        corpus: str = "wikitext-2",
        root: str | None = None,
        source: str = "auto",
        batch_size: int = 22,
        tgt_len: int = 128,
        eval: EvalConfig | None = None,
        cache_dir: str = ".cache",
        tokenizer: str | None = None,
        valid_file: str | None = None,
        test_file: str | None = None,
        base_url: str | None = None,
        vocab_splits: list[str] | None = None,
    ):
        super().__init__()
        if corpus not in CORPORA:
            raise unknown("corpus", corpus, CORPORA)
        if source not in SOURCES:
            raise unknown("data.source", source, SOURCES)
        if batch_size < 1 or tgt_len < 1:
            raise ConfigError(f"data.batch_size ({batch_size}) and data.tgt_len ({tgt_len}) must be >= 1.")
        self.corpus, self.root, self.source, self.base_url = corpus, root, source, base_url
        self.batch_size, self.tgt_len, self.cache_dir = batch_size, tgt_len, cache_dir
        self.tokenizer_path, self.valid_file, self.test_file = tokenizer, valid_file, test_file
        self.vocab_splits = list(vocab_splits) if vocab_splits else ["train"]
        if self.vocab_splits[0] != "train" or len(set(self.vocab_splits)) != len(self.vocab_splits) or any(
                v not in SPLITS for v in self.vocab_splits):
            raise ConfigError(f"data.vocab_splits {self.vocab_splits} must start with train and name each of "
                              f"{', '.join(SPLITS)} at most once: [train] (default) or [train, valid, test] "
                              f"(the MoE authors' vocabulary).")
        # Always a fresh instance: a default shared between modules must never be mutated through one.
        self.eval_cfg = dataclasses.replace(coerce(EvalConfig, eval)) if eval is not None else EvalConfig()
        # Checkpoints hold plain values only (no pickled dataclasses).
        self.save_hyperparameters(ignore=["eval"])
        self.hparams["eval"] = dataclasses.asdict(self.eval_cfg)
        self._files: CorpusFiles | None = None
        self._vocab: Vocab | None = None
        self._tokens: dict[str, torch.Tensor] = {}
        # Rolling validation (data.eval.val_protocol: rolling): one loader for the whole fit, its position in
        # every checkpoint (state_dict below); a restored position waits here until the loader is built.
        self._rolling: RollingBlocks | None = None
        self._rolling_state: dict[str, Any] | None = None

    # ----- lazily built, cached ---------------------------------------------------------------
    @property
    def unit(self) -> str:
        return "byte" if self.corpus == "enwik8" else "word"

    @property
    def files(self) -> CorpusFiles:
        if self._files is None:
            overrides = {"valid": self.valid_file, "test": self.test_file}
            self._files = find_corpus(self.corpus, self.root, self.source, overrides, self.base_url)
        return self._files

    @property
    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = self._load_vocab()
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def _load_vocab(self) -> Vocab:
        if self.tokenizer_path:
            vocab = Vocab.load(self.tokenizer_path)
            if vocab.unit != self.unit:
                raise ConfigError(f"data.tokenizer {self.tokenizer_path} is {vocab.unit}-level but corpus "
                                  f"{self.corpus} is {self.unit}-level.")
            return vocab
        if self.unit == "byte":
            return Vocab.byte_level()
        files = self.files  # a corpus missing (or undownloadable) as a whole has its own message
        try:
            train = files.read_bytes("train")
        except DataError as e:
            raise DataError(f"{e}\nThe vocabulary is counted on the train split; to evaluate without it, "
                            f"pass data.tokenizer=<run dir>/tokenizer.json from the training run.") from None
        # Counting WikiText-103 takes a minute: keep the result, keyed by the counted files' content.
        texts = [train] + [files.read_bytes(s) for s in self.vocab_splits[1:]]
        digest = hashlib.sha256(b"".join(hashlib.sha256(t).digest() for t in texts)).hexdigest()[:16]
        key = f"v{FORMAT_VERSION}.{digest if len(texts) > 1 else hashlib.sha256(train).hexdigest()[:16]}"
        path = Path(self.cache_dir) / "vocab" / f"{self.corpus}.{key}.json"
        if path.is_file():
            try:
                return Vocab.load(path)
            except DataError as e:
                log.warning("Cached vocabulary %s is unusable (%s); counting it again.", path, e)
        where = f"the {'+'.join(self.vocab_splits)} split" + ("s" if len(self.vocab_splits) > 1 else "")
        note(f"counting the {self.corpus} vocabulary on {where} ({sum(map(len, texts)) / 1e6:.1f} MB)...")
        t0 = time.perf_counter()
        lines = [line for s, t in zip(self.vocab_splits, texts) for line in split_lines(decode_utf8(t, str(files.path(s))))]
        vocab = Vocab.build(lines)
        vocab.save(path)
        note(f"vocabulary: {vocab.size:,} entries in {time.perf_counter() - t0:.1f} s (kept in {path.parent})")
        return vocab

    def tokens(self, split: str) -> torch.Tensor:
        """The split as one 1-D LongTensor of ids (through the content-keyed token cache)."""
        split = STAGE_SPLIT.get(split, split)
        if split not in SPLITS:
            raise unknown("split", split, SPLITS)
        if split not in self._tokens:
            data = self.files.read_bytes(split)
            override = {"valid": self.valid_file, "test": self.test_file}.get(split)
            label = f"{self.corpus}.{split}" + (f".{Path(override).stem}" if override else "")
            src = str(self.files.path(split))
            t0, built = time.perf_counter(), []

            def build():
                note(f"tokenising {label} ({len(data) / 1e6:.1f} MB)...")
                built.append(True)
                return self.vocab.encode_bytes(data, src)

            arr = TokenCache(Path(self.cache_dir) / "tokens").load_or_build(label, data, self.vocab.sha256, build)
            note(f"{label}: {len(arr):,} tokens " + (f"in {time.perf_counter() - t0:.1f} s (kept in {self.cache_dir})"
                                                    if built else "(from the cache)"))
            self._tokens[split] = torch.from_numpy(arr).long()
        return self._tokens[split]

    def split_file(self, split: str) -> Path:
        """A file holding exactly ``split`` (e.g. to corrupt it, then pass it back as ``test_file``).
        EnWik8 splits are byte ranges of one file, so the range is written out under ``cache_dir``."""
        split = STAGE_SPLIT.get(split, split)
        if split not in self.files.ranges:
            return self.files.path(split)
        data = self.files.read_bytes(split)
        out = Path(self.cache_dir) / "splits" / f"{self.corpus}.{split}.{hashlib.sha256(data).hexdigest()[:16]}"
        if not out.is_file() or out.stat().st_size != len(data):
            atomic_write_bytes(out, data)
        return out

    # ----- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Runs once per node before setup(): fill the caches so ranks do not all tokenize at once.
        fn = str(getattr(self.trainer.state.fn, "value", "")) if self.trainer is not None else ""
        needed = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",)}.get(fn, SPLITS)
        for split in needed:
            if self.files.paths.get(split) is not None:
                self.tokens(split)

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.is_global_zero and self.unit == "word":
            # Beside the run's checkpoints and config, so evaluation/finetuning can reuse the vocabulary.
            path = Path(trainer.default_root_dir) / "tokenizer.json"
            self._check_run_vocab(path)
            self.vocab.save(path)

    def _check_run_vocab(self, path: Path) -> None:
        """Never replace the vocabulary of a run that has checkpoints with another one: its checkpoints would
        no longer match its files (another data root counts another vocabulary)."""
        ckpts = path.parent / "checkpoints"
        if not path.is_file() or not (ckpts.is_dir() and any(ckpts.glob("*.ckpt"))):
            return
        try:
            theirs = Vocab.load(path)
        except DataError:
            return  # unreadable: rewriting it with the vocabulary in use is the repair
        if theirs.sha256 != self.vocab.sha256:
            raise ConfigError(
                f"This data ({self.corpus}, data.root {self.root or '(searched)'}) gives another vocabulary "
                f"({self.vocab.size} entries) than the run in {path.parent} was trained with ({theirs.size} entries, "
                f"{path}). Use the run's own data root (its config.yaml has data.root), "
                f"or reuse its vocabulary with --data.tokenizer {path}. Nothing was written."
            )

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> OrderedStreams:
        # Not a DataLoader, so Lightning's use_distributed_sampler cannot re-shard it; it shards itself.
        rank, world = self._rank_world()
        return OrderedStreams(self.tokens("train"), self.batch_size, self.tgt_len, rank, world)

    def val_dataloader(self) -> EvalBatches | RollingBlocks:
        rank, world = self._rank_world()
        if rolling_active(self.trainer, self.eval_cfg):
            if self._rolling is None:
                sanity = lambda: bool(getattr(self.trainer, "sanity_checking", False))  # noqa: E731
                self._rolling = RollingBlocks(self.tokens("valid"), self.eval_cfg, self.tgt_len, rank, world,
                                              dry_run=sanity)
                if self._rolling_state is not None:
                    self._rolling.load_state_dict(self._rolling_state)
            return self._rolling
        return eval_batches(self.tokens("valid"), self.eval_cfg, self.tgt_len, rank, world)

    def state_dict(self) -> dict[str, Any]:
        # Lightning stores this in every checkpoint (under the class name) and hands it back on restore.
        state = self._rolling.state_dict() if self._rolling is not None else self._rolling_state
        return {"rolling_val": state} if state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rolling_state = state.get("rolling_val")
        if self._rolling is not None and self._rolling_state is not None:
            self._rolling.load_state_dict(self._rolling_state)

    def test_dataloader(self) -> EvalBatches:
        rank, world = self._rank_world()
        return eval_batches(self.tokens("test"), self.eval_cfg, self.tgt_len, rank, world)

    def describe(self, stage: str) -> dict[str, Any]:
        """Data provenance for result JSONs (read by the LightningModule)."""
        split = STAGE_SPLIT.get(stage, stage)
        override = {"valid": self.valid_file, "test": self.test_file}.get(split)
        data = self.files.read_bytes(split)
        return {
            "corpus": self.corpus, "split": split, "unit": self.unit, "file": str(self.files.path(split)),
            "file_sha256": hashlib.sha256(data).hexdigest(), "file_tag": Path(override).stem if override else None,
            "tokens": int(self.tokens(split).numel()), "vocab_size": self.vocab.size,
            "vocab_sha256": self.vocab.sha256,
        }
