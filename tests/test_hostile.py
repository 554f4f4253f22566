"""The bad-input list of issue 19, replayed: each case must end in a non-zero exit, with one paragraph
(``lm: error: ...``, no blank line inside, no traceback), and leave every file written before it as it was
(the run directory, the data and the caches are hashed before and after each case).

Runs in CI with the rest of the suite; ``scripts/hostile.sh`` runs just this module. Signals, the run-directory
lock and the untrained-weights cases are in ``test_run_safety.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import refused, snapshot, train_tiny, write_config

import lm.utils
from lm.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny trained run (2 steps), its data and caches, an evaluation result; shared by every case."""
    world = train_tiny(tmp_path_factory.mktemp("hostile"))
    assert main(["test", "--config", str(world["cfg"]), "--ckpt_path", str(world["ckpt"])]) == 0
    (world["tmp"] / "a_file").write_text("not a folder\n")
    return world


def fit_args(world, *extra):
    return ["fit", "--config", str(world["cfg"]), "--trainer.default_root_dir", str(world["tmp"] / "new"), *extra]


# ----- item 5: raw tracebacks where a paragraph is promised ------------------------------------------------
def test_val_check_interval_beyond_an_epoch(world, capsys):
    # ~70 batches per epoch here. An integer interval now counts steps across epochs (the stock recipes' 500 on
    # a small corpus used to be a ValueError) ...
    new = world["tmp"] / "vci"
    try:
        assert main(["fit", "--config", str(world["cfg"]), "--trainer.default_root_dir", str(new),
                     "--trainer.val_check_interval", "500", "--trainer.max_steps", "2"]) == 0
    finally:
        shutil.rmtree(new, ignore_errors=True)
    # ... and with the per-epoch counting asked for explicitly, Lightning's error is one paragraph.
    refused(capsys, world, fit_args(world, "--trainer.val_check_interval", "500", "--trainer.check_val_every_n_epoch",
                                    "1"), "val_check_interval", "check_val_every_n_epoch")


@pytest.mark.parametrize("accel, needle", [("tpuu", "tpuu"), ("mps", "mps")], ids=["unknown", "unavailable"])
def test_unknown_or_unavailable_accelerator(world, capsys, accel, needle):
    refused(capsys, world, fit_args(world, "--trainer.accelerator", accel), "trainer settings", needle)


def test_run_dir_is_a_file(world, capsys):
    refused(capsys, world, ["fit", "--config", str(world["cfg"]), "--trainer.default_root_dir",
                            str(world["tmp"] / "a_file")], "a_file", "cannot be used")


def test_full_disk_while_saving(world, capsys, monkeypatch):
    """A full disk (ENOSPC) can only be faked here: it is raised at the OS boundary (fsync of the atomic write).
    The fit stops in one paragraph; the run's earlier checkpoint and files are untouched (resume is refused
    otherwise: it goes into a copy of the run)."""
    run = world["tmp"] / "copy"
    shutil.copytree(world["run"], run)
    try:
        real = os.fsync

        def full(fd):
            real(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        before = snapshot(run)
        monkeypatch.setattr(lm.utils.os, "fsync", full)
        capsys.readouterr()
        assert main(["fit", "--config", str(world["cfg"]), "--trainer.default_root_dir", str(run),
                     "--ckpt_path", "last", "--trainer.max_steps", "3"]) == 2
        err = capsys.readouterr().err
        assert "the disk is full" in err and "Traceback" not in err
        after = snapshot(run)
        assert {k: v for k, v in after.items() if k in before} == {k: before[k] for k in after if k in before}
        assert not [k for k in after if k.endswith(".tmp")]
    finally:
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.slow  # a subprocess
def test_read_only_run_directory(world, tmp_path):
    """A real read-only folder: root ignores file modes, so as root the command runs as `nobody` (setpriv)."""
    base = Path(tempfile.mkdtemp(prefix="lm-ro-"))
    try:
        os.chmod(base, 0o755)
        shutil.copytree(world["data"], base / "data")
        ro = base / "ro"
        ro.mkdir()
        cfg = write_config(base / "cfg.yaml", ro / "run", base / "data", base / "cache")
        for p in [base, *base.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(ro, 0o555)  # read-only for everyone who honours modes
        prefix = []
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: no way to make a folder read-only")
            prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(base), "MPLCONFIGDIR": str(base)}
        before = snapshot(base)
        r = subprocess.run([*prefix, sys.executable, "-m", "lm.cli", "fit", "--config", str(cfg)], cwd=base,
                           env=env, capture_output=True, text=True, timeout=300)
        err = r.stderr
        assert r.returncode == 2, err[-3000:]
        assert "Traceback" not in err and "permission denied" in err and str(ro / "run") in err, err[-3000:]
        assert snapshot(base) == before
    finally:
        os.chmod(base / "ro", 0o755) if (base / "ro").exists() else None
        shutil.rmtree(base, ignore_errors=True)


def test_cache_dir_is_a_file(world, capsys):
    refused(capsys, world, fit_args(world, "--data.cache_dir", str(world["tmp"] / "a_file")), "a_file",
            "not a folder")


def test_evaluate_out_is_a_file(world, capsys):
    refused(capsys, world, ["evaluate", "--ckpts", str(world["ckpt"]), "--root", str(world["data"]), "--corruptions",
                            "", "--out", str(world["tmp"] / "a_file")], "a_file")


def test_corrupt_out_dir_is_a_file_or_not_writable(world, capsys):
    src = str(world["data"] / "wikitext-2" / "wiki.test.tokens")
    refused(capsys, world, ["corrupt", src, "--out_dir", str(world["tmp"] / "a_file")], "a_file")
    # /sys refuses new folders even to root (EPERM; EACCES otherwise): a real unwritable filesystem.
    refused(capsys, world, ["corrupt", src, "--out_dir", "/sys/lm-hostile"], "/sys/lm-hostile")


def test_negative_init_std(world, capsys):
    refused(capsys, world, fit_args(world, "--model.init_std", "-1"), "model.init_std", "> 0")


def test_analyze_seq_len_zero(world, capsys):
    refused(capsys, world, ["analyze", "--ckpt", str(world["ckpt"]), "--root", str(world["data"]), "--seq_len", "0"],
            "--seq_len must be >= 1")


# ----- item 6: inputs accepted that should not be ------------------------------------------------------------
def test_explicit_data_root_that_does_not_exist(world, capsys):
    # With data.source local it is an error; with auto (the default) the corpus is downloaded INTO that
    # root (tests/test_download.py) — in neither case is another place's copy used instead.
    refused(capsys, world, fit_args(world, "--data.root", str(world["tmp"] / "nowhere"), "--data.source", "local"),
            "nowhere", "does not exist")


def test_window_larger_than_the_machine(world, capsys):
    refused(capsys, world, fit_args(world, "--data.tgt_len", "10000000"), "GiB", "Lower data.tgt_len")
    refused(capsys, world, ["test", "--config", str(world["cfg"]), "--ckpt_path", str(world["ckpt"]),
                            "--data.eval.tgt_len", "10000000"], "GiB", "data.eval.tgt_len")


def test_empty_ckpts_list(world, capsys):
    refused(capsys, world, ["evaluate", "--ckpts", "", "--root", str(world["data"])], "--ckpts names no checkpoint")


@pytest.mark.parametrize("content, needle", [(b"", "is empty"), (bytes(range(256)) * 4, "not valid UTF-8")],
                         ids=["empty", "binary"])
def test_corrupting_an_empty_or_binary_file(world, capsys, content, needle):
    src = world["tmp"] / "odd.tokens"
    src.write_bytes(content)
    try:
        refused(capsys, world, ["corrupt", str(src), "--out_dir", str(world["tmp"] / "cache" / "corr")], needle)
    finally:
        src.unlink()


def test_checkpoint_with_non_finite_weights_in_evaluate(world, capsys, tmp_path):
    ck = torch.load(world["ckpt"], map_location="cpu", weights_only=True)
    key = next(k for k in ck["state_dict"] if k.endswith("qkv.weight"))
    ck["state_dict"][key] = torch.full_like(ck["state_dict"][key], float("inf"))
    bad = world["tmp"] / "inf.ckpt"
    torch.save(ck, bad)
    try:
        refused(capsys, world, ["evaluate", "--ckpts", str(bad), "--root", str(world["data"]), "--corruptions", "",
                                "--out", str(tmp_path / "ev")], "non-finite", "No result was written")
    finally:
        bad.unlink()


def test_integer_limit_means_batches(world):
    """`--trainer.limit_*_batches 1` used to mean 100% (Lightning's type tries float first): now an integer
    is a number of batches, a decimal a fraction."""
    out = world["tmp"] / "lim"
    try:
        for value, windows in (("1", 1), ("3", 3), ("1.0", None)):
            assert main(["validate", "--config", str(world["cfg"]), "--ckpt_path", str(world["ckpt"]),
                         "--trainer.default_root_dir", str(out), "--trainer.limit_val_batches", value]) == 0
            res = json.loads((out / "results" / "val-segments.json").read_text())
            per_batch = 2 * 8  # eval batch 2 x window 8
            if windows is None:
                assert res["tokens_scored"] == res["data"]["tokens"] - 1  # every target of the split
            else:
                assert res["tokens_scored"] == windows * per_batch
        # and for training: 1 batch per epoch, 2 epochs -> 2 steps (not 2 full epochs)
        assert main(["fit", "--config", str(world["cfg"]), "--trainer.default_root_dir", str(out / "fit"),
                     "--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1",
                     "--trainer.limit_val_batches", "0"]) == 0
        assert torch.load(out / "fit" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_model_options_replaced_by_the_checkpoint_are_named(world, capsys, tmp_path):
    capsys.readouterr()
    assert main(["test", "--config", str(world["cfg"]), "--ckpt_path", str(world["ckpt"]), "--model.n_layer", "4",
                 "--trainer.default_root_dir", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert "lm: warning:" in err and "model.n_layer: 4 -> 2" in err


# ----- item 7: lost work and stray files ------------------------------------------------------------------------
def test_evaluate_checks_every_checkpoint_before_the_first_evaluation(world, capsys, tmp_path):
    missing = world["tmp"] / "runs" / "b" / "checkpoints" / "last.ckpt"
    refused(capsys, world, ["evaluate", "--ckpts", f"{world['ckpt']},{missing}", "--root", str(world["data"]),
                            "--corruptions", "", "--out", str(tmp_path / "ev")], str(missing), "does not exist")
    assert not (tmp_path / "ev").exists()  # nothing was evaluated, nothing written


def test_evaluate_default_out_is_under_the_run(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old default wrote results/evaluate into the working directory
    assert main(["evaluate", "--ckpts", str(world["ckpt"]), "--root", str(world["data"]), "--corruptions", ""]) == 0
    out = world["run"] / "evaluate" / "results.json"
    try:
        report = json.loads(out.read_text())
        assert report["complete"] and len(report["rows"]) == 1
        assert not (tmp_path / "results").exists()
    finally:
        shutil.rmtree(world["run"] / "evaluate")


def test_analyze_leaves_nothing_in_tmp(world, tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("lm-analyze-*"))
    assert main(["analyze", "--ckpt", str(world["ckpt"]), "--root", str(world["data"]), "--seq_len", "8",
                 "--n_sequences", "2", "--passage_len", "8", "--out", str(tmp_path / "an")]) == 0
    assert set(Path(tempfile.gettempdir()).glob("lm-analyze-*")) == before


def test_train_json_counts_an_interrupted_session(world, tmp_path, monkeypatch):
    """A session that ends in an exception is recorded too (it trained), marked with how it ended."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import lm.tasks.lm_module as mod

    run = tmp_path / "run"
    real = mod.LanguageModel.training_step

    def stop_at_2(self, batch, batch_idx):
        if self.global_step == 2:
            raise SIGTERMException  # what Lightning raises at a batch boundary after SIGTERM
        return real(self, batch, batch_idx)

    monkeypatch.setattr(mod.LanguageModel, "training_step", stop_at_2)
    assert main(["fit", "--config", str(world["cfg"]), "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", "5"]) == 143
    summary = json.loads((run / "results" / "train.json").read_text())
    assert summary["global_step"] == 2 and summary["sessions"][0]["ended"] == "SIGTERM"
    assert summary["sessions"][0]["steps"] == 2 and summary["tokens"] == 2 * 2 * 8
