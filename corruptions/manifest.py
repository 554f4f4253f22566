"""Whole-file corruption, its manifest, and the content-keyed cache of corrupted splits.

:func:`corrupt_file` reads a clean split as bytes (decoded as UTF-8 with ``surrogateescape``, so any
byte sequence round-trips exactly), corrupts it line by line with one ``random.Random(seed)``, and
writes the result and a JSON manifest to::

    <out_dir>/<source name>.<recipe>-<sampling>-r<rate>-s<seed>-<hash12>/<source name>
    <out_dir>/<source name>.<recipe>-<sampling>-r<rate>-s<seed>-<hash12>/manifest.json

``hash12`` is the start of the sha256 of the cache key: the source's sha256, recipe, rate, seed,
replacement (``None`` for ``char_swap``), format, sampling (``textattack`` or ``exact``, see
:mod:`corruptions.word_swap`) and the format's algorithm version (:data:`ALGORITHMS`). A later call with the same key reuses the files when the manifest's key matches
and the output's sha256 equals the one recorded (``cached=True``); anything else (a missing, edited or
truncated file, a manifest from another version) is rebuilt. Every write goes to a temporary file in
the destination folder and is moved into place with ``os.replace``, the output first and the manifest
last, so a manifest exists only for a finished output: a stop (SIGTERM, Ctrl-C) or a crash at any moment
leaves no new manifest (at most an output without one, which the next call rebuilds), never a manifest
describing a partial output. The clean source is only ever read.

Manifest fields (all counts are over the whole file):

* ``complete``: always ``true`` (issue 31: every result file says whether it is complete; an unfinished
  corruption has no manifest at all). A cached manifest without it (written before the field) is rebuilt.
* ``recipe``, ``rate``, ``seed``, ``replacement``, ``format``, ``sampling``, ``algorithm``, ``key``,
  ``key_hash``;
* ``source_path``, ``source_sha256``, ``source_bytes``, ``output_file``, ``output_sha256``, ``output_bytes``;
* ``n_lines`` (``\\n``-separated lines), ``n_nonempty_lines`` (lines with a whitespace token),
  ``n_lines_with_eligible`` (lines with at least one non-stopword word), ``n_lines_swapped``;
* ``n_words`` (all words, stopwords included; for ``enwik8`` only the words inside ``<text>`` bodies,
  outside tags and entities), ``n_eligible_words``,
  ``n_swaps``, ``effective_rate`` = ``n_swaps / n_words``;
* ``n_swaps_expected``: the mean of ``n_swaps`` over seeds under the file's sampling (a sum of
  per-line expectations); ``n_lines_eligible_clean``: lines with an eligible word left unchanged (only
  ``textattack`` leaves any), ``n_lines_eligible_clean_expected`` its mean over seeds;
* ``swapped_line_fraction`` = ``n_lines_swapped / n_lines``,
  ``swapped_nonempty_line_fraction`` = ``n_lines_swapped / n_nonempty_lines``;
* ``n_tokens`` (whitespace tokens, ``line.split()``), ``n_tokens_changed``, ``token_change_rate``;
* ``unk_swaps`` (swaps of the word ``unk`` inside a ``<unk>`` token), ``unk_swap_fraction``
  (= ``unk_swaps / n_swaps``), ``n_tokens_changed_excl_unk`` and ``token_change_rate_excl_unk``
  (changed tokens whose clean text was not ``<unk>``: a changed ``<unk>`` is still out of vocabulary,
  so it maps back to ``<unk>`` and the token stream does not change there);
* ``swap_fields`` = ``["line", "word", "start", "original", "new"]`` and ``swaps``: one list per swap
  with the 0-based line index, the word's index among all words of that line, its character offset
  in the clean line, the original word and its replacement.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corruptions.recipes import FORMATS, RECIPES, Recipe, corrupt_text, get_recipe, resolve_format
from corruptions.word_swap import (
    DEFAULT_REPLACEMENT,
    DEFAULT_SAMPLING,
    ConfigError,
    validate_rate,
    validate_replacement,
    validate_sampling,
)
from corruptions.words import STOPWORDS

# corruptions/ ships in the same distribution as lm/ and uses only its leaf modules (errors, atomic
# writes); nothing else from lm/ may be imported here (tests/test_corruptions.py checks the layering).
from lm.errors import DataError
from lm.utils import atomic_write_bytes


__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "FORMATS",
    "RECIPES",
    "Recipe",
    "CorruptionResult",
    "atomic_write_bytes",
    "atomic_write_json",
    "dumps_manifest",
    "cache_key",
    "cache_paths",
    "corrupt_file",
    "corrupt_text",
    "get_recipe",
    "resolve_format",
    "sha256_bytes",
    "sha256_file",
]

# Bumped whenever the output for a given key could change; part of the cache key. Versioned per format
# so that a change to one format leaves the caches of the other valid: v2 of ``enwik8`` protects
# everything outside the <text> bodies (v1 protected only tags and entities); ``wikitext`` is unchanged,
# so its cache paths (recorded in results/) stay the same.
ALGORITHM = "corruptions-v1"
ALGORITHMS = {"wikitext": ALGORITHM, "enwik8": "corruptions-v2"}
ENCODING = "utf-8"
ERRORS = "surrogateescape"
DEFAULT_OUT_DIR = Path(".cache") / "corruptions"
SWAP_FIELDS = ["line", "word", "start", "original", "new"]


@dataclass
class CorruptionResult:
    """Where a corrupted split lies, its manifest, and whether it came from the cache."""

    path: Path
    manifest_path: Path
    manifest: dict[str, Any] = field(repr=False)
    cached: bool = False


# --------------------------------------------------------------------------------------------------
# hashing and atomic writes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dumps_manifest(obj: dict[str, Any]) -> str:
    """JSON with one top-level field per line and one swap per line (readable and diff-friendly)."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
            inner = ",\n".join("  " + json.dumps(x, ensure_ascii=True) for x in v)
            value = "[\n" + inner + "\n ]"
        else:
            value = json.dumps(v, ensure_ascii=True)
        lines.append(f" {json.dumps(k)}: {value}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def atomic_write_json(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, dumps_manifest(obj).encode("ascii"))


# --------------------------------------------------------------------------------------------------
# the cache


def cache_key(
    source_sha256: str,
    recipe: str,
    rate: float,
    seed: int,
    replacement: str | None,
    format: str,
    sampling: str = DEFAULT_SAMPLING,
) -> dict[str, Any]:
    """Everything the corrupted bytes depend on."""
    return {
        "sampling": sampling,
        "algorithm": ALGORITHMS.get(format, ALGORITHM),
        "source_sha256": source_sha256,
        "recipe": recipe,
        "rate": float(rate),
        "seed": int(seed),
        "replacement": replacement,
        "format": format,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(key, sort_keys=True).encode("utf-8"))


def cache_paths(src: str | os.PathLike[str], key: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(output file, manifest)`` for ``key`` under ``out_dir``."""
    name = Path(src).name
    folder = f"{name}.{key['recipe']}-{key['sampling']}-r{key['rate']:g}-s{key['seed']}-{_key_hash(key)[:12]}"
    d = Path(out_dir) / folder
    return d / name, d / "manifest.json"


def _load_valid_manifest(out_path: Path, manifest_path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached manifest if it matches ``key`` and the output file matches its recorded sha256."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key or manifest.get("complete") is not True:
        return None  # (a manifest from before ``complete`` existed: rebuilt, byte-identical output, same path)
    if manifest.get("output_file") != out_path.name:
        return None
    try:
        if sha256_file(out_path) != manifest.get("output_sha256"):
            return None
    except OSError:
        return None
    return manifest


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def corrupt_file(
    src: str | os.PathLike[str],
    recipe: str = "word_swap",
    rate: float = 0.015,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    replacement: str = DEFAULT_REPLACEMENT,
    format: str = "wikitext",
    stopwords: frozenset[str] | set[str] = STOPWORDS,
    sampling: str = DEFAULT_SAMPLING,
) -> CorruptionResult:
    """Corrupt the split ``src`` (or reuse the cached copy) and return where it and its manifest lie.

    Args:
        src: clean split (WikiText ``*.tokens`` / ``*.raw`` or an EnWik8-style byte file); only read.
        recipe: ``word_swap`` or ``char_swap`` (see :data:`RECIPES`).
        rate: fraction of each line's words to corrupt, in [0, 1] (the paper: 0.015; MoE runs: 0.025).
        seed: seed of the file's ``random.Random``.
        out_dir: cache root; default ``./.cache/corruptions`` under the current working directory.
        replacement: the literal for ``word_swap`` (``AAA``); ignored by ``char_swap``.
        format: ``wikitext``, ``enwik8`` (only ``<text>`` bodies corrupted, markup protected) or ``auto``
            (by file name).
        stopwords: words never corrupted; the default is NLTK's English list. A non-default list is
            not part of the cache key, so give such runs their own ``out_dir``.
        sampling: how many of a line's ``n = max(int(rate * words), 1)`` target words are corrupted:
            ``textattack`` (default, the paper's TextAttack ``fast_augment`` draw: ``n - 1`` with
            probability ``1 / (E - n + 2)`` when ``E >= n`` eligible words, else ``n``; ``E`` when
            ``E < n``) or ``exact`` (``min(n, E)``). Part of the cache key and the manifest.
    """
    spec = get_recipe(recipe)
    rate = validate_rate(rate)
    sampling = validate_sampling(sampling)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"Corruption seed {seed!r} must be an integer, e.g. 0.")
    seed = int(seed)
    src_path = Path(src)
    format = resolve_format(format, src_path)
    if spec.uses_replacement:
        replacement = validate_replacement(replacement, markup=format == "enwik8")
    if not src_path.is_file():
        raise DataError(f"Cannot corrupt '{src_path}': no such file; pass the path of a clean split.")
    data = src_path.read_bytes()
    source_sha = sha256_bytes(data)
    key = cache_key(source_sha, recipe, rate, seed, replacement if spec.uses_replacement else None, format, sampling)
    out_path, manifest_path = cache_paths(src_path, key, out_dir if out_dir is not None else DEFAULT_OUT_DIR)

    if _same_file(out_path, src_path):
        raise ConfigError(
            f"The corrupted output '{out_path}' would overwrite the clean source; choose another out_dir."
        )
    if _same_file(out_path.parent, src_path.parent):
        raise ConfigError(
            f"The corrupted output would be written next to the clean source in '{src_path.parent}'; "
            "choose another out_dir."
        )

    manifest = _load_valid_manifest(out_path, manifest_path, key)
    if manifest is not None:
        return CorruptionResult(out_path, manifest_path, manifest, cached=True)

    text = data.decode(ENCODING, ERRORS)
    new_text, stats, swaps = corrupt_text(text, recipe, rate, seed, replacement, format, stopwords, sampling)
    out_bytes = new_text.encode(ENCODING, ERRORS)
    manifest = {
        "complete": True,  # true by construction: the manifest is written only after the whole output
        "recipe": recipe,
        "rate": rate,
        "seed": seed,
        "replacement": key["replacement"],
        "format": format,
        "sampling": sampling,
        "algorithm": key["algorithm"],
        "key": key,
        "key_hash": _key_hash(key),
        "source_path": str(src_path.resolve()),
        "source_sha256": source_sha,
        "source_bytes": len(data),
        "output_file": out_path.name,
        "output_sha256": sha256_bytes(out_bytes),
        "output_bytes": len(out_bytes),
        **stats,
        "swap_fields": SWAP_FIELDS,
        "swaps": swaps,
    }
    try:
        atomic_write_bytes(out_path, out_bytes)
        atomic_write_json(manifest_path, manifest)
    except PermissionError as e:
        raise ConfigError(
            f"Cannot write the corrupted split under '{out_path.parent}' ({e.strerror}); "
            "pass a writable out_dir."
        ) from e
    # the source must be exactly what was read (a concurrent writer would make the manifest wrong)
    if sha256_file(src_path) != source_sha:
        raise DataError(f"'{src_path}' changed while it was being corrupted; run the command again.")
    return CorruptionResult(out_path, manifest_path, manifest, cached=False)
