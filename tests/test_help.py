"""The CLI's own help: `lm --help` starts without Lightning, a mistyped command names the real ones, and every
command's --help gives its name, purpose and one example whose options the command really has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lm.cli import COMMANDS, EXAMPLES, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "pytorch_lightning", "torch")


def test_top_level_help_imports_neither_lightning_nor_torch():
    code = ("import sys; from lm.cli import main; rc = main(['--help']); "
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); "
            "print('HEAVY', heavy); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout.splitlines()[-1]
    assert all(f"lm {c} " in r.stdout for c in COMMANDS)


def test_a_mistyped_command_names_every_command(capsys):
    assert main(["fitt"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fitt'" in err and "Did you mean `lm fit`?" in err
    assert all(c in err for c in COMMANDS)  # not just Lightning's fit/validate/test
    assert main(["predict", "--help"]) == 2 and "unknown command 'predict'" in capsys.readouterr().err


def test_every_command_has_an_example():
    assert set(EXAMPLES) == set(COMMANDS)
    for cmd, example in EXAMPLES.items():
        assert example.startswith(f"lm {cmd} "), example


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_command_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"lm {cmd}: {COMMANDS[cmd]}"  # name and one-line purpose first
    assert f"example:\n  {EXAMPLES[cmd]}\n" in out
    usage = next(ln for ln in lines if ln.startswith("usage: "))
    assert usage.startswith(f"usage: lm {cmd} ") or usage.startswith(f"usage: lm [options] {cmd} "), usage
    assert "``" not in out and "REFERENCE" not in out and "Lightning Trainer command line tool" not in out
    assert not re.search(r":(class|func|meth|paramref):\s*`", out)  # Sphinx roles of Lightning's docstrings
    # every option the example uses is one this command has (finetune's live under `finetune fit`)
    if cmd == "finetune":
        assert "{fit,validate}" in out  # no test or predict subcommand to offer
        assert main([cmd, "fit", "--help"]) == 0
        out = capsys.readouterr().out
        assert "usage: lm finetune [options] fit " in out
    for opt in re.findall(r"(--[\w.]+)", EXAMPLES[cmd]):
        assert f"{opt} " in out or f"{opt}," in out, f"{cmd}: {opt}"
