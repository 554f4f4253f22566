"""The paper's study at the scale of this machine: train, attack, finetune, analyse; one report.

For every variant x seed: `lm fit` the tiny WikiText-2 recipe, `lm evaluate` clean vs word-swapped test
PPL, `lm finetune` on SST-2, `lm analyze`; then `results/<name>/report.md` with mean ± std per variant,
a PPL-vs-swap-rate plot and a collapse-per-layer plot. Resumable: finished stages are skipped (their
result files exist), unfinished training resumes from `last.ckpt`.

    python scripts/reproduce.py                 # full study: 5 variants x 3 seeds, ~2 h on 2 cores
    python scripts/reproduce.py --quick         # 2 variants x 2 seeds, short runs, ~15 min
    python scripts/reproduce.py --report_only   # rebuild report.md and plots from rows.json

Scale (the defaults, all overridable): the tiny recipes trained for --steps 600 (of their 2000) so that
15 runs fit in about two hours; SST-2 finetuning for one epoch capped at --sst2_batches 400 batches of
32 sentences (19% of the training set); clean and word-swapped test PPL on the full WikiText-2
test split. Runs live under <out>/runs (git-ignored); the report, rows.json and plots under <out>.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm.utils import atomic_write_text  # noqa: E402

VARIANTS = ["softmax", "elliptical", "quest", "elliptical_quest", "elliptical_switch"]
RATES = [0.015, 0.05]


class StudyError(Exception):
    """A stage that did not finish: reported in one line, the study stops, a rerun resumes it."""


def sh(args: list[str], env: dict | None = None) -> None:
    print("+", " ".join(args), flush=True)
    code = subprocess.run(args, env=env).returncode
    if code != 0:
        why = {143: " (stopped by SIGTERM)", 130: " (stopped by Ctrl-C)", -15: " (killed by SIGTERM)",
               -9: " (killed by SIGKILL)"}.get(code, "")
        raise StudyError(f"`{' '.join(args[2:])}` exited with {code}{why}; its stage is not marked done. Rerun the "
                         f"command to resume it.")


def lm(*args: str, threads: int | None = None) -> None:
    """Run `python -m lm.cli *args`; ``threads`` pins OMP_NUM_THREADS (the study runs two jobs on two cores)."""
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    sh([sys.executable, "-m", "lm.cli", *args], env=env)


def ckpt_step(path: Path) -> int | None:
    """The optimizer step a checkpoint holds (None: missing or unreadable)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:
        return None


def trained(run: Path, steps: int) -> bool:
    """A run counts as trained only with its ``done`` marker AND a last.ckpt at the target step: an exit code
    alone is not trusted (a SIGTERM once ended `lm fit` with 0 after 1,000 of 3,000 steps)."""
    step = ckpt_step(run / "checkpoints" / "last.ckpt")
    return (run / "done").exists() and step is not None and step >= steps


def fit_to(run: Path, steps: int, fit) -> bool:
    """Train ``run`` to ``steps`` unless it already is (``trained``); ``fit(resume_args)`` runs `lm fit`. The marker
    is cleared first and written only once last.ckpt holds the target step. Returns whether it trained now."""
    ckpt = run / "checkpoints" / "last.ckpt"
    if trained(run, steps):
        return False
    (run / "done").unlink(missing_ok=True)
    fit(["--ckpt_path", "last"] if ckpt.exists() else [])
    step = ckpt_step(ckpt)
    if step is None or step < steps:
        raise StudyError(f"{run} ended at step {step} of {steps} although `lm fit` exited 0; it is not marked done. "
                         f"Rerun the command to resume it from last.ckpt.")
    (run / "done").write_text("")
    return True


def run_one(variant: str, seed: int, root: Path, a) -> dict:
    run = root / "runs" / f"{variant}-s{seed}"
    ckpt = run / "checkpoints" / "last.ckpt"
    # Shorter runs keep the recipe's shape: warm-up is at most a fifth of training, then cosine to the end.
    extra = ["--trainer.max_steps", str(a.steps), "--model.optim.warmup_steps", str(min(200, a.steps // 5))]
    if fit_to(run, a.steps, lambda resume: lm(
            "fit", "--config", "configs/wikitext2/tiny.yaml", "--config", f"configs/wikitext2/variants/{variant}.yaml",
            "--seed_everything", str(seed), "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar",
            "false", *extra, *resume)):
        # The efficiency columns depend on what else ran: keep the load beside them.
        (run / "load_after_fit.txt").write_text(f"{os.getloadavg()[0]:.2f}")
    ev = run / "evaluate" / "results.json"
    if not ev.exists():
        specs = ",".join(f"word_swap:{r}" for r in RATES)
        lm("evaluate", "--ckpts", str(ckpt), "--corruptions", specs, "--seed", str(seed), "--out", str(run / "evaluate"),
           *(["--limit_batches", str(a.limit_batches)] if a.limit_batches else []))
    ft = root / "runs" / f"sst2-{variant}-s{seed}"
    sst = ft / "results" / "sst2-dev.json"
    if a.sst2 and not (ft / "done").exists():
        resume = ["--ckpt_path", "last"] if (ft / "checkpoints" / "last.ckpt").exists() else []
        lm("finetune", "fit", "--config", "configs/sst2/finetune.yaml", "--model.pretrained", str(ckpt),
           "--seed_everything", str(seed), "--trainer.default_root_dir", str(ft), "--trainer.enable_progress_bar",
           "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(a.sst2_batches), *resume)
        (ft / "done").write_text("")
    an = run / "analysis" / "analysis.json"
    if not an.exists():
        lm("analyze", "--ckpt", str(ckpt), "--n_sequences", "16", "--out", str(run / "analysis"))
    row = json.loads(ev.read_text())["rows"][0]["results"]
    out = {"variant": variant, "seed": seed, "clean": row["clean"]["ppl"],
           "tokens_per_s_eval": row["clean"].get("tokens_per_s")}
    for r in RATES:
        out[f"ws{r}"] = row[f"word_swap:{r:g}"]["ppl"]
    if sst.exists():
        best = json.loads(sst.read_text()).get("best_by_dev_loss") or {}
        out["sst2"] = best.get("dev_acc")
    analysis = json.loads(an.read_text())
    out["collapse"], out["moe"] = analysis["collapse_per_layer"], analysis.get("moe", [])
    train = run / "results" / "train.json"  # written by lm's TokenThroughput callback at the end of fit
    t = json.loads(train.read_text()) if train.exists() else {}
    out["train_wall_s"], out["train_tokens_per_s"] = t.get("wall_s"), t.get("tokens_per_s")
    load = run / "load_after_fit.txt"
    out["load_after_fit"] = float(load.read_text()) if load.exists() else None
    return out


def progress(done: int, total: int) -> str:
    """The report's "Runs finished" line: marked PARTIAL until every planned run is in."""
    return f"{done} of {total} runs" + ("" if done >= total else " (PARTIAL: rerun the command to finish)")


def mean_std(xs: list[float], digits: int = 2) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = f"{statistics.mean(xs):.{digits}f}"
    return f"{m} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else m


def findings(rows: list[dict], a) -> list[str]:
    def stats(v, key):
        xs = [key(r) for r in rows if r["variant"] == v and key(r) is not None]
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None) if xs else (None, None)

    metrics = [("clean PPL", lambda r: r["clean"], "lower")]
    metrics += [(f"PPL ratio at swap {x:g}", (lambda r, x=x: r[f"ws{x}"] / r["clean"]), "lower") for x in RATES]
    metrics += [("SST-2 dev acc", lambda r: r.get("sst2"), "higher"), ("train tokens/s", lambda r: r.get("train_tokens_per_s"), "higher")]
    out = []
    for v in a.variants:
        if v == "softmax" or not any(r["variant"] == v for r in rows):
            continue
        parts = []
        for name, key, better in metrics:
            (m, sd), (m0, sd0) = stats(v, key), stats("softmax", key)
            if m is None or m0 is None:
                continue
            noise = None if sd is None or sd0 is None else max(sd, sd0)
            verdict = "within noise" if noise is None or abs(m - m0) <= noise else (
                "better" if (m < m0) == (better == "lower") else "worse")
            parts.append(f"{name} {m:.4g} vs {m0:.4g} ({verdict})")
        out.append(f"- **{v}**: " + "; ".join(parts) + ".")
    return out or ["- (softmax or another variant missing: nothing to compare)"]


def report(rows: list[dict], root: Path, a, done: str = "") -> str:
    lines = [f"# Reproduction at the scale of this machine ({'quick' if a.quick else 'full'} mode)", "",
             f"Runs finished: {done}. Training: tiny WikiText-2 recipes, {a.steps} steps (batch 16 x 128 tokens, "
             f"precision auto: bf16-mixed where the CPU has bf16 instructions, else 32-true, as each run's config.yaml "
             f"records); SST-2: {a.sst2_batches} batches, one epoch at most.", "",
             f"Command: `python scripts/reproduce.py {' '.join(x for x in sys.argv[1:] if x != '--report_only')}`. WikiText-2 test, segments protocol "
             f"(window 128, no context across segments), PPL per token; word swap seed = training seed; "
             f"seeds {a.seeds}. SST-2: dev accuracy of the best-by-dev-loss checkpoint.", "",
             "| variant | n | clean PPL | " + " | ".join(f"PPL swap {r:g}" for r in RATES)
             + " | " + " | ".join(f"x {r:g}" for r in RATES)
             + " | SST-2 dev acc | train tokens/s | train wall s | eval tokens/s |",
             "|" + "---|" * (7 + 2 * len(RATES))]
    for v in a.variants:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        cells = [mean_std([r["clean"] for r in rs])] + [mean_std([r[f"ws{x}"] for r in rs]) for x in RATES]
        cells += [mean_std([r[f"ws{x}"] / r["clean"] for r in rs]) for x in RATES]
        cells += [mean_std([r.get("sst2") for r in rs], 3), mean_std([r.get("train_tokens_per_s") for r in rs], 0),
                  mean_std([r.get("train_wall_s") for r in rs], 0), mean_std([r.get("tokens_per_s_eval") for r in rs], 0)]
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + " |")
    loads = [r["load_after_fit"] for r in rows if r.get("load_after_fit") is not None]
    if loads:
        shared = max(loads) > (os.cpu_count() or 1) + 0.5  # one training process alone keeps the load ~ cores
        lines += ["", f"1-minute load average at the end of each training run: {min(loads):.1f}-{max(loads):.1f} on "
                  f"{os.cpu_count()} cores" + (" (above the core count: other jobs shared the CPU for some runs, "
                  "whose tokens/s are lower than on an idle machine)." if shared else
                  " (no more than the training itself: the CPU was not shared).")]
    lines += ["", "What the data shows (each variant against softmax; 'within noise' = the difference of means is "
              "smaller than the larger of the two standard deviations, or fewer than 2 seeds):", ""]
    lines += findings(rows, a)
    moe_rows = [r for r in rows if r.get("moe")]
    if moe_rows:
        lines += ["", "Expert load on the test windows analysed (evaluation capacity): per MoE layer, the share of "
                  "assignments of the busiest expert over the mean share (1 = balanced, E = collapsed), and the "
                  "dropped-token fraction; mean ± std over seeds.", "",
                  "| variant | layer | max/mean load | dropped fraction |", "|---|---|---|---|"]
        for v in a.variants:
            rs = [r for r in moe_rows if r["variant"] == v]
            for j, layer in enumerate(rs[0]["moe"] if rs else []):
                lines.append(f"| {v} | {layer['layer']} | {mean_std([r['moe'][j]['load_max_over_mean'] for r in rs])} "
                             f"| {mean_std([r['moe'][j]['dropped_fraction'] for r in rs], 4)} |")
    lines += ["", "Collapse per layer (mean pairwise token cosine similarity, lower = less collapse), mean over seeds:",
              "", "| variant | " + " | ".join(f"layer {i}" for i in range(len(rows[0]["collapse"]))) + " |",
              "|---|" + "---|" * len(rows[0]["collapse"])]
    for v in a.variants:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            lines.append(f"| {v} | " + " | ".join(f"{statistics.mean(r['collapse'][i] for r in rs):.3f}"
                                                  for i in range(len(rs[0]["collapse"]))) + " |")
    lines += ["", "![PPL vs swap rate](ppl_vs_rate.png)", "", "![collapse per layer](collapse.png)", ""]
    _plots(rows, root, a)
    return "\n".join(lines)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _plots(rows: list[dict], root: Path, a) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for v in a.variants:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            cols = [[r["clean"] for r in rs]] + [[r[f"ws{x}"] for r in rs] for x in RATES]
            ax.errorbar([0.0] + RATES, [statistics.mean(c) for c in cols], yerr=[_std(c) for c in cols],
                        marker="o", capsize=3, label=v)
    ax.set(xlabel="word-swap rate", ylabel="test PPL", title="WikiText-2 test PPL under word swap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "ppl_vs_rate.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for v in a.variants:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            layers = range(len(rs[0]["collapse"]))
            cols = [[r["collapse"][i] for r in rs] for i in layers]
            ax.errorbar(list(layers), [statistics.mean(c) for c in cols], yerr=[_std(c) for c in cols],
                        marker="o", capsize=3, label=v)
            ax.set_xticks(list(layers))
    ax.set(xlabel="layer", ylabel="mean token cosine similarity", title="representation collapse")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "collapse.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1111, 1112, 1113])
    ap.add_argument("--steps", type=int, default=600, help="training steps per run (the recipes say 2000)")
    ap.add_argument("--sst2_batches", type=int, default=400, help="SST-2 training batches (one epoch, capped)")
    ap.add_argument("--limit_batches", type=float, default=None, help="evaluate a fraction of the test set")
    ap.add_argument("--no-sst2", dest="sst2", action="store_false")
    ap.add_argument("--quick", action="store_true",
                    help="2 variants x 2 seeds, 300 steps, 200 SST-2 batches, a quarter of the test set")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report_only", action="store_true",
                    help="rebuild report.md and the plots from <out>/rows.json without running anything")
    a = ap.parse_args()
    if a.quick:
        a.variants = a.variants if a.variants != VARIANTS else ["softmax", "elliptical"]
        a.seeds = a.seeds[:2]
        a.steps, a.sst2_batches = min(a.steps, 300), min(a.sst2_batches, 200)
        a.limit_batches = a.limit_batches or 0.25
    root = Path(a.out or ("results/reproduce-quick" if a.quick else "results/reproduce"))
    if a.report_only:
        if not (root / "rows.json").exists():
            sys.exit(f"reproduce: error: {root / 'rows.json'} does not exist; run the study first (without --report_only)")
        rows = json.loads((root / "rows.json").read_text())
        atomic_write_text(root / "report.md", report(rows, root, a, progress(len(rows), len(a.variants) * len(a.seeds))))
        print((root / "report.md").read_text())
        return
    root.mkdir(parents=True, exist_ok=True)
    # Seed-major order: an interrupted study has every variant at fewer seeds, not some variants missing.
    rows, plan = [], [(v, s) for s in a.seeds for v in a.variants]
    for i, (v, s) in enumerate(plan):
        try:
            rows.append(run_one(v, s, root, a))
        except StudyError as e:
            sys.exit(f"reproduce: error: {e}")
        # The report is rewritten after every finished run: an interrupted study still leaves a
        # (marked) partial report, and a rerun completes it.
        atomic_write_text(root / "rows.json", json.dumps(rows, indent=2))
        atomic_write_text(root / "report.md", report(rows, root, a, progress(i + 1, len(plan))))
    print((root / "report.md").read_text())


if __name__ == "__main__":
    main()
