"""Word-swap and character-swap contamination of evaluation splits (the paper's robustness test).

Quick use::

    from corruptions import corrupt_file
    res = corrupt_file("data/wikitext-103/wiki.test.tokens", "word_swap", rate=0.015, seed=0)
    res.path, res.manifest["effective_rate"]

See :mod:`corruptions.words` (what a word is), :mod:`corruptions.word_swap` (the recipe and its RNG
use), :mod:`corruptions.char_swap`, :mod:`corruptions.manifest` (files, cache, manifest fields) and
:mod:`corruptions.cli` (``lm corrupt``).
"""

from corruptions.char_swap import char_swap_line
from corruptions.cli import corrupt, parse_spec, parse_specs
from corruptions.manifest import RECIPES, CorruptionResult, corrupt_file, corrupt_text
from corruptions.word_swap import ConfigError, Swap, n_swaps_for_line, word_swap_line
from corruptions.words import (
    STOPWORDS,
    Word,
    enwik8_protected_spans,
    find_words,
    markup_spans,
    text_body_spans,
    words_from_text,
)

__all__ = [
    "RECIPES",
    "STOPWORDS",
    "ConfigError",
    "CorruptionResult",
    "Swap",
    "Word",
    "char_swap_line",
    "corrupt",
    "corrupt_file",
    "corrupt_text",
    "enwik8_protected_spans",
    "find_words",
    "markup_spans",
    "n_swaps_for_line",
    "parse_spec",
    "parse_specs",
    "text_body_spans",
    "word_swap_line",
    "words_from_text",
]
