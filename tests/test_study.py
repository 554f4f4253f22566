"""scripts/study.py (issue 20's study driver) and scripts/study_report.py: the plan flips one factor at a time,
the slopes and intervals match hand computations, the reports recompute gaps and verdicts from synthetic rows,
and a run counts as trained only when its checkpoint holds the target step and its `done` marker exists."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest
import torch

import study  # scripts/ is on sys.path via tests/conftest.py
import study_report as sr


def args(tmp_path, **kw):
    base = dict(out=str(tmp_path), cells=list(study.CELLS), seeds=[1, 2], steps=600, allow_slow_bf16=True,
                cell="base", variants=["softmax", "elliptical", "quest"], small_steps=800, small_precision="32-true",
                small_eval_batches=30)
    return argparse.Namespace(**{**base, **kw})


def trained(run: study.Run) -> bool:
    """The driver's test of a finished run: reproduce.trained on the folder the checkpoint comes from."""
    return study.trained_at(run.train_dir, run.steps)


def overrides(fit: list[str]) -> dict[str, str]:
    """The last value of every `--key value` pair after the config files (later ones win, as in jsonargparse)."""
    out, i = {}, 0
    while i < len(fit):
        if fit[i] == "--config":
            i += 2
            continue
        out[fit[i]] = fit[i + 1]
        i += 2
    return out


def test_each_cell_flips_one_factor_of_the_base(tmp_path):
    runs = study.plan("attribution", args(tmp_path))
    base = overrides(next(r for r in runs if r.cell == "base" and r.variant == "elliptical").fit)
    assert base["--model.n_head"] == "8" and base["--model.d_head"] == "32"
    assert base["--trainer.precision"] == "32-true" and base["--data.batch_size"] == "32"
    assert base["--model.optim.warmup_steps"] == "100" and base["--trainer.max_steps"] == "600"
    expected = {"d64": {"--model.n_head": "4", "--model.d_head": "64"},
                "bf16": {"--trainer.precision": "bf16-mixed"}, "b16": {"--data.batch_size": "16"},
                "wu200": {"--model.optim.warmup_steps": "200"}}
    for cell, flips in expected.items():
        got = overrides(next(r for r in runs if r.cell == cell and r.variant == "elliptical").fit)
        assert {k: v for k, v in got.items() if base.get(k) != v} == flips, cell
    sq = overrides(next(r for r in runs if r.cell == "d64_sqrt").fit)
    assert '"scale": "sqrt"' in sq["--model.attention.options"] and sq["--model.d_head"] == "64"
    # softmax always scales by 1/sqrt(D): no separate d64_sqrt softmax run; 6 cells x 2 variants x 2 seeds - 2
    assert not [r for r in runs if r.cell == "d64_sqrt" and r.variant == "softmax"]
    assert len(runs) == 22 and len({r.dir for r in runs}) == 22
    # the main comparison (base, d64) at every seed comes before the other factors
    assert [r.cell for r in runs[:8]].count("base") == 4 and [r.cell for r in runs[:8]].count("d64") == 4


def test_bf16_cell_skipped_without_bf16_hardware(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "cpu_bf16_native", lambda: False)
    assert not [r for r in study.plan("attribution", args(tmp_path, allow_slow_bf16=False)) if r.cell == "bf16"]
    assert [r for r in study.plan("attribution", args(tmp_path, allow_slow_bf16=True)) if r.cell == "bf16"]


def test_trained_needs_the_target_step_and_the_done_marker(tmp_path):
    run = study.plan("attribution", args(tmp_path))[0]
    assert not trained(run)
    (run.dir / "checkpoints").mkdir(parents=True)
    (run.dir / "done").write_text("")
    torch.save({"global_step": 599}, run.dir / "checkpoints" / "last.ckpt")
    assert not trained(run)
    torch.save({"global_step": 600}, run.dir / "checkpoints" / "last.ckpt")
    assert trained(run)
    (run.dir / "done").unlink()  # `lm fit` exited but the driver died before marking it: not trusted
    assert not trained(run)
    small_run = study.plan("small", args(tmp_path))[0]
    small = overrides(small_run.fit)
    assert small["--trainer.max_steps"] == "800" and small["--model.optim.warmup_steps"] == "80"
    assert small["--data.corpus"] == "wikitext-2" and small_run.eval_args == ["--limit_batches", "30"]
    assert study.plan("small", args(tmp_path, small_eval_batches=0))[0].eval_args == []  # 0: all of test


def test_small_report_gap_paired_by_seed(tmp_path):
    rows = []
    for seed, (s, e) in {1: (800.0, 808.0), 2: (900.0, 927.0)}.items():  # gaps +1%, +3%
        rows += [row("small", "softmax", seed, s, **{"word_swap:0.015": s * 1.02, "word_swap:0.05": s * 1.1}),
                 row("small", "elliptical", seed, e, **{"word_swap:0.015": e * 1.03, "word_swap:0.05": e * 1.1})]
    text = sr.small(rows, tmp_path, args(tmp_path), planned=4)
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert f"| +2.0% ± {100 * statistics.stdev([0.01, 0.03]):.1f} |" in lines["elliptical"]
    assert "| 850.00 ± 70.71 |  |" in lines["softmax"] and "1.030 ± 0.000" in lines["elliptical"]
    assert "its first 30 evaluation batches (?" in text  # rows without tokens_scored (older rows)
    text = sr.small([{**r, "tokens_scored": 76800} for r in rows], tmp_path, args(tmp_path), planned=4)
    assert "its first 30 evaluation batches (76,800 tokens scored, the same positions clean and corrupted)" in text


def test_slope_through_origin_by_hand():
    b, se, dof = sr.slope_through_origin([(1.0, 2.0), (2.0, 4.0), (3.0, 6.0)])
    assert (b, se, dof) == (2.0, 0.0, 2)
    # y = (1, 3) at x = (1, 2): b = (1 + 6) / 5 = 1.4; residuals -0.4, 0.2; rss 0.2; se = sqrt(0.2 / 1 / 5) = 0.2
    b, se, dof = sr.slope_through_origin([(1.0, 1.0), (2.0, 3.0)])
    assert b == pytest.approx(1.4) and se == pytest.approx(0.2) and dof == 1
    with pytest.raises(ValueError):
        sr.slope_through_origin([(0.0, 0.0), (0.0, 1.0)])


def test_slope_difference_verdict():
    assert sr.t975(1) == 12.706 and sr.t975(13) == 2.160 and sr.t975(100) == 1.96
    assert sr.differs(2.0, 0.1, 13, 1.0, 0.1, 13)  # 1.0 > 2.16 * 0.141
    assert not sr.differs(2.0, 0.5, 13, 1.0, 0.5, 13)  # 1.0 < 2.16 * 0.707


def row(cell, variant, seed, clean, **ppl):
    return {"part": "attribution", "cell": cell, "variant": variant, "seed": seed, "steps": 600, "threads": 1,
            "train_wall_s": 100.0, "train_tokens_per_s": 1400.0, "ppl": {"clean": clean, **ppl}}


def test_attribution_report_gaps_and_verdicts(tmp_path):
    rows = []
    for seed, (s, e) in {1: (200.0, 202.0), 2: (210.0, 210.0)}.items():  # base: gaps +1%, 0%
        rows += [row("base", "softmax", seed, s, **{"word_swap:0.015": s * 1.05}),
                 row("base", "elliptical", seed, e, **{"word_swap:0.015": e * 1.05})]
    for seed, (s, e) in {1: (220.0, 242.0), 2: (230.0, 255.3)}.items():  # d64: gaps +10%, +11%
        rows += [row("d64", "softmax", seed, s, **{"word_swap:0.015": s * 1.04}),
                 row("d64", "elliptical", seed, e, **{"word_swap:0.015": e * 1.06})]
    rows.append(row("d64_sqrt", "elliptical", 1, 220.0, **{"word_swap:0.015": 231.0}))  # vs d64 softmax: 0%
    text = sr.attribution(rows, tmp_path, args(tmp_path), planned=22)
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| +0.5% ± 0.7 |" in lines["base"]  # gaps +1% and 0%: mean 0.5, std 0.71
    assert "+10.5% ± 0.7" in lines["d64"]
    assert "1.040 ± 0.000" in lines["d64"] and "1.060 ± 0.000" in lines["d64"]
    assert "+0.0%" in lines["d64_sqrt"]  # paired with d64's softmax run of the same seed
    d, se = 0.105 - 0.005, math.sqrt(statistics.variance([0.10, 0.11]) / 2 + statistics.variance([0.01, 0.0]) / 2)
    assert f"change {100 * d:+.1f} points, 2 SE = {200 * se:.1f}: beyond noise" in text
    assert "d64_sqrt: gap +0.0% vs base +0.5% (one seed in a cell: no spread yet)" in text
    assert "PARTIAL" in text and "Cell bf16 not run" in text


def test_curve_report_slopes(tmp_path):
    rows = []
    slopes = {"softmax": (1.0, 1.2), "elliptical": (1.05, 1.19), "quest": (3.0, 3.3)}  # per seed 1, 2
    for v, per_seed in slopes.items():
        for seed, k in zip((1, 2), per_seed):
            ppl = {f"word_swap:{r:g}": 100 * math.exp(k * r) for r in study.WORD_RATES}
            ppl.update({f"char_swap:{r:g}": 100 * math.exp(2 * k * r) for r in study.CHAR_RATES})
            rows.append({**row("base", v, seed, 100.0, **ppl), "part": "curve"})
    a = args(tmp_path)
    text = sr.curve(rows, tmp_path, a, planned=6)
    # Pooled fit over both seeds (same rates): b = the mean of the seeds' slopes; residuals +-d*r with
    # d = half their difference, so se = d / sqrt(dof), dof = 2 * 5 - 1 = 9 (t = 2.262).
    b, se, dof = sr.curve_fit(rows, "quest")
    assert b == pytest.approx(3.15) and se == pytest.approx(0.15 / 3) and dof == 2 * len(study.WORD_RATES) - 1
    assert f"| 1.10 ± {2.262 * 0.1 / 3:.2f} | 1.00, 1.20 |" in text  # softmax: b ± t * se, then the seeds' slopes
    assert sr.seed_slopes(rows, "elliptical") == pytest.approx({1: 1.05, 2: 1.19})
    # Paired by seed: elliptical - softmax = +0.05, -0.01: mean 0.02, sd 0.0424, se 0.03, t(1) = 12.706 -> 0.38;
    # quest - softmax = 2.0, 2.1: mean 2.05, se 0.05 -> half-width 0.64.
    m, hw, n = sr.paired_slope_difference(sr.seed_slopes(rows, "elliptical"), sr.seed_slopes(rows, "softmax"))
    assert (m, hw, n) == (pytest.approx(0.02), pytest.approx(12.706 * 0.03), 2)
    # pooled: 0.02 < 2.262 * hypot(0.1, 0.07) / 3 = 0.092 -> within; quest 2.05 far beyond either way
    assert "- elliptical: 1.12 vs 1.10; paired difference +0.02 ± 0.38 over 2 seeds: within noise (pooled fits: within" in text
    assert "- quest: 3.15 vs 1.10; paired difference +2.05 ± 0.64 over 2 seeds: beyond noise (pooled fits: beyond" in text
    assert sr.paired_slope_difference({1: 1.0}, {1: 2.0}) is None
    assert (tmp_path / "curve.png").exists()


def test_curve_is_fitted_against_the_measured_rate(tmp_path):
    # PPL ratios exactly exp(2 * measured rate), with the measured rate off the nominal one as TextAttack's
    # one-word-per-line floor makes it (0.5% -> 1.2%): the slope is 2 only if the fit uses the measured rate.
    measured = {0.005: 0.012, 0.015: 0.016, 0.025: 0.0245, 0.05: 0.048, 0.1: 0.0975}
    ppl = {f"word_swap:{r:g}": 100 * math.exp(2 * m) for r, m in measured.items()}
    eff = {f"word_swap:{r:g}": m for r, m in measured.items()}
    rows = [{**row("base", "softmax", 1, 100.0, **ppl), "part": "curve", "effective_rate": eff}]
    b, se, _ = sr.curve_fit(rows, "softmax")
    assert b == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-12)
    nominal = sr.curve_fit([{k: v for k, v in rows[0].items() if k != "effective_rate"}], "softmax")
    assert abs(nominal[0] - 2.0) > 0.02 and nominal[1] > 0.01  # the nominal x: another slope, points off the line
    text = sr.curve(rows, tmp_path, args(tmp_path), planned=1)
    assert "| measured rate | | | 1.20% | 1.60% | 2.45% | 4.80% | 9.75% |" in text


def test_curve_reuses_an_identical_finished_attribution_run(tmp_path):
    a = args(tmp_path)
    attribution = {r.name: r for r in study.plan("attribution", a)}
    src = attribution["base-softmax-s1"]

    def finish(run, step, fit):
        (run.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step}, run.dir / "checkpoints" / "last.ckpt")
        (run.dir / "done").write_text("")
        (run.dir / "row.json").write_text(json.dumps({"seed": run.seed, "fit_args": fit}))

    finish(src, 600, src.fit)
    other = attribution["base-elliptical-s1"]
    finish(other, 599, other.fit)  # unfinished: trained again by the curve
    changed = attribution["base-softmax-s2"]
    finish(changed, 600, [*changed.fit, "--model.dropout", "0.2"])  # a different recipe: not reused
    order = study.plan("curve", a)
    assert order[-1].name == "base-softmax-s1" and all(r.train_dir == r.dir for r in order[:-1])  # trainings first
    curve = {r.name: r for r in order}
    assert curve["base-softmax-s1"].train_dir == src.dir and trained(curve["base-softmax-s1"])
    assert curve["base-softmax-s1"].dir != src.dir  # its evaluation and row.json stay in the curve's folder
    for name in ("base-elliptical-s1", "base-softmax-s2", "base-quest-s1"):
        assert curve[name].train_dir == curve[name].dir and not trained(curve[name]), name
    # a curve at another step count is another recipe
    assert study.plan("curve", args(tmp_path, steps=300))[0].train_dir != src.dir


def test_execute_marks_a_finished_fit_done(tmp_path, monkeypatch):
    # A fake `lm`: fit writes last.ckpt at the target step, evaluate writes results.json.
    run = study.plan("attribution", args(tmp_path))[0]

    def fake_lm(*argv, threads):
        assert threads == 1
        if argv[0] == "fit":
            (run.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            torch.save({"global_step": run.steps}, run.dir / "checkpoints" / "last.ckpt")
        else:
            (run.dir / "evaluate").mkdir(parents=True, exist_ok=True)
            res = {"clean": {"ppl": 200.0},
                   "word_swap:0.015": {"ppl": 210.0, "corruption": {"effective_rate": 0.016}}}
            (run.dir / "evaluate" / "results.json").write_text(json.dumps({"rows": [{"results": res}]}))

    monkeypatch.setattr(study, "lm", fake_lm)
    row = study.execute(run, 1)
    assert (run.dir / "done").exists() and trained(run)
    assert row["ppl"] == {"clean": 200.0, "word_swap:0.015": 210.0} and row["effective_rate"] == {"word_swap:0.015": 0.016}
