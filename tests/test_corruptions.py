"""Tests for corruptions/: word definition, per-line count formula, determinism, XML safety, cache.

Expectations are computed independently here (a plain character-loop word splitter, the stopword file
read directly, the count formula written out), never copied from the implementation's output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import string
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from corruptions import (  # noqa: E402
    RECIPES,
    ConfigError,
    char_swap_line,
    corrupt,
    corrupt_file,
    find_words,
    markup_spans,
    n_swaps_for_line,
    parse_spec,
    parse_specs,
    word_swap_line,
    words_from_text,
)
from corruptions.words import WORD_RE  # noqa: E402

# --------------------------------------------------------------------------------------------------
# independent references

STOPWORD_FILE = REPO / "corruptions" / "stopwords.txt"
REF_STOPWORDS = frozenset(w for w in STOPWORD_FILE.read_text(encoding="utf-8").split("\n") if w)


def ref_words(s: str) -> list[tuple[str, int]]:
    """TextAttack's words_from_text as a character loop, also returning each word's start."""
    out = []
    word, start = "", 0
    for i, c in enumerate(s):
        if c.isalnum():
            if not word:
                start = i
            word += c
        elif c in "'-_*@" and word:
            word += c
        elif word:
            out.append((word, start))
            word = ""
    if word:
        out.append((word, start))
    return out


def ref_count(n_words: int, n_eligible: int, rate: float) -> int:
    if n_eligible == 0:
        return 0
    return min(max(int(rate * n_words), 1), n_eligible)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_wikitext(rng: random.Random, n_lines: int = 300) -> str:
    """WikiText-like lines: headings, empty lines, paragraphs with <unk>, @-@, U.S., punctuation."""
    vocab = ["cat", "Dog", "the", "The", "of", "and", "run", "U.S.", "<unk>", "@-@", "@,@", ",", ".",
             "1990", "don't", "a", "is", "river", "Paris", "it's", "(", ")", "=", "e-mail", "x_y",
             "café", "naïve", "km²", "won't", "AAA", "I", "s"]
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.3:
            lines.append(" ")
        elif kind < 0.4:
            lines.append(" = " + " ".join(rng.choices(vocab, k=rng.randint(1, 4))) + " = ")
        elif kind < 0.45:
            lines.append(" " + " ".join(rng.choices(["the", "of", "a", "@-@", ",", "is"], k=rng.randint(1, 9))) + " ")
        else:
            lines.append(" " + " ".join(rng.choices(vocab, k=rng.randint(1, 250))) + " ")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# words


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<unk>", ["unk"]),
        ("don't", ["don't"]),
        ("U.S.", ["U", "S"]),
        ("@-@", []),
        ("@,@", []),
        (" , . ; ( ) \" ", []),
        ("a_b", ["a_b"]),
        ("-abc", ["abc"]),
        ("_ab", ["ab"]),  # an underscore cannot begin a word (str.isalnum('_') is False)
        ("rock 'n' roll", ["rock", "n'", "roll"]),
        ("e-mail- x*y@z", ["e-mail-", "x*y@z"]),
        ("1990s km² café", ["1990s", "km²", "café"]),
        (" = Robert <unk> = ", ["Robert", "unk"]),
    ],
)
def test_words_handmade(text, expected):
    assert words_from_text(text) == expected
    words = find_words(text)
    assert [w.text for w in words] == expected
    for i, w in enumerate(words):
        assert w.index == i and text[w.start : w.end] == w.text


def test_word_regex_equals_character_loop():
    # single characters over the BMP and beyond: word start ⇔ isalnum
    for cp in range(0, 0x30000, 7):
        c = chr(cp)
        assert (WORD_RE.fullmatch(c) is not None) == c.isalnum(), hex(cp)
    rng = random.Random(1)
    alphabet = "ab Z9_-'*@.,<>é²\t\u00a0×`"
    for _ in range(3000):
        s = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        assert [(w.text, w.start) for w in find_words(s)] == ref_words(s), repr(s)


def test_stopword_list():
    assert len(REF_STOPWORDS) == 179
    assert all(w == w.lower() for w in REF_STOPWORDS)
    assert {"the", "a", "don't", "wouldn't", "s", "t", "ma"} <= REF_STOPWORDS
    from corruptions import STOPWORDS

    assert STOPWORDS == REF_STOPWORDS


# --------------------------------------------------------------------------------------------------
# per-line recipe


def test_count_formula_handmade_lines():
    rng = random.Random(0)
    line200 = " " + " ".join(f"w{i}" for i in range(200)) + " "
    new, swaps = word_swap_line(line200, 0.015, rng, sampling="exact")
    assert len(swaps) == 3 == n_swaps_for_line(200, 200, 0.015)
    assert new.split().count("AAA") == 3

    line10 = " " + " ".join(f"w{i}" for i in range(10)) + " "
    assert len(word_swap_line(line10, 0.015, rng, sampling="exact")[1]) == 1

    only_stop = " the of and a , is it @-@ . "
    state = rng.getstate()
    assert word_swap_line(only_stop, 0.015, rng, sampling="exact") == (only_stop, [])
    assert rng.getstate() == state  # lines without an eligible word do not consume randomness

    assert word_swap_line(" @-@ @,@ . , ", 0.5, rng, sampling="exact") == (" @-@ @,@ . , ", [])

    # the count uses all words (stopwords included) but is capped by the eligible ones
    mixed = " " + " ".join(["the"] * 98 + ["cat", "dog"]) + " "
    new, swaps = word_swap_line(mixed, 0.5, rng, sampling="exact")
    assert len(swaps) == 2 and {s.original for s in swaps} == {"cat", "dog"}
    assert new.split() == ["the"] * 98 + ["AAA", "AAA"]
    # a word that already equals the replacement is not eligible (a no-op swap, as in TextAttack)
    new, swaps = word_swap_line(" AAA cat AAA ", 1.0, rng, sampling="exact")
    assert new == " AAA AAA AAA " and [s.original for s in swaps] == ["cat"]
    assert word_swap_line(" AAA ", 0.5, rng, sampling="exact") == (" AAA ", [])
    assert char_swap_line(" AAA ", 0.5, rng, sampling="exact")[0] != " AAA "
    # 100 words at 0.015 → int(1.5) = 1, 300 words → 4
    assert n_swaps_for_line(100, 50, 0.015) == 1
    assert n_swaps_for_line(300, 50, 0.015) == 4
    assert n_swaps_for_line(7, 0, 0.015) == 0


def test_stopwords_are_exact_match():
    rng = random.Random(0)
    new, swaps = word_swap_line(" The the THE ", 1.0, rng, sampling="exact")
    assert new == " AAA the AAA "
    assert [s.original for s in swaps] == ["The", "THE"]


def test_unk_and_dotted_tokens_keep_their_shape():
    new, swaps = word_swap_line(" <unk> ", 0.015, random.Random(0), sampling="exact")
    assert new == " <AAA> " and swaps[0].original == "unk" and swaps[0].start == 2
    seen = set()
    for seed in range(20):
        new, swaps = word_swap_line(" U.S. ", 0.5, random.Random(seed), sampling="exact")
        assert len(swaps) == 1
        seen.add(new)
    assert seen == {" AAA.S. ", " U.AAA. "}


def test_swap_records_and_invariants_on_generated_text():
    text = make_wikitext(random.Random(3))
    rng = random.Random(5)
    for line in text.split("\n"):
        words = ref_words(line)
        eligible = [w for w, _ in words if w not in REF_STOPWORDS and w != "AAA"]
        new, swaps = word_swap_line(line, 0.015, rng, sampling="exact")
        # count formula, no stopword, positions in the clean line
        assert len(swaps) == ref_count(len(words), len(eligible), 0.015)
        assert len({s.word_index for s in swaps}) == len(swaps)
        for s in swaps:
            assert s.original not in REF_STOPWORDS
            assert words[s.word_index] == (s.original, s.start)
        # rebuild the corrupted line from the clean one and the records
        expected = line
        for s in sorted(swaps, key=lambda s: -s.start):
            expected = expected[: s.start] + "AAA" + expected[s.start + len(s.original) :]
        assert new == expected
        # whitespace tokens: same count; unchanged wherever no swap falls
        old_t, new_t = line.split(), new.split()
        assert len(old_t) == len(new_t)
        hit = {_token_index(line, s.start) for s in swaps}
        for i, (a, b) in enumerate(zip(old_t, new_t, strict=True)):
            if i not in hit:
                assert a == b


def _token_index(line: str, pos: int) -> int:
    return len(line[:pos].split()) - (0 if pos == 0 or line[pos - 1].isspace() else 1)


def test_replacement_is_configurable():
    new, swaps = word_swap_line(" cat ", 0.015, random.Random(0), replacement="ZZZ")
    assert new == " ZZZ " and swaps[0].new == "ZZZ"


def _edit_kind(a: str, b: str) -> str | None:
    if len(b) == len(a) - 1 and any(a[:i] + a[i + 1 :] == b for i in range(len(a))):
        return "delete"
    if len(b) == len(a) + 1 and any(b[:i] + b[i + 1 :] == a and b[i] in string.ascii_lowercase for i in range(len(b))):
        return "insert"
    if len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1:
        return "substitute"
    return None


def test_char_swap_edits_one_character_inside_the_word():
    text = make_wikitext(random.Random(4))
    rng = random.Random(9)
    kinds = set()
    for line in text.split("\n"):
        words = ref_words(line)
        eligible = [w for w, _ in words if w not in REF_STOPWORDS]
        new, swaps = char_swap_line(line, 0.05, rng, sampling="exact")
        assert len(swaps) == ref_count(len(words), len(eligible), 0.05)
        expected = line
        for s in sorted(swaps, key=lambda s: -s.start):
            assert words[s.word_index] == (s.original, s.start)
            kind = _edit_kind(s.original, s.new)
            assert kind is not None, (s.original, s.new)
            kinds.add(kind)
            expected = expected[: s.start] + s.new + expected[s.start + len(s.original) :]
        assert new == expected
        assert len(new.split()) == len(line.split())
    assert kinds == {"delete", "insert", "substitute"}
    assert char_swap_line(" a ", 1.0, random.Random(0), sampling="exact")[0].strip() != ""  # never deletes a 1-char word


@pytest.mark.parametrize("bad", [-0.01, 1.5, float("nan"), float("inf"), "0.1", True, None])
def test_rate_outside_range_raises(bad, tmp_path):
    with pytest.raises(ValueError) as e:
        word_swap_line(" cat ", bad, random.Random(0))
    assert isinstance(e.value, ConfigError)
    msg = str(e.value)
    assert repr(bad) in msg or str(bad) in msg
    src = tmp_path / "wiki.test.tokens"
    src.write_text(" cat \n")
    with pytest.raises(ConfigError, match=r"\[0, 1\]|not a number"):
        corrupt_file(src, rate=bad, out_dir=tmp_path / "out")


def test_rate_zero_is_identity_and_rate_one_swaps_every_eligible_word():
    line = " The cat sat on the <unk> mat . "
    assert word_swap_line(line, 0.0, random.Random(0)) == (line, [])
    new, swaps = word_swap_line(line, 1.0, random.Random(0), sampling="exact")
    assert new == " AAA AAA AAA on the <AAA> AAA . " and len(swaps) == 5


# --------------------------------------------------------------------------------------------------
# files: determinism, cache, safety


@pytest.fixture
def wt_src(tmp_path):
    src_dir = tmp_path / "data"
    src_dir.mkdir()
    src = src_dir / "wiki.valid.tokens"
    src.write_text(make_wikitext(random.Random(11), 400), encoding="utf-8")
    return src


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_same_seed_same_output_and_manifest(wt_src, tmp_path, recipe):
    a = corrupt_file(wt_src, recipe, 0.015, seed=3, out_dir=tmp_path / "a")
    b = corrupt_file(wt_src, recipe, 0.015, seed=3, out_dir=tmp_path / "b")
    c = corrupt_file(wt_src, recipe, 0.015, seed=4, out_dir=tmp_path / "a")
    assert not a.cached and not b.cached
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.manifest_path.read_bytes() == b.manifest_path.read_bytes()
    assert c.path.read_bytes() != a.path.read_bytes()
    assert c.path.parent != a.path.parent
    m = json.loads(a.manifest_path.read_text())
    assert m == a.manifest
    assert m["recipe"] == recipe and m["seed"] == 3 and m["rate"] == 0.015
    assert m["source_sha256"] == sha(wt_src) and m["output_sha256"] == sha(a.path)
    assert m["replacement"] == ("AAA" if recipe == "word_swap" else None)


def test_manifest_counts_match_independent_recount(wt_src, tmp_path):
    res = corrupt_file(wt_src, "word_swap", 0.025, seed=0, out_dir=tmp_path / "o", sampling="exact")
    m = res.manifest
    clean = wt_src.read_text(encoding="utf-8").split("\n")[:-1]
    dirty = res.path.read_text(encoding="utf-8").split("\n")[:-1]
    n_words = n_swaps = n_eligible = lines_eligible = changed = tokens = 0
    for c, d in zip(clean, dirty, strict=True):
        words = ref_words(c)
        elig = [w for w, _ in words if w not in REF_STOPWORDS and w != "AAA"]
        n_words += len(words)
        n_eligible += len(elig)
        lines_eligible += bool(elig)
        n_swaps += ref_count(len(words), len(elig), 0.025)
        ct, dt = c.split(), d.split()
        assert len(ct) == len(dt)
        tokens += len(ct)
        changed += sum(x != y for x, y in zip(ct, dt, strict=True))
    assert (m["n_lines"], m["n_words"], m["n_eligible_words"]) == (len(clean), n_words, n_eligible)
    assert m["n_swaps"] == n_swaps == len(m["swaps"])
    assert m["n_lines_with_eligible"] == m["n_lines_swapped"] == lines_eligible
    assert m["effective_rate"] == pytest.approx(n_swaps / n_words)
    assert m["swapped_line_fraction"] == pytest.approx(lines_eligible / len(clean))
    assert (m["n_tokens"], m["n_tokens_changed"]) == (tokens, changed)
    assert m["token_change_rate"] == pytest.approx(changed / tokens)
    # every recorded swap points at a non-stopword word of the clean line
    fields = m["swap_fields"]
    for rec in m["swaps"]:
        r = dict(zip(fields, rec, strict=True))
        line = clean[r["line"]]
        assert ref_words(line)[r["word"]] == (r["original"], r["start"])
        assert r["original"] not in REF_STOPWORDS


def test_cache_reuse_tamper_and_source_untouched(wt_src, tmp_path):
    before = (sha(wt_src), wt_src.stat().st_mtime_ns)
    out = tmp_path / "cache"
    first = corrupt_file(wt_src, out_dir=out)
    second = corrupt_file(wt_src, out_dir=out)
    assert not first.cached and second.cached
    assert second.path == first.path and second.manifest == first.manifest
    good = first.path.read_bytes()

    first.path.write_bytes(good[:-10] + b"tampered\n")
    third = corrupt_file(wt_src, out_dir=out)
    assert not third.cached and third.path.read_bytes() == good

    third.manifest_path.write_text("{not json")
    fourth = corrupt_file(wt_src, out_dir=out)
    assert not fourth.cached and json.loads(fourth.manifest_path.read_text())["output_sha256"] == sha(fourth.path)

    first.path.unlink()
    assert not corrupt_file(wt_src, out_dir=out).cached
    assert corrupt_file(wt_src, out_dir=out).cached

    # a different replacement or rate is a different cache entry
    assert corrupt_file(wt_src, out_dir=out, replacement="ZZZ").path.parent != first.path.parent
    assert corrupt_file(wt_src, out_dir=out, rate=0.02).path.parent != first.path.parent

    assert (sha(wt_src), wt_src.stat().st_mtime_ns) == before
    assert sorted(p.name for p in wt_src.parent.iterdir()) == [wt_src.name]  # nothing written next to it
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_default_out_dir_is_cwd_cache(wt_src, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    res = corrupt_file(wt_src)
    assert res.path.resolve().is_relative_to((work / ".cache" / "corruptions").resolve())
    assert res.path.name == wt_src.name
    assert re.fullmatch(r"wiki\.valid\.tokens\.word_swap-textattack-r0\.015-s0-[0-9a-f]{12}", res.path.parent.name)


def test_missing_source_and_bad_recipe(tmp_path):
    from lm.errors import LMError

    with pytest.raises(LMError, match="no such file"):
        corrupt_file(tmp_path / "nope.tokens", out_dir=tmp_path)
    src = tmp_path / "x.tokens"
    src.write_text(" cat \n")
    with pytest.raises(ConfigError, match="Did you mean 'word_swap'"):
        corrupt_file(src, recipe="word_swp", out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="whitespace"):
        corrupt_file(src, replacement="A A", out_dir=tmp_path / "o")


# --------------------------------------------------------------------------------------------------
# EnWik8-style XML bytes

TAG_RE = re.compile(rb"<[^<>]*>")
ENTITY_RE = re.compile(rb"&(?:[A-Za-z][A-Za-z0-9._-]*|#[0-9]+|#[xX][0-9A-Fa-f]+);")


def make_enwik8(rng: random.Random, n_pages: int = 30) -> bytes:
    words = ["Anarchism", "political", "the", "of", "philosophy", "state", "café", "Zürich", "and",
             "1990", "self-governed", "[[link]]", "{{cite}}", "'''bold'''", "==History==", "it's"]
    out = [b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/" version="0.3"\n'
           b'  xml:lang="en">\n  <siteinfo>\n    <sitename>Wikipedia</sitename>\n  </siteinfo>\n']
    for p in range(n_pages):
        body = []
        for _ in range(rng.randint(1, 6)):
            line = " ".join(rng.choices(words, k=rng.randint(1, 60)))
            line += " &lt;ref name=&quot;a&quot;&gt;x&lt;/ref&gt; AT&amp;T &#160; &#x2014;"
            body.append(line.encode("utf-8"))
        body.append(b"raw bytes \xff\xfe here \xc3( and \xe2\x82 end word\x80s")
        out.append(
            b"  <page>\n    <title>Page " + str(p).encode() + b" Title</title>\n    <id>" + str(100 + p).encode()
            + b'</id>\n    <revision>\n      <id>' + str(9000 + p).encode() + b"</id>\n"
            + b'      <text xml:space="preserve">' + b"\n".join(body) + b"</text>\n    </revision>\n  </page>\n"
        )
    return b"".join(out)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_enwik8_markup_is_byte_identical(tmp_path, recipe):
    data = make_enwik8(random.Random(2))
    src = tmp_path / "src" / "enwik8"
    src.parent.mkdir()
    src.write_bytes(data)
    res = corrupt_file(src, recipe, 0.3, seed=1, out_dir=tmp_path / "o", format="enwik8")
    out = res.path.read_bytes()
    assert out != data and res.manifest["n_swaps"] > 100
    assert TAG_RE.findall(out) == TAG_RE.findall(data)  # every tag, name and attribute unchanged
    assert ENTITY_RE.findall(out) == ENTITY_RE.findall(data)
    for raw in (b"\xff\xfe", b"\xc3(", b"\xe2\x82 ", b"\x80s<"):
        assert out.count(raw) == data.count(raw)
    # everything outside the <text> bodies (titles, ids, the header) is byte-identical
    strip = re.compile(rb"<text[^<>]*>.*?</text>", re.DOTALL)
    assert strip.sub(b"", out) == strip.sub(b"", data) and b"<title>Page 7 Title</title>" in out
    # no word was taken from inside markup
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    for rec in res.manifest["swaps"]:
        li, start, original = rec[0], rec[2], rec[3]
        line = lines[li]
        assert line[start : start + len(original)] == original
        for m in re.finditer(r"<[^<>]*>|&(?:[A-Za-z]+|#[0-9]+|#x[0-9A-Fa-f]+);", line):
            assert start + len(original) <= m.start() or start >= m.end()
    assert res.manifest["format"] == "enwik8"


def test_enwik8_round_trip_and_cut_tags(tmp_path):
    # no <text> element at all: nothing is a body, so nothing is corrupted (not even at rate 1)
    data = b"ge>\n  <title>Cut start</title>\nsome text \xff words here <tit"
    src = tmp_path / "enwik8.test"
    src.write_bytes(data)
    zero = corrupt_file(src, rate=0.0, out_dir=tmp_path / "o", format="auto")
    assert zero.manifest["format"] == "enwik8"
    assert zero.path.read_bytes() == data  # arbitrary bytes round-trip exactly
    full = corrupt_file(src, rate=1.0, out_dir=tmp_path / "o", format="auto", sampling="exact")
    assert full.path.read_bytes() == data
    assert full.manifest["n_words"] == 0 and full.manifest["n_swaps"] == 0
    # cut inside the opening <text ...> tag and again inside a tag of an unclosed body: the tag tail
    # is markup, the body before "</text>" and the one open at the end are corrupted ("here" and
    # "more" are stopwords), the title between them is not
    data = (b've">cut body \xff words here</text>\n  <title>Cut start</title>\n'
            b'  <text xml:space="preserve">more words \xff open body <tit')
    src2 = tmp_path / "enwik8.cut"
    src2.write_bytes(data)
    full = corrupt_file(src2, rate=1.0, out_dir=tmp_path / "o", format="auto", sampling="exact")
    assert full.path.read_bytes() == (
        b've">AAA AAA \xff AAA here</text>\n  <title>Cut start</title>\n'
        b'  <text xml:space="preserve">more AAA \xff AAA AAA <tit'
    )
    assert full.manifest["n_words"] == 8 and full.manifest["n_swaps"] == 6
    spans = markup_spans("a <b\nc> d &amp; e")
    assert spans == [(2, 7), (10, 15)]


ENWIK8_PAGES = (
    "  <page>\n"
    "    <title>Anarchism Theory</title>\n"
    "    <id>12</id>\n"
    "    <revision>\n"
    "      <id>42136831</id>\n"
    "      <timestamp>2006-03-04T01:41:25Z</timestamp>\n"
    "      <contributor>\n"
    "        <username>Ben Example</username>\n"
    "        <id>94</id>\n"
    "      </contributor>\n"
    "      <comment>Revert vandalism per talk page</comment>\n"
    '      <text xml:space="preserve">{{Anarchism}} Anarchism originated as a term of abuse\n'
    "Political philosophy &amp; movement &lt;ref&gt;Ward 2004&lt;/ref&gt; rejects hierarchy\n"
    "\n"
    "== Etymology ==\n"
    'Greek roots <span class="gr">anarchos</span> meaning without rulers</text>\n'
    "    </revision>\n"
    "  </page>\n"
    "  <page>\n"
    "    <title>Autism Spectrum</title>\n"
    "    <id>25</id>\n"
    "    <revision>\n"
    "      <id>42019020</id>\n"
    "      <timestamp>2006-03-03T06:55:53Z</timestamp>\n"
    "      <contributor>\n"
    "        <ip>210.49.112.47</ip>\n"
    "      </contributor>\n"
    "      <minor />\n"
    "      <comment>spelling fix</comment>\n"
    '      <text xml:space="preserve">Autism is a neurodevelopmental condition</text>\n'
    '      <text deleted="deleted" />\n'
    "    </revision>\n"
    "  </page>\n"
)
# a 5M-byte-style split that begins in the middle of a body
ENWIK8_MID_BODY = (
    "ing rulers and states &quot;quoted words&quot; continue\n"
    "second body line here [[Link|label]]</text>\n"
    "    </revision>\n"
    "  </page>\n" + ENWIK8_PAGES
)


def ref_enwik8_mask(s: str) -> list[bool]:
    """True for each character that may belong to a word: inside a <text> body and outside markup."""
    mask = [False] * len(s)
    events = [(m.start(), m.end(), m.group()) for m in re.finditer(r"<text(?:\s[^<>]*)?>|</text>", s)]
    inside, pos = False, 0
    if events and events[0][2] == "</text>":
        inside = True  # starts mid-body
    for a, b, tag in events:
        if tag == "</text>":
            if inside:
                mask[pos:a] = [True] * (a - pos)
            inside = False
        elif not tag.endswith("/>") and not inside:
            inside, pos = True, b
    if inside:
        mask[pos:] = [True] * (len(s) - pos)
    for m in re.finditer(r"<[^<>]*>|&(?:[A-Za-z]+|#[0-9]+|#x[0-9A-Fa-f]+);", s):
        mask[m.start() : m.end()] = [False] * (m.end() - m.start())
    return mask


def ref_enwik8_line_words(s: str) -> list[list[tuple[str, int]]]:
    """Per line: the (word, start in line) of the characters the mask allows."""
    mask = ref_enwik8_mask(s)
    out, off = [], 0
    for line in s.split("\n"):
        words = []
        for m in re.finditer(r"1+", "".join("1" if mask[off + i] else "0" for i in range(len(line)))):
            words += [(w, m.start() + st) for w, st in ref_words(line[m.start() : m.end()])]
        out.append(words)
        off += len(line) + 1
    return out


@pytest.mark.parametrize("snippet", [ENWIK8_PAGES, ENWIK8_MID_BODY], ids=["pages", "mid_body"])
def test_enwik8_only_text_bodies_are_corrupted(tmp_path, snippet):
    src = tmp_path / "src" / "enwik8"
    src.parent.mkdir()
    src.write_text(snippet, encoding="utf-8")
    lines = snippet.split("\n")
    line_words = ref_enwik8_line_words(snippet)
    body_lines = {i for i, ws in enumerate(line_words) if ws}
    # the reference agrees with a hand annotation: the lines with words inside a body (line 13 of the
    # pages is an empty body line); no metadata line yields a word
    pages_body = {11, 12, 14, 15, 29}
    assert body_lines == (pages_body if snippet is ENWIK8_PAGES else {0, 1} | {i + 4 for i in pages_body})

    # rate 1: exactly the non-stopword body words become AAA, everything else is byte-identical
    full = corrupt_file(src, "word_swap", 1.0, seed=0, out_dir=tmp_path / "o", format="enwik8", sampling="exact")
    expected = []
    for line, words in zip(lines, line_words, strict=True):
        for w, st in reversed(words):
            if w not in REF_STOPWORDS:
                line = line[:st] + "AAA" + line[st + len(w) :]
        expected.append(line)
    assert full.path.read_text(encoding="utf-8") == "\n".join(expected)
    assert full.manifest["n_words"] == sum(len(ws) for ws in line_words)
    assert full.manifest["algorithm"] == full.manifest["key"]["algorithm"] == "corruptions-v2"

    for recipe in sorted(RECIPES):
        res = corrupt_file(src, recipe, 0.3, seed=3, out_dir=tmp_path / "o", format="enwik8", sampling="exact")
        out = res.path.read_text(encoding="utf-8").split("\n")
        assert len(out) == len(lines)
        for i, (old, new) in enumerate(zip(lines, out, strict=True)):
            if i not in body_lines:
                assert new == old  # title, id, timestamp, contributor, comment, closing tags ...
        for needle in ("<title>Anarchism Theory</title>", "<id>42136831</id>", "Ben Example",
                       "<timestamp>2006-03-03T06:55:53Z</timestamp>", "<comment>spelling fix</comment>",
                       '<span class="gr">', "&lt;ref&gt;", "&amp;"):
            assert "\n".join(out).count(needle) == snippet.count(needle)
        out_bytes = res.path.read_bytes()
        assert TAG_RE.findall(out_bytes) == TAG_RE.findall(snippet.encode())
        assert ENTITY_RE.findall(out_bytes) == ENTITY_RE.findall(snippet.encode())
        by_line: dict[int, list[list]] = {}
        for rec in res.manifest["swaps"]:
            by_line.setdefault(rec[0], []).append(rec)
        with_eligible = {i for i in body_lines if any(w not in REF_STOPWORDS for w, _ in line_words[i])}
        assert set(by_line) == with_eligible
        for i, recs in by_line.items():
            words = line_words[i]
            n_eligible = sum(w not in REF_STOPWORDS and w != "AAA" for w, _ in words)
            assert len(recs) == ref_count(len(words), n_eligible, 0.3) == max(int(0.3 * len(words)), 1)
            assert {(r[2], r[3]) for r in recs} <= {(st, w) for w, st in words}
        assert res.manifest["n_words"] == sum(len(ws) for ws in line_words)
        assert res.manifest["n_swaps"] == sum(len(r) for r in by_line.values())


def test_cache_key_algorithm_is_versioned_per_format():
    from corruptions.manifest import cache_key, cache_paths

    # enwik8 output changed when page metadata became protected (v2); WikiText output did not, so its
    # keys (and the cache paths recorded in results/) must stay those of v1
    wt = cache_key("0" * 64, "word_swap", 0.015, 0, "AAA", "wikitext")
    e8 = cache_key("0" * 64, "word_swap", 0.015, 0, "AAA", "enwik8")
    assert wt["algorithm"] == "corruptions-v1" and e8["algorithm"] == "corruptions-v2"
    old = {**e8, "algorithm": "corruptions-v1"}
    assert cache_paths("enwik8", old, "o") != cache_paths("enwik8", e8, "o")


def test_wikitext_format_leaves_unk_swappable_and_enwik8_protects_it():
    assert [w.text for w in find_words("<unk> x")] == ["unk", "x"]
    spans = markup_spans("<unk> x")
    assert [w.text for w in find_words("<unk> x", spans)] == ["x"]


# --------------------------------------------------------------------------------------------------
# CLI and spec strings


def test_parse_spec():
    assert parse_spec("word_swap:0.015") == ("word_swap", 0.015, "textattack")
    assert parse_spec("word_swap:0.015").label == "word_swap:0.015"
    assert parse_spec("word_swap:0.015:exact") == ("word_swap", 0.015, "exact")
    assert parse_spec("word_swap:0.015:exact").label == "word_swap:0.015:exact"
    assert parse_spec(" word_swap : 1.5% : textattack ") == ("word_swap", pytest.approx(0.015), "textattack")
    assert parse_spec(" char_swap : 2.5% ") == ("char_swap", pytest.approx(0.025), "textattack")
    assert parse_spec("char_swap:0.02:exact").kwargs() == {"recipe": "char_swap", "rate": 0.02, "sampling": "exact"}
    assert parse_spec("word_swap") == ("word_swap", 0.015, "textattack")
    assert parse_specs("word_swap:0.015,char_swap:0.015") == [
        ("word_swap", 0.015, "textattack"), ("char_swap", 0.015, "textattack")]
    assert parse_specs(["word_swap:0.01:exact", "char_swap:0.02"]) == [
        ("word_swap", 0.01, "exact"), ("char_swap", 0.02, "textattack")]
    with pytest.raises(ConfigError, match="Did you mean 'word_swap'"):
        parse_spec("wordswap:0.015")
    with pytest.raises(ConfigError, match="not a number"):
        parse_spec("word_swap:abc")
    with pytest.raises(ConfigError, match="sampling goes third"):
        parse_spec("word_swap:exact")
    with pytest.raises(ConfigError, match="sampling 'exactly'.*textattack, exact"):
        parse_spec("word_swap:0.015:exactly")
    with pytest.raises(ConfigError, match="at most 3"):
        parse_spec("word_swap:0.015:exact:x")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        parse_spec("word_swap:1.5")
    with pytest.raises(ConfigError):
        parse_specs(" , ")


def test_cli_corrupt(tmp_path, capsys):
    a = tmp_path / "d" / "wiki.test.tokens"
    a.parent.mkdir()
    a.write_text(make_wikitext(random.Random(1), 50))
    e = tmp_path / "d" / "enwik8_small"
    e.write_bytes(make_enwik8(random.Random(1), 3))
    out = corrupt([str(a), str(e)], rate=0.015, seed=2, out_dir=str(tmp_path / "o"))
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and "swaps" in printed[0] and "effective rate" in printed[0]
    assert [m["format"] for m in out] == ["wikitext", "enwik8"]
    assert all("swaps" not in m and Path(m["path"]).is_file() for m in out)
    again = corrupt(str(a), rate=0.015, seed=2, out_dir=str(tmp_path / "o"))
    assert again[0]["cached"] and "[cached]" in capsys.readouterr().out


def test_cli_through_jsonargparse(tmp_path, capsys):
    jsonargparse = pytest.importorskip("jsonargparse")
    a = tmp_path / "wiki.test.tokens"
    a.write_text(make_wikitext(random.Random(1), 20))
    out = jsonargparse.CLI(
        __import__("corruptions.cli", fromlist=["corrupt"]).corrupt,
        args=[str(a), "--recipe", "char_swap", "--rate", "0.02", "--out_dir", str(tmp_path / "o")],
    )
    assert out[0]["recipe"] == "char_swap" and out[0]["rate"] == 0.02
    out = jsonargparse.CLI(
        __import__("corruptions.cli", fromlist=["corrupt"]).corrupt,
        args=[json.dumps([str(a), str(a)]), "--out_dir", str(tmp_path / "o")],
    )
    assert [m["recipe"] for m in out] == ["word_swap", "word_swap"] and out[1]["cached"]


# --------------------------------------------------------------------------------------------------
# the real WikiText test splits (skipped when the shared data is absent)


def _data_dir() -> Path | None:
    for cand in (os.environ.get("LM_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


REAL = [("wikitext-103", "wiki.test.tokens"), ("wikitext-2", "wiki.test.tokens")]


@pytest.mark.parametrize("rate,sampling", [(0.015, "exact"), (0.015, "textattack"), (0.025, "textattack")])
@pytest.mark.parametrize("corpus,name", REAL)
def test_real_wikitext_rates(corpus, name, rate, sampling, tmp_path):
    root = _data_dir()
    src = root / corpus / name if root else None
    if src is None or not src.is_file():
        pytest.skip(f"{corpus}/{name} not found (set LM_DATA_DIR)")
    before = sha(src)
    res = corrupt_file(src, "word_swap", rate, seed=0, out_dir=tmp_path, sampling=sampling)
    m = res.manifest
    assert m["sampling"] == m["key"]["sampling"] == sampling

    clean = src.read_text(encoding="utf-8").split("\n")[:-1]
    dirty = res.path.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(clean) == len(dirty)
    words = swaps = swapped_lines = tokens = changed = changed_unk = short_lines = 0
    expected = clean_expected = 0.0
    swapped_by_line: dict[int, list] = {}
    for rec in m["swaps"]:
        swapped_by_line.setdefault(rec[0], []).append(rec)
    unk_hits = 0
    for i, (c, d) in enumerate(zip(clean, dirty, strict=True)):
        ws = ref_words(c)
        elig = [w for w, _ in ws if w not in REF_STOPWORDS and w != "AAA"]  # AAA→AAA is no swap
        k = ref_count(len(ws), len(elig), rate)
        n = max(int(rate * len(ws)), 1)
        recs = swapped_by_line.get(i, [])
        if sampling == "exact":
            assert len(recs) == k  # every line with an eligible word has its formula count of swaps
        elif elig and len(elig) >= n:  # the TextAttack pool: n, or the n - 1 the chain stood on
            assert len(recs) in (n, n - 1)
            short_lines += len(recs) == n - 1
            expected += n - 1 / (len(elig) - n + 2)
            clean_expected += 1 / (len(elig) + 1) if n == 1 else 0.0
        else:  # E < n: the chain runs out of eligible words
            assert len(recs) == len(elig)
        if sampling == "exact":
            expected += k
        elif elig and len(elig) < n:
            expected += len(elig)
        words += len(ws)
        swaps += len(recs)
        swapped_lines += bool(recs)
        ct, dt = c.split(), d.split()
        assert len(ct) == len(dt)
        tokens += len(ct)
        hit = {_token_index(c, r[2]) for r in recs}
        for j, (x, y) in enumerate(zip(ct, dt, strict=True)):
            if x != y:
                assert j in hit
                changed += 1
                changed_unk += x == "<unk>"
        for r in recs:
            assert r[3] not in REF_STOPWORDS
            unk_hits += ct[_token_index(c, r[2])] == "<unk>"

    assert m["n_swaps"] == swaps
    assert m["n_swaps_expected"] == pytest.approx(expected, rel=1e-12)
    assert m["n_lines_eligible_clean_expected"] == pytest.approx(clean_expected, rel=1e-12, abs=1e-12)
    assert m["n_lines_eligible_clean"] == m["n_lines_with_eligible"] - swapped_lines
    if sampling == "textattack":  # the realised count lies within 5 sigma of its expectation
        assert short_lines > 0 and abs(swaps - expected) < 5 * math.sqrt(short_lines + 1)
    assert m["effective_rate"] == pytest.approx(swaps / words, rel=1e-12)
    assert m["swapped_line_fraction"] == pytest.approx(swapped_lines / len(clean), rel=1e-12)
    assert m["unk_swaps"] == unk_hits
    assert m["token_change_rate"] == pytest.approx(changed / tokens, rel=1e-12)
    assert m["n_tokens_changed_excl_unk"] == changed - changed_unk
    if sampling == "exact":
        assert m["effective_rate"] >= rate  # the per-line minimum of one swap only adds
    assert sha(src) == before
    print(
        f"\n{corpus}/{name} word_swap@{rate} ({sampling}): effective word rate {m['effective_rate']:.5f} "
        f"({m['n_swaps']}/{m['n_words']}), swapped-line fraction {m['swapped_line_fraction']:.5f} "
        f"(of non-empty lines {m['swapped_nonempty_line_fraction']:.5f}), unk swaps {m['unk_swaps']} "
        f"({m['unk_swap_fraction']:.4f} of swaps), token change rate {m['token_change_rate']:.5f}, "
        f"excluding <unk> {m['token_change_rate_excl_unk']:.5f}"
    )
    assert math.isfinite(m["effective_rate"])
