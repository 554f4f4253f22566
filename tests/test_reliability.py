"""Reliability: resume without loss, atomic checkpoints, guarded numerics, self-healing caches, determinism.

Every run here is a real ``lm fit`` (the console entry point, in-process through ``lm.cli.main`` or as a
subprocess where it must be killed) on a tiny generated WikiText-like corpus, with a checkpoint after
every step and per-step losses read back from a CSVLogger.

Related tests elsewhere: same seed -> byte-identical corrupted sets and manifests
(``test_corruptions.py::test_same_seed_same_output_and_manifest``); the token cache's key and checksum
(``test_data.py::test_cache_hit_stale_and_corruption``); resumption of the ordered streams at the next
batch (``test_data.py::test_lightning_resume_continues_at_next_batch``); Elliptical's metric with
all-equal values (``test_attention.py::test_metric_all_equal_values_gives_ones_and_finite_output``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import lm.utils
from helpers import write_corpus as cli_write_corpus  # the shared tiny WikiText-2 generator
from run_callbacks import subprocess_env

from lm.cli import main
from lm.config import AttentionConfig, ModelConfig
from lm.data.datamodule import LMDataModule
from lm.model.transformer import TransformerLM




def write_corpus(root: Path, seed: int = 0, n_words: int = 40) -> Path:
    """A WikiText-like corpus under root/wikitext-2 (test_cli's generator, more and longer lines)."""
    return cli_write_corpus(root, seed, n_words=n_words, lines=(160, 20, 20), max_len=12)


def write_config(tmp_path: Path, run: str, *, steps: int = 8, extra_callbacks=(), model=None, **trainer) -> Path:
    """A tiny relative-position model with memory (so memories matter on resume), a checkpoint after every
    step and a CSVLogger, as one YAML per run (paths are explicit: no interpolation across overrides)."""
    root = tmp_path / run
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "default_root_dir": str(root), "max_steps": steps, "accelerator": "cpu", "devices": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "logs", "version": "v"}},
            "callbacks": [{"class_path": "lm.tasks.callbacks.RunCheckpoint",
                           "init_args": {"every_n_train_steps": 1, "monitor": None}}, *extra_callbacks],
            **trainer,
        },
        "model": {"n_layer": 2, "d_model": 16, "n_head": 2, "d_head": 8, "d_inner": 32, "dropout": 0.0,
                  "pos": "relative", "mem_len": 8, "adaptive": False, "cutoffs": [],
                  "optim": {"lr": 1.0e-2, "warmup_steps": 3, "schedule": "cosine"}, **(model or {})},
        "data": {"root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), "batch_size": 2, "tgt_len": 8},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path, version: str = "v") -> dict[int, float]:
    """step -> train/loss from the run's CSVLogger file."""
    out = {}
    with open(run_dir / "logs" / version / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def fit(*args: str) -> int:
    return main(["fit", *args])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    write_corpus(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ----- resume --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(workdir):
    """SIGKILL a run after step k; `--ckpt_path last` continues with the same data position, memories,
    optimizer/scheduler state and RNG (dropout is on): the per-step loss curve equals an uninterrupted
    run's from the resumed step on."""
    tmp, n, k = workdir, 12, 4
    model = {"dropout": 0.1}
    assert fit("--config", str(write_config(tmp, "full", steps=n, model=model))) == 0
    full = losses(tmp / "full")
    assert sorted(full) == list(range(n)) and all(math.isfinite(v) for v in full.values())

    sleepy = write_config(tmp, "part", steps=n, model=model,
                          extra_callbacks=[{"class_path": "run_callbacks.Sleep", "init_args": {"seconds": 0.3}}])
    env = subprocess_env(tmp)
    log = open(tmp / "part.log", "wb")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([sys.executable, "-m", "lm.cli", "fit", "--config", str(sleepy)], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    ckpts, deadline = tmp / "part" / "checkpoints", time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            steps = [int(m.group(1)) for p in ckpts.glob("*.ckpt") if (m := re.search(r"step=(\d+)", p.name))]
            if steps and max(steps) >= k or proc.poll() is not None:
                break
            time.sleep(0.05)
        alive = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert alive, f"the run ended before it could be killed:\n{(tmp / 'part.log').read_text()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    # Readable after the kill (saves are atomic). The kill may land between the step-k file and last.ckpt.
    resumed_from = ckpt_step(ckpts / "last.ckpt")
    assert k - 1 <= resumed_from < n

    resume = write_config(tmp, "part", steps=n, model=model)  # same run, without the Sleep callback
    assert fit("--config", str(resume), "--ckpt_path", "last") == 0
    after = losses(tmp / "part")
    assert sorted(after) == list(range(resumed_from, n))
    for step, value in after.items():
        assert value == pytest.approx(full[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert ckpt_step(ckpts / "last.ckpt") == n


def test_resume_restores_memories_stream_position_and_rng(workdir):
    """In-process: a run that crashes before step 3 and is resumed with `--ckpt_path last` logs the same
    losses as an uninterrupted run, step for step (dropout on). The checkpoint holds what makes this
    possible, and leaving out the memories would show."""
    tmp, model = workdir, {"dropout": 0.1}
    crash = [{"class_path": "run_callbacks.CrashAt", "init_args": {"step": 3}}]
    assert fit("--config", str(write_config(tmp, "full", steps=6, model=model))) == 0
    with pytest.raises(RuntimeError, match="simulated crash before step 3"):
        fit("--config", str(write_config(tmp, "part", steps=6, model=model, extra_callbacks=crash)))
    ck = torch.load(tmp / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 3
    assert ck["lm_mems"] is not None and len(ck["lm_mems"]) == 2 and ck["lm_mems"][0].shape == (2, 8, 16)
    assert ck["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 3
    assert ck["lm_rng"]["torch"].dtype == torch.uint8
    assert ck["lr_schedulers"][0]["last_epoch"] == 3
    no_mems = tmp / "no_mems.ckpt"
    torch.save({**ck, "lm_mems": None}, no_mems)
    assert fit("--config", str(write_config(tmp, "part", steps=6, model=model)), "--ckpt_path", "last") == 0
    full, after = losses(tmp / "full"), losses(tmp / "part")
    assert sorted(after) == [3, 4, 5]
    for step in after:
        assert after[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    # The memories matter: resumed without them, the very next loss differs.
    assert fit("--config", str(write_config(tmp, "forgetful", steps=6, model=model)), "--ckpt_path", str(no_mems),
               "--trainer.max_steps", "4") == 0
    assert losses(tmp / "forgetful")[3] != pytest.approx(full[3], rel=1e-4)


def test_fresh_fit_into_used_folder_is_refused(workdir, capsys):
    cfg = write_config(workdir, "run", steps=2)
    assert fit("--config", str(cfg)) == 0
    capsys.readouterr()
    assert fit("--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--ckpt_path last" in err and "Traceback" not in err


# ----- atomic checkpoints ----------------------------------------------------------------------------
class SimulatedCrash(Exception):
    pass


def test_crash_while_saving_leaves_previous_last_ckpt_intact(workdir, monkeypatch):
    """Checkpoints go through AtomicCheckpointIO. A crash while one is being written (inside torch.save
    with half the bytes out, after the bytes hit the temp file but before fsync, or just before the
    rename) leaves the previous last.ckpt byte-identical and loadable, and no temp file behind."""
    from lm.cli import lm_cli
    from lm.tasks.callbacks import AtomicCheckpointIO

    cli = lm_cli(["fit", "--config", str(write_config(workdir, "run", steps=2))])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    last = workdir / "run" / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    assert ckpt_step(last) == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(last.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    import lm.tasks.callbacks as callbacks

    real_save, real_write, crashes = torch.save, callbacks.atomic_write_bytes, []
    writing_ckpt = [False]

    def ckpt_write(path, data):  # marks the checkpoint's own file write (tokenizer.json etc. use it too)
        writing_ckpt[0] = True
        try:
            real_write(path, data)
        finally:
            writing_ckpt[0] = False

    def half_then_die(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        crashes.append("save")
        raise SimulatedCrash("serialise")

    def die_in_ckpt_write(real):
        def f(*a, **k):
            if writing_ckpt[0]:
                crashes.append(real.__name__)
                raise SimulatedCrash(real.__name__)
            return real(*a, **k)
        return f

    resume = write_config(workdir, "run", steps=4)
    for target, name, fn in ((torch, "save", half_then_die), (lm.utils.os, "fsync", die_in_ckpt_write(os.fsync)),
                             (lm.utils.os, "replace", die_in_ckpt_write(os.replace))):
        with monkeypatch.context() as m:
            m.setattr(callbacks, "atomic_write_bytes", ckpt_write)
            m.setattr(target, name, fn)
            with pytest.raises(SimulatedCrash):
                fit("--config", str(resume), "--ckpt_path", "last")
        assert crashes[-1] == name  # it died inside the checkpoint save, not elsewhere
        assert last.read_bytes() == good and ckpt_step(last) == 2, name
        assert not [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")], name


# ----- numerics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("poison", ["PoisonAt", "PoisonGradAt"], ids=["nan-weights", "nan-grads"])
def test_non_finite_training_stops_with_step_and_intact_last_checkpoint(workdir, capsys, poison):
    """NaN weights (-> NaN loss) or NaN gradients under a finite loss before step 3: exit code 2, one
    paragraph naming the step and the last good checkpoint, which is the step-3 one, finite, and usable."""
    cfg = write_config(workdir, "run", steps=8,
                       extra_callbacks=[{"class_path": f"run_callbacks.{poison}", "init_args": {"step": 3}}])
    assert fit("--config", str(cfg)) == 2
    err = capsys.readouterr().err
    last = workdir / "run" / "checkpoints" / "last.ckpt"
    assert "Traceback" not in err
    what = r"training loss became nan" if poison == "PoisonAt" else r"gradients became non-finite"
    assert re.search(rf"{what} at step 3\b", err), err
    assert str(last) in err and "--ckpt_path last" in err
    ck = torch.load(last, map_location="cpu", weights_only=True)
    assert ck["global_step"] == 3  # the checkpoint before the bad step, untouched
    assert all(torch.isfinite(t).all() for t in ck["state_dict"].values())
    if poison == "PoisonAt":  # ... and training goes on from it (without the poison)
        assert fit("--config", str(write_config(workdir, "run", steps=5)), "--ckpt_path", "last") == 0
        assert all(math.isfinite(v) for v in losses(workdir / "run").values())


def _elliptical(pos: str, estimator: str, normalize: str) -> TransformerLM:
    cfg = ModelConfig(n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, pos=pos,
                      mem_len=4 if pos == "relative" else 0, adaptive=False, cutoffs=[],
                      attention=AttentionConfig(name="elliptical", layers="1:",
                                                options={"estimator": estimator, "normalize": normalize}))
    return TransformerLM(cfg, vocab_size=11)


@pytest.mark.parametrize("pos", ["absolute", "relative"])
@pytest.mark.parametrize("estimator, normalize", [("segment_mean", "max"), ("causal", "mean")])
def test_elliptical_model_with_identical_layer_values_stays_finite(pos, estimator, normalize, monkeypatch):
    """Whole model: consecutive layers with identical values (all zero, then all equal and non-zero) make
    every m̂ denominator 0; outputs, loss and every gradient stay finite."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (2, 6))
    net = _elliptical(pos, estimator, normalize)
    with torch.no_grad():
        for blk in net.layers:  # value rows of qkv = 0 -> v == v_prev == 0 in every layer
            blk.attn.qkv.weight[2 * 16:] = 0.0
    mems = net(tokens).mems if pos == "relative" else None
    for variant in ("zero", "constant"):
        if variant == "constant":
            from lm.model.attention.base import Attention

            real = Attention.project

            def same_values(self, h, mem):
                q, k, v = real(self, h, mem)
                return q, k, torch.full_like(v, 0.5) + 0 * v  # equal across layers, still in the graph

            monkeypatch.setattr(Attention, "project", same_values)
        net.zero_grad()
        out = net(tokens, mems)
        loss = net.nll(out.hidden, tokens).mean()
        loss.backward()
        assert torch.isfinite(out.hidden).all() and torch.isfinite(loss), variant
        for name, p in net.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (variant, name)


# ----- caches ----------------------------------------------------------------------------------------
def test_datamodule_rebuilds_corrupted_or_stale_caches(tmp_path, caplog):
    """End to end through the data module: a damaged token cache entry, a stale one (sidecar key of
    another source) and an unreadable cached vocabulary are detected, logged and rebuilt, never used."""
    write_corpus(tmp_path / "data")

    def dm():
        return LMDataModule(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))

    first = dm()
    clean = {s: first.tokens(s).clone() for s in ("train", "valid", "test")}
    vocab_sha = first.vocab.sha256
    npy = next((tmp_path / "cache" / "tokens").glob("wikitext-2.valid.*.npy"))
    meta = npy.with_suffix(".json")
    vocab_file = next((tmp_path / "cache" / "vocab").glob("*.json"))

    raw = bytearray(npy.read_bytes())
    raw[-3] ^= 0xFF  # same size, one token id changed
    npy.write_bytes(bytes(raw))
    side = meta.read_text()
    test_meta = next((tmp_path / "cache" / "tokens").glob("wikitext-2.test.*.json"))
    test_meta.write_text(test_meta.read_text().replace('"key": "', '"key": "0'))  # stale key
    vocab_file.write_text(vocab_file.read_text()[:50])  # truncated JSON
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = dm()
        assert again.vocab.sha256 == vocab_sha
        for s in ("train", "valid", "test"):
            assert torch.equal(again.tokens(s), clean[s]), s
    text = caplog.text
    assert "corrupted (checksum mismatch)" in text and "stale" in text and "counting it again" in text
    assert meta.read_text() == side  # the rebuilt entry is the same entry


# ----- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_losses_and_other_seed_differs(workdir):
    """Two fresh `lm fit` runs with the same seed (dropout on) log identical losses on CPU; another seed
    does not. (Same seed -> identical corrupted sets: test_corruptions.py::test_same_seed_same_output_and_manifest.)"""
    model = {"dropout": 0.1}
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert fit("--config", str(write_config(workdir, name, steps=5, model=model)), "--seed_everything", seed) == 0
        runs[name] = losses(workdir / name)
    assert sorted(runs["a"]) == list(range(5))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
