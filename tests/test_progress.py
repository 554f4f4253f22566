"""Output to a log file (no progress bar): a line at the first step, then every N steps or every T seconds, one
summary line per stage however short the run, data preparation that says what it does, a notice for a run
shorter than its warm-up, and evaluations that leave no TensorBoard version folder behind."""

from __future__ import annotations

import io

import pytest
from helpers import write_config, write_corpus

import lm.tasks.progress as progress
from lm.cli import main
from lm.config import OptimConfig
from lm.tasks.progress import LineProgress
from lm.tasks.schedule import short_run_notice


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_at_the_first_step_every_n_and_every_t_seconds(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    p = LineProgress(every_n_steps=50, every_s=30.0)
    p._last["train"] = clock.now  # as on_train_start sets it
    said = []
    for step, dt in [(1, 60), (2, 10), (3, 10), (4, 11), (5, 1), (50, 1), (51, 5)]:
        clock.now += dt  # seconds since the previous step
        if p._due("train", step, p.every_n_steps):
            said.append(step)
    # step 1 (first), step 4 (31 s after step 1's line), step 50 (every 50); none in between
    assert said == [1, 4, 50]


def test_short_run_notice_states_the_rate_it_reaches():
    o = OptimConfig(lr=1e-3, warmup_steps=200)
    note = short_run_notice(o, 30)
    # standard convention: update n (0-based) runs at (n + 1) / 200; the last of 30 at 30 / 200 = 15%
    assert "30 steps end inside its 200-step" in note and "0.00015 (15% of model.optim.lr 0.001)" in note
    assert "--model.optim.warmup_steps 3 or fewer" in note
    assert short_run_notice(o, 200) is None and short_run_notice(o, 0) is None
    assert short_run_notice(OptimConfig(lr=1e-3, warmup_steps=0), 5) is None


@pytest.fixture
def run(tmp_path):
    data = write_corpus(tmp_path / "data")
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data, tmp_path / "cache")
    return tmp_path, cfg


def test_short_run_prints_first_step_summaries_and_data_preparation(run, capsys):
    tmp, cfg = run
    fit = ["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
           "--trainer.limit_val_batches", "1"]
    assert main(fit) == 0  # 3 steps: far fewer than the 50 between lines
    err = capsys.readouterr().err.splitlines()
    assert any(ln.startswith("step 1/3 (33%), loss ") for ln in err), err
    assert any(ln.startswith("train done: 3 steps (global step 3) in ") and "loss " in ln for ln in err), err
    assert any(ln.startswith("validation done in ") and "ppl " in ln for ln in err), err
    # data preparation: the vocabulary counted, each split tokenised (the first time), in that order
    data = [ln for ln in err if ln.startswith("lm: data: ")]
    assert data[0].startswith("lm: data: counting the wikitext-2 vocabulary on the train split ("), data
    assert data[1].startswith("lm: data: vocabulary: ") and "entries in" in data[1]
    assert any(ln.startswith("lm: data: tokenising wikitext-2.train") for ln in data)
    assert any(ln.startswith("lm: data: wikitext-2.train: ") and " tokens in " in ln for ln in data)
    # write_config keeps OptimConfig's 2000 warm-up steps: the run never reaches the full rate, and says so
    assert sum("end inside its 2000-step learning-rate warm-up" in ln for ln in err) == 1

    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    assert main(["test", "--config", str(cfg), "--ckpt_path", ckpt]) == 0
    assert main(["validate", "--config", str(cfg), "--ckpt_path", ckpt]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(ln.startswith("test done in ") and "ppl " in ln for ln in err), err
    assert any(ln.startswith("lm: data: wikitext-2.valid: ") and "(from the cache)" in ln for ln in err), err  # fit made it
    assert not [ln for ln in err if "counting the" in ln]  # the cached vocabulary is reused, not recounted
    assert not [ln for ln in err if "warm-up" in ln]  # evaluations train nothing
    # evaluations write their JSON; only fit's TensorBoard folder is in the run
    assert [p.name for p in (tmp / "run" / "lightning_logs").iterdir()] == ["version_0"]


def test_no_warmup_notice_when_the_run_outlasts_its_warmup(run, capsys):
    _, cfg = run
    assert main(["fit", "--config", str(cfg), "--model.optim.warmup_steps", "2", "--trainer.max_steps", "2"]) == 0
    assert "warm-up" not in capsys.readouterr().err


def test_the_lines_go_to_the_given_stream_only_without_a_bar():
    buf = io.StringIO()
    p = LineProgress(stream=buf)
    p._say("x")
    assert buf.getvalue() == "x\n"
