"""SST-2 data preparation says what it does (issue 30), in the ``lm: data:`` lines the language-model data module
prints: where the files are, the vocabulary and its size, each split read and tokenised with counts and time."""

from __future__ import annotations

import re

import pytest
from test_sst2 import make_lm_ckpt, write_tsv

from lm.data.sst2 import SST2DataModule

TRAIN = ["a good film", "a bad film", "good good", "Bad"]  # fresh, lower-cased: a, good, film, bad
DEV = ["a good plot", "bad"]  # "plot" is unseen in train


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "data"
    write_tsv(d / "glue" / "SST-2" / "train.tsv", [(s, i % 2) for i, s in enumerate(TRAIN)])
    write_tsv(d / "glue" / "SST-2" / "dev.tsv", [(s, i % 2) for i, s in enumerate(DEV)])
    return d


def data_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lm: data: ")]


def test_fresh_vocab_setup_reports_files_vocabulary_and_splits(root, capsys):
    SST2DataModule(root=str(root), source="local", vocab="fresh", limit_train=3).setup("fit")
    lines = data_lines(capsys)
    assert lines[0] == f"lm: data: SST-2: train.tsv and dev.tsv in {root / 'glue' / 'SST-2'}", lines
    assert re.fullmatch(r"lm: data: SST-2 train: read 4 sentences from train\.tsv in \d+\.\d s "
                        r"\(the first 3 kept: data\.limit_train\)", lines[1]), lines
    # <pad> <eos> <unk> + the 4 words of the first 3 train sentences (a, good, film, bad)
    assert re.fullmatch(r"lm: data: SST-2 vocabulary: counted on train \(3 sentences, min_freq 1\): 7 entries in "
                        r"\d+\.\d s", lines[2]), lines
    assert re.match(r"lm: data: SST-2 train: tokenised 3 sentences, 8 words in \d+\.\d s; unknown-word rate 0\.00% ",
                    lines[3]), lines
    assert re.fullmatch(r"lm: data: SST-2 dev: read 2 sentences from dev\.tsv in \d+\.\d s", lines[4]), lines
    # dev: 4 words, "plot" unknown -> 25%
    assert re.match(r"lm: data: SST-2 dev: tokenised 2 sentences, 4 words in \d+\.\d s; unknown-word rate 25\.00% ",
                    lines[5]), lines
    assert len(lines) == 6, lines


def test_each_step_is_reported_once(root, capsys):
    dm = SST2DataModule(root=str(root), source="local", vocab="fresh", vocab_count="train+dev")
    dm.setup("fit")
    dm.setup("validate")  # already prepared: silent
    dm.train_dataloader(), dm.val_dataloader()
    lines = data_lines(capsys)
    assert len(lines) == 6 and sum("vocabulary" in ln for ln in lines) == 1, lines
    assert "counted on train+dev (6 sentences, min_freq 1): 8 entries" in lines[3], lines  # + plot


def test_reused_vocab_names_the_checkpoint_and_its_size(root, tmp_path, capsys):
    ckpt = make_lm_ckpt(tmp_path / "lm" / "last.ckpt")
    dm = SST2DataModule(root=str(root), source="local", pretrained=str(ckpt))
    dm.setup("validate")  # dev only
    lines = data_lines(capsys)
    assert lines[1].startswith("lm: data: SST-2 dev: read 2 sentences"), lines
    assert lines[2] == f"lm: data: SST-2 vocabulary: reused from {ckpt} (word, {dm.vocab_size} entries)", lines
    assert lines[3].startswith("lm: data: SST-2 dev: tokenised 2 sentences") and len(lines) == 4, lines
