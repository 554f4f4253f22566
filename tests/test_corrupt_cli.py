"""`lm corrupt` through the real entry point: the README's positional form and `--src`, the files it
writes (corrupted split + manifest under ./.cache/corruptions), and clear errors for bad input.

Every case runs ``lm.cli.main`` (what the ``lm`` console script calls) in-process, with the working
directory moved to ``tmp_path`` so the default cache (``./.cache/corruptions``) lands there, not in
the checkout.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from corruptions.manifest import corrupt_file
from lm.cli import main

STOP = ["the", "of", "and", "a", "in", "to", "was", "is"]


def write_test_split(d: Path, name: str = "wiki.test.tokens", seed: int = 0, lines: int = 40) -> Path:
    """A WikiText-like split: headings, blank lines, stopwords and plain words (none of them AAA)."""
    rng = random.Random(seed)
    words = [f"word{i}" for i in range(30)]
    out = []
    for i in range(lines):
        if i % 10 == 0:
            out += [" \n", f" = Heading {words[i % 30]} = \n", " \n"]
        else:
            n = rng.randint(2, 40)
            out.append(" " + " ".join(rng.choice(words + STOP) for _ in range(n)) + " \n")
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text("".join(out), encoding="utf-8")
    return path


@pytest.fixture
def src(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default cache is ./.cache/corruptions: keep it out of the checkout
    return write_test_split(tmp_path / "data" / "wikitext-103")


def recount(clean: Path, corrupted: Path, replacement: str = "AAA") -> tuple[int, int]:
    """(lines that differ, words replaced by ``replacement``), from the two files alone."""
    a = clean.read_text(encoding="utf-8").split("\n")
    b = corrupted.read_text(encoding="utf-8").split("\n")
    assert len(a) == len(b)
    lines = words = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            lines += 1
            tx, ty = x.split(), y.split()
            assert len(tx) == len(ty)
            words += sum(1 for u, v in zip(tx, ty, strict=True) if u != v and v == replacement)
            assert all(u == v or v == replacement for u, v in zip(tx, ty, strict=True))
    return lines, words


def only_output(root: Path) -> tuple[Path, dict]:
    folders = [p for p in (root / ".cache" / "corruptions").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    out, manifest = folders[0] / "wiki.test.tokens", folders[0] / "manifest.json"
    assert out.is_file() and manifest.is_file()
    return out, json.loads(manifest.read_text())


def test_console_script_is_main():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "lm"]
    assert ep.value == "lm.cli:main"


@pytest.mark.parametrize("form", ["positional", "--src"])
def test_corrupt_as_in_the_readme(src, tmp_path, capsys, form):
    before = src.read_bytes()
    where = [str(src)] if form == "positional" else ["--src", str(src)]
    # README: lm corrupt ../shared/data/wikitext-103/wiki.test.tokens --recipe word_swap --rate 0.015 --seed 0
    assert main(["corrupt", *where, "--recipe", "word_swap", "--rate", "0.015", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    out, m = only_output(tmp_path)
    assert str(out.relative_to(tmp_path)) in printed and f"{m['n_swaps']} swaps / {m['n_words']} words" in printed
    assert src.read_bytes() == before  # the clean split is only read
    assert (m["recipe"], m["rate"], m["seed"], m["replacement"]) == ("word_swap", 0.015, 0, "AAA")
    assert m["source_sha256"] == hashlib.sha256(before).hexdigest()
    assert m["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    lines, words = recount(src, out)
    assert m["n_swaps"] == words == len(m["swaps"]) > 0
    assert m["n_lines_swapped"] == lines > 0
    # the same bytes as the library call
    ref = corrupt_file(src, "word_swap", 0.015, seed=0, out_dir=tmp_path / "ref")
    assert ref.path.read_bytes() == out.read_bytes()
    # a second run is served from the cache
    assert main(["corrupt", *where, "--rate", "0.015"]) == 0
    assert "[cached]" in capsys.readouterr().out


def test_corrupt_several_sources_positionally_and_with_src(src, tmp_path, capsys):
    valid = write_test_split(src.parent, "wiki.valid.tokens", seed=1)
    assert main(["corrupt", str(src), "--rate", "0.05", "--src", str(valid), "--out_dir", str(tmp_path / "c")]) == 0
    manifests = sorted((tmp_path / "c").glob("*/manifest.json"))
    assert [json.loads(p.read_text())["output_file"] for p in manifests] == ["wiki.test.tokens", "wiki.valid.tokens"]
    for p in manifests:
        m = json.loads(p.read_text())
        clean = src.parent / m["output_file"]
        assert recount(clean, p.parent / m["output_file"]) == (m["n_lines_swapped"], m["n_swaps"])
    assert not (tmp_path / ".cache").exists()  # --out_dir was honoured


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Exit code 2 (returned, or SystemExit(2) from jsonargparse), an `error:` message with every needle,
    no traceback."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    msg = err[err.index("error:"):]
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    return msg


@pytest.mark.parametrize("argv, needles", [
    (["{data}/nope.tokens"], ("nope.tokens", "no such file")),
    (["--src", "{data}/nope.tokens"], ("nope.tokens", "no such file")),
    (["{src}", "--rate", "1.5"], ("1.5", "[0, 1]")),
    (["{src}", "--rate", "abc"], ("rate", "abc")),
    (["{src}", "--recipe", "word_swp"], ("word_swp", "word_swap")),
    (["--rate", "0.015"], ("No source file given", "lm corrupt")),
    (["{src}", "--bogus", "0.1"], ("unrecognized arguments", "--bogus")),
    (["{src}", "--rat", "0.1"], ("unrecognized arguments", "--rat")),  # no silent prefix match
    (["{src}", "--sampling", "paper"], ("paper", "textattack", "exact")),
])
def test_bad_input_is_one_message_exit_2(src, tmp_path, capsys, argv, needles):
    argv = [a.format(src=src, data=src.parent) for a in argv]
    fails(capsys, ["corrupt", *argv], *needles)
    assert not (tmp_path / ".cache").exists()  # nothing written


def test_sampling_option(src, tmp_path, capsys):
    # default: the paper's TextAttack draw; --sampling exact: min(n, eligible) words on every eligible line
    assert main(["corrupt", str(src), "--rate", "0.015", "--out_dir", str(tmp_path / "t")]) == 0
    assert main(["corrupt", str(src), "--rate", "0.015", "--sampling", "exact", "--out_dir", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "(textattack sampling)" in printed and "(exact sampling)" in printed
    (mt,) = [json.loads(p.read_text()) for p in (tmp_path / "t").glob("*/manifest.json")]
    (me,) = [json.loads(p.read_text()) for p in (tmp_path / "e").glob("*/manifest.json")]
    assert (mt["sampling"], me["sampling"]) == ("textattack", "exact")
    assert me["n_lines_swapped"] == me["n_lines_with_eligible"] and me["n_lines_eligible_clean"] == 0
    assert mt["n_lines_swapped"] + mt["n_lines_eligible_clean"] == mt["n_lines_with_eligible"]
    assert mt["n_swaps"] <= me["n_swaps"]
    ref = corrupt_file(src, "word_swap", 0.015, seed=0, out_dir=tmp_path / "ref", sampling="exact")
    assert ref.path.read_bytes() == next((tmp_path / "e").glob("*/wiki.test.tokens")).read_bytes()
