"""Issue 19 items 1-4: every stop accounted for, no result from untrained weights, no overwritten run.

The stop tests send real signals to a real ``lm fit`` subprocess (``python -m lm.cli``) on the tiny generated
corpus of test_reliability (test_cli's generator); the concurrency test runs a second real ``lm fit`` into the
folder of one that is running. The rest run the entry point in-process (``lm.cli.main``).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from run_callbacks import subprocess_env
from test_reliability import ckpt_step, fit, losses, write_config, write_corpus




@pytest.fixture
def work(tmp_path, monkeypatch):
    write_corpus(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the lock file aside: taking it is not writing) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def beat_config(tmp: Path, run: str, steps: int = 400, **kw) -> Path:
    """The tiny model, no validation, only the CLI's default RunCheckpoint (no checkpoint before the epoch ends,
    ~80 steps: a stop must save its own), and the Beat callback."""
    return only_default_checkpointing(write_config(tmp, run, steps=steps, extra_callbacks=[
        {"class_path": "run_callbacks.Beat", "init_args": {"path": str(tmp / f"{run}.beat")}}], **kw))


def only_default_checkpointing(cfg: Path) -> Path:
    """Drops write_config's every-step RunCheckpoint: the CLI's default one (monitor val/loss) is the one users get."""
    c = yaml.safe_load(cfg.read_text())
    c["trainer"]["callbacks"] = [cb for cb in c["trainer"]["callbacks"]
                                 if not cb["class_path"].endswith("RunCheckpoint")]
    cfg.write_text(yaml.safe_dump(c))
    return cfg


def start_fit(tmp: Path, cfg: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    env = subprocess_env(tmp)
    log = tmp / f"{cfg.stem}.log"
    with open(log, "wb") as f:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen([sys.executable, "-m", "lm.cli", "fit", "--config", str(cfg), *extra], cwd=tmp,
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def wait_for_step(proc: subprocess.Popen, beat: Path, log: Path, step: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            now = int(beat.read_text())
        except (OSError, ValueError):
            now = -1
        if now >= step:
            return now
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run did not reach step {step}:\n{log.read_text()[-3000:]}")


# ----- item 1: a signal is a non-zero exit with last.ckpt at the stop point -------------------------------
@pytest.mark.slow  # a subprocess per signal (CI runs slow tests)
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_with_nonzero_exit_and_last_ckpt_at_the_stop(work, sig, code):
    """Before: SIGTERM ended `lm fit` with exit 0 and no checkpoint at the stop (Lightning's SystemExit without
    a code), so a study driver marked a third-trained model done. Now: exit 128+signal, one paragraph, and
    last.ckpt holds exactly the step the run stopped at; `--ckpt_path last` continues from there."""
    cfg = beat_config(work, "run")
    proc, log = start_fit(work, cfg)
    try:
        wait_for_step(proc, work / "run.beat", log, 3)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    out = log.read_text()
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = int((work / "run.beat").read_text())  # the last step that finished
    last = work / "run" / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == stopped >= 3
    assert f"lm: stopped by {signal.Signals(sig).name}" in out and f"holds step {stopped}" in out
    assert "--ckpt_path last" in out
    # The stop lost nothing: the resumed run logs its first loss at the step after the stop.
    resume = write_config(work, "run", steps=stopped + 2)
    c = yaml.safe_load(resume.read_text())
    c["trainer"]["logger"]["init_args"]["version"] = "resumed"
    resume.write_text(yaml.safe_dump(c))
    assert fit("--config", str(resume), "--ckpt_path", "last") == 0
    assert sorted(losses(work / "run", "resumed")) == [stopped, stopped + 1]


# ----- item 3: a second concurrent fit into the same folder --------------------------------------------------
@pytest.mark.slow  # a subprocess
def test_concurrent_second_fit_into_the_same_folder_is_refused(work, capsys):
    """Before: two `lm fit` into one folder at once both exited 0, the second replacing the first's files.
    Now the second is refused (exit 2, one paragraph) while the first holds the folder's lock, and leaves every
    file of the first as it was; once the first has ended the folder is free again (resume works)."""
    cfg = beat_config(work, "run")
    proc, log = start_fit(work, cfg)
    try:
        wait_for_step(proc, work / "run.beat", log, 1)
        proc.send_signal(signal.SIGSTOP)  # hold the first still, so that its files cannot change meanwhile
        before = tree_hash(work / "run")
        capsys.readouterr()
        second = write_config(work, "run", steps=2)  # another config, same folder
        assert fit("--config", str(second)) == 2
        err = capsys.readouterr().err
        assert "Another `lm fit` is writing to" in err and "Traceback" not in err
        assert tree_hash(work / "run") == before
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
        proc.wait()
    assert fit("--config", str(write_config(work, "run", steps=ckpt_step(work / "run" / "checkpoints" / "last.ckpt")
                                                   + 1)), "--ckpt_path", "last") == 0


# ----- item 3: a refused fit writes nothing --------------------------------------------------------------------
def test_refused_fit_leaves_config_and_tokenizer_untouched(work, capsys):
    """Before: a fresh `lm fit` into a used folder (refused: it holds checkpoints) first rewrote config.yaml and
    tokenizer.json -- with another data root, a tokenizer of another vocabulary. Same for a resume on data with
    another vocabulary. Now both are refused before anything is written."""
    assert fit("--config", str(write_config(work, "run", steps=2))) == 0
    before = tree_hash(work / "run")
    write_corpus(work / "other", seed=5, n_words=60)  # another vocabulary
    other = write_config(work, "run", steps=4)
    c = yaml.safe_load(other.read_text())
    c["data"]["root"], c["data"]["cache_dir"] = str(work / "other"), str(work / "cache2")
    other.write_text(yaml.safe_dump(c))
    capsys.readouterr()
    assert fit("--config", str(other)) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "Traceback" not in err
    assert tree_hash(work / "run") == before
    assert fit("--config", str(other), "--ckpt_path", "last") == 2
    err = capsys.readouterr().err
    assert "another vocabulary" in err and "--data.tokenizer" in err and "Traceback" not in err
    assert tree_hash(work / "run") == before


# ----- item 2: validate/test never score untrained weights ---------------------------------------------------
def test_test_without_checkpoint_uses_last_or_refuses(work, capsys):
    """Before: `lm test --config <run>/config.yaml` (the README's own rerun command) scored a fresh model's
    random weights, exited 0 and overwrote results/test-*.json with "checkpoint": null. Now: without
    --ckpt_path it scores the run's last.ckpt; with no checkpoint at all (or `--ckpt_path last` and none)
    it refuses and writes nothing; a non-finite result is an error and the stored result stays."""
    cfg = write_config(work, "run", steps=2)
    for sub in ("test", "validate"):
        for extra in ([], ["--ckpt_path", "last"]):
            capsys.readouterr()
            assert main_([sub, "--config", str(cfg), *extra]) == 2
            err = capsys.readouterr().err
            assert "needs trained weights" in err and "Traceback" not in err
    assert not (work / "run").exists()
    assert fit("--config", str(cfg)) == 0
    last = work / "run" / "checkpoints" / "last.ckpt"
    result = work / "run" / "results" / "test-segments.json"
    assert main_(["test", "--config", str(cfg), "--ckpt_path", str(last)]) == 0
    explicit = json.loads(result.read_text())
    result.unlink()
    assert main_(["test", "--config", str(cfg)]) == 0
    implicit = json.loads(result.read_text())
    assert implicit["checkpoint"] == str(last) and implicit["ppl"] == explicit["ppl"]
    # A checkpoint with NaN weights: an error naming the cause; the stored result is not replaced.
    ck = torch.load(last, map_location="cpu", weights_only=True)
    key = next(k for k in ck["state_dict"] if k.endswith("qkv.weight"))  # not the tied embedding/softmax pair
    ck["state_dict"][key] = torch.full_like(ck["state_dict"][key], float("nan"))
    bad = work / "nan.ckpt"
    torch.save(ck, bad)
    stored = result.read_bytes()
    capsys.readouterr()
    assert main_(["test", "--config", str(cfg), "--ckpt_path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "weights are non-finite" in err and "No result was written" in err and "Traceback" not in err
    assert result.read_bytes() == stored


def main_(argv):
    from lm.cli import main

    return main(argv)


# ----- item 4: last.ckpt is the latest step ------------------------------------------------------------------
def test_last_ckpt_follows_every_validation_and_stale_tmp_is_removed(work):
    """Before: last.ckpt was rewritten after a validation only when the monitored loss improved, so a crash
    resumed from an older step than the last validation (a kill at step 48 went back to 30, not 45). Here the
    validation loss gets worse every time (WorseVal); a crash before step 5 must leave last.ckpt at step 5,
    the last validation. A temp file that a kill during a save left behind is removed by the next fit."""
    cfg = only_default_checkpointing(write_config(
        work, "run", steps=8, limit_val_batches=1, val_check_interval=1,
        extra_callbacks=[{"class_path": "run_callbacks.WorseVal"},
                         {"class_path": "run_callbacks.CrashAt", "init_args": {"step": 5}}]))
    with pytest.raises(RuntimeError, match="simulated crash before step 5"):
        fit("--config", str(cfg))
    ckpts = work / "run" / "checkpoints"
    assert ckpt_step(ckpts / "last.ckpt") == 5  # 5 steps done, validated after each
    stale = ckpts / ".last.ckpt.k2j4h1.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert fit("--config", str(write_config(work, "run", steps=6)), "--ckpt_path", "last") == 0
    assert not stale.exists() and ckpt_step(ckpts / "last.ckpt") == 6


@pytest.mark.parametrize("env, other", [({}, False), ({"LOCAL_RANK": "0"}, False), ({"LOCAL_RANK": "1"}, True),
                                        ({"RANK": "3"}, True), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, True)])
def test_only_rank_zero_takes_the_run_lock(monkeypatch, env, other):
    # DDP re-runs `lm fit` for ranks 1..N-1 (LOCAL_RANK set): they must not contend for rank 0's lock.
    from lm.rundir import other_rank

    for k in ("LOCAL_RANK", "NODE_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert other_rank() is other
