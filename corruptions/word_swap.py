"""Word-swap contamination: the paper's recipe, one line at a time.

For one line (a WikiText paragraph or heading; a line of an EnWik8 dump with its XML markup
and everything outside the ``<text>`` bodies protected):

1. ``words`` = every word of the line (:mod:`corruptions.words`), stopwords included;
   ``eligible`` = the words that are not stopwords (exact match against NLTK's lowercase list) and
   not already equal to the replacement (TextAttack's ``WordSwap`` drops a replacement equal to the
   word it replaces, so a literal ``AAA`` in the clean text is never "swapped"; WikiText-103 test
   has two).
2. If ``eligible`` is empty (or ``rate == 0``) the line is left alone and the RNG is not touched.
3. Otherwise ``n = min(max(int(rate * len(words)), 1), len(eligible))`` — the count is computed from
   *all* words, as TextAttack's ``Augmenter`` does (``max(int(pct * len(words)), 1)``), and capped by
   the number of words that may be swapped. So every line with an eligible word gets at least one swap.
4. ``chosen = rng.sample(eligible, n)``: uniformly without replacement among eligible word
   *occurrences* (the population is the eligible words in line order).
5. Each chosen word is replaced in place, at its character span, by ``replacement`` (``AAA``). Text
   outside the chosen spans is untouched, so whitespace tokens keep their count and positions:
   ``<unk>`` → ``<AAA>``, ``U.S.`` → ``AAA.S.``.

``rate == 0`` is the one deliberate departure from the bare formula (which would still give one swap
per line): it means "no contamination" and returns the line unchanged.

Reproducibility: a file is processed with a single ``random.Random(seed)`` and its lines in order, so
the only RNG calls are one ``rng.sample`` per line that has an eligible word (plus, for
:mod:`corruptions.char_swap`, the per-word edit draws documented there).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

from corruptions.words import STOPWORDS, Word, find_words

from lm.errors import ConfigError  # the framework's user-facing error type (a ValueError)


__all__ = [
    "ConfigError",
    "Swap",
    "LineResult",
    "validate_rate",
    "validate_replacement",
    "n_swaps_for_line",
    "choose_words",
    "apply_edits",
    "word_swap_line",
    "word_swap_line_detailed",
]

DEFAULT_REPLACEMENT = "AAA"


class Swap(NamedTuple):
    """One corrupted word: its index among all words of the line, start in the clean line, texts."""

    word_index: int
    start: int
    original: str
    new: str


class LineResult(NamedTuple):
    """A corrupted line plus the counts the manifest needs."""

    line: str
    swaps: list[Swap]
    n_words: int
    n_eligible: int


def validate_rate(rate: float) -> float:
    """Return ``rate`` as a float, or raise :class:`ConfigError` unless it is a number in [0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise ConfigError(
            f"Corruption rate {rate!r} is not a number; give a fraction of words in [0, 1], e.g. 0.015."
        )
    rate = float(rate)
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise ConfigError(
            f"Corruption rate {rate!r} is outside the valid range [0, 1] (a fraction of words, e.g. 0.015)."
        )
    return rate


def validate_replacement(replacement: str, markup: bool = False) -> str:
    """The replacement must be a non-empty string without whitespace (and without ``<>&`` in XML)."""
    if not isinstance(replacement, str) or not replacement or any(c.isspace() for c in replacement):
        raise ConfigError(
            f"Replacement {replacement!r} must be a non-empty string without whitespace, "
            "so that every line keeps its token count (the paper uses 'AAA')."
        )
    if markup and any(c in "<>&" for c in replacement):
        raise ConfigError(
            f"Replacement {replacement!r} contains one of '<', '>' or '&', which would create XML "
            "markup in an EnWik8 file; choose plain text such as 'AAA'."
        )
    return replacement


def n_swaps_for_line(n_words: int, n_eligible: int, rate: float) -> int:
    """How many words a line loses: ``min(max(int(rate * n_words), 1), n_eligible)``; 0 if none eligible."""
    if n_eligible <= 0 or rate <= 0:
        return 0
    return min(max(int(rate * n_words), 1), n_eligible)


def choose_words(
    line: str,
    rate: float,
    rng: random.Random,
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    protected: Sequence[tuple[int, int]] = (),
    skip: str | None = None,
) -> tuple[list[Word], list[Word], list[Word]]:
    """``(words, eligible, chosen)`` for one line; ``chosen`` is sorted by position.

    ``eligible`` excludes stopwords and words equal to ``skip`` (the replacement itself). Calls
    ``rng.sample(eligible, n)`` exactly once when the line gets at least one swap, never otherwise.
    """
    words = find_words(line, protected)
    eligible = [w for w in words if w.text not in stopwords and w.text != skip]
    n = n_swaps_for_line(len(words), len(eligible), rate)
    if n == 0:
        return words, eligible, []
    chosen = sorted(rng.sample(eligible, n), key=lambda w: w.index)
    return words, eligible, chosen


def apply_edits(line: str, edits: Sequence[tuple[Word, str]]) -> str:
    """Replace each word's span (sorted, disjoint) by its new text; everything else is kept as is."""
    if not edits:
        return line
    parts = []
    pos = 0
    for word, new in edits:
        parts.append(line[pos : word.start])
        parts.append(new)
        pos = word.end
    parts.append(line[pos:])
    return "".join(parts)


def word_swap_line_detailed(
    line: str,
    rate: float,
    rng: random.Random,
    replacement: str = DEFAULT_REPLACEMENT,
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    protected: Sequence[tuple[int, int]] = (),
) -> LineResult:
    """:func:`word_swap_line` plus the line's word and eligible-word counts."""
    words, eligible, chosen = choose_words(line, rate, rng, stopwords, protected, skip=replacement)
    swaps = [Swap(w.index, w.start, w.text, replacement) for w in chosen]
    new_line = apply_edits(line, [(w, replacement) for w in chosen])
    return LineResult(new_line, swaps, len(words), len(eligible))


def word_swap_line(
    line: str,
    rate: float,
    rng: random.Random,
    replacement: str = DEFAULT_REPLACEMENT,
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    protected: Sequence[tuple[int, int]] = (),
) -> tuple[str, list[Swap]]:
    """Swap ``max(int(rate * words), 1)`` random non-stopword words of ``line`` for ``replacement``.

    Args:
        line: one line of text, without its newline.
        rate: fraction of the line's words (all words, stopwords included) to swap, in [0, 1].
        rng: the file's ``random.Random``; one ``rng.sample`` call per line that gets a swap.
        replacement: the literal that replaces each chosen word (``AAA`` in the paper).
        stopwords: words never swapped, matched exactly (case-sensitive), as TextAttack does; words
            equal to ``replacement`` are not swapped either.
        protected: sorted, disjoint character spans (XML markup, EnWik8 page metadata) that are neither
            words nor touched.

    Returns:
        ``(new_line, swaps)``; each :class:`Swap` is ``(word_index, start, original, new)`` with the
        word index among all words of the line and the start offset in the clean line.
    """
    result = word_swap_line_detailed(line, validate_rate(rate), rng, replacement, stopwords, protected)
    return result.line, result.swaps
