"""What a user sees: `lm --help`, progress lines in a log file, the third-party noise the CLI silences."""

from __future__ import annotations

import io
import logging
import re
import warnings

import lightning as L
import pytest

from helpers import write_corpus

from lm.cli import COMMANDS, main, quiet_harmless_warnings
from lm.data.datamodule import LMDataModule
from lm.tasks.lm_module import LanguageModel
from lm.tasks.progress import LineProgress


def test_help_lists_every_command_once_and_no_predict(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  lm (\w+) ", out, flags=re.M)
    assert listed == ["fit", "validate", "test", "corrupt", "evaluate", "finetune", "analyze", "generate", "export",
                      "summary"]
    assert list(COMMANDS) == listed and "predict" not in out
    assert main([]) == 2  # no command: the same listing, as an error
    assert "lm generate" in capsys.readouterr().out
    assert main(["predict", "--help"]) == 2  # not a command (tests/test_help.py)
    assert "unknown command 'predict'" in capsys.readouterr().err


@pytest.fixture
def restore_log_filters():
    loggers = [logging.getLogger(f"lightning.{p}.utilities.rank_zero") for p in ("fabric", "pytorch")]
    saved = [list(lg.filters) for lg in loggers]
    yield
    for lg, filters in zip(loggers, saved):
        lg.filters[:] = filters


def test_only_the_known_harmless_messages_are_silenced(caplog, restore_log_filters):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_harmless_warnings()
        warnings.warn("LightningCLI's args parameter is intended to run from within Python like if it were ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` ...")
        warnings.warn("Precision bf16-mixed is not supported by the model summary.  Estimated model size in MB ...")
        warnings.warn("The dataloader does something you should know about")
    assert [str(w.message) for w in seen] == ["The dataloader does something you should know about"]
    log = logging.getLogger("lightning.fabric.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]...")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_line_progress_in_a_log_file(tmp_path):
    data = write_corpus(tmp_path / "data")
    dm = LMDataModule(root=str(data), source="local", batch_size=2, tgt_len=8, cache_dir=str(tmp_path / "c"),
                      eval={"batch_size": 2})
    model = LanguageModel(vocab_size=dm.vocab_size, tgt_len=8, n_layer=1, d_model=8, n_head=2, d_head=4, d_inner=16,
                          adaptive=False, cutoffs=[])
    buf = io.StringIO()
    trainer = L.Trainer(max_steps=4, val_check_interval=4, limit_val_batches=3, num_sanity_val_steps=0, logger=False,
                        default_root_dir=str(tmp_path / "run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LineProgress(every_n_steps=2, every_n_batches=2, stream=buf)])
    trainer.fit(model, datamodule=dm)
    lines = buf.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines if ln.startswith("step")] == [
        "step 1/4 (25%)", "step 2/4 (50%)", "step 4/4 (100%)"]  # the first step too (tests/test_progress.py)
    assert any(ln.startswith("step 4/4 (100%), loss ") and "left" in ln for ln in lines)
    assert any(ln.startswith("validation batch 2/3 (67%)") for ln in lines)
    assert any(ln.startswith("validation done in ") and "ppl " in ln for ln in lines)
    # with Lightning's bar on (a terminal), the lines stay off
    buf2 = io.StringIO()
    L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=True,
              default_root_dir=str(tmp_path / "run2"),
              enable_model_summary=False, callbacks=[LineProgress(every_n_steps=1, stream=buf2)]
              ).fit(model, datamodule=dm)
    assert buf2.getvalue() == ""
