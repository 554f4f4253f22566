"""Helpers shared by the test modules (plain functions and classes; the fixtures are in conftest.py).

    from helpers import write_corpus, write_config, train_tiny, Loader
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import yaml


def write_corpus(root: Path, seed: int = 0, prefix: str = "w", n_words: int = 40, extra_words: tuple = (),
                 lines: tuple[int, int, int] = (120, 15, 15), min_len: int = 3, max_len: int = 10) -> Path:
    """A WikiText-like corpus (space-separated tokens, ' \\n' line ends) under root/wikitext-2: ``lines``
    train/valid/test lines of ``min_len``..``max_len`` words drawn from ``prefix0..`` (+ ``extra_words``).
    Shared by the CLI, checkpoint, evaluation, recipe, reliability and TensorBoard tests."""
    rng = random.Random(seed)
    words = [f"{prefix}{i}" for i in range(n_words)] + list(extra_words)
    d = root / "wikitext-2"
    d.mkdir(parents=True, exist_ok=True)
    for split, n_lines in zip(("train", "valid", "test"), lines):
        text = "".join(" " + " ".join(rng.choice(words) for _ in range(rng.randint(min_len, max_len))) + " \n"
                       for _ in range(n_lines))
        (d / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return root


def write_config(path: Path, run_dir: Path, data_root: Path, cache: Path, **model) -> Path:
    cfg = {
        "seed_everything": 3,
        "trainer": {"default_root_dir": str(run_dir), "max_steps": 2, "accelerator": "cpu", "devices": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 2, "limit_test_batches": 2, "num_sanity_val_steps": 0},
        "model": {"n_layer": 2, "d_model": 16, "n_head": 2, "d_head": 8, "d_inner": 32, "dropout": 0.0,
                  "pos": "relative", "mem_len": 8, "adaptive": False, "cutoffs": [], **model},
        "data": {"root": str(data_root), "cache_dir": str(cache), "batch_size": 2, "tgt_len": 8,
                 "eval": {"batch_size": 2}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_tiny(tmp: Path, **model) -> dict:
    """One tiny `lm fit` run (2 steps of write_config's model) on write_corpus's corpus under ``tmp``: the shared
    starting point of the CLI, hostile-input and API tests. Returns tmp, data, cfg, run and ckpt paths."""
    from lm.cli import main

    data = write_corpus(tmp / "data")
    cfg = write_config(tmp / "cfg.yaml", tmp / "run", data, tmp / "cache", **model)
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return {"tmp": tmp, "data": data, "cfg": cfg, "run": tmp / "run", "ckpt": ckpt}


class Loader:
    """A plain iterable of ready batches with a length (what Lightning needs from a train loader)."""
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (but run locks) and its sha256: equal before and after a refused command."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def refused(capsys, world: dict, argv: list[str], *needles: str, exact: bool = False) -> str:
    """`lm argv` exits non-zero with one `lm: error:` paragraph naming every needle, no traceback, and no file
    under ``world["tmp"]`` changed (none added, none rewritten). ``exact``: exit code 2 and a single line.
    Shared by the hostile-input tests (test_hostile.py, test_hostile_data.py)."""
    from lm.cli import main

    before = snapshot(world["tmp"])
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # jsonargparse's own parse errors
        code = e.code
    err = capsys.readouterr().err
    assert (code == 2) if exact else code not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert ("lm: error:" if exact else "error:") in err, err[-2000:]
    msg = err[err.index("lm: error:" if exact else "error:"):].strip()
    assert ("\n" if exact else "\n\n") not in msg, f"more than one paragraph:\n{msg}"
    for n in needles:
        assert n in msg, f"{n!r} not in:\n{msg}"
    assert snapshot(world["tmp"]) == before, "a refused command changed files written before it"
    return msg


def one_paragraph(capsys, code: int) -> str:
    """The single `lm: error:` line a refused command printed (exit 2, no traceback)."""
    out = capsys.readouterr()
    assert code == 2, out.err[-2000:]
    err = out.err.strip()
    lines = [x for x in err.splitlines() if x.startswith("lm: error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    return lines[0]
