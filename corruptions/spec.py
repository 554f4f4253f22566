"""Corruption spec strings for evaluation configs: ``recipe[:rate[:sampling]]``.

``word_swap:0.015`` is word swap at rate 0.015 with the default sampling (``textattack``, the paper's);
``word_swap:0.015:exact`` selects exactly ``min(n, E)`` swaps per line; ``char_swap:2.5%`` reads a
trailing ``%`` as a percentage; a bare ``word_swap`` uses rate 0.015. Several specs are separated by
commas (``word_swap:0.015,char_swap:0.015``).

This module is what ``lm evaluate`` imports to read its ``--corruptions`` option: it depends on the
recipe registry and :mod:`lm.errors` only, not on the ``lm corrupt`` command line (:mod:`corruptions.cli`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from corruptions.recipes import get_recipe
from corruptions.word_swap import DEFAULT_SAMPLING, SAMPLINGS, ConfigError, validate_rate

__all__ = ["DEFAULT_RATE", "CorruptionSpec", "parse_spec", "parse_specs"]

DEFAULT_RATE = 0.015


class CorruptionSpec(NamedTuple):
    """One parsed spec: what :func:`corruptions.manifest.corrupt_file` needs besides the file and seed."""

    recipe: str
    rate: float
    sampling: str = DEFAULT_SAMPLING

    @property
    def label(self) -> str:
        """``recipe:rate`` (``:sampling`` appended when it is not the default): the results' column name."""
        base = f"{self.recipe}:{self.rate:g}"
        return base if self.sampling == DEFAULT_SAMPLING else f"{base}:{self.sampling}"

    def kwargs(self) -> dict:
        """``recipe``, ``rate`` and ``sampling`` as keyword arguments of ``corrupt_file``."""
        return {"recipe": self.recipe, "rate": self.rate, "sampling": self.sampling}


def _fail(spec: str, problem: str) -> ConfigError:
    return ConfigError(
        f"Corruption spec '{spec}' {problem}; write it as 'recipe:rate' or 'recipe:rate:sampling', "
        f"e.g. 'word_swap:0.015' (sampling {DEFAULT_SAMPLING}, the paper's) or 'word_swap:0.015:exact'."
    )


def parse_spec(spec: str) -> CorruptionSpec:
    """``"word_swap:0.015:exact"`` → ``CorruptionSpec("word_swap", 0.015, "exact")``; see the module doc."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"Corruption spec {spec!r} is empty; write it as 'recipe:rate', e.g. 'word_swap:0.015'."
        )
    parts = [p.strip() for p in spec.strip().split(":")]
    if len(parts) > 3:
        raise _fail(spec, f"has {len(parts)} ':'-separated fields (at most 3)")
    name = parts[0]
    get_recipe(name)  # unknown recipe → ConfigError with the closest name
    rate = DEFAULT_RATE
    if len(parts) > 1:
        rate_text, scale = parts[1], 1.0
        if rate_text.endswith("%"):
            rate_text, scale = rate_text[:-1].strip(), 0.01
        try:
            rate = float(rate_text) * scale
        except ValueError:
            hint = " (a sampling goes third)" if rate_text in SAMPLINGS else ""
            raise _fail(spec, f"has rate '{rate_text}', which is not a number{hint}") from None
        if not math.isfinite(rate):
            raise ConfigError(f"Corruption spec '{spec}' has a non-finite rate; use a fraction in [0, 1].")
    sampling = parts[2] if len(parts) > 2 else DEFAULT_SAMPLING
    if sampling not in SAMPLINGS:
        raise _fail(spec, f"has sampling '{sampling}', which is not one of {', '.join(SAMPLINGS)}")
    return CorruptionSpec(name, validate_rate(rate), sampling)


def parse_specs(specs: str | list[str]) -> list[CorruptionSpec]:
    """``"word_swap:0.015,char_swap:0.015"`` (or a list of such strings) → list of :class:`CorruptionSpec`."""
    items = specs if isinstance(specs, list) else str(specs).split(",")
    parts = [p for item in items for p in str(item).split(",")]
    if not any(p.strip() for p in parts):
        raise ConfigError(
            f"No corruption given in {specs!r}; write e.g. 'word_swap:0.015,char_swap:0.015'."
        )
    return [parse_spec(p) for p in parts if p.strip()]
