"""What `lm fit` writes to TensorBoard, read back from the event files (`lm test` writes its JSON only).

One tiny run through the real entry point (``lm.cli.main``) on a generated corpus, then the event files
are parsed with TensorBoard's own ``EventAccumulator``: the scalar tags the README promises exist, hold
finite values, and agree with each other (ppl = exp(loss), tokens/s = segments/s x tokens per segment)
and with the JSON files the same run wrote (results/train.json, results/test-segments.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from helpers import write_config, write_corpus  # the tiny generated WikiText-2 and model config

from lm.cli import main

TGT_LEN = 8  # write_config's data.tgt_len
STEPS = 3


def scalars(version_dir: Path) -> dict[str, list[tuple[int, float]]]:
    assert list(version_dir.glob("events.out.tfevents.*")), f"no event file in {version_dir}"
    acc = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    data = write_corpus(tmp / "data")
    cfg = write_config(tmp / "cfg.yaml", tmp / "run", data, tmp / "cache")
    run = tmp / "run"
    # 3 steps, far fewer than the throughput window (20): the rate must still be logged.
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", str(STEPS),
                 "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2",
                 "--trainer.limit_val_batches", "1"]) == 0
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    versions = sorted((run / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    assert len(versions) == 1, versions  # fit's; `lm test` adds no version folder (issue 30)
    return {"run": run, "fit": scalars(versions[0])}


def test_fit_logs_loss_ppl_lr_and_tokens_per_s_every_step(run):
    tb = run["fit"]
    for tag in ("train/loss", "train/ppl", "train/lr", "train/tokens_per_s", "train/segments_per_s"):
        assert tag in tb, f"{tag} missing; logged: {sorted(tb)}"
        assert [s for s, _ in tb[tag]] == list(range(STEPS)), tag  # every step (log_every_n_steps=1)
        assert all(math.isfinite(v) for _, v in tb[tag]), tag
    # Lightning's own names are replaced by ours
    assert not [t for t in tb if "items_per_sec" in t or "samples_per_sec" in t or "/device/" in t], sorted(tb)
    for (_, loss), (_, ppl) in zip(tb["train/loss"], tb["train/ppl"]):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
    # OptimConfig defaults: lr 2.5e-4 after a 2000-step linear warm-up; step s trains at (s + 1) / 2000 of it
    for step, lr in tb["train/lr"]:
        assert lr == pytest.approx(2.5e-4 * (step + 1) / 2000, rel=1e-5)
    # every segment holds tgt_len tokens
    for (_, tok), (_, seg) in zip(tb["train/tokens_per_s"], tb["train/segments_per_s"]):
        assert tok > 0 and tok == pytest.approx(seg * TGT_LEN, rel=1e-5)


def test_validation_during_fit_logs_one_rate_beside_val_loss(run):
    tb = run["fit"]
    assert len(tb["val/loss"]) == 1 and len(tb["val/ppl"]) == 1, sorted(tb)
    assert len(tb["val/tokens_per_s"]) == 1 and tb["val/tokens_per_s"][0][0] == tb["val/loss"][0][0]
    assert tb["val/tokens_per_s"][0][1] > 0
    assert tb["val/ppl"][0][1] == pytest.approx(math.exp(tb["val/loss"][0][1]), rel=1e-5)


def test_logged_tokens_per_s_agrees_with_train_json(run):
    # Before the window fills, the logged rate is the mean since the fit started: the last value covers
    # the same tokens as train.json over a shorter time (train.json is written at train end, after the
    # final checkpoint save), so it is at least train.json's rate.
    summary = json.loads((run["run"] / "results" / "train.json").read_text())
    assert summary["global_step"] == STEPS and summary["tokens"] == STEPS * 2 * TGT_LEN
    (session,) = summary["sessions"]  # its rate is from unrounded seconds (the summary's from 0.01 s ones)
    last = run["fit"]["train/tokens_per_s"][-1][1]
    assert last + 0.05 >= session["tokens_per_s"] > 0  # rounded to 0.1


def test_fit_logs_no_placeholder_hp_metric(run):
    assert "hp_metric" not in run["fit"], sorted(run["fit"])  # Lightning's default_hp_metric=-1 is off


def test_test_writes_its_result_json_and_no_event_file(run):
    result = json.loads((run["run"] / "results" / "test-segments.json").read_text())
    assert result["metric"] == "ppl" and math.isfinite(result["nll"])
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]), rel=1e-6)
    assert len(list((run["run"] / "lightning_logs").glob("version_*"))) == 1
