"""Locating and reading corpora (docs/options.md, Data options).

Local files come first (``data.root``, $LM_DATA_DIR, ./data, ../shared/data). With ``source: auto``
(the data module's default) a corpus found nowhere is downloaded into the data root once and read
from there as local files (``lm.data.download``); ``local`` never downloads; ``download`` reads only
the data root, filling it first when needed.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lm.data.download import BY_HAND, SOURCES, materialise
from lm.errors import DataError, unknown

SPLITS = ("train", "valid", "test")
WORD_CORPORA = ("wikitext-2", "wikitext-103")
CORPORA = WORD_CORPORA + ("enwik8",)
# Standard EnWik8 split, as fractions of the file so a small generated file splits the same way;
# for the real 100,000,000-byte file this is exactly [0, 90M) / [90M, 95M) / [95M, 100M).
ENWIK8_PERCENT = {"train": (0, 90), "valid": (90, 95), "test": (95, 100)}
# The real file is exactly 10^8 bytes; nothing larger is inflated from a zip into memory.
ENWIK8_BYTES = ENWIK8_MAX_BYTES = 100_000_000
HOW_TO_GET = {
    "wikitext-2": "fetch " + BY_HAND["wikitext-2"] + " so that <root>/wikitext-2/wiki.{train,valid,test}.tokens exist",
    "wikitext-103": "fetch " + BY_HAND["wikitext-103"] + " so that <root>/wikitext-103/wiki.{train,valid,test}.tokens exist",
    "enwik8": "fetch " + BY_HAND["enwik8"] + " and put it at <root>/enwik8/enwik8.zip",
}


def repo_root() -> Path:
    """The checkout that holds the ``lm`` package (``lm/data/corpora.py`` -> two levels up)."""
    return Path(__file__).resolve().parents[2]


def resolve_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Data roots in search order: configured root, $LM_DATA_DIR, ./data, then ../shared/data
    relative to the working directory and to the repository root (docs/options.md, Data options)."""
    candidates = [root, os.environ.get("LM_DATA_DIR") or None, Path.cwd() / "data",
                  Path.cwd().parent / "shared" / "data", repo_root().parent / "shared" / "data"]
    out: list[Path] = []
    for c in candidates:
        if c is None:
            continue
        p = Path(c).expanduser().resolve()
        if p not in out:
            out.append(p)
    return out


def decode_utf8(data: bytes, name: str) -> str:
    """Strict UTF-8 decode; a bad byte is a data problem, reported with its offset and the fix."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name} is not valid UTF-8: byte offset {e.start} (0x{data[e.start]:02x}) cannot be decoded. "
            f"Word-level corpora must be UTF-8 text: re-download or re-extract the file, or convert it "
            f"with e.g. `iconv -f <encoding> -t utf-8`."
        ) from None


def split_lines(text: str) -> list[str]:
    """Lines as Python file iteration yields them (universal newlines: \\n, \\r\\n, \\r), which is
    what Transformer-XL's vocabulary code counts; NOT str.splitlines, which would also break lines
    at \\x1c-\\x1e, \\x85 and \\u2028 and so change the number of <eos>."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a trailing newline ends the last line, it does not start a new one
    return lines


@dataclass(frozen=True)
class CorpusFiles:
    """Where each split of a corpus lives.

    ``paths[split]`` is None when no searched place has it; ``ranges`` gives byte ranges (as
    percent of the file) when several splits share one file (EnWik8).
    """

    name: str
    unit: str  # "word" | "byte"
    paths: dict[str, Path | None]
    looked: dict[str, list[Path]] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def path(self, split: str) -> Path:
        if split not in self.paths:
            raise unknown("split", split, self.paths)
        p = self.paths[split]
        if p is None:
            places = "\n  ".join(str(x) for x in self.looked.get(split, [])) or "(nowhere)"
            raise DataError(
                f"The {split} split of {self.name} was not found. Looked in:\n  {places}\n"
                f"To get it: {HOW_TO_GET.get(self.name, 'place the files under a data root')}; then set "
                f"data.root (or the LM_DATA_DIR environment variable) to that root, or use "
                f"data.source: download to fetch a complete copy into data.root (else $LM_DATA_DIR, else ./data) "
                f"where the internet is reachable. {self.notes.get(split, '')}".rstrip()
            )
        return p

    def read_bytes(self, split: str) -> bytes:
        """The split's raw bytes (the EnWik8 slice for byte corpora). Empty -> DataError."""
        p = self.path(split)
        data = _read_file(p)
        if split in self.ranges:
            lo, hi = self.ranges[split]
            data = data[len(data) * lo // 100 : len(data) * hi // 100]
        if not data:
            raise DataError(f"{p} ({self.name} {split}) is empty. Re-download or re-extract the file.")
        return data

    def read_lines(self, split: str) -> list[str]:
        return split_lines(decode_utf8(self.read_bytes(split), str(self.path(split))))


def _read_file(p: Path) -> bytes:
    if p.suffix == ".zip":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
                member = next((n for n in names if Path(n).name == "enwik8"), None)
                if member is None:
                    raise DataError(f"{p} has no member named 'enwik8' (members: {names[:5]}). Use the "
                                    f"original enwik8.zip from mattmahoney.net.")
                return _inflate_capped(z, member, p)
        except zipfile.BadZipFile as e:
            raise DataError(f"{p} is not a valid zip file ({e}). Re-download enwik8.zip.") from None
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"Cannot read {p}: {e.strerror}.") from None
    if not data:
        raise DataError(f"{p} is empty. Re-download or re-extract the file.")
    return data


def _inflate_capped(z: zipfile.ZipFile, member: str, p: Path) -> bytes:
    """The member's bytes, never more than ``ENWIK8_MAX_BYTES``: a zip whose member inflates to a gigabyte (a
    zip bomb, or another file named enwik8) is refused from its declared size before anything is inflated, and
    the inflation itself is capped (a declared size can lie; zipfile stops at it, this does not rely on that)."""
    info = z.getinfo(member)
    too_big = (f"{p}: its member {member!r} {{}}: it is not the enwik8 "
               f"file (a different or damaged archive). Use the original enwik8.zip from mattmahoney.net "
               f"(sha256 547994d9...534bc).")
    if info.file_size > ENWIK8_MAX_BYTES:
        raise DataError(too_big.format(f"declares {info.file_size:,} bytes, more than enwik8's {ENWIK8_BYTES:,}"))
    out = bytearray()
    with z.open(info) as f:
        while chunk := f.read(min(1 << 24, ENWIK8_MAX_BYTES + 1 - len(out))):
            out += chunk
            if len(out) > ENWIK8_MAX_BYTES:
                raise DataError(too_big.format(f"inflates to more than enwik8's {ENWIK8_BYTES:,} bytes"))
    return bytes(out)


def _word_paths(name: str, roots: list[Path]) -> tuple[dict, dict, dict]:
    def f(r: Path, split: str) -> Path:
        return r / name / f"wiki.{split}.tokens"

    # All splits come from the FIRST root that has any of them: mixing copies from different roots
    # could pair a train split with someone else's valid/test without anyone noticing.
    chosen = next((r for r in roots if any(f(r, s).is_file() for s in SPLITS)), None)
    paths, looked, notes = {}, {}, {}
    for split in SPLITS:
        looked[split] = [f(r, split) for r in roots]
        paths[split] = f(chosen, split) if chosen is not None and f(chosen, split).is_file() else None
        elsewhere = [str(p) for p in looked[split] if p.is_file()]
        if paths[split] is None and elsewhere:
            notes[split] = (f"{name} was taken from {chosen} (the first root that has it) and splits are "
                            f"never mixed across roots; {elsewhere[0]} exists: copy it into {chosen / name}.")
    return paths, looked, notes


def _enwik8_path(roots: list[Path]) -> tuple[Path | None, list[Path]]:
    tried = []
    for r in roots:
        tried += [r / "enwik8" / "enwik8", r / "enwik8" / "enwik8.zip", r / "enwik8", r / "enwik8.zip"]
    return next((p for p in tried if p.is_file()), None), tried


def find_corpus(
    name: str,
    root: str | os.PathLike | None = None,
    source: str = "local",
    overrides: dict[str, str | os.PathLike | None] | None = None,
    base_url: str | None = None,
) -> CorpusFiles:
    """Locate ``name``'s splits (``source``: see the module docstring). ``overrides`` maps a split to a
    file that replaces it (e.g. a word-swapped test file); missing splits are reported only when read.
    ``base_url``: where EnWik8's zip is downloaded from (default mattmahoney.net, or $LM_DATA_BASE_URL)."""
    if name not in CORPORA:
        raise unknown("corpus", name, CORPORA)
    if source not in SOURCES:
        raise unknown("data.source", source, SOURCES)
    explicit_missing = root is not None and not Path(root).expanduser().is_dir()
    if explicit_missing and source == "local":
        # An explicit root is a statement of where the data is: falling back to other places would
        # silently train or score on another copy.
        raise DataError(f"data.root {root} does not exist (or is not a folder). Point it at the folder that holds "
                        f"{name}/ (e.g. ../shared/data), leave it unset to search $LM_DATA_DIR, ./data and "
                        f"../shared/data, or set data.source: auto to download {name} into it.")
    # An explicit root that does not exist is never replaced by another place's copy: with `auto` the
    # corpus is downloaded into it, as asked.
    roots = ([materialise(name, root, base_url)] if source == "download"
             else [] if explicit_missing else resolve_roots(root))
    files = _locate(name, roots)
    if source == "auto" and all(p is None for p in files.paths.values()):
        # Found nowhere (a fresh machine): fetch it. A partial local copy is never topped up from the
        # network: that would mix splits of two origins; its error says what is missing instead.
        files = _locate(name, [materialise(name, root, base_url, roots or resolve_roots(root))])
    paths, looked, ranges, notes = dict(files.paths), dict(files.looked), dict(files.ranges), dict(files.notes)
    for split, f in (overrides or {}).items():
        if f is None:
            continue
        if split not in SPLITS:
            raise unknown("split", split, SPLITS)
        f = Path(f).expanduser().resolve()
        if not f.is_file():
            raise DataError(f"The {split} override file {f} does not exist. Check data.{split}_file.")
        paths[split], looked[split] = f, [f]
        ranges.pop(split, None)  # an override file is the whole split, never a slice
        notes.pop(split, None)
    return CorpusFiles(name, files.unit, paths, looked, ranges, notes)


def _locate(name: str, roots: list[Path]) -> CorpusFiles:
    if name == "enwik8":
        p, tried = _enwik8_path(roots)
        return CorpusFiles(name, "byte", {s: p for s in SPLITS}, {s: tried for s in SPLITS}, dict(ENWIK8_PERCENT))
    paths, looked, notes = _word_paths(name, roots)
    return CorpusFiles(name, "word", paths, looked, {}, notes)


__all__ = ["CORPORA", "SPLITS", "CorpusFiles", "decode_utf8", "find_corpus", "resolve_roots", "split_lines"]
