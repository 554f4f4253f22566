"""``precision: auto`` (lm/precision.py): bf16-mixed only where this machine computes bf16 natively, the run's
config.yaml and checkpoints record what ran, and evaluation / finetuning default to the checkpoint's precision.

Both kinds of CPU are covered on any machine: ``lm.precision.CPUINFO`` points at a fake /proc/cpuinfo with the
flags of an AVX2-only x86 CPU or of one with AVX512-BF16, so the real flag parsing runs too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import write_config, write_corpus

import lm.precision as P
from lm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma\n\n"
BF16 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16\n\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """cpu("avx2") / cpu("bf16"): this process sees that CPU (and no CUDA GPU)."""
    def use(kind: str) -> None:
        f = tmp_path / f"cpuinfo-{kind}"
        f.write_text(AVX2 if kind == "avx2" else BF16)
        monkeypatch.setattr(P, "CPUINFO", str(f))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return use


# ----- resolution rules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, expected", [("avx2", "32-true"), ("bf16", "bf16-mixed")])
def test_auto_on_a_cpu(cpu, kind, expected):
    cpu(kind)
    for accelerator in ("cpu", "auto", None):
        assert P.resolve("auto", accelerator)[0] == expected


def test_auto_on_a_cuda_gpu_follows_its_native_bf16(monkeypatch, cpu):
    cpu("avx2")  # the CPU does not matter on a GPU
    monkeypatch.setattr(P, "cuda_bf16", lambda: True)
    assert P.resolve("auto", "gpu")[0] == "bf16-mixed"
    monkeypatch.setattr(P, "cuda_bf16", lambda: False)  # e.g. a V100: bf16 only emulated
    assert P.resolve("auto", "cuda")[0] == "32-true"


def test_unknown_cpu_and_other_devices_stay_in_float32(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "CPUINFO", str(tmp_path / "missing"))  # cannot tell: not fast
    assert P.resolve("auto", "cpu")[0] == "32-true"
    assert P.resolve("auto", "mps")[0] == "32-true"


def test_explicit_settings_are_kept_even_where_slow(cpu):
    cpu("avx2")
    assert P.resolve("bf16-mixed", "cpu") == ("bf16-mixed", "as given")
    assert P.resolve("bf16", "cpu")[0] == "bf16-mixed" and P.resolve(32, "cpu")[0] == "32-true"
    assert P.resolve(None, "cpu")[0] == "32-true"  # Lightning's unset default


@pytest.mark.parametrize("kind, trained, expected", [
    ("avx2", "32-true", "32-true"), ("bf16", "32-true", "32-true"),     # never re-apply bf16 to a float32 model
    ("bf16", "bf16-mixed", "bf16-mixed"), ("avx2", "bf16-mixed", "32-true"),  # bf16 only where it is fast
    ("avx2", "bf16", "32-true"), ("bf16", "16-mixed", "16-mixed"),
])
def test_auto_with_a_checkpoint_follows_its_training_precision(cpu, kind, trained, expected):
    cpu(kind)
    assert P.resolve("auto", "cpu", trained=trained)[0] == expected


def test_trained_precision_from_the_checkpoint_then_the_run_config(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    assert P.trained_precision({"lm_precision": "bf16"}, ckpt) == "bf16-mixed"
    assert P.trained_precision({}, ckpt) is None  # no record anywhere
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"precision": "32-true"}}))
    assert P.trained_precision({}, ckpt) == "32-true"  # runs from before lm_precision existed
    (tmp_path / "run" / "config.yaml").write_text("trainer: [unbalanced")
    assert P.trained_precision({}, ckpt) is None


def test_cpu_recipes_default_to_auto_and_paper_recipes_to_float32():
    """The recipes a CPU runs (tiny, SST-2 finetune) resolve per machine; the paper recipes keep the papers'
    float32 (their scripts train without mixed precision), so a GPU run stays comparable unless asked."""
    recipes = [p for p in CONFIGS.rglob("*.yaml") if "trainer" in (yaml.safe_load(p.read_text()) or {})]
    settings = {p.relative_to(CONFIGS).as_posix(): (yaml.safe_load(p.read_text())["trainer"] or {}).get("precision")
                for p in recipes if p.parent.name not in ("variants", "options")}
    cpu_sized = {k for k in settings if k.startswith("wikitext2/") or k == "sst2/finetune.yaml"}
    assert cpu_sized == {"wikitext2/tiny.yaml", "sst2/finetune.yaml"}
    assert {settings[k] for k in cpu_sized} == {"auto"}, settings
    paper = {k: v for k, v in settings.items() if k not in cpu_sized}
    assert len(paper) >= 12 and set(paper.values()) == {"32-true"}, paper
    overlays = [p for p in (CONFIGS / "wikitext2").rglob("*.yaml") if p.parent.name in ("variants", "options")]
    assert not [p for p in overlays if "precision" in p.read_text()]  # they inherit tiny.yaml's


def test_python_trainer_resolves_auto_too(cpu, tmp_path):
    from lm.trainer import Trainer

    cpu("avx2")
    t = Trainer(precision="auto", accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                default_root_dir=str(tmp_path))
    assert str(t.precision) == "32-true"


# ----- through `lm` ----------------------------------------------------------------------------------------------
@pytest.fixture
def setup(tmp_path):
    data = write_corpus(tmp_path / "data")
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data, tmp_path / "cache")
    return tmp_path, cfg


def fit(cfg: Path, *extra: str) -> int:
    return main(["fit", "--config", str(cfg), "--trainer.precision", "auto", *extra])


@pytest.mark.parametrize("kind, expected", [("avx2", "32-true"), ("bf16", "bf16-mixed")])
def test_fit_records_the_resolved_precision(cpu, setup, capsys, kind, expected):
    tmp, cfg = setup
    cpu(kind)
    assert fit(cfg) == 0
    err = capsys.readouterr().err
    assert f"lm: precision auto -> {expected}" in err
    saved = yaml.safe_load((tmp / "run" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == expected  # never `auto`
    ckpt = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lm_precision"] == expected
    assert json.loads((tmp / "run" / "results" / "train.json").read_text())["sessions"][0]["precision"] == expected
    assert "without bf16 matrix instructions" not in err  # auto never picks the slow path


def test_explicit_bf16_on_an_avx2_cpu_runs_with_one_warning_line(cpu, setup, capsys):
    tmp, cfg = setup
    cpu("avx2")
    assert main(["fit", "--config", str(cfg), "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "1"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "bf16 matrix instructions" in ln]
    assert len(lines) == 1 and lines[0].startswith("lm: warning: trainer.precision=bf16-mixed"), err
    assert "--trainer.precision auto" in lines[0]
    assert "rank_zero_warn(" not in err and "warnings.warn" not in err  # no stray source line
    assert yaml.safe_load((tmp / "run" / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"


def test_test_uses_the_checkpoints_precision_unless_told(cpu, setup, capsys):
    """A float32 model is scored in float32 on a bf16 CPU (the recipe's `auto` does not re-apply bf16); an explicit
    precision still wins."""
    tmp, cfg = setup
    cpu("avx2")
    assert fit(cfg) == 0
    cpu("bf16")  # the same checkpoint, now scored on a bf16 machine
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main(["test", "--config", str(cfg), "--trainer.precision", "auto", "--ckpt_path", ckpt]) == 0
    assert "lm: precision auto -> 32-true (the precision the checkpoint was trained in)" in capsys.readouterr().err
    assert main(["test", "--config", str(cfg), "--trainer.precision", "bf16-mixed", "--ckpt_path", ckpt]) == 0
    assert "precision auto" not in capsys.readouterr().err


def test_test_of_a_bf16_checkpoint_on_an_avx2_cpu_runs_in_float32(cpu, setup, capsys):
    tmp, cfg = setup
    cpu("bf16")
    assert fit(cfg) == 0
    cpu("avx2")
    capsys.readouterr()
    assert main(["test", "--config", str(cfg), "--trainer.precision", "auto",
                 "--ckpt_path", str(tmp / "run" / "checkpoints" / "last.ckpt")]) == 0
    err = capsys.readouterr().err
    assert "lm: precision auto -> 32-true (the checkpoint trained in bf16-mixed" in err
    assert "without bf16 matrix instructions" not in err  # no slow-bf16 warning: it did not run bf16


def test_test_of_an_old_run_reads_its_config(cpu, setup, capsys):
    """A checkpoint from before `lm_precision` existed: the run's config.yaml says what it trained in."""
    tmp, cfg = setup
    cpu("avx2")
    assert fit(cfg) == 0
    path = tmp / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt["lm_precision"]
    torch.save(ckpt, path)
    cpu("bf16")
    capsys.readouterr()
    assert main(["test", "--config", str(cfg), "--trainer.precision", "auto", "--ckpt_path", str(path)]) == 0
    assert "lm: precision auto -> 32-true" in capsys.readouterr().err


@pytest.mark.parametrize("trained", ["32-true", "bf16-mixed"])
def test_finetune_follows_the_pretrained_checkpoint(cpu, tmp_path, capsys, trained):
    """`lm finetune fit` on a bf16 CPU: a float32 language model is finetuned in float32, a bf16 one in bf16; the
    recipe (configs/sst2/finetune.yaml) says `auto`, and the run's config.yaml says what ran."""
    from test_sst2 import make_lm_ckpt, sentences, write_tsv

    root = tmp_path / "data"
    write_tsv(root / "glue" / "SST-2" / "train.tsv", sentences(16, 0))
    write_tsv(root / "glue" / "SST-2" / "dev.tsv", sentences(8, 1))
    ckpt = make_lm_ckpt(tmp_path / "lm" / "checkpoints" / "last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save({**state, "lm_precision": trained}, ckpt)
    cpu("bf16")
    run = tmp_path / "sst2"
    assert main(["finetune", "fit", "--config", str(CONFIGS / "sst2" / "finetune.yaml"), "--data.root", str(root),
                 "--model.pretrained", str(ckpt), "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]) == 0
    assert f"lm: precision auto -> {trained} (the precision the checkpoint was trained in)" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == trained
    # the classifier's own checkpoint records it too: `finetune validate` scores it in the same precision
    cpu("avx2")
    assert main(["finetune", "validate", "--config", str(CONFIGS / "sst2" / "finetune.yaml"), "--data.root", str(root),
                 "--model.pretrained", str(ckpt), "--trainer.default_root_dir", str(run), "--trainer.precision", "auto",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.accelerator", "cpu"]) == 0
    expected = "32-true (the checkpoint trained in bf16-mixed" if trained != "32-true" else "32-true (the precision"
    assert f"lm: precision auto -> {expected}" in capsys.readouterr().err
    assert [v.name for v in (run / "lightning_logs").iterdir()] == ["version_0"]  # validate adds no version folder


def test_evaluate_scores_each_checkpoint_in_its_training_precision(cpu, setup, capsys):
    tmp, cfg = setup
    cpu("avx2")
    assert fit(cfg) == 0  # float32
    cpu("bf16")
    capsys.readouterr()
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    assert main(["evaluate", "--ckpts", ckpt, "--corruptions", "", "--root", str(tmp / "data"), "--source", "local",
                 "--limit_batches", "1", "--out", str(tmp / "ev")]) == 0
    err = capsys.readouterr().err
    assert "precision auto -> 32-true (the precision the checkpoint was trained in)" in err, err


def test_a_resumed_fit_keeps_its_precision(cpu, setup, capsys):
    """`--ckpt_path last` on another machine: the run goes on in the precision it started in, where that is fast."""
    tmp, cfg = setup
    cpu("avx2")
    assert fit(cfg) == 0
    cpu("bf16")
    capsys.readouterr()
    assert fit(cfg, "--trainer.max_steps", "3", "--ckpt_path", "last") == 0
    assert "lm: precision auto -> 32-true (the precision the checkpoint was trained in)" in capsys.readouterr().err
    assert yaml.safe_load((tmp / "run" / "config.yaml").read_text())["trainer"]["precision"] == "32-true"
