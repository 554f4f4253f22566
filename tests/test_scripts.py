"""The study driver's report (scripts/reproduce.py) on synthetic rows: means, standard deviations and the
'what the data shows' verdicts are recomputed here by hand."""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import reproduce  # scripts/ is on sys.path via tests/conftest.py


def row(variant, seed, clean, ws1, ws5, sst2=0.8, tps=5000.0):
    return {"variant": variant, "seed": seed, "clean": clean, "ws0.015": ws1, "ws0.05": ws5, "sst2": sst2,
            "train_tokens_per_s": tps, "train_wall_s": 100.0, "tokens_per_s_eval": 9000.0, "load_after_fit": 2.0,
            "collapse": [0.5, 0.6], "moe": []}


def args(**kw):
    base = dict(variants=["softmax", "elliptical", "quest"], seeds=[1, 2, 3], steps=600, sst2_batches=400,
                quick=False)
    return argparse.Namespace(**{**base, **kw})


def test_mean_std_formatting():
    assert reproduce.mean_std([1.0, 2.0, 3.0]) == f"2.00 ± {statistics.stdev([1, 2, 3]):.2f}"
    assert reproduce.mean_std([0.8123], 3) == "0.812"
    assert reproduce.mean_std([None, None]) == "-"


def test_findings_verdicts():
    rows = [row("softmax", s, c, c * 1.10, c * 1.30) for s, c in zip((1, 2, 3), (150.0, 151.0, 152.0))]
    # elliptical: clearly worse clean PPL (gap 20 >> std 1), same degradation ratios, far lower throughput
    rows += [row("elliptical", s, c, c * 1.10, c * 1.30, tps=2000.0) for s, c in zip((1, 2, 3), (170.0, 171.0, 172.0))]
    # quest: clean PPL within noise (gap 0.5 < std 1) but clearly smaller degradation at rate 0.05
    rows += [row("quest", s, c, c * 1.10, c * 1.20) for s, c in zip((1, 2, 3), (150.5, 151.5, 152.5))]
    lines = {ln.split("**")[1]: ln for ln in reproduce.findings(rows, args())}
    assert "clean PPL 171 vs 151 (worse)" in lines["elliptical"]
    assert "train tokens/s 2000 vs 5000 (worse)" in lines["elliptical"]
    assert "PPL ratio at swap 0.015 1.1 vs 1.1 (within noise)" in lines["elliptical"]
    assert "clean PPL 151.5 vs 151 (within noise)" in lines["quest"]
    assert "PPL ratio at swap 0.05 1.2 vs 1.3 (better)" in lines["quest"]
    assert "softmax" not in lines


def test_report_table_and_partial_marker(tmp_path):
    rows = [row("softmax", s, c, c * 1.1, c * 1.3) for s, c in zip((1, 2, 3), (150.0, 151.0, 152.0))]
    text = reproduce.report(rows, tmp_path, args(variants=["softmax"]), "3 of 15 runs (PARTIAL: rerun the command to finish)")
    assert "3 of 15 runs (PARTIAL" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| softmax |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3" and cells[2] == f"151.00 ± {statistics.stdev([150, 151, 152]):.2f}"
    assert cells[5] == "1.10 ± 0.00"  # word swap 0.015 / clean


def test_report_only_rebuilds_from_rows_without_running(tmp_path, monkeypatch, capsys):
    import json

    rows = [row(v, s, c, c * 1.1, c * 1.3) for v in ("softmax", "elliptical") for s, c in ((1, 150.0), (2, 152.0))]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    monkeypatch.setattr(reproduce, "sh", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran a command")))
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--report_only", "--out", str(tmp_path),
                                      "--variants", "softmax", "elliptical", "--seeds", "1", "2", "3"])
    reproduce.main()
    text = (tmp_path / "report.md").read_text()
    assert "4 of 6 runs (PARTIAL" in text  # 2 variants x 3 seeds asked for, 4 rows present
    assert "--report_only" not in text  # the command shown is the one that regenerates the numbers
    assert f"| elliptical | 2 | 151.00 ± {statistics.stdev([150, 152]):.2f} |" in text


def test_report_only_without_rows_names_the_fix(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--report_only", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="run the study first"):
        reproduce.main()


def test_a_run_short_of_its_target_step_is_never_marked_done(tmp_path, monkeypatch):
    """Issue 19: a SIGTERM once ended `lm fit` with exit 0 after 1,000 of 3,000 steps and the study marked the run
    done. Now a stage counts as trained only when last.ckpt holds the target step: an `lm fit` that exits 0
    short of it stops the study (not marked done), a non-zero exit (143) likewise, and an old `done` marker
    beside a short checkpoint is not trusted (the run is resumed)."""
    import pytest
    import torch

    run = tmp_path / "runs" / "softmax-s1"
    ckpt = run / "checkpoints" / "last.ckpt"
    calls = []

    def fake_lm(step, code=0):
        def sh(argv, env=None):
            calls.append(argv)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"global_step": step}, ckpt)
            if code:
                raise reproduce.StudyError(f"exited with {code}")
        return sh

    a = args(steps=30, limit_batches=None, sst2=False)
    monkeypatch.setattr(reproduce, "sh", fake_lm(10))
    with pytest.raises(reproduce.StudyError, match="ended at step 10 of 30"):
        reproduce.run_one("softmax", 1, tmp_path, a)
    assert not (run / "done").exists()
    monkeypatch.setattr(reproduce, "sh", fake_lm(12, code=143))
    with pytest.raises(reproduce.StudyError, match="143"):
        reproduce.run_one("softmax", 1, tmp_path, a)
    assert not (run / "done").exists() and "--ckpt_path" in calls[-1]  # resumed from last.ckpt
    (run / "done").write_text("")  # a marker left by the old driver beside a 12-step checkpoint
    assert not reproduce.trained(run, 30)
    torch.save({"global_step": 30}, ckpt)
    assert reproduce.trained(run, 30)


def test_lm_pins_threads_only_when_asked(monkeypatch):
    seen = []
    monkeypatch.setattr(reproduce, "sh", lambda argv, env=None: seen.append((argv[1:], env)))
    reproduce.lm("fit", "--x")
    reproduce.lm("evaluate", threads=1)
    assert seen[0] == (["-m", "lm.cli", "fit", "--x"], None)  # inherits the caller's environment untouched
    assert seen[1][0] == ["-m", "lm.cli", "evaluate"] and seen[1][1]["OMP_NUM_THREADS"] == "1"
    assert seen[1][1]["PATH"] == os.environ["PATH"]  # the rest of the environment is kept


def test_sh_reports_a_signal_exit_in_one_line():
    import pytest

    with pytest.raises(reproduce.StudyError, match=r"exited with 143 \(stopped by SIGTERM\)"):
        reproduce.sh([sys.executable, "-c", "import sys; sys.exit(143)"])


def test_fit_to_marks_done_only_at_the_target_step(tmp_path):
    # One definition of "finished" for reproduce.py and study.py: the marker is written only once last.ckpt
    # holds the target step; a fit that exits early leaves no marker and the next call resumes with --ckpt_path.
    import pytest
    import torch

    run, calls = tmp_path / "run", []

    def fit_to_step(step):
        def fit(resume):
            calls.append(resume)
            (run / "checkpoints").mkdir(parents=True, exist_ok=True)
            torch.save({"global_step": step}, run / "checkpoints" / "last.ckpt")
        return fit

    with pytest.raises(reproduce.StudyError, match="ended at step 250 of 600"):
        reproduce.fit_to(run, 600, fit_to_step(250))  # e.g. a SIGTERM that lm fit answered with exit 0
    assert calls == [[]] and not (run / "done").exists() and not reproduce.trained(run, 600)
    assert reproduce.fit_to(run, 600, fit_to_step(600)) is True
    assert calls[-1] == ["--ckpt_path", "last"] and (run / "done").exists() and reproduce.trained(run, 600)
    assert reproduce.fit_to(run, 600, fit_to_step(0)) is False and len(calls) == 2  # trained: no second fit
    # a stale marker beside a short checkpoint is not trusted: cleared, and the fit resumes
    torch.save({"global_step": 100}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(reproduce.StudyError):
        reproduce.fit_to(run, 600, lambda resume: calls.append(resume))
    assert calls[-1] == ["--ckpt_path", "last"] and not (run / "done").exists()
