"""Word-swap sampling: ``textattack`` (the paper's TextAttack ``fast_augment`` pool draw) vs ``exact``.

The oracle for ``textattack`` is independent of the implementation: :func:`textattack_outcomes`
enumerates TextAttack's ``Augmenter.augment`` loop as written in ``textattack/augmentation/
augmenter.py`` (a chain of single swaps, each ``random.choice`` among the texts that are not yet
finished; at the step that reaches ``n`` swaps every finished text goes into a set, then the text the
chain stood on; one text drawn uniformly from the set) and returns the exact probability of every
output line. The frequency tests check the closed form ``P(n - 1 swaps) = 1 / (E - n + 2)`` against
counts over many synthetic lines within a binomial bound.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from corruptions import corrupt_file, corrupt_text, expected_swaps, word_swap_line
from corruptions.manifest import cache_key, cache_paths

REPO = Path(__file__).resolve().parents[1]
STOP = ["the", "of", "and", "a", "in", "to", "was", "is"]  # all NLTK stopwords


def textattack_outcomes(words: list[str], eligible: set[int], n: int) -> dict[tuple[str, ...], Fraction]:
    """Exact output distribution of ``Augmenter(fast_augment=True, transformations_per_example=1)``.

    ``words`` are the line's words, ``eligible`` the indices the StopwordModification allows, ``n``
    the target. A swapped word is ``AAA``, whose replacement equals itself and so is dropped by
    ``WordSwap`` (no index is swapped twice).
    """
    out: dict[tuple[str, ...], Fraction] = Counter()

    def step(current: tuple[str, ...], swapped: frozenset[int], p: Fraction) -> None:
        candidates = [i for i in sorted(eligible) if i not in swapped]
        if not candidates:  # "if there's no more transformed texts after filter, terminate"
            out[current] += p
            return
        texts = [(current[:i] + ("AAA",) + current[i + 1 :], swapped | {i}) for i in candidates]
        if len(swapped) + 1 >= n:  # all ready: the pool is them plus the text the chain stood on
            pool = {t for t, _ in texts} | {current}
            for t in pool:
                out[t] += p / len(pool)
            return
        for t, s in texts:  # current_text = random.choice(unfinished_texts)
            step(t, s, p / len(texts))

    step(tuple(words), frozenset(), Fraction(1))
    return dict(out)


def run_lines(line: str, rate: float, n_lines: int, seed: int, sampling: str = "textattack") -> Counter:
    """Output-line frequencies of ``word_swap_line`` over ``n_lines`` copies sharing one RNG (as a file)."""
    rng = random.Random(seed)
    return Counter(word_swap_line(line, rate, rng, sampling=sampling)[0] for _ in range(n_lines))


def binomial_ok(count: int, trials: int, p: float, z: float = 5.0) -> bool:
    return abs(count - trials * p) <= z * math.sqrt(trials * p * (1 - p)) + 1e-9


def test_oracle_hand_traced():
    # " cat the dog sat " at rate 0.5: 4 words → n = 2; E = 3 (cat, dog, sat).
    # Chain: first swap uniform (1/3 each); then the pool is the two 2-swap texts plus the 1-swap text
    # the chain stood on, 1/3 each. A 2-swap pair {a, b} is reached from a or from b: 2 · 1/3 · 1/3 = 2/9;
    # each 1-swap text: 1/3 · 1/3 = 1/9. P(n - 1 = 1 swap) = 3/9 = 1/(E - n + 2) = 1/3.
    dist = textattack_outcomes(["cat", "the", "dog", "sat"], {0, 2, 3}, 2)
    assert dist == {
        ("AAA", "the", "AAA", "sat"): Fraction(2, 9),
        ("AAA", "the", "dog", "AAA"): Fraction(2, 9),
        ("cat", "the", "AAA", "AAA"): Fraction(2, 9),
        ("AAA", "the", "dog", "sat"): Fraction(1, 9),
        ("cat", "the", "AAA", "sat"): Fraction(1, 9),
        ("cat", "the", "dog", "AAA"): Fraction(1, 9),
    }
    # n = 1, E = 3: the clean line is in the pool with the three one-swap texts
    dist1 = textattack_outcomes(["cat", "the", "dog", "sat"], {0, 2, 3}, 1)
    assert dist1[("cat", "the", "dog", "sat")] == Fraction(1, 4) and len(dist1) == 4
    # E < n: the chain swaps every eligible word and stops
    assert textattack_outcomes(["cat", "the", "dog"], {0, 2}, 3) == {("AAA", "the", "AAA"): 1}


@pytest.mark.parametrize("rate, n", [(0.5, 2), (0.015, 1)])
def test_small_line_matches_the_textattack_oracle(rate, n):
    line = " cat the dog sat "
    dist = textattack_outcomes(["cat", "the", "dog", "sat"], {0, 2, 3}, n)
    expected = {" " + " ".join(k) + " ": float(p) for k, p in dist.items()}
    trials = 6000
    counts = run_lines(line, rate, trials, seed=123)
    assert set(counts) == set(expected)  # no output TextAttack could not produce, none missing
    for out, p in expected.items():
        assert binomial_ok(counts[out], trials, p), (out, counts[out], trials * p)
    # the exact sampling never leaves a swap out
    exact = run_lines(line, rate, 2000, seed=123, sampling="exact")
    assert all(o.split().count("AAA") == n for o in exact)
    # E < n (rate 1: n = 4, E = 3) swaps every eligible word under both samplings
    for sampling in ("textattack", "exact"):
        assert run_lines(line, 1.0, 50, seed=1, sampling=sampling) == Counter({" AAA the AAA AAA ": 50})


def _line(n_eligible: int, n_words: int) -> str:
    words = [f"w{i}" for i in range(n_eligible)] + [STOP[i % len(STOP)] for i in range(n_words - n_eligible)]
    random.Random(n_words * 31 + n_eligible).shuffle(words)
    return " " + " ".join(words) + " "


@pytest.mark.parametrize(
    "n_eligible, n_words, n",
    [(1, 10, 1), (2, 30, 1), (5, 60, 1), (12, 66, 1),  # int(0.015 · words) = 0 → n = 1
     (2, 140, 2), (3, 140, 2), (7, 150, 2), (40, 199, 2)],  # int(0.015 · words) = 2
)
def test_short_line_frequency_is_one_over_e_minus_n_plus_2(n_eligible, n_words, n):
    line = _line(n_eligible, n_words)
    assert max(int(0.015 * n_words), 1) == n
    trials = 3000
    counts = run_lines(line, 0.015, trials, seed=n_eligible * 1000 + n_words)
    by_swaps = Counter()
    hits = Counter()
    for out, c in counts.items():
        toks = out.split()
        by_swaps[toks.count("AAA")] += c
        for i, t in enumerate(toks):
            hits[i] += c * (t == "AAA")
    assert set(by_swaps) <= {n - 1, n}
    p = 1 / (n_eligible - n + 2)
    assert binomial_ok(by_swaps[n - 1], trials, p), (by_swaps, trials * p)
    # which words: uniform among the eligible ones (stopwords never), as the chain's uniform choices give
    clean = line.split()
    per_word = (n - p) / n_eligible
    for i, t in enumerate(clean):
        if t in STOP:
            assert hits[i] == 0
        else:
            assert binomial_ok(hits[i], trials, per_word), (t, hits[i], trials * per_word)
    assert expected_swaps(n_words, n_eligible, 0.015, "textattack") == pytest.approx(n - p)
    assert expected_swaps(n_words, n_eligible, 0.015, "exact") == n


def test_fewer_eligible_than_target_gives_e_swaps():
    line = _line(1, 140)  # n = 2, E = 1
    counts = run_lines(line, 0.015, 500, seed=5)
    assert all(out.split().count("AAA") == 1 for out in counts)
    assert expected_swaps(140, 1, 0.015, "textattack") == 1.0


def reference_exact(text: str, rate: float, seed: int) -> str:
    """The pre-option algorithm, transcribed: one ``rng.sample(eligible, min(n, E))`` per line."""
    stop = frozenset(w for w in (REPO / "corruptions" / "stopwords.txt").read_text().split("\n") if w)
    rng = random.Random(seed)
    out = []
    for line in text.split("\n"):
        words = [(m.start(), m.group()) for m in re.finditer(r"[^\W_][\w'*@-]*", line)]
        elig = [w for w in words if w[1] not in stop and w[1] != "AAA"]
        if elig:
            for start, w in sorted(rng.sample(elig, min(max(int(rate * len(words)), 1), len(elig))), reverse=True):
                line = line[:start] + "AAA" + line[start + len(w) :]
        out.append(line)
    return "\n".join(out)


def _text(seed: int, n_lines: int = 300) -> str:
    rng = random.Random(seed)
    vocab = ["cat", "Dog", "river", "Paris", "<unk>", "U.S.", "1990", "@-@", ",", "."] + STOP
    lines = [" " if rng.random() < 0.3 else " " + " ".join(rng.choices(vocab, k=rng.randint(1, 200))) + " "
             for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def test_exact_writes_the_same_bytes_as_before_and_textattack_differs():
    text = _text(7)
    new_exact, stats_exact, _ = corrupt_text(text, rate=0.025, seed=4, sampling="exact")
    assert new_exact == reference_exact(text, 0.025, 4)
    new_ta, stats_ta, _ = corrupt_text(text, rate=0.025, seed=4, sampling="textattack")
    assert new_ta != new_exact and stats_ta["n_swaps"] < stats_exact["n_swaps"]
    assert stats_exact["n_swaps"] == stats_exact["n_swaps_expected"]
    assert stats_exact["n_lines_eligible_clean"] == 0 == stats_exact["n_lines_eligible_clean_expected"]
    assert stats_ta["n_lines_eligible_clean"] > 0
    assert stats_ta["n_lines_with_eligible"] - stats_ta["n_lines_swapped"] == stats_ta["n_lines_eligible_clean"]


def test_same_seed_same_bytes_and_samplings_are_cached_apart(tmp_path):
    src = tmp_path / "data" / "wiki.test.tokens"
    src.parent.mkdir()
    src.write_text(_text(3), encoding="utf-8")
    a = corrupt_file(src, seed=9, out_dir=tmp_path / "a")
    b = corrupt_file(src, seed=9, out_dir=tmp_path / "b", sampling="textattack")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.manifest_path.read_bytes() == b.manifest_path.read_bytes()
    assert corrupt_file(src, seed=10, out_dir=tmp_path / "a").path.read_bytes() != a.path.read_bytes()

    e = corrupt_file(src, seed=9, out_dir=tmp_path / "a", sampling="exact")
    assert not e.cached and e.path.parent != a.path.parent
    assert e.path.read_bytes() != a.path.read_bytes()
    assert (a.manifest["sampling"], e.manifest["sampling"]) == ("textattack", "exact")
    assert (a.manifest["key"]["sampling"], e.manifest["key"]["sampling"]) == ("textattack", "exact")
    assert "word_swap-textattack-" in a.path.parent.name and "word_swap-exact-" in e.path.parent.name
    # each is served from its own cache entry
    assert corrupt_file(src, seed=9, out_dir=tmp_path / "a").cached
    assert corrupt_file(src, seed=9, out_dir=tmp_path / "a", sampling="exact").cached
    # a manifest written under one sampling is never taken for the other
    key_t = cache_key("0" * 64, "word_swap", 0.015, 0, "AAA", "wikitext", "textattack")
    key_e = cache_key("0" * 64, "word_swap", 0.015, 0, "AAA", "wikitext", "exact")
    assert key_t != key_e and cache_paths("x", key_t, "o") != cache_paths("x", key_e, "o")
    assert json.loads(a.manifest_path.read_text())["n_swaps"] == a.manifest["n_swaps"]


def test_bad_sampling_is_a_config_error(tmp_path):
    from lm.errors import ConfigError

    src = tmp_path / "wiki.test.tokens"
    src.write_text(" cat \n")
    with pytest.raises(ConfigError, match="'textattack'.*'exact'"):
        corrupt_file(src, out_dir=tmp_path / "o", sampling="paper")
    with pytest.raises(ConfigError, match="'textattack'.*'exact'"):
        word_swap_line(" cat ", 0.5, random.Random(0), sampling="Exact")
    assert not (tmp_path / "o").exists()


def test_layering_and_file_sizes():
    """corruptions/ takes only lm.errors and lm.utils (atomic writes) from lm, and stays under ~400 lines."""
    pattern = re.compile(r"^\s*(?:from|import)\s+(lm(?:\.\w+)*)", re.MULTILINE)
    for path in sorted((REPO / "corruptions").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert set(pattern.findall(text)) <= {"lm.errors", "lm.utils"}, path.name
        assert len(text.splitlines()) <= 400, path.name
