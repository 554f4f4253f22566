"""Issue 20's study: why the tiny Elliptical model trails softmax, a robustness curve, the paper's small model.

    python scripts/study.py attribution            # flip one factor at a time from the 8 x 32 / fp32 / batch 32 recipe
    python scripts/study.py curve                  # 5 variants, word swap 0-10 % + char swap, slopes with intervals
    python scripts/study.py small                  # the paper's 16 x d128 model on WikiText-2, fixed time per run
    python scripts/study.py attribution --report_only   # rebuild the report from the finished runs
    python scripts/study.py attribution --dry_run       # print the plan (commands) without running anything

Every run is `lm fit` then `lm evaluate` (clean and corrupted WikiText-2 test PPL, segments protocol, the
corruption seed = the training seed, the paper's TextAttack word-swap sampling). Runs live under
`results/study/<part>/runs/<cell>-<variant>-s<seed>` (git-ignored); each finished run writes `row.json` there and
the part's `rows.json` + `report.md` are rebuilt from all of them after every run. A run whose recipe and seed
another part already trained to the end (e.g. the curve's softmax/Elliptical at the base cell, trained by the
attribution) evaluates that checkpoint instead of training again. Resumable: a run counts as
trained only with its `done` marker and a last.ckpt at the target step (`reproduce.trained`); an unfinished one
resumes from last.ckpt. `--workers 2` runs two single-threaded runs at once:
on this 2-core CPU that trains ~1.3x more tokens per second in total than one run on two threads, so the
tokens/s columns are per single-threaded run, not comparable with the quickstart's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm.utils import atomic_write_text, cpu_bf16_native  # noqa: E402
# scripts/ is sys.path[0] when run as a script; one definition of "trained" (done marker + target step) for both.
from reproduce import StudyError, ckpt_step, fit_to, lm, trained as trained_at  # noqa: E402
from study_report import REPORTS  # noqa: E402

# The study's recipes (shared with study_report.py, which describes them): one definition, no import cycle.
from study_cells import (BASE, CELLS, CHAR_RATES, CURVE_VARIANTS, SMALL, SMALL_DATA, SQRT, TINY,  # noqa: E402,F401
                         WORD_RATES)

class Run:
    """One training run of the study and how to evaluate it."""

    def __init__(self, part: str, cell: str, variant: str, seed: int, fit: list[str], specs: list[str],
                 steps: int, root: Path, eval_args: tuple[str, ...] = ()):
        self.part, self.cell, self.variant, self.seed, self.fit, self.specs, self.steps = (
            part, cell, variant, seed, fit, specs, steps)
        self.eval_args = list(eval_args)  # extra `lm evaluate` arguments (the small model: a prefix of test)
        self.dir = root / "runs" / f"{cell}-{variant}-s{seed}"
        # Where the checkpoint comes from: this run's folder, unless another part already trained the very same
        # recipe and seed (see reuse()); evaluation and row.json always live in self.dir.
        self.train_dir = self.dir

    @property
    def name(self) -> str:
        return self.dir.name


def plan(part: str, a) -> list[Run]:
    """The runs of one part, in the order they should run: the most informative comparisons first, and
    softmax/Elliptical of the same cell and seed side by side (two workers train them together)."""
    root = Path(a.out) / part
    runs: list[Run] = []
    common = ["--trainer.enable_progress_bar", "false"]
    if part == "attribution":
        specs = ["word_swap:0.015"]
        for cell in a.cells:
            if cell == "bf16" and not a.allow_slow_bf16 and cpu_bf16_native() is False:
                continue  # reported as not run: this CPU multiplies bf16 in a scalar fallback (~200x slower)
            for seed in a.seeds:
                for v in ("softmax", "elliptical"):
                    if cell == "d64_sqrt" and v == "softmax":
                        continue  # softmax already scales by 1/sqrt(D): its d64_sqrt run is the d64 run
                    fit = [*TINY, "--config", f"configs/wikitext2/variants/{v}.yaml", *BASE, *CELLS[cell][1],
                           *(SQRT if cell == "d64_sqrt" else []), "--trainer.max_steps", str(a.steps), *common]
                    runs.append(Run(part, cell, v, seed, fit, specs, a.steps, root))
        # The main question first: base and d64 at every seed, then sqrt, then the other factors.
        group = {"base": 0, "d64": 0, "d64_sqrt": 1}
        runs.sort(key=lambda r: (group.get(r.cell, 2), a.seeds.index(r.seed), list(CELLS).index(r.cell)))
    elif part == "curve":
        specs = [f"word_swap:{r:g}" for r in WORD_RATES] + [f"char_swap:{r:g}" for r in CHAR_RATES]
        for seed in a.seeds:
            for v in a.variants:
                fit = [*TINY, "--config", f"configs/wikitext2/variants/{v}.yaml", *BASE, *CELLS[a.cell][1],
                       "--trainer.max_steps", str(a.steps), *common]
                runs.append(Run(part, a.cell, v, seed, fit, specs, a.steps, root))
    elif part == "small":
        specs = ["word_swap:0.015", "word_swap:0.05"]
        for seed in a.seeds:
            for v, cfg in SMALL.items():
                fit = ["--config", cfg, *SMALL_DATA, "--trainer.precision", a.small_precision,
                       "--trainer.max_steps", str(a.small_steps), "--model.optim.warmup_steps",
                       str(a.small_steps // 10), *common]
                # Scoring all of test costs a 16-layer model ~6 min per condition at one thread: a prefix of it.
                ev = ("--limit_batches", str(a.small_eval_batches)) if a.small_eval_batches else ()
                runs.append(Run(part, "small", v, seed, fit, specs, a.small_steps, root, ev))
    else:
        raise SystemExit(f"study: error: unknown part {part!r}; choose attribution, curve or small")
    runs = [reuse(r, Path(a.out)) for r in runs]
    # Training first, then the runs that only evaluate another part's checkpoint: a study stopped early has
    # spent its hours on what cannot be done quickly later.
    return sorted(runs, key=lambda r: r.train_dir != r.dir)


def reuse(run: Run, out: Path) -> Run:
    """Point a run at another part's finished training run of the identical recipe and seed (same name, same fit
    arguments in its row.json), so that e.g. the curve's softmax/Elliptical at the base cell evaluate the
    attribution's checkpoints instead of training them again (~30 CPU-minutes each)."""
    for part in ("attribution", "curve", "small"):
        other = out / part / "runs" / run.name
        if part == run.part or not (other / "row.json").is_file():
            continue
        row = json.loads((other / "row.json").read_text())
        if row.get("fit_args") == run.fit and row.get("seed") == run.seed and trained_at(other, run.steps):
            run.train_dir = other
            break
    return run


def execute(run: Run, threads: int) -> dict:
    """Train (or resume), evaluate, and write the run's row.json; returns the row."""
    ckpt = run.train_dir / "checkpoints" / "last.ckpt"
    fit_to(run.train_dir, run.steps, lambda resume: lm(
        "fit", *run.fit, "--seed_everything", str(run.seed), "--trainer.default_root_dir", str(run.train_dir),
        *resume, threads=threads))
    ev = run.dir / "evaluate" / "results.json"
    if not ev.exists():
        lm("evaluate", "--ckpts", str(ckpt), "--corruptions", ",".join(run.specs), "--seed", str(run.seed),
           "--out", str(run.dir / "evaluate"), *run.eval_args, threads=threads)
    res = json.loads(ev.read_text())["rows"][0]["results"]
    train = run.train_dir / "results" / "train.json"
    t = json.loads(train.read_text()) if train.exists() else {}
    row = {"part": run.part, "cell": run.cell, "variant": run.variant, "seed": run.seed,
           "steps": ckpt_step(ckpt), "threads": threads, "tokens_scored": res["clean"].get("tokens_scored"),
           "train_wall_s": t.get("wall_s"),
           "train_tokens_per_s": t.get("tokens_per_s"), "ppl": {k: v["ppl"] for k, v in res.items()},
           # The measured word rate (swaps / words) beside the nominal one: TextAttack's sampling swaps at least
           # one word per line, so word_swap:0.005 changes ~1.2% of the words; the curve is fitted against this.
           "effective_rate": {k: v["corruption"]["effective_rate"] for k, v in res.items()
                              if (v.get("corruption") or {}).get("effective_rate") is not None},
           "fit_args": run.fit, **({"trained_in": str(run.train_dir)} if run.train_dir != run.dir else {})}
    atomic_write_text(run.dir / "row.json", json.dumps(row, indent=2))
    return row


def collect(part: str, a) -> list[dict]:
    root = Path(a.out) / part / "runs"
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/row.json"))]


def write_report(part: str, a, planned: int) -> str:
    rows = collect(part, a)
    root = Path(a.out) / part
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "rows.json", json.dumps(rows, indent=2))
    text = REPORTS[part](rows, root, a, planned)
    atomic_write_text(root / "report.md", text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["attribution", "curve", "small"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1111, 1112])
    ap.add_argument("--steps", type=int, default=600, help="training steps per run (attribution, curve)")
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS), help="attribution cells")
    ap.add_argument("--cell", default="base", choices=list(CELLS), help="the recipe the curve trains")
    ap.add_argument("--variants", nargs="+", default=CURVE_VARIANTS, help="curve variants")
    ap.add_argument("--small_steps", type=int, default=150,
                    help="training steps per small-model run (batch 16 x 256 tokens; 150 = about 45 min per run "
                         "at ~230 tokens/s, two runs at a time on this project's 2-core AVX2 CPU)")
    ap.add_argument("--small_eval_batches", type=int, default=30,
                    help="score this many evaluation batches (10 x 256 tokens each) per condition; 0: all of test")
    ap.add_argument("--small_precision", default="32-true")
    ap.add_argument("--allow_slow_bf16", action="store_true",
                    help="run the bf16 cell even on a CPU without bf16 matrix instructions (about 200x slower)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="results/study")
    ap.add_argument("--report_only", action="store_true")
    ap.add_argument("--dry_run", action="store_true")
    a = ap.parse_args(argv)
    runs = plan(a.part, a)
    if a.dry_run:
        for r in runs:
            fit = (f"reuses {r.train_dir}" if r.train_dir != r.dir
                   else f"lm fit {' '.join(r.fit)} --seed_everything {r.seed}")
            print(f"{r.name}: {fit}; lm evaluate {','.join(r.specs)}")
        return
    if not a.report_only:
        threads = max(1, (os.cpu_count() or 1) // a.workers)
        errors: list[str] = []

        def one(r: Run) -> None:
            try:
                execute(r, threads)
            except StudyError as e:
                errors.append(str(e))
                return
            write_report(a.part, a, len(runs))

        with ThreadPoolExecutor(max_workers=a.workers) as pool:
            list(pool.map(one, runs))
        if errors:
            write_report(a.part, a, len(runs))
            sys.exit("study: error: " + "\n".join(errors))
    print(write_report(a.part, a, len(runs)))


if __name__ == "__main__":
    main()
