"""Word-swap contamination: the paper's recipe, one line at a time.

For one line (a WikiText paragraph or heading; a line of an EnWik8 dump with its XML markup
and everything outside the ``<text>`` bodies protected):

1. ``words`` = every word of the line (:mod:`corruptions.words`), stopwords included;
   ``eligible`` = the words that are not stopwords (exact match against NLTK's lowercase list) and
   not already equal to the replacement (TextAttack's ``WordSwap`` drops a replacement equal to the
   word it replaces, so a literal ``AAA`` in the clean text is never "swapped"; WikiText-103 test
   has two). ``E = len(eligible)``.
2. If ``E == 0`` (or ``rate == 0``) the line is left alone and the RNG is not touched.
3. The target ``n = max(int(rate * len(words)), 1)`` is computed from *all* words, as TextAttack's
   ``Augmenter.augment`` does (``max(int(pct_words_to_swap * len(attacked_text.words)), 1)``).
4. How many words are swapped depends on ``sampling`` (:data:`SAMPLINGS`):

   * ``textattack`` (default; the paper's distribution): ``Augmenter(..., transformations_per_example=1,
     fast_augment=True)`` walks a chain of single swaps, each uniform among the words still eligible;
     at the step that reaches ``n`` swaps it puts every text with ``n`` swaps into a pool, then adds
     the text the chain stood on (``n - 1`` swaps; for ``n = 1`` the clean line), and returns one
     text drawn uniformly from that pool. So with ``E >= n`` the line gets ``n - 1`` swaps with
     probability ``1 / (E - n + 2)`` and ``n`` otherwise; with ``E < n`` the chain runs out of
     eligible words after ``E`` swaps and that text is the only one in the pool: ``E`` swaps.
     Drawn here as ``chosen = rng.sample(eligible, min(n, E))`` and, when ``E >= n``, one
     ``rng.randrange(E - n + 2)``: a 0 drops the last chosen word (the chain's last step is the last
     element of the uniform ordered sample, so the kept ``n - 1`` words are a uniform subset).
   * ``exact``: ``min(n, E)`` swaps, every line with an eligible word gets at least one
     (``chosen = rng.sample(eligible, min(n, E))``, nothing else drawn).

   Either way the chosen words are uniform without replacement among eligible word *occurrences*
   (the population is the eligible words in line order).
5. Each chosen word is replaced in place, at its character span, by ``replacement`` (``AAA``). Text
   outside the chosen spans is untouched, so whitespace tokens keep their count and positions:
   ``<unk>`` → ``<AAA>``, ``U.S.`` → ``AAA.S.``.

``rate == 0`` is the one deliberate departure from the bare formula (which would still give one swap
per line): it means "no contamination" and returns the line unchanged.

Reproducibility: a file is processed with a single ``random.Random(seed)`` and its lines in order, so
the only RNG calls are one ``rng.sample`` per line that has an eligible word, plus (``textattack``) one
``rng.randrange`` per such line with ``E >= n`` (and, for :mod:`corruptions.char_swap`, the per-word
edit draws documented there). ``exact`` therefore writes the same bytes as before the option existed.
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
    "target_swaps",
    "expected_swaps",
    "SAMPLINGS",
    "DEFAULT_SAMPLING",
    "validate_sampling",
    "choose_words",
    "apply_edits",
    "word_swap_line",
    "word_swap_line_detailed",
]

DEFAULT_REPLACEMENT = "AAA"
# How many of the n target words a line really loses (see the module docstring): the paper's
# TextAttack fast_augment pool draw, or exactly min(n, E).
SAMPLINGS = ("textattack", "exact")
DEFAULT_SAMPLING = "textattack"


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


def validate_sampling(sampling: str) -> str:
    """``sampling`` if it is one of :data:`SAMPLINGS`, else a :class:`ConfigError` naming them."""
    if sampling not in SAMPLINGS:
        raise ConfigError(
            f"Word sampling {sampling!r} is not known; use 'textattack' (the paper's TextAttack "
            "fast_augment draw: a line sometimes keeps one swap fewer, the default) or 'exact' "
            "(exactly min(n, eligible) swaps per line)."
        )
    return sampling


def target_swaps(n_words: int, rate: float) -> int:
    """TextAttack's ``num_words_to_swap``: ``max(int(rate * n_words), 1)``; 0 when ``rate == 0``."""
    return max(int(rate * n_words), 1) if rate > 0 else 0


def n_swaps_for_line(n_words: int, n_eligible: int, rate: float) -> int:
    """How many words a line loses: ``min(max(int(rate * n_words), 1), n_eligible)``; 0 if none eligible.

    This is the ``exact`` count and the number ``rng.sample`` draws under both samplings; under
    ``textattack`` the last of them is then dropped with probability ``1 / (E - n + 2)`` when ``E >= n``.
    """
    if n_eligible <= 0 or rate <= 0:
        return 0
    return min(target_swaps(n_words, rate), n_eligible)


def expected_swaps(n_words: int, n_eligible: int, rate: float, sampling: str = DEFAULT_SAMPLING) -> float:
    """The mean number of swaps of a line under ``sampling`` (seed-free; the manifest sums it)."""
    k = n_swaps_for_line(n_words, n_eligible, rate)
    n = target_swaps(n_words, rate)
    if sampling == "textattack" and k and n_eligible >= n:
        return k - 1.0 / (n_eligible - n + 2)
    return float(k)


def choose_words(
    line: str,
    rate: float,
    rng: random.Random,
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    protected: Sequence[tuple[int, int]] = (),
    skip: str | None = None,
    sampling: str = DEFAULT_SAMPLING,
) -> tuple[list[Word], list[Word], list[Word]]:
    """``(words, eligible, chosen)`` for one line; ``chosen`` is sorted by position.

    ``eligible`` excludes stopwords and words equal to ``skip`` (the replacement itself). Calls
    ``rng.sample(eligible, min(n, E))`` exactly once when the line has an eligible word (never
    otherwise) and, under ``textattack`` sampling with ``E >= n``, one ``rng.randrange(E - n + 2)``
    whose 0 drops the last sampled word (the pool draw of TextAttack's ``fast_augment``).
    """
    words = find_words(line, protected)
    eligible = [w for w in words if w.text not in stopwords and w.text != skip]
    k = n_swaps_for_line(len(words), len(eligible), rate)
    if k == 0:
        return words, eligible, []
    picked = rng.sample(eligible, k)
    n = target_swaps(len(words), rate)
    if sampling == "textattack" and len(eligible) >= n and rng.randrange(len(eligible) - n + 2) == 0:
        picked.pop()  # the pool's one text with n - 1 swaps: the chain's last step is not taken
    return words, eligible, sorted(picked, key=lambda w: w.index)


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
    sampling: str = DEFAULT_SAMPLING,
) -> LineResult:
    """:func:`word_swap_line` plus the line's word and eligible-word counts."""
    words, eligible, chosen = choose_words(line, rate, rng, stopwords, protected, replacement, sampling)
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
    sampling: str = DEFAULT_SAMPLING,
) -> tuple[str, list[Swap]]:
    """Swap about ``max(int(rate * words), 1)`` random non-stopword words of ``line`` for ``replacement``.

    Args:
        line: one line of text, without its newline.
        rate: fraction of the line's words (all words, stopwords included) to swap, in [0, 1].
        rng: the file's ``random.Random``; one ``rng.sample`` call per line that gets a swap.
        replacement: the literal that replaces each chosen word (``AAA`` in the paper).
        stopwords: words never swapped, matched exactly (case-sensitive), as TextAttack does; words
            equal to ``replacement`` are not swapped either.
        protected: sorted, disjoint character spans (XML markup, EnWik8 page metadata) that are neither
            words nor touched.
        sampling: ``textattack`` (the paper's count: with ``E >= n`` eligible words, ``n - 1`` swaps
            with probability ``1 / (E - n + 2)``, else ``n``; ``E`` swaps when ``E < n``) or
            ``exact`` (``min(n, E)``).

    Returns:
        ``(new_line, swaps)``; each :class:`Swap` is ``(word_index, start, original, new)`` with the
        word index among all words of the line and the start offset in the clean line.
    """
    result = word_swap_line_detailed(
        line, validate_rate(rate), rng, replacement, stopwords, protected, validate_sampling(sampling)
    )
    return result.line, result.swaps
