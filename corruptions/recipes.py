"""The registered corruption recipes, and corruption of a whole text (no files, no cache).

:func:`corrupt_text` visits the lines of a text in order with one ``random.Random(seed)``, calls the
recipe's per-line function (:mod:`corruptions.word_swap`, :mod:`corruptions.char_swap`) and counts
what the manifest reports (:mod:`corruptions.manifest` adds the files, hashes and the cache).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corruptions.char_swap import char_swap_line_detailed
from corruptions.word_swap import (
    DEFAULT_REPLACEMENT,
    DEFAULT_SAMPLING,
    LineResult,
    expected_swaps,
    validate_rate,
    validate_replacement,
    validate_sampling,
    word_swap_line_detailed,
)
from corruptions.words import STOPWORDS, enwik8_protected_spans, line_spans

from lm.errors import unknown

__all__ = ["FORMATS", "RECIPES", "Recipe", "corrupt_text", "get_recipe", "resolve_format"]

FORMATS = ("wikitext", "enwik8")


@dataclass(frozen=True)
class Recipe:
    """A registered corruption: its per-line function and whether it uses ``replacement``."""

    name: str
    line_fn: Callable[..., LineResult]
    uses_replacement: bool
    description: str


RECIPES: dict[str, Recipe] = {
    "word_swap": Recipe(
        "word_swap",
        word_swap_line_detailed,
        True,
        "replace about max(int(rate*words),1) random non-stopword words per line with a literal (AAA)",
    ),
    "char_swap": Recipe(
        "char_swap",
        char_swap_line_detailed,
        False,
        "one random character deletion/insertion/substitution in each chosen word",
    ),
}


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``, or a :class:`ConfigError` that suggests the closest name."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise unknown("corruption recipe", name, RECIPES) from None


def resolve_format(format: str, src: str | os.PathLike[str] | None = None) -> str:
    """``wikitext`` or ``enwik8``; ``auto`` means ``enwik8`` when the file name starts with ``enwik8``."""
    if format == "auto":
        name = Path(src).name if src is not None else ""
        return "enwik8" if name.lower().startswith("enwik8") else "wikitext"
    if format not in FORMATS:
        raise unknown("corruption format", format, (*FORMATS, "auto"))
    return format


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def corrupt_text(
    text: str,
    recipe: str = "word_swap",
    rate: float = 0.015,
    seed: int = 0,
    replacement: str = DEFAULT_REPLACEMENT,
    format: str = "wikitext",
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    sampling: str = DEFAULT_SAMPLING,
) -> tuple[str, dict[str, Any], list[list[Any]]]:
    """Corrupt every line of ``text``; return ``(new_text, stats, swaps)``.

    One ``random.Random(seed)`` serves the whole text and lines are visited in order, so the result
    depends only on ``(text, recipe, rate, seed, replacement, format, sampling)``. In ``enwik8`` format the
    protected spans are found over the whole text first (XML tags and entity references, which may span
    lines, and everything outside the ``<text>`` bodies; see
    :func:`~corruptions.words.enwik8_protected_spans`) and excluded from the words of every line they
    touch, so only article text is corrupted. ``stats`` holds the count fields of the manifest;
    ``swaps`` is one ``[line, word, start, original, new]`` per swap.
    """
    spec = get_recipe(recipe)
    rate = validate_rate(rate)
    format = resolve_format(format)
    sampling = validate_sampling(sampling)
    if spec.uses_replacement:
        replacement = validate_replacement(replacement, markup=format == "enwik8")
    rng = random.Random(seed)
    markup = enwik8_protected_spans(text) if format == "enwik8" else []
    mi = 0  # first markup span that may still overlap the current line

    pieces: list[str] = []
    swaps: list[list[Any]] = []
    n_lines = n_nonempty = n_with_eligible = n_swapped_lines = 0
    n_words = n_eligible = n_swaps = n_eligible_clean = 0
    swaps_expected = clean_expected = 0.0  # the sampling's expectation, independent of the seed
    n_tokens = n_changed = n_changed_excl_unk = unk_swaps = 0
    pos = 0
    from tqdm.auto import tqdm  # a bar over lines in a terminal (disable=None: none in a log file)

    spans = tqdm(line_spans(text), total=text.count("\n") + 1, unit=" lines", desc=f"{recipe} {rate:g}",
                 disable=None, mininterval=1.0, leave=False)
    for li, (start, end) in enumerate(spans):
        line = text[start:end]
        protected: list[tuple[int, int]] = []
        if markup:
            while mi < len(markup) and markup[mi][1] <= start:
                mi += 1
            j = mi
            while j < len(markup) and markup[j][0] < end:
                s, e = markup[j]
                protected.append((max(s, start) - start, min(e, end) - start))
                j += 1
        res = spec.line_fn(line, rate, rng, stopwords=stopwords, protected=protected, replacement=replacement,
                           sampling=sampling)
        tokens = line.split()
        n_lines += 1
        n_nonempty += bool(tokens)
        n_tokens += len(tokens)
        n_words += res.n_words
        n_eligible += res.n_eligible
        n_with_eligible += res.n_eligible > 0
        n_eligible_clean += res.n_eligible > 0 and not res.swaps
        exp = expected_swaps(res.n_words, res.n_eligible, rate, sampling)
        swaps_expected += exp
        if 0 < exp < 1:  # only a one-swap line can stay clean: with probability 1 - exp = 1 / (E + 1)
            clean_expected += 1 - exp
        if res.swaps:
            n_swapped_lines += 1
            n_swaps += len(res.swaps)
            for sw in res.swaps:
                swaps.append([li, sw.word_index, sw.start, sw.original, sw.new])
                end_char = sw.start + len(sw.original)
                before, after = line[sw.start - 1 : sw.start], line[end_char : end_char + 1]
                unk_swaps += sw.original == "unk" and before == "<" and after == ">"
            new_tokens = res.line.split()
            if len(new_tokens) != len(tokens):  # cannot happen: edits never touch whitespace
                raise AssertionError(f"line {li}: token count changed from {len(tokens)} to {len(new_tokens)}")
            for old, new in zip(tokens, new_tokens, strict=True):
                if old != new:
                    n_changed += 1
                    n_changed_excl_unk += old != "<unk>"
        pieces.append(text[pos:start])
        pieces.append(res.line)
        pos = end
    pieces.append(text[pos:])

    stats = {
        "n_lines": n_lines,
        "n_nonempty_lines": n_nonempty,
        "n_lines_with_eligible": n_with_eligible,
        "n_lines_swapped": n_swapped_lines,
        "n_words": n_words,
        "n_eligible_words": n_eligible,
        "n_swaps": n_swaps,
        "n_swaps_expected": swaps_expected,
        "n_lines_eligible_clean": n_eligible_clean,
        "n_lines_eligible_clean_expected": clean_expected,
        "effective_rate": _ratio(n_swaps, n_words),
        "swapped_line_fraction": _ratio(n_swapped_lines, n_lines),
        "swapped_nonempty_line_fraction": _ratio(n_swapped_lines, n_nonempty),
        "n_tokens": n_tokens,
        "n_tokens_changed": n_changed,
        "token_change_rate": _ratio(n_changed, n_tokens),
        "unk_swaps": unk_swaps,
        "unk_swap_fraction": _ratio(unk_swaps, n_swaps),
        "n_tokens_changed_excl_unk": n_changed_excl_unk,
        "token_change_rate_excl_unk": _ratio(n_changed_excl_unk, n_tokens),
    }
    return "".join(pieces), stats, swaps
