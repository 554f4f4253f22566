"""Command-line entry point for making contaminated splits (wired to ``lm corrupt``).

``corrupt`` is written for jsonargparse: plain type hints, defaults, and an ``Args:`` docstring.
:func:`corrupt_cli` is ``lm corrupt``: the clean split(s) positionally (``lm corrupt wiki.test.tokens
--rate 0.015``) or with ``--src`` (a path or a list ``[a, b]``), every other argument as ``--name``.
Spec strings such as ``word_swap:0.015,char_swap:0.025:exact`` (for evaluation configs) are parsed
by :mod:`corruptions.spec`, which ``lm evaluate`` imports without this command line.
"""

from __future__ import annotations

from typing import Any

from corruptions.manifest import corrupt_file
from corruptions.recipes import RECIPES, get_recipe, resolve_format
from corruptions.spec import DEFAULT_RATE
from corruptions.word_swap import DEFAULT_SAMPLING, ConfigError, validate_rate, validate_sampling
from lm.utils import check_writable_dir

__all__ = ["RECIPES", "DEFAULT_RATE", "corrupt", "corrupt_cli"]


def corrupt(
    src: str | list[str],
    recipe: str = "word_swap",
    rate: float = 0.015,
    seed: int = 0,
    replacement: str = "AAA",
    out_dir: str = ".cache/corruptions",
    format: str = "auto",
    sampling: str = DEFAULT_SAMPLING,
) -> list[dict[str, Any]]:
    """Write word-swap (or char-swap) contaminated copies of clean splits, with manifests.

    Each line targets n = max(int(rate * words_in_line), 1) non-stopword words (none if it has no
    eligible word); the sampling decides how many it gets. Results are cached under out_dir by
    content, recipe, rate, seed, replacement and sampling.

    Args:
        src: clean split file(s) to corrupt, e.g. data/wikitext-103/wiki.test.tokens.
        recipe: word_swap (replace words by the replacement literal) or char_swap (one random
            character edit per chosen word).
        rate: fraction of each line's words to corrupt, in [0, 1]; the paper used 0.015 (0.025 for MoE).
        seed: random seed; the same seed gives byte-identical output and manifest.
        replacement: literal that replaces each chosen word in word_swap.
        out_dir: cache directory for the corrupted splits and manifests.
        format: wikitext, enwik8 (only the <text> bodies are corrupted; markup and page metadata are
            left untouched) or auto (enwik8 if the file name starts with enwik8).
        sampling: textattack (the paper's TextAttack fast_augment draw: with E >= n eligible words a
            line gets n - 1 swaps with probability 1/(E - n + 2), else n; E swaps when E < n) or
            exact (exactly min(n, E) swaps per line).

    Returns:
        One manifest per file (without the per-swap list), each with "path", "manifest_path" and "cached".
    """
    get_recipe(recipe)
    validate_rate(rate)
    validate_sampling(sampling)
    sources = [src] if isinstance(src, str) else list(src)
    if not sources:
        raise ConfigError("No source file given; pass at least one clean split, e.g. wiki.test.tokens.")
    for path in sources:  # all sources checked before the first is corrupted
        _check_source(path, resolve_format(format, path))
    check_writable_dir(out_dir, "--out_dir", ".cache/corruptions (the default)")  # before any work
    summaries = []
    for path in sources:
        result = corrupt_file(
            path,
            recipe=recipe,
            rate=rate,
            seed=seed,
            out_dir=out_dir,
            replacement=replacement,
            format=resolve_format(format, path),
            sampling=sampling,
        )
        m = result.manifest
        print(
            f"{result.path}: {m['n_swaps']} swaps / {m['n_words']} words ({m['sampling']} sampling), "
            f"effective rate {m['effective_rate']:.4f}, swapped lines {m['swapped_line_fraction']:.4f}, "
            f"token change rate {m['token_change_rate']:.4f} "
            f"(<unk> swaps {m['unk_swap_fraction']:.3f})"
            + (" [cached]" if result.cached else "")
        )
        summary = {k: v for k, v in m.items() if k != "swaps"}
        summary.update(path=str(result.path), manifest_path=str(result.manifest_path), cached=result.cached)
        summaries.append(summary)
    return summaries


def _check_source(path: str, fmt: str) -> None:
    """An empty file has nothing to corrupt, and a word-level split must be UTF-8 text: both used to be
    "corrupted" into a manifest of 0 swaps, or of swaps between byte garbage, with exit code 0."""
    from pathlib import Path

    from lm.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file. Pass a clean split, e.g. "
                        f"../shared/data/wikitext-2/wiki.test.tokens.")
    data = p.read_bytes() if fmt == "wikitext" else b"x" * min(1, p.stat().st_size)  # (enwik8: 100 MB, not read)
    if not data.strip():
        raise DataError(f"{path} is empty: there is nothing to corrupt. Pass a clean split with text in it.")
    if fmt == "wikitext":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:  # a binary file: name the first undecodable byte
            raise DataError(f"{path} is not valid UTF-8: byte offset {e.start} (0x{data[e.start]:02x}) cannot be "
                            f"decoded. A word-level split must be UTF-8 text: re-extract it, or convert it with "
                            f"e.g. `iconv -f <encoding> -t utf-8`.") from None


def corrupt_cli(argv: list[str] | None = None, resolve_corpus=None) -> list[dict[str, Any]]:
    """``lm corrupt [SRC ...] [--src SRC] [--recipe ...] [--rate ...] [--seed ...] ...``.

    The sources given positionally and with ``--src`` are corrupted in that order. Parse errors (an
    unknown option, a rate that is not a number) exit through jsonargparse with code 2; bad values (a
    missing file, a rate outside [0, 1], no source at all) raise a ``ConfigError``/``DataError``, which
    ``lm`` prints as one paragraph with exit code 2.
    """
    import inspect
    import sys

    from jsonargparse import ActionConfigFile, ArgumentParser

    # allow_abbrev=False: a misspelt option (--rat) is an error, never silently another option (--rate).
    parser = ArgumentParser(prog="lm corrupt", description=(corrupt.__doc__ or "").split("\n")[0], allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the arguments below.")
    parser.add_argument("paths", nargs="*", default=[], metavar="SRC",
                        help="clean split file(s) to corrupt, e.g. data/wikitext-103/wiki.test.tokens.")
    parser.add_argument("--src", type=str | list[str] | None, default=None,
                        help="the clean split file(s), as an option instead of positionally (a path or [a, b]).")
    parser.add_function_arguments(corrupt, skip={"src"}, as_positional=False)
    # The same data options as lm fit/evaluate: name a corpus split instead of a file (found locally,
    # else downloaded once into the data root).
    parser.add_argument("--corpus", type=str | None, default=None,
                        help="corrupt this corpus's split instead of a file: wikitext-2, wikitext-103 or enwik8.")
    parser.add_argument("--split", type=str, default="test", help="with --corpus: test or valid.")
    parser.add_argument("--root", type=str | None, default=None, help="with --corpus: data root (data.root).")
    parser.add_argument("--source", type=str, default="auto", help="with --corpus: auto, local or download.")
    parser.add_argument("--base_url", type=str | None, default=None, help="with --corpus: EnWik8 download URL.")
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    extra = cfg.src if isinstance(cfg.src, list) else [cfg.src] if cfg.src is not None else []
    sources = [str(s) for s in [*(cfg.paths or []), *extra]]
    if cfg.corpus is not None:
        if resolve_corpus is None:  # the corruptions package does not know where corpora live; `lm` does
            raise ConfigError("--corpus needs the `lm corrupt` command, which finds the split like `lm fit` does; "
                              "here pass the split's file instead.")
        sources.append(str(resolve_corpus(cfg.corpus, cfg.split, cfg.root, cfg.source, cfg.base_url)))
    if not sources:
        raise ConfigError("No source file given; pass the clean split to corrupt, e.g. "
                          "`lm corrupt data/wikitext-103/wiki.test.tokens --rate 0.015` (or --src <file>, "
                          "or --corpus wikitext-103 --split test).")
    kwargs = {name: cfg[name] for name in inspect.signature(corrupt).parameters if name != "src"}
    return corrupt(sources, **kwargs)


if __name__ == "__main__":  # pragma: no cover
    corrupt_cli()
