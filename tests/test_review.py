"""Defects found in the review of issues 29-31's work (one test per fix; each fails on the code before it)."""

from __future__ import annotations

import os

import pytest
from helpers import one_paragraph, train_tiny

from lm.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("review"))


@pytest.mark.parametrize("bad", ["/proc/lm-review/out", "FILE/out"])
def test_evaluate_out_that_cannot_be_created_is_one_paragraph(run, tmp_path, capsys, bad):
    """`lm evaluate --out /proc/x` raised FileNotFoundError with a traceback (ENOENT is not a write errno):
    now the shared probe (lm.utils.check_writable_dir, also lm corrupt's --out_dir) names --out."""
    (tmp_path / "FILE").write_text("a file, not a folder")
    out = bad.replace("FILE", str(tmp_path / "FILE"))
    if out.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    code = main(["evaluate", "--ckpts", str(run["ckpt"]), "--corruptions", "", "--out", out])
    err = one_paragraph(capsys, code)
    assert f"--out {out} cannot be written" in err and "Nothing was written" in err


def test_non_finite_names_float_tensors_with_nan_or_inf_only():
    """The one "is it finite" check (lm.checkpoint.non_finite) that export, generate, analyze and test share."""
    import torch

    from lm import checkpoint

    tensors = [("ok", torch.ones(3)), ("nan", torch.tensor([1.0, float("nan")])), ("int", torch.tensor([7])),
               ("inf", torch.tensor([-float("inf")], dtype=torch.bfloat16)), ("big", torch.tensor([3e38]))]
    assert checkpoint.non_finite(tensors) == ["nan", "inf"]
    net = torch.nn.Linear(2, 2)
    checkpoint.refuse_non_finite(net, "fine.ckpt")  # finite: no error
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match=r"bad.ckpt holds non-finite weights \(NaN or inf in 1 "
                                                         r"tensors, e.g. bias\): why"):
        checkpoint.refuse_non_finite(net, "bad.ckpt", "why")


def test_export_out_that_cannot_be_created_is_one_paragraph(run, capsys):
    """`lm export --out /proc/x` (mkdtemp under /proc: ENOENT) raised a raw FileNotFoundError."""
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    code = main(["export", "--ckpt", str(run["ckpt"]), "--out", "/proc/lm-review-export"])
    err = one_paragraph(capsys, code)
    assert "--out /proc/lm-review-export cannot be written" in err and "Nothing was written" in err


def test_summary_counts_the_vocabulary_on_the_recipes_vocab_splits(tmp_path, capsys):
    """`lm summary` without --vocab_size dropped data.vocab_splits (the MoE recipes' [train, valid, test]) and
    counted train only: a vocabulary, and so a parameter count, other than the one `lm fit` builds."""
    import yaml
    from helpers import write_config, write_corpus

    from lm.data.datamodule import LMDataModule

    data = write_corpus(tmp_path / "data")
    valid = data / "wikitext-2" / "wiki.valid.tokens"
    valid.write_text(valid.read_text() + " onlyinvalid onlyinvalid2 \n", encoding="utf-8")
    cfg_path = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data, tmp_path / "cache")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["vocab_splits"] = ["train", "valid", "test"]
    cfg_path.write_text(yaml.safe_dump(cfg))
    fit_vocab = LMDataModule(root=str(data), cache_dir=str(tmp_path / "cache"), source="local",
                             vocab_splits=["train", "valid", "test"]).vocab_size
    train_only = LMDataModule(root=str(data), cache_dir=str(tmp_path / "cache"), source="local").vocab_size
    assert fit_vocab == train_only + 2
    capsys.readouterr()
    assert main(["summary", "--config", str(cfg_path)]) == 0
    assert f"vocabulary {fit_vocab:,} (counted on wikitext-2)" in capsys.readouterr().out


def _fit_run_dir(run, tmp_path):
    return ["fit", "--config", str(run["cfg"]), "--trainer.default_root_dir", "/proc/lm-review/run"]


def _fit_cache_dir(run, tmp_path):
    return ["fit", "--config", str(run["cfg"]), "--trainer.default_root_dir", str(tmp_path / "new"),
            "--data.cache_dir", "/proc/lm-review/cache"]


def _analyze_out(run, tmp_path):
    return ["analyze", "--ckpt", str(run["ckpt"]), "--root", str(run["data"]), "--source", "local", "--seq_len", "8",
            "--n_sequences", "2", "--passage_len", "6", "--out", "/proc/lm-review/an"]


@pytest.mark.parametrize("argv, needle", [(_fit_run_dir, "/proc/lm-review/run cannot be used"),
                                          (_fit_cache_dir, "the folder cannot be created there"),
                                          (_analyze_out, "--out /proc/lm-review/an cannot be written")],
                         ids=["fit-run-dir", "fit-cache-dir", "analyze-out"])
def test_folders_that_cannot_be_created_are_one_paragraph(run, tmp_path, capsys, argv, needle):
    """mkdir under /proc fails with ENOENT, which write_error did not translate: `lm fit` into such a run folder
    or cache, and `lm analyze --out` there, ended in a FileNotFoundError traceback. lm.utils.make_dirs marks it
    (FolderNotCreatable) wherever lm creates folders: the run lock, atomic writes, the output probes."""
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    err = one_paragraph(capsys, main(argv(run, tmp_path)))
    assert needle in err and "lm: error:" in err


def test_write_error_keeps_a_missing_input_file_a_bug():
    """Only a folder lm failed to create is a write error; the ENOENT of a file it reads stays a traceback."""
    from lm.utils import FolderNotCreatable, make_dirs, write_error

    with pytest.raises(FileNotFoundError) as missing:
        open("/nonexistent-lm-review/x")
    assert write_error(missing.value) is None
    with pytest.raises(FolderNotCreatable) as e:
        make_dirs("/proc/lm-review/a/b")
    assert "Cannot write /proc/lm-review" in str(write_error(e.value))


def test_analyze_prints_strict_json_too(run, tmp_path, capsys, monkeypatch):
    """analysis.json became strict JSON (a NaN metric is null), but the summary printed on stdout still had `NaN`."""
    import json

    import lm.analysis.cli as analysis

    real = analysis.analyze_model

    def with_a_nan(*a, **k):
        r = real(*a, **k)
        r["collapse_per_layer"][0] = float("nan")
        return r

    monkeypatch.setattr(analysis, "analyze_model", with_a_nan)
    capsys.readouterr()
    assert main(["analyze", "--ckpt", str(run["ckpt"]), "--root", str(run["data"]), "--source", "local",
                 "--seq_len", "8", "--n_sequences", "2", "--passage_len", "6", "--out", str(tmp_path / "an")]) == 0
    out = capsys.readouterr().out

    def no_constants(c):
        raise AssertionError(f"invalid JSON constant {c}")

    printed = json.loads(out[out.index("{"):], parse_constant=no_constants)
    assert printed["collapse_per_layer"][0] is None and printed["complete"] is True
