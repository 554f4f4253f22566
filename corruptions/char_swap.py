"""Character-level contamination: the same words are chosen, each gets one random character edit.

Words are chosen exactly as in :mod:`corruptions.word_swap` (same count formula and ``sampling``, same
stopword rule, same ``rng.sample`` call per line). Under ``textattack`` sampling this models the count
of TextAttack's ``fast_augment`` pool draw only: a character-level TextAttack chain (without
``RepeatModification``) may also edit the same word twice, which is not reproduced. Then, for each chosen word in increasing position order:

1. ``op = rng.choice(ops)`` with ``ops = ("delete", "insert", "substitute")``, or
   ``("insert", "substitute")`` for a one-character word (deleting it would empty its token);
2. ``pos = rng.randrange(len(word))``;
3. ``delete`` removes ``word[pos]``; ``insert`` puts ``rng.choice(ascii_lowercase)`` before
   ``word[pos]``; ``substitute`` replaces ``word[pos]`` with ``rng.choice(letters)`` where ``letters`` is
   ``ascii_lowercase`` without ``word[pos]`` (so the edit always changes the word).

These follow TextAttack's ``WordSwapRandomCharacterDeletion`` / ``Insertion`` / ``Substitution`` with
``random_one=True``. Only characters inside the word's span are touched, and no whitespace is ever
added or removed, so whitespace tokens keep their count and order.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

from corruptions.word_swap import (
    DEFAULT_SAMPLING,
    LineResult,
    Swap,
    apply_edits,
    choose_words,
    validate_rate,
    validate_sampling,
)
from corruptions.words import STOPWORDS, Word

__all__ = ["char_swap_line", "char_swap_line_detailed", "edit_word", "OPS"]

OPS = ("delete", "insert", "substitute")
_LETTERS = string.ascii_lowercase


def edit_word(word: str, rng: random.Random) -> str:
    """One random deletion, insertion (of a lowercase letter) or substitution inside ``word``."""
    ops = OPS if len(word) > 1 else OPS[1:]
    op = rng.choice(ops)
    pos = rng.randrange(len(word))
    if op == "delete":
        return word[:pos] + word[pos + 1 :]
    if op == "insert":
        return word[:pos] + rng.choice(_LETTERS) + word[pos:]
    letters = [c for c in _LETTERS if c != word[pos]]
    return word[:pos] + rng.choice(letters) + word[pos + 1 :]


def char_swap_line_detailed(
    line: str,
    rate: float,
    rng: random.Random,
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    protected: Sequence[tuple[int, int]] = (),
    replacement: str | None = None,
    sampling: str = DEFAULT_SAMPLING,
) -> LineResult:
    """:func:`char_swap_line` plus the line's word and eligible-word counts."""
    words, eligible, chosen = choose_words(line, rate, rng, stopwords, protected, sampling=sampling)
    edits: list[tuple[Word, str]] = [(w, edit_word(w.text, rng)) for w in chosen]
    swaps = [Swap(w.index, w.start, w.text, new) for w, new in edits]
    return LineResult(apply_edits(line, edits), swaps, len(words), len(eligible))


def char_swap_line(
    line: str,
    rate: float,
    rng: random.Random,
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    protected: Sequence[tuple[int, int]] = (),
    replacement: str | None = None,
    sampling: str = DEFAULT_SAMPLING,
) -> tuple[str, list[Swap]]:
    """Apply one random character edit to each of about ``max(int(rate * words), 1)`` non-stopword words.

    Args:
        line: one line of text, without its newline.
        rate: fraction of the line's words (stopwords included) to edit, in [0, 1].
        rng: the file's ``random.Random``.
        stopwords: words never edited (exact, case-sensitive match).
        protected: sorted, disjoint character spans (XML markup, EnWik8 page metadata) left untouched.
        replacement: ignored; accepted so that both recipes share one call signature.
        sampling: ``textattack`` or ``exact``, how many words are edited (see :mod:`corruptions.word_swap`).

    Returns:
        ``(new_line, swaps)`` with one :class:`Swap` ``(word_index, start, original, new)`` per word.
    """
    result = char_swap_line_detailed(
        line, validate_rate(rate), rng, stopwords, protected, sampling=validate_sampling(sampling)
    )
    return result.line, result.swaps
