"""Collect the quickstart's results into one markdown table (printed and written to --out).

Reads, per variant: the LM run's test result JSON, its checkpoint (step, batch, tgt_len) and wall time,
the `lm evaluate` table (clean vs word-swapped), and the SST-2 finetune result JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lm import checkpoint


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["softmax", "elliptical"])
    ap.add_argument("--quick", default="0")
    ap.add_argument("--out", default="results/quickstart/summary.md")
    ap.add_argument("--evaluate", default=None, help="results.json of `lm evaluate` (default: beside --out)")
    a = ap.parse_args()
    suffix = "-quick" if a.quick == "1" else ""
    out = Path(a.out)
    evaluate = _json(Path(a.evaluate) if a.evaluate else out.parent / "evaluate" / "results.json")
    by_name = {row["name"]: row for row in evaluate.get("rows", [])}
    lines = ["| variant | train steps | train wall (s) | train tokens/s | test PPL (clean) | PPL word_swap 1.5% | "
             "PPL word_swap 2.5% | x 1.5% | x 2.5% | SST-2 dev acc (end / best dev loss) |", "|" + "---|" * 10]
    for v in a.variants:
        run = Path(f"runs/wikitext2-tiny-{v}{suffix}")
        ckpt_path = run / "checkpoints" / "last.ckpt"
        step, tokens_per_step = None, None
        if ckpt_path.is_file():
            ck = checkpoint.read(ckpt_path)
            step = ck.get("global_step")
            d = ck.get("lm_data", {})
            tokens_per_step = (d.get("batch_size") or 0) * (d.get("tgt_len") or 0)
        train = _json(run / "results" / "train.json")  # lm fit's TokenThroughput summary
        wall_file = run / "train_wall_s.txt"  # the script's own clock (process start to exit)
        wall = train.get("wall_s") or (float(wall_file.read_text()) if wall_file.is_file() else None)
        if train.get("tokens_per_s"):
            tps = f"{train['tokens_per_s']:.0f}"
        else:
            tps = f"{step * tokens_per_step / wall:.0f}" if step and tokens_per_step and wall else "-"
        test = _json(run / "results" / "test-segments.json")
        row = by_name.get(run.name, {}).get("results", {})

        def ppl(label):
            r = row.get(label)
            return (f"{r['ppl']:.1f}", f"{r['ratio_vs_clean']:.3f}") if r else ("-", "-")

        p15, r15 = ppl("word_swap:0.015")
        p25, r25 = ppl("word_swap:0.025")
        sst = _json(Path(f"runs/sst2-tiny-{v}{suffix}") / "results" / "sst2-dev.json")
        best = sst.get("best_by_dev_loss") or {}
        acc = f"{sst['dev_acc']:.3f} / {best['dev_acc']:.3f}" if best else "-"
        clean = f"{test['ppl']:.1f}" if test else "-"
        lines.append(f"| {v} | {step or '-'} | {wall or '-'} | {tps} | {clean} | {p15} | {p25} | {r15} | {r25} | {acc} |")
    proto = evaluate.get("protocol", {})
    lines += ["", f"WikiText-2 test, protocol {proto.get('protocol', 'segments')} (window {proto.get('window')}, "
              f"no context across segments). Train wall = the whole fit; tokens/s = training tokens / training time "
              f"(validation excluded). SST-2: dev accuracy at the end of finetuning / of the checkpoint with the "
              f"lowest dev loss (the paper's selection). 'x' = contaminated / clean."]
    table = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
