"""Reports of scripts/study.py: tables, slopes with intervals, plots; pure functions of the runs' rows.

A row (one run's `row.json`): part, cell, variant, seed, steps, threads, train_wall_s, train_tokens_per_s,
ppl = {"clean": ..., "word_swap:0.015": ..., ...}, effective_rate = {"word_swap:0.015": measured swaps / words, ...},
fit_args.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from reproduce import mean_std as reproduce_mean_std  # scripts/ is on sys.path (run as a script, or tests)
from study_cells import CELLS, CHAR_RATES, WORD_RATES  # the cells' descriptions live with their overrides

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (any table); 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    if dof < 1:
        raise ValueError("a t interval needs at least one degree of freedom (two points)")
    return _T975[dof - 1] if dof <= 30 else 1.96


def mean_sd(xs: list[float]) -> tuple[float, float | None]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(xs: list[float], digits: int = 2, pct: bool = False) -> str:
    """reproduce.mean_std's "mean ± std"; with ``pct``, a signed percentage of fractions."""
    if not pct:
        return reproduce_mean_std(xs, digits)
    if not xs:
        return "-"
    m, sd = mean_sd([100 * x for x in xs])
    return f"{m:+.{digits}f}%" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def slope_through_origin(points: list[tuple[float, float]]) -> tuple[float, float, int]:
    """Least squares y = b x (no intercept): (b, standard error of b, degrees of freedom n - 1).

    Used for the robustness curve with y = log(PPL_corrupted / PPL_clean), which is 0 at rate 0 by definition:
    b is the extra negative log-likelihood per token (nats) per unit swap rate."""
    sxx = sum(x * x for x, _ in points)
    if len(points) < 2 or sxx == 0:
        raise ValueError("a slope needs at least two points with a non-zero rate")
    b = sum(x * y for x, y in points) / sxx
    dof = len(points) - 1
    rss = sum((y - b * x) ** 2 for x, y in points)
    return b, math.sqrt(rss / dof / sxx), dof


def differs(b1: float, se1: float, dof1: int, b2: float, se2: float, dof2: int) -> bool:
    """Whether two fitted slopes differ beyond noise: |b1 - b2| > t * sqrt(se1^2 + se2^2), t at the smaller dof."""
    return abs(b1 - b2) > t975(min(dof1, dof2)) * math.hypot(se1, se2)


def _by(rows: list[dict], **keys) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in keys.items())]


def _paired_gaps(ell: list[dict], soft: list[dict]) -> list[float]:
    """Elliptical / softmax - 1 in clean PPL, paired by seed (same data order and initial draws)."""
    s = {r["seed"]: r["ppl"]["clean"] for r in soft}
    return [r["ppl"]["clean"] / s[r["seed"]] - 1 for r in ell if r["seed"] in s]


def attribution(rows: list[dict], root: Path, a, planned: int) -> str:
    lines = [f"# Attribution: Elliptical vs softmax, one factor flipped at a time ({len(rows)} of {planned} runs"
             + ("" if len(rows) >= planned else ", PARTIAL: rerun the command to finish") + ")", "",
             f"Command: `python scripts/study.py attribution --steps {a.steps} --seeds {' '.join(map(str, a.seeds))}`. "
             f"Recipe: `configs/wikitext2/tiny.yaml` (4 layers, d_model 256, d_inner 1024) + the variant overlay, "
             f"{a.steps} steps, cosine; base cell 8 heads x 32, float32, batch 32 x 128 tokens, warm-up 100; "
             "Elliptical with `scale: none` (the released code) unless the cell says sqrt. WikiText-2 test PPL, "
             "segments protocol (window 128), word swap 1.5% with the paper's TextAttack sampling, swap seed = "
             "training seed. Gap = Elliptical / softmax - 1 in clean PPL, paired by seed; mean ± std over seeds.", "",
             "| cell | flips to | seeds | softmax PPL | Elliptical PPL | gap | softmax x swap 1.5% | "
             "Elliptical x swap 1.5% |", "|---|---|---|---|---|---|---|---|"]
    gaps: dict[str, list[float]] = {}
    for cell, (what, _) in CELLS.items():
        ell = _by(rows, cell=cell, variant="elliptical")
        soft = _by(rows, cell="d64" if cell == "d64_sqrt" else cell, variant="softmax")
        if not ell and (not soft or cell == "d64_sqrt"):  # d64_sqrt's softmax is d64's: no row without Elliptical
            continue
        gaps[cell] = _paired_gaps(ell, soft)
        ratio = lambda rs: [r["ppl"]["word_swap:0.015"] / r["ppl"]["clean"] for r in rs]  # noqa: E731
        lines.append(f"| {cell} | {what} | {len(ell)} | {fmt([r['ppl']['clean'] for r in soft])} | "
                     f"{fmt([r['ppl']['clean'] for r in ell])} | {fmt(gaps[cell], 1, pct=True)} | "
                     f"{fmt(ratio(soft), 3)} | {fmt(ratio(ell), 3)} |")
    if "bf16" not in gaps:
        lines += ["", "Cell bf16 not run: this CPU has no bf16 matrix instructions (no AVX512-BF16/AMX), where "
                  "PyTorch multiplies bf16 in a scalar fallback about 200x slower than float32."]
    lines += ["", "Each cell against base (the gap's change; 'beyond noise' = more than twice the standard error "
              "of the difference of the two cells' mean gaps, which needs 2 seeds in each):", ""]
    base = gaps.get("base", [])
    for cell, g in gaps.items():
        if cell == "base" or not g or not base:
            continue
        d = statistics.mean(g) - statistics.mean(base)
        if len(g) > 1 and len(base) > 1:
            se = math.sqrt(statistics.variance(g) / len(g) + statistics.variance(base) / len(base))
            verdict = "beyond noise" if abs(d) > 2 * se else "within noise"
            lines.append(f"- {cell}: gap {100 * statistics.mean(g):+.1f}% vs base {100 * statistics.mean(base):+.1f}%"
                         f" (change {100 * d:+.1f} points, 2 SE = {200 * se:.1f}: {verdict}).")
        else:
            lines.append(f"- {cell}: gap {100 * statistics.mean(g):+.1f}% vs base {100 * statistics.mean(base):+.1f}%"
                         " (one seed in a cell: no spread yet).")
    lines += ["", _throughput(rows), ""]
    return "\n".join(lines)


def _throughput(rows: list[dict]) -> str:
    tps = [r["train_tokens_per_s"] for r in rows if r.get("train_tokens_per_s")]
    threads = "/".join(str(t) for t in sorted({r.get("threads") for r in rows if r.get("threads")}))
    return (f"Training ran at {min(tps):,.0f}-{max(tps):,.0f} tokens/s per run ({threads} thread(s) each, runs two "
            "at a time on 2 cores): not comparable with the single-run tokens/s elsewhere in the docs." if tps else "")


def rate(row: dict, spec: str) -> float:
    """The x of a curve point: the measured rate (swaps / words) the run's corrupted file has, else the nominal one.
    They differ: TextAttack's sampling swaps max(int(rate * words), 1) words per line, so at a nominal 0.5% every
    short line still loses a word (1.2% measured on WikiText-2 test), while at 1.5% the rounding down nearly
    cancels it (1.6%); fitted against the nominal rate the first point would sit far above the line."""
    return row.get("effective_rate", {}).get(spec, float(spec.split(":")[1]))


def curve_fit(rows: list[dict], variant: str, kind: str = "word_swap") -> tuple[float, float, int] | None:
    pts = [(rate(r, k), math.log(v / r["ppl"]["clean"]))
           for r in _by(rows, variant=variant) for k, v in r["ppl"].items() if k.startswith(kind + ":")]
    return slope_through_origin(pts) if len(pts) >= 2 else None


def seed_slopes(rows: list[dict], variant: str, kind: str = "word_swap") -> dict[int, float]:
    """Each seed's own slope (one model per seed): the unit whose spread is the seed-to-seed noise."""
    out = {}
    for seed in sorted({r["seed"] for r in _by(rows, variant=variant)}):
        fit = curve_fit(_by(rows, seed=seed), variant, kind)
        if fit is not None:
            out[seed] = fit[0]
    return out


def paired_slope_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean of a - b over the seeds both have (same data order and initial draws), its 95% t half-width and the
    number of seeds; None with fewer than two common seeds. The pooled fit's interval only sees how far the
    points of a run lie from a line; the five rates of one seed share one model, so seed-to-seed noise shows
    only in this paired difference."""
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if len(d) < 2:
        return None
    return statistics.mean(d), t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)), len(d)


def curve(rows: list[dict], root: Path, a, planned: int) -> str:
    specs = [f"word_swap:{r:g}" for r in WORD_RATES] + [f"char_swap:{r:g}" for r in CHAR_RATES]
    lines = [f"# Robustness curve ({len(rows)} of {planned} runs" + ("" if len(rows) >= planned else
             ", PARTIAL: rerun the command to finish") + ")", "",
             f"Command: `python scripts/study.py curve --cell {a.cell} --steps {a.steps} --seeds "
             f"{' '.join(map(str, a.seeds))}`. Recipe: `configs/wikitext2/tiny.yaml` + variant overlay, cell "
             f"{a.cell} ({CELLS[a.cell][0]}), {a.steps} steps. WikiText-2 test, segments protocol; word swap with "
             "the paper's TextAttack sampling, character swap; corruption seed = training seed. Cells: PPL ratio "
             "corrupted / clean, mean ± std over seeds. Slope: least squares of log(PPL ratio) on the measured "
             "word-swap rate (swaps / words, the row 'measured rate') through the origin (extra nats per token per "
             "unit rate), pooled over seeds, with a 95% t interval. Character swap on this word-level vocabulary: "
             "an edited word is almost never a word of the vocabulary (docs/study.md counts them) and becomes "
             "`<unk>`, a frequent and easy target, so PPL falls (ratio < 1): that column measures the `<unk>` "
             "mapping, not robustness (a character-level model, e.g. on EnWik8, sees the edit itself).", "",
             "| variant | seeds | clean PPL | " + " | ".join(f"x {s.replace('_swap:', ' ')}" for s in specs)
             + " | slope (95% CI) | slope per seed |", "|---|---|---|" + "---|" * len(specs) + "---|---|"]
    measured = [[rate(r, sp) for r in rows if sp in r["ppl"]] for sp in specs]
    if rows:
        lines.append("| measured rate | | | " + " | ".join(f"{100 * statistics.mean(m):.2f}%" if m else "-"
                                                       for m in measured) + " | | |")
    fits = {}
    for v in a.variants:
        rs = _by(rows, variant=v)
        if not rs:
            continue
        fits[v] = curve_fit(rows, v)
        cells = [fmt([r["ppl"][s] / r["ppl"]["clean"] for r in rs if s in r["ppl"]], 3) for s in specs]
        fit = "-" if fits[v] is None else f"{fits[v][0]:.2f} ± {t975(fits[v][2]) * fits[v][1]:.2f}"
        per_seed = ", ".join(f"{b:.2f}" for b in seed_slopes(rows, v).values()) or "-"
        lines.append(f"| {v} | {len(rs)} | {fmt([r['ppl']['clean'] for r in rs])} | " + " | ".join(cells)
                     + f" | {fit} | {per_seed} |")
    lines += ["", "Slope against softmax's. Verdict: the per-seed slopes' difference, paired by seed, against its 95% "
              "t half-width (seed-to-seed noise; 'beyond noise' when the mean difference exceeds it). In brackets, "
              "the pooled fits compared (|difference| > t x the standard error of the difference): fit noise only.",
              ""]
    s0 = fits.get("softmax")
    for v, f in fits.items():
        if v == "softmax" or not f or not s0:
            continue
        pooled = "beyond" if differs(*f, *s0) else "within"
        pair = paired_slope_difference(seed_slopes(rows, v), seed_slopes(rows, "softmax"))
        if pair is None:
            verdict = "fewer than 2 seeds in common: no seed-level verdict"
        else:
            m, hw, n = pair
            verdict = (f"paired difference {m:+.2f} ± {hw:.2f} over {n} seeds: "
                       + ("beyond noise" if abs(m) > hw else "within noise"))
        lines.append(f"- {v}: {f[0]:.2f} vs {s0[0]:.2f}; {verdict} (pooled fits: {pooled} fit noise).")
    lines += ["", "![PPL ratio vs rate](curve.png)", "", _throughput(rows), ""]
    _curve_plot(rows, root, a, WORD_RATES, CHAR_RATES)
    return "\n".join(lines)


def _curve_plot(rows, root: Path, a, word_rates, char_rates) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, kind, rates in ((axes[0], "word_swap", word_rates), (axes[1], "char_swap", char_rates)):
        for v in a.variants:
            rs = _by(rows, variant=v)
            cols = [[r["ppl"][f"{kind}:{x:g}"] / r["ppl"]["clean"] for r in rs if f"{kind}:{x:g}" in r["ppl"]]
                    for x in rates]
            if rs and all(cols):
                xs = [statistics.mean(rate(r, f"{kind}:{x:g}") for r in rs) for x in rates]
                ax.errorbar([0.0] + [100 * x for x in xs], [1.0] + [statistics.mean(c) for c in cols],
                            yerr=[0.0] + [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols],
                            marker="o", capsize=3, label=v)
        name = kind.replace("_", " ")
        ax.set(xlabel=f"{name}: measured rate (% of words)", title=f"WikiText-2 test, {name}")
    axes[0].set_ylabel("PPL corrupted / clean")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=110)
    plt.close(fig)


def small(rows: list[dict], root: Path, a, planned: int) -> str:
    scored = "/".join(f"{n:,}" for n in sorted({r["tokens_scored"] for r in rows if r.get("tokens_scored")})) or "?"
    lines = [f"# The paper's small model on WikiText-2 ({len(rows)} of {planned} runs)", "",
             f"Command: `python scripts/study.py small --small_steps {a.small_steps} --seeds {' '.join(map(str, a.seeds))}`. "
             "16 layers, d_model 128, 8 heads x 16, d_inner 2048, window 256 (configs/wikitext103/small*.yaml on "
             f"WikiText-2, cutoffs 2000/10000), {a.small_steps} steps of batch 16 x 256 in {a.small_precision}, the "
             "paper's Adam 2.5e-4 and Transformer-XL cosine shortened to them (warm-up a tenth). WikiText-2 test, "
             "segments protocol (window 256), "
             + (f"its first {a.small_eval_batches} evaluation batches ({scored} tokens scored, the same positions "
                "clean and corrupted)" if a.small_eval_batches else f"all of it ({scored} tokens scored)")
             + "; word swap with the paper's TextAttack sampling, swap seed = training seed. Gap = Elliptical / "
             "softmax - 1 in clean PPL, paired by seed.", "",
             "| variant | seeds | steps | clean PPL | gap | x swap 1.5% | x swap 5% |", "|---|---|---|---|---|---|---|"]
    soft = _by(rows, variant="softmax")
    for v in ("softmax", "elliptical"):
        rs = _by(rows, variant=v)
        if rs:
            gap = fmt(_paired_gaps(rs, soft), 1, pct=True) if v != "softmax" else ""
            lines.append(f"| {v} | {len(rs)} | {fmt([r['steps'] for r in rs], 0)} | "
                         f"{fmt([r['ppl']['clean'] for r in rs])} | {gap} | "
                         + " | ".join(fmt([r["ppl"][s] / r["ppl"]["clean"] for r in rs], 3)
                                      for s in ("word_swap:0.015", "word_swap:0.05")) + " |")
    return "\n".join(lines + ["", _throughput(rows), ""])


REPORTS = {"attribution": attribution, "curve": curve, "small": small}
