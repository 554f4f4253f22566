"""SST-2 sentences to token ids: the two vocabulary modes (``reuse``, ``fresh``) and the encoder.

- ``reuse``: the pretraining vocabulary stored in the checkpoint, so the embeddings transfer. SST-2 is
  lower-cased and PTB-tokenised, WikiText is cased and writes ``don 't`` / ``well @-@ made``; a word
  absent from the vocabulary is mapped to WikiText's spelling (``normalize``), then tried lower-cased,
  Capitalised and UPPER-cased before it becomes ``<unk>``. Byte-level checkpoints read UTF-8 bytes.
- ``fresh``: a new lower-cased word vocabulary (``<pad>`` = id 0, ``<eos>``, ``<unk>``, then words by
  decreasing frequency) counted on SST-2 train, or on train + dev as the paper's code does
  (``data.vocab_count``); with ``data.cls_framing`` the sentence is ``<CLS> words <S>`` (the paper's code,
  ``lm.data.sst2_protocol``).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from lm import checkpoint
from lm.data.sst2_protocol import CLS, SEP, counted_words
from lm.data.tokenizer import EOS, UNK, Vocab

PAD = "<pad>"
BYTE_PAD = 10  # '\n': what precedes a line in a byte stream


def checkpoint_vocab(path: str) -> Vocab:
    """The pretraining vocabulary stored in a ``lm fit`` checkpoint (key ``lm_vocab``)."""
    ckpt = checkpoint.read(path, given_as="model.pretrained", hint=f"Pass {checkpoint.LM_FIT_CKPT}.")
    return Vocab.from_state(checkpoint.vocab_state(ckpt, path, "Use a language-model checkpoint, or "
                                                                "model.vocab: fresh."))


def fresh_vocab(sentences: list[str], min_freq: int = 1, cls_framing: bool = False) -> Vocab:
    """A new vocabulary: ``<pad>`` (id 0), ``<eos>``, ``<unk>``, then the lower-cased words of
    ``sentences`` (framed with ``<CLS>``/``<S>`` when ``cls_framing``), most frequent first (ties: first seen)."""
    return Vocab.from_words([PAD, EOS, UNK] + counted_words(sentences, min_freq, cls_framing, (PAD, EOS, UNK)))


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

    def __init__(self, vocab: Vocab, mode: str, add_eos: bool = True, normalize: bool = True,
                 cls_framing: bool = False):
        self.vocab, self.mode, self.add_eos, self.normalize = vocab, mode, add_eos, normalize
        self.cls_framing = cls_framing
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
            if self.cls_framing:  # the framing tokens are not words: outside the unknown-word statistics
                ids = [self.vocab.token_to_id(CLS), *ids, self.vocab.token_to_id(SEP)]
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
