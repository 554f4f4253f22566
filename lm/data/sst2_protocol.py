"""The data-side pieces of the paper's SST-2 protocol that are options of ``SST2DataModule``.

Transcribed from the authors' finetuning code (``lazizcodes/smoe_expertcount``: ``finetune_data.py``,
its ``Vocab`` and ``SST2Iterator``; see docs/sst2.md), which is the ground truth where docs/sst2.md is
terser:

- framing (``data.cls_framing``): every sentence becomes ``<CLS> words <S>``; the classifier reads the
  last position, which is ``<S>`` (``Vocab.tokenize(..., add_cls_token=True)``);
- vocabulary (``data.vocab_count``): a fresh word vocabulary, lower-cased, counted on train AND dev
  (``Corpus`` counts both files before ``build_vocab``), the framing tokens counted like words, most
  frequent first, ties in first-seen order (``Counter.most_common``);
- batching (``data.shuffle: false``, ``data.drop_last: true``): batches of consecutive sentences in
  file order, the same every epoch, and the last partial batch dropped (``SST2Iterator`` iterates
  ``n_samples // bsz`` batches of ``arange(n_samples)``), so 864 of the 872 dev sentences are scored
  at batch 16.

Kept apart from ``lm.data.sst2`` so the project's defaults stay readable there.
"""

from __future__ import annotations

from collections import Counter

CLS, SEP = "<CLS>", "<S>"  # the authors' spelling; never produced by lower-casing an SST-2 word
VOCAB_COUNTS = ("train", "train+dev")


def frame_words(words: list[str], cls_framing: bool) -> list[str]:
    """``<CLS> words <S>`` when ``cls_framing``, else ``words`` unchanged."""
    return [CLS, *words, SEP] if cls_framing else list(words)


def counted_words(sentences: list[str], min_freq: int = 1, cls_framing: bool = False,
                  reserved: tuple[str, ...] = ()) -> list[str]:
    """Lower-cased whitespace tokens of ``sentences`` (framed like the inputs), most frequent first.

    Ties keep first-seen order, as ``Counter.most_common`` does in the authors' ``build_vocab``;
    tokens with a count below ``min_freq`` and the ``reserved`` special tokens are left out.
    """
    counter: Counter[str] = Counter()
    for s in sentences:
        counter.update(frame_words(s.lower().split(), cls_framing))
    return [w for w, c in counter.most_common() if c >= min_freq and w not in reserved]


def drop_partial(batches: list[list[int]], batch_size: int) -> list[list[int]]:
    """The batches holding exactly ``batch_size`` items (the authors' iterator never yields a short one)."""
    return [b for b in batches if len(b) == batch_size]


__all__ = ["CLS", "SEP", "VOCAB_COUNTS", "counted_words", "drop_partial", "frame_words"]
