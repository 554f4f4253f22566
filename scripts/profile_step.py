"""Where a training step's time goes: ``torch.profiler`` over a few steps of the tiny and small shapes.

    .venv/bin/python scripts/profile_step.py                       # tiny + small, bf16 + fp32 (~2 min)
    .venv/bin/python scripts/profile_step.py --shapes tiny --precisions bf16 --steps 3

One step = what ``lm fit`` does per batch, in a plain loop: forward under autocast, adaptive-softmax
NLL, backward, gradient-norm clipping (0.25), Adam. Each operator's SELF CPU time is put into one
category (matmul, attention kernel, adaptive-softmax head, LayerNorm, dropout, element-wise,
embedding, dtype casts, optimizer, other); "python / dispatch" is the step's wall time that no
operator accounts for. Writes ``--out`` (JSON with both tables and the top operators) and prints a
markdown table per (shape, precision) for docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from bench_versus import old_code_paths  # noqa: E402

from lm.config import AttentionConfig  # noqa: E402
from lm.model.transformer import TransformerLM  # noqa: E402
from lm.utils import cpu_bf16_native  # noqa: E402

# (category, substrings of the aten operator name); the first match wins, so order matters.
CATEGORIES = [
    ("attention kernel", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("adaptive softmax", ("log_softmax", "nll_loss", "gather", "logsumexp", "_softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("LayerNorm", ("layer_norm",)),
    ("dropout", ("dropout", "bernoulli", "aten::random_", "aten::ge")),  # (+ lm::dropout_mask's numpy time)
    ("embedding", ("embedding", "index_select", "index_add", "index_put", "scatter")),
    ("dtype casts", ("aten::_to_copy", "aten::to", "aten::copy_")),
    ("optimizer", ("_foreach", "adam", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("element-wise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "relu", "gelu", "aten::where",
                      "aten::clamp", "aten::neg", "aten::exp", "aten::sum", "aten::mean", "aten::norm",
                      "linalg_vector_norm", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty",
                      "aten::ones")),
]


# lm.model.dropout's scopes: every op under them is dropout (its where/mul_ would otherwise count as element-wise).
# (torch's own: its forward's div_/mul run under aten::dropout; its backward is a MulBackward0 that cannot be
# told from other multiplications and stays element-wise.)
DROPOUT_SCOPES = ("lm::dropout_mask", "_MaskedScale", "_MaskedScaleBackward", "aten::dropout")


def _under_dropout(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name in DROPOUT_SCOPES:
            return True
        p = p.cpu_parent
    return False


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other ops"


def run(shape_name: str, precision: str, steps: int, warmup: int, seed: int, code: str = "after") -> dict:
    shape = bl.SHAPES[shape_name]
    torch.manual_seed(seed)
    net = TransformerLM(bl.model_config(shape, AttentionConfig(name="softmax")), shape["vocab"]).train()
    if code == "before":  # issue 32's old code paths: torch's dropout mask, in-place ReLU, Adam's loop
        old_code_paths(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=code == "after")  # as LanguageModel configures it
    data = list(bl.streams(shape, steps + warmup, seed=seed))
    bf16 = precision == "bf16"

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(batch["input"])
            loss = net.nll(out.hidden, batch["target"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in data[:warmup]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for b in data[warmup:]:
            step(b)
        wall = time.perf_counter() - t0
    by_cat, by_op = defaultdict(float), defaultdict(float)
    for e in prof.events():
        if e.name in DROPOUT_SCOPES:  # self time: numpy's Philox, the autograd Function's Python, aten::dropout's own
            by_cat["dropout"] += e.self_cpu_time_total
            continue
        if not e.name.startswith("aten::"):
            continue  # record_function scopes and autograd nodes: their time is in the aten ops under them
        us = e.self_cpu_time_total
        by_cat["dropout" if _under_dropout(e) else category(e.name)] += us
        by_op[e.name] += us
    total_ops = sum(by_cat.values()) / 1e6
    # Self times of ops running on intra-op threads are not summed into the step's wall time one to one;
    # with one thread the difference is interpreter, dispatch and autograd-engine overhead.
    by_cat["python / dispatch / autograd"] = max(0.0, wall - total_ops) * 1e6
    share = {k: round(v / 1e6 / wall, 4) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])}
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
    return {"shape": shape_name, "precision": precision, "code": code, "steps": steps, "batch": shape["batch"],
            "tgt_len": shape["tgt_len"], "wall_s_per_step": round(wall / steps, 4),
            "tokens_per_s": round(shape["batch"] * shape["tgt_len"] * steps / wall, 1),
            "share_of_step": share,
            "top_ops_ms_per_step": {k: round(v / 1e3 / steps, 2) for k, v in top}}


def markdown(r: dict) -> str:
    rows = [f"| {k} | {v * 100:.1f}% | {v * r['wall_s_per_step'] * 1e3:.0f} |" for k, v in r["share_of_step"].items()]
    return "\n".join([f"**{r['shape']} {r['precision']}, code {r['code']}** ({r['wall_s_per_step'] * 1e3:.0f} ms/step, "
                      f"{r['tokens_per_s']:.0f} tokens/s)", "", "| where | share | ms/step |", "|---|---:|---:|", *rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,small")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--code", default="after", help="after (the framework now), before (issue 32's old dropout "
                   "and Adam), or both, interleaved per (shape, precision)")
    p.add_argument("--out", default="results/profile_step.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    precisions = a.precisions.split(",")
    skipped = []
    if "bf16" in precisions and cpu_bf16_native() is False:  # its scalar fallback: minutes per step, nothing to learn
        precisions.remove("bf16")
        skipped.append("bf16: this CPU has no bf16 matrix instructions (lm.utils.cpu_bf16_native)")
    codes = ["before", "after"] if a.code == "both" else [a.code]
    rows = [run(s, pr, a.steps, a.warmup, a.seed, c) for s in a.shapes.split(",") for pr in precisions for c in codes]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": torch.get_num_threads(),
              "loadavg": bl.loadavg(), "torch": torch.__version__, "machine": bl.machine_info(), "cpu_bf16_native": cpu_bf16_native(),
              "skipped": skipped, "results": rows}
    bl.write_json(a.out, report)
    for r in rows:
        print(markdown(r) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
