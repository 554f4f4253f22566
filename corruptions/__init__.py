"""Word-swap and character-swap contamination of evaluation splits (the paper's robustness test).

Quick use::

    from corruptions import corrupt_file
    res = corrupt_file("data/wikitext-103/wiki.test.tokens", "word_swap", rate=0.015, seed=0)
    res.path, res.manifest["effective_rate"]

See :mod:`corruptions.words` (what a word is), :mod:`corruptions.word_swap` (the recipe, the
``textattack`` / ``exact`` sampling and the RNG use), :mod:`corruptions.char_swap`,
:mod:`corruptions.recipes` (the registry, a whole text), :mod:`corruptions.manifest` (files, cache,
manifest fields), :mod:`corruptions.spec` (``word_swap:0.015:exact`` strings) and
:mod:`corruptions.cli` (``lm corrupt``).

Layering: this package imports from ``lm`` only its leaf modules ``lm.errors`` and ``lm.utils``
(atomic writes); ``lm`` imports it (``lm evaluate``, ``lm corrupt``), never the other way round.
"""

from corruptions.char_swap import char_swap_line
from corruptions.cli import corrupt
from corruptions.manifest import CorruptionResult, corrupt_file
from corruptions.recipes import RECIPES, corrupt_text
from corruptions.spec import CorruptionSpec, parse_spec, parse_specs
from corruptions.word_swap import (
    DEFAULT_SAMPLING,
    SAMPLINGS,
    ConfigError,
    Swap,
    expected_swaps,
    n_swaps_for_line,
    word_swap_line,
)
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
    "DEFAULT_SAMPLING",
    "RECIPES",
    "SAMPLINGS",
    "STOPWORDS",
    "ConfigError",
    "CorruptionResult",
    "CorruptionSpec",
    "Swap",
    "Word",
    "char_swap_line",
    "corrupt",
    "corrupt_file",
    "corrupt_text",
    "enwik8_protected_spans",
    "expected_swaps",
    "find_words",
    "markup_spans",
    "n_swaps_for_line",
    "parse_spec",
    "parse_specs",
    "text_body_spans",
    "word_swap_line",
    "words_from_text",
]
