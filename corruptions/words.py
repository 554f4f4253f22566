"""What counts as a *word* for the contamination recipes, with character spans.

The paper's contaminated test sets were made with TextAttack, whose ``words_from_text`` walks the
characters of the text and builds words like this:

* a character ``c`` with ``c.isalnum()`` extends the current word (or starts a new one);
* one of ``' - _ * @`` extends the current word only if the word is non-empty: these characters never
  begin a word, but may appear inside it or at its end (``don't``, ``rock'n'``, ``e-mail-``);
* any other character ends the current word.

Consequences on WikiText: the markup ``@-@``, ``@,@``, ``@.@`` and punctuation are not words; the token
``<unk>`` contains the word ``unk``; ``U.S.`` is the two words ``U`` and ``S``; ``-abc`` is ``abc``.
Note the underscore: ``str.isalnum('_')`` is ``False``, so exactly as in TextAttack an underscore cannot
begin a word (``_ab`` is the word ``ab``) but is kept inside one (``a_b``). (WikiText contains no
underscore at all, so this only matters for other corpora.) Some later TextAttack releases also treat a
few homoglyphs such as ``×`` and the backtick as word characters; that variant is not followed here.

Stopwords: TextAttack's ``StopwordModification`` tests ``word not in stopwords`` with the word *as it
appears* against NLTK's lowercase English list, so ``the`` is protected and ``The`` is not. The same
exact-match rule is used here (see :func:`is_stopword`).

The implementation is a regular expression that is equivalent to the character loop: ``\\w`` in a
``str`` pattern matches exactly ``str.isalnum()`` characters plus ``_``, so ``[^\\W_]`` is "alphanumeric"
and ``[\\w'*@-]`` is "alphanumeric or one of ``'-_*@``".

For EnWik8-style XML, :func:`markup_spans` finds the XML tags (``<page>``, ``<text xml:space=...>``,
``</title>``) and XML entity / character references (``&amp;``, ``&quot;``, ``&#160;``) that must stay
byte-identical. Only the article bodies are corrupted: :func:`text_body_spans` finds the content of
every ``<text ...>...</text>`` element (which usually spans many lines), and
:func:`enwik8_protected_spans` protects the markup plus everything outside those bodies (the
``<title>``, ``<id>``, ``<timestamp>``, ``<contributor>``, ``<comment>`` ... of every page, the
``<siteinfo>`` header). Words are then only looked for in the text between the protected spans.

A split cut out of a dump may start or end inside a body. The rule: if the first ``<text``-element tag
of the file is a closing ``</text>`` (a body closes before any opens), everything before it is body; a
body still open at the end of the file runs to the end. A self-closing ``<text ... />`` has no body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

__all__ = [
    "Word",
    "WORD_RE",
    "find_words",
    "words_from_text",
    "markup_spans",
    "text_body_spans",
    "enwik8_protected_spans",
    "line_spans",
    "load_stopwords",
    "STOPWORDS",
    "is_stopword",
]

# A word starts with an alphanumeric character and continues with alphanumerics or any of '-_*@.
WORD_RE = re.compile(r"[^\W_][\w'*@-]*")

# XML markup inside an EnWik8-like dump: complete tags (which may span lines), an unterminated tag at
# the very end (a split cut mid-tag), and entity / character references.
_TAG_RE = re.compile(r"<[^<>]*>|<[^<>]*\Z")
_ENTITY_RE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9._-]*|#[0-9]+|#[xX][0-9A-Fa-f]+);")
# A split that starts in the middle of a tag: text up to the first '>' on the first line, if no '<'
# comes before it (in a MediaWiki dump a bare '>' never occurs in text; it is written '&gt;').
_LEADING_TAG_TAIL_RE = re.compile(r"\A[^<>\n]*>")
# The tags of the <text> element (the article body): "<text ...>", "</text>", "<text ... />"; the
# name must end there ("<textarea>" is another element). Matched at the start of a _TAG_RE match.
_TEXT_TAG_RE = re.compile(r"<\s*(/?)\s*text(?=[\s/>]|\Z)")


class Word(NamedTuple):
    """One word of a line: its index among all words of the line, character span and text."""

    index: int
    start: int
    end: int
    text: str


def find_words(text: str, protected: Sequence[tuple[int, int]] = ()) -> list[Word]:
    """All words of ``text`` in order, skipping the (sorted, disjoint) ``protected`` character spans.

    A protected span acts as a separator: no word crosses it and nothing inside it is a word.
    """
    if not protected:
        return [Word(i, m.start(), m.end(), m.group()) for i, m in enumerate(WORD_RE.finditer(text))]
    words: list[Word] = []
    pos = 0
    for start, end in [*protected, (len(text), len(text))]:
        for m in WORD_RE.finditer(text, pos, max(start, pos)):
            words.append(Word(len(words), m.start(), m.end(), m.group()))
        pos = max(pos, end)
    return words


def words_from_text(text: str) -> list[str]:
    """The word strings of ``text`` (TextAttack's ``words_from_text`` with nothing ignored)."""
    return WORD_RE.findall(text)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ``spans`` and merge the overlapping or touching ones."""
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def markup_spans(text: str) -> list[tuple[int, int]]:
    """Sorted, merged character spans of XML markup (tags and entity references) in ``text``."""
    spans = [m.span() for m in _TAG_RE.finditer(text)]
    spans += [m.span() for m in _ENTITY_RE.finditer(text)]
    m = _LEADING_TAG_TAIL_RE.match(text)
    if m:
        spans.append(m.span())
    return _merge(spans)


def text_body_spans(text: str) -> list[tuple[int, int]]:
    """Sorted, disjoint ``(start, end)`` of the contents of the ``<text ...>`` elements of ``text``.

    A body runs from the end of an opening ``<text ...>`` tag to the start of the next ``</text>``.
    If the first ``<text``-element tag is a closing one, the file starts inside a body, which then
    runs from offset 0; a body not closed by the end of the file runs to the end. ``<text ... />`` is
    empty. Tags are those of :func:`markup_spans` (a tag may span lines; a final one may be cut).
    """
    bodies: list[tuple[int, int]] = []
    body_start: int | None = None
    first = True
    for tag in _TAG_RE.finditer(text):
        m = _TEXT_TAG_RE.match(tag.group())
        if m is None:
            continue
        closing = bool(m.group(1))
        if first and closing:
            body_start = 0  # the split starts inside a body
        first = False
        if closing:
            if body_start is not None:
                bodies.append((body_start, tag.start()))
                body_start = None
        elif body_start is None and tag.group().endswith(">") and not tag.group().endswith("/>"):
            body_start = tag.end()
    if body_start is not None:
        bodies.append((body_start, len(text)))
    return [(s, e) for s, e in bodies if e > s]


def enwik8_protected_spans(text: str) -> list[tuple[int, int]]:
    """What stays byte-identical in an EnWik8 dump: all markup, and everything outside text bodies.

    Sorted and merged; the words of the file are the words of its :func:`text_body_spans` with the
    tags and entity references in them (:func:`markup_spans`) excluded.
    """
    spans = markup_spans(text)
    pos = 0
    for s, e in text_body_spans(text):
        if s > pos:
            spans.append((pos, s))
        pos = e
    if pos < len(text):
        spans.append((pos, len(text)))
    return _merge(spans)


def line_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every line of ``text``, the ``\\n`` excluded; a final empty line is dropped.

    Only ``\\n`` separates lines (a ``\\r`` stays part of its line), so joining the lines back with their
    separators reproduces ``text`` exactly.
    """
    spans = []
    pos = 0
    n = len(text)
    while pos < n:
        nl = text.find("\n", pos)
        if nl < 0:
            spans.append((pos, n))
            break
        spans.append((pos, nl))
        pos = nl + 1
    return spans


@lru_cache(maxsize=1)
def load_stopwords() -> frozenset[str]:
    """NLTK's English stopword list (179 lowercase words), shipped as ``corruptions/stopwords.txt``."""
    text = resources.files("corruptions").joinpath("stopwords.txt").read_text(encoding="utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip())


STOPWORDS: frozenset[str] = load_stopwords()


def is_stopword(word: str, stopwords: Iterable[str] | frozenset[str] = STOPWORDS) -> bool:
    """Exact (case-sensitive) membership, as in TextAttack: ``the`` is a stopword, ``The`` is not."""
    return word in stopwords
