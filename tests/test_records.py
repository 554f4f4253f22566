"""Records that never overstate (issue 30) and stops that never look like completions (issue 31 classes 3, 5-7).

Every result JSON (``lm test``/``validate``, ``lm evaluate``, ``lm finetune fit``/``validate``) names the checkpoint,
its training step, the Trainer's precision and ``complete``; a limited run or one a signal reached is
``complete: false`` and exits non-zero. The signals are real (``os.kill`` of this process from inside a batch or
between evaluation variants, through ``lm.cli.main``'s handlers); the expected step/batch counts come from the
tiny run's own checkpoint and data loaders.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import train_tiny
from test_sst2 import make_lm_ckpt, sentences, write_tsv

from lm.cli import main
from lm.tasks.classifier import SequenceClassifier
from lm.tasks.lm_module import LanguageModel
from lm.utils import RunLock

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("records"))


def paragraph(capsys, code: int, expect: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expect, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("lm: error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    return lines[0]


def sigterm_in_last_batch(monkeypatch, cls=LanguageModel, hook="on_test_batch_end", loop="test_loop"):
    """SIGTERM from inside the last batch of an evaluation (Lightning checks for a stop only before the next one)."""
    sent = []

    def last_batch_end(self, *a, **kw):
        if getattr(self.trainer, loop).batch_progress.is_last_batch and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cls, hook, last_batch_end, raising=False)
    return sent


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ----- lm fit ---------------------------------------------------------------------------------------------
def test_train_json_is_complete_only_for_a_fit_that_ran_to_its_end(world, capsys, tmp_path, monkeypatch):
    assert json.loads((world["run"] / "results" / "train.json").read_text())["complete"] is True
    real = LanguageModel.training_step

    def step(self, batch, batch_idx):
        if self.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModel, "training_step", step)
    run = tmp_path / "stopped"
    code = main(["fit", "--config", str(world["cfg"]), "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", "5"])
    assert code == 143, capsys.readouterr().err[-2000:]
    summary = json.loads((run / "results" / "train.json").read_text())
    assert summary["complete"] is False and summary["sessions"][-1]["ended"] == "SIGTERM"


# ----- lm test / validate -------------------------------------------------------------------------------
def test_test_json_names_checkpoint_step_precision_and_is_complete_only_unlimited(world, capsys):
    res = world["run"] / "results" / "test-segments.json"
    assert main(["test", "--config", str(world["cfg"]), "--trainer.limit_test_batches", "1.0"]) == 0
    r = json.loads(res.read_text())
    assert r["checkpoint"] == str(world["ckpt"]) and r["step"] == ckpt_step(world["ckpt"]) == 2
    assert r["precision"] == "32-true" and r["protocol"]["protocol"] == "segments" and r["tokens_scored"] > 0
    assert r["complete"] is True and r["batches_scored"] == r["batches_total"] > 2 and r["limit_batches"] == 1.0
    full_tokens = r["tokens_scored"]
    assert main(["test", "--config", str(world["cfg"])]) == 0  # the config's limit_test_batches: 2
    r = json.loads(res.read_text())
    assert r["complete"] is False and r["limit_batches"] == 2 and r["batches_scored"] == 2
    assert "limited to 2 batches" in r["incomplete"] and 0 < r["tokens_scored"] < full_tokens


def test_sigterm_in_the_last_test_batch_exits_143_and_records_incomplete(world, capsys, monkeypatch):
    sent = sigterm_in_last_batch(monkeypatch)
    code = main(["test", "--config", str(world["cfg"]), "--trainer.limit_test_batches", "1.0"])
    assert sent and code == 143, capsys.readouterr().err[-2000:]
    r = json.loads((world["run"] / "results" / "test-segments.json").read_text())
    assert r["complete"] is False and "stopped by a signal" in r["incomplete"]


@pytest.mark.parametrize("sub, name", [("fit", "hpc"), ("fit", "best"), ("test", "hpc")])
def test_ckpt_path_names_without_meaning_are_one_paragraph(world, capsys, tmp_path, sub, name):
    run = tmp_path / "r"
    msg = paragraph(capsys, main([sub, "--config", str(world["cfg"]), "--ckpt_path", name,
                                  "--trainer.default_root_dir", str(run if sub == "fit" else world["run"])]))
    assert f"--ckpt_path {name}" in msg and "Pass" in msg and not run.exists()


def test_test_ckpt_path_best_scores_the_best_checkpoint_or_says_why(world, capsys, tmp_path):
    best = world["run"] / "checkpoints" / "epoch=0-step=1.ckpt"
    best.write_bytes(world["ckpt"].read_bytes())  # the only checkpoint beside last.ckpt
    try:
        assert main(["test", "--config", str(world["cfg"]), "--ckpt_path", "best"]) == 0
        assert json.loads((world["run"] / "results" / "test-segments.json").read_text())["checkpoint"] == str(best)
    finally:
        best.unlink()
    other = tmp_path / "empty"
    (other / "checkpoints").mkdir(parents=True)
    msg = paragraph(capsys, main(["test", "--config", str(world["cfg"]), "--ckpt_path", "best",
                                  "--trainer.default_root_dir", str(other)]))
    assert "best-by-validation" in msg and "--ckpt_path" in msg


# ----- lm evaluate --------------------------------------------------------------------------------------
def evaluate(world, out: Path, *extra: str) -> int:
    return main(["evaluate", "--ckpts", str(world["ckpt"]), "--root", str(world["data"]), "--corruptions", "",
                 "--accelerator", "cpu", "--batch_size", "2", "--out", str(out), *extra])


def test_evaluate_limit_is_recorded_and_never_complete(world, capsys, tmp_path):
    assert evaluate(world, tmp_path / "full") == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    clean = full["rows"][0]["results"]["clean"]
    assert full["complete"] is True and clean["complete"] is True and clean["step"] == 2
    assert clean["precision"] == full["precision"] == "32-true" and clean["checkpoint"] == str(world["ckpt"])
    assert full["tokens_scored"] == clean["tokens_scored"] > 0
    assert evaluate(world, tmp_path / "lim", "--limit_batches", "1") == 0
    lim = json.loads((tmp_path / "lim" / "results.json").read_text())
    c = lim["rows"][0]["results"]["clean"]
    assert lim["complete"] is False and c["complete"] is False and lim["limit_batches"] == 1
    assert c["batches_scored"] == 1 < c["batches_total"] and 0 < lim["tokens_scored"] < full["tokens_scored"]
    assert "INCOMPLETE: limited to 1 batches" in (tmp_path / "lim" / "table.md").read_text()
    assert "INCOMPLETE" not in (tmp_path / "full" / "table.md").read_text()


@pytest.mark.parametrize("extra, needle", [(["--limit_batches", "0"], "--limit_batches 0"),
                                           (["--limit_batches", "1.5"], "--limit_batches 1.5"),
                                           (["--precision", "bogus"], "--precision bogus")])
def test_evaluate_bad_limit_or_precision_is_one_paragraph(world, capsys, tmp_path, extra, needle):
    msg = paragraph(capsys, evaluate(world, tmp_path / "ev", *extra))
    assert needle in msg and not (tmp_path / "ev").exists()


def test_second_evaluate_into_a_busy_out_is_refused(world, capsys, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.json").write_text('{"first": true}')
    with RunLock(out, "lm evaluate"):  # the first evaluation, still running
        msg = paragraph(capsys, evaluate(world, out))
    assert "Another `lm evaluate` is writing to" in msg and "--out" in msg
    assert json.loads((out / "results.json").read_text()) == {"first": True}


def test_sigterm_in_evaluates_last_batch_exits_143_and_records_incomplete(world, capsys, tmp_path, monkeypatch):
    sent = sigterm_in_last_batch(monkeypatch)
    code = evaluate(world, tmp_path / "ev")
    assert sent and code == 143, capsys.readouterr().err[-2000:]
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["complete"] is False and "stopped" in r["incomplete"] and not (tmp_path / "ev" / "table.md").exists()


def test_sigterm_between_variants_leaves_no_scratch_and_records_incomplete(world, capsys, tmp_path, monkeypatch):
    from lm.tasks.progress import LineProgress

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    built, real_init = [], LineProgress.__init__

    def init(self, *a, **kw):  # one per Trainer: the up-front check's, the clean run's, then the corrupted one's
        built.append(1)
        if len(built) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        real_init(self, *a, **kw)

    monkeypatch.setattr(LineProgress, "__init__", init)
    code = main(["evaluate", "--ckpts", str(world["ckpt"]), "--root", str(world["data"]), "--accelerator", "cpu",
                 "--corruptions", "word_swap:0.1", "--batch_size", "2", "--out", str(tmp_path / "ev")])
    assert len(built) == 3 and code == 143, capsys.readouterr().err[-2000:]
    assert not list(scratch_root.glob("lm-eval-*")), list(scratch_root.iterdir())
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["complete"] is False and list(r["rows"][0]["results"]) == ["clean"]


# ----- lm finetune ----------------------------------------------------------------------------------------
@pytest.fixture
def sst2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "data"
    write_tsv(d / "glue" / "SST-2" / "train.tsv", sentences(96, 0))
    write_tsv(d / "glue" / "SST-2" / "dev.tsv", sentences(32, 1))
    run = tmp_path / "sst2"
    common = ["--config", str(ROOT / "configs" / "sst2" / "finetune.yaml"), "--data.root", str(d),
              "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false"]
    return {"run": run, "common": common, "pretrained": make_lm_ckpt(tmp_path / "lm" / "last.ckpt")}


@pytest.mark.slow  # two finetunes
def test_finetune_records_complete_checkpoint_and_the_checkpoints_step(sst2, capsys):
    run = sst2["run"]
    # (the recipe's precision is `auto`, machine-dependent for a checkpoint that records none: pinned here)
    assert main(["finetune", "fit", *sst2["common"], "--model.pretrained", str(sst2["pretrained"]),
                 "--trainer.max_epochs", "1", "--trainer.precision", "32-true"]) == 0
    fit = json.loads((run / "results" / "sst2-dev.json").read_text())
    last = run / "checkpoints" / "last.ckpt"
    assert fit["complete"] is True and fit["checkpoint"] == str(last) and Path(fit["best_checkpoint"]).is_file()
    assert fit["precision"] == "32-true" and fit["step"] == ckpt_step(last) > 0
    assert main(["finetune", "validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)]) == 0
    val = json.loads((run / "results" / "sst2-dev-validate.json").read_text())
    assert val["step"] == ckpt_step(last) and val["checkpoint"] == str(last) and val["complete"] is True


@pytest.mark.slow  # a finetune
def test_interrupted_finetune_fit_is_not_a_finished_one(sst2, capsys, monkeypatch):
    """A stop after the first dev evaluation: exit 143, and the dev result written then says complete: false."""
    sent = []
    real = SequenceClassifier.training_step

    def step(self, batch, batch_idx):
        if self.trainer.state.fn == "fit" and self.history and not sent:  # after a dev evaluation
            sent.append(self.global_step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(SequenceClassifier, "training_step", step)
    code = main(["finetune", "fit", *sst2["common"], "--model.pretrained", str(sst2["pretrained"])])
    assert sent and code == 143, capsys.readouterr().err[-2000:]
    r = json.loads((sst2["run"] / "results" / "sst2-dev.json").read_text())
    assert r["complete"] is False and "stopped" in r["incomplete"] and r["checkpoint"] is None
