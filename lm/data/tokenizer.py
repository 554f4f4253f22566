"""Vocabularies: word level as in Transformer-XL and raw bytes (EnWik8).

Word level: each line is ``line.split() + ['<eos>']`` (empty lines still give one ``<eos>``), counted
on the training split, case kept. Order: ``<eos>`` at id 0 (XL's special), then decreasing frequency,
ties by first occurrence (``Counter.most_common`` after counting in file order). The vocabulary lives
in a ``tokenizers`` WordLevel model so it can be saved as a standard ``tokenizer.json`` and encoding
runs in Rust.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lm.data.corpora import decode_utf8, split_lines
from lm.errors import CheckpointError, DataError
from lm.utils import atomic_write_text

EOS, UNK = "<eos>", "<unk>"
BYTE_VOCAB_JSON = {"lm_vocab": "bytes-256"}
# Python's str.split() also splits at these separators; the Rust WhitespaceSplit does not.
# Mapping them to spaces makes both splitters agree token for token.
_PY_ONLY_SPACES = {c: " " for c in (0x1C, 0x1D, 0x1E, 0x1F)}
_CHUNK = 20_000  # lines per encode_batch call: bounds the memory of Encoding objects


def _clean(line: str) -> str:
    return line.translate(_PY_ONLY_SPACES) if any(0x1C <= ord(c) <= 0x1F for c in line) else line


def count_words(lines: Iterable[str]) -> list[str]:
    """The ordered vocabulary of ``lines`` (the order above); ``<unk>`` appended if absent."""
    counter: Counter[str] = Counter()
    for line in lines:
        counter.update(line.split())
        counter[EOS] += 1
    words = [EOS] + [w for w, _ in counter.most_common() if w != EOS]
    if UNK not in counter:
        words.append(UNK)  # OOV words in valid/test (or a word-swapped file) need a target
    return words


class Vocab:
    """Common interface for word and byte vocabularies.

    Attributes: ``unit`` ('word'|'byte'), ``size``, ``sha256`` (content hash of the ordered vocabulary,
    so it stays stable across ``tokenizers`` versions that serialise the JSON differently),
    ``eos_id``/``unk_id`` (None for bytes).
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        if tokenizer is None:
            self.unit, self.size, self.eos_id, self.unk_id = "byte", 256, None, None
            self.sha256 = hashlib.sha256(b"bytes-256").hexdigest()
            return
        self.unit = "word"
        self.size = tokenizer.get_vocab_size()
        self.eos_id, self.unk_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(UNK)
        if self.eos_id is None or self.unk_id is None:
            raise DataError(f"A word-level tokenizer needs both {EOS} and {UNK} tokens.")
        ordered = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        self.sha256 = hashlib.sha256(json.dumps([w for w, _ in ordered], ensure_ascii=False).encode()).hexdigest()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def byte_level(cls) -> Vocab:
        return cls(None)

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit

        tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
        tok.pre_tokenizer = WhitespaceSplit()
        return cls(tok)

    @classmethod
    def build(cls, train_lines: Iterable[str]) -> Vocab:
        return cls.from_words(count_words(train_lines))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            if json.loads(text) == BYTE_VOCAB_JSON:
                return cls.byte_level()
            return cls(Tokenizer.from_str(text))
        except Exception as e:  # OSError, JSON errors, and tokenizers' plain Exception alike
            raise DataError(f"Cannot load the tokenizer {path}: {e}. Point data.tokenizer at a "
                            f"tokenizer.json written by a previous run.") from None

    def state(self) -> dict[str, Any]:
        """Plain data (str/int/None only) so a checkpoint holding it loads with ``weights_only=True``."""
        return {"unit": self.unit, "size": self.size, "sha256": self.sha256,
                "tokenizer": None if self.tokenizer is None else self.tokenizer.to_str()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Vocab:
        from tokenizers import Tokenizer

        try:
            vocab = cls.byte_level() if state["unit"] == "byte" else cls(Tokenizer.from_str(state["tokenizer"]))
        except Exception as e:
            raise CheckpointError(f"The vocabulary stored in the checkpoint is unreadable ({type(e).__name__}: "
                                  f"{e}); use another checkpoint or pass the run's tokenizer.json.") from None
        if state.get("sha256") not in (None, vocab.sha256):
            raise CheckpointError("The vocabulary stored in the checkpoint does not match its recorded sha256: the "
                                  "checkpoint is corrupted; use another one.")
        return vocab

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write, so a crash never leaves a half-written tokenizer beside a checkpoint."""
        text = json.dumps(BYTE_VOCAB_JSON) if self.tokenizer is None else self.tokenizer.to_str(pretty=True)
        atomic_write_text(path, text)

    # --- encoding -----------------------------------------------------------------------------
    def encode_bytes(self, data: bytes, source: str = "<bytes>") -> np.ndarray:
        """Token ids of a whole split: uint8 bytes, or int32 word ids with ``<eos>`` per line."""
        if self.tokenizer is None:
            return np.frombuffer(data, dtype=np.uint8).copy()
        lines = split_lines(decode_utf8(data, source))
        ids: list[int] = []
        for i in range(0, len(lines), _CHUNK):
            chunk = [_clean(line) for line in lines[i : i + _CHUNK]]
            for enc in self.tokenizer.encode_batch_fast(chunk, add_special_tokens=False):
                ids.extend(enc.ids)
                ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int32)

    def encode_file(self, path: str | os.PathLike) -> np.ndarray:
        path = Path(path)
        data = path.read_bytes()
        if not data:
            raise DataError(f"{path} is empty. Re-download or re-extract the file.")
        return self.encode_bytes(data, str(path))

    def encode_lines(self, lines: list[str], add_eos: bool = False) -> list[list[int]]:
        """Per-line ids (e.g. SST-2 sentences); unknown words -> ``<unk>``."""
        if self.tokenizer is None:
            return [list(line.encode("utf-8")) for line in lines]
        encs = self.tokenizer.encode_batch_fast([_clean(x) for x in lines], add_special_tokens=False)
        return [e.ids + [self.eos_id] if add_eos else list(e.ids) for e in encs]

    def id_to_token(self, i: int) -> str:
        if self.tokenizer is None:
            return bytes([i]).decode("latin-1")
        tok = self.tokenizer.id_to_token(int(i))
        if tok is None:
            raise IndexError(f"id {i} is outside the vocabulary of size {self.size}")
        return tok

    def token_to_id(self, token: str) -> int | None:
        if self.tokenizer is None:
            b = token.encode("latin-1")
            return b[0] if len(b) == 1 else None
        return self.tokenizer.token_to_id(token)

    def decode(self, ids: Iterable[int]) -> str:
        if self.tokenizer is None:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return " ".join(self.id_to_token(i) for i in ids)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Vocab(unit={self.unit!r}, size={self.size}, sha256={self.sha256[:12]})"
