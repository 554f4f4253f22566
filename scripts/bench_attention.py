"""Attention variants side by side at one shape: training and evaluation throughput, peak memory.

    .venv/bin/python scripts/bench_attention.py                 # all registered variants, tiny shape
    .venv/bin/python scripts/bench_attention.py --quick         # a smoke run (seconds)
    .venv/bin/python scripts/bench_attention.py --variants softmax,elliptical,quest --precision bf16

Shape (the tiny WikiText-2 recipe): 4 layers, d_model 256, 4 heads x 64, d_inner 1024, batch 16 x 128
tokens, vocabulary 33,278 with adaptive-softmax cutoffs [2000, 10000]. Tokens are random draws from a
Zipf distribution over the frequency-sorted vocabulary (p(rank r) ~ 1/(r+1)^1.1), so the adaptive
softmax's tail clusters are used about as often as on real text; no data files are needed.

Shapes and variant settings are read from the recipe files (configs/wikitext2/tiny.yaml + variants/<name>.yaml,
configs/wikitext103/small.yaml): Elliptical and
Elliptical-QUEST on layers 1.. (layer 0 ordinary softmax / QUEST, as in the paper), Elliptical with the
released code's scale 1; every other variant on all layers with its default options.

What is measured, for every variant, in one invocation:

- training tokens/s: forward + adaptive-softmax NLL + backward + gradient clipping + Adam step of the
  framework's ``TransformerLM`` in a plain loop (no Lightning here; ``scripts/bench.py`` measures the
  Lightning overhead). Variants are timed round-robin in one process (the order rotates every round)
  so that load drift on a shared machine hits them alike; the reported figure is the median over rounds.
- evaluation tokens/s: ``torch.no_grad`` forward + NLL in eval mode, timed the same way.
- peak memory: in a FRESH subprocess per variant started with ``MALLOC_MMAP_THRESHOLD_=65536`` (every
  tensor buffer of 64 KiB or more is its own mmap, returned to the OS when freed, so the resident set
  tracks live tensors instead of the allocator's free lists). The kernel's peak-RSS counter (VmHWM) is
  reset (``/proc/self/clear_refs``) right before the measured phase; the figure is the peak RSS over the
  RSS at the reset. ``train_step_peak_mb``: during a training step after the first (weights and Adam
  state already resident), i.e. activations + gradients + workspace; ``eval_peak_mb``: during an
  evaluation forward. ``train_total_peak_mb`` is the absolute peak RSS of that process (Python, torch,
  weights, Adam state included).

On a GPU (``--device cuda``, the default ``auto`` picks it when one is visible) the same loop runs there
(bf16 autocast with ``--precision bf16``; SDPA then dispatches to its flash / memory-efficient kernels),
and memory is the CUDA caching allocator's peak (``torch.cuda.max_memory_allocated``) over the
allocation at the start of the measured phase, in the same fresh subprocess per variant. Timing needs no
explicit synchronisation: every step ends in ``.item()``, which waits for the device.

The JSON (``--out``, default results/bench_attention.json) records the machine, its load average
before and after, the settings and every number; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (MALLOC_ENV, ROOT, SHAPES, attention_config, cuda_peak_over, device_info,  # noqa: E402
                      choose_threads, eval_step, hwm_mb, loadavg, machine_info, markdown_table, model_config,
                      peak_over, resolve_device, rss_mb, streams, to_device, train_step, write_json)

from lm.model.attention import ATTENTION  # noqa: E402
from lm.model.transformer import TransformerLM  # noqa: E402

SCHEMA = "bench_attention/1"
PAPER_ORDER = ["softmax", "elliptical", "quest", "qknorm", "elliptical_quest",
               "performer", "mgk", "fourier", "rkde", "spkde", "mom"]


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def registered_variants() -> list[str]:
    known = [v for v in PAPER_ORDER if v in ATTENTION]
    return known + sorted(v for v in ATTENTION if v not in known)


def build(variant: str, shape: dict, seed: int = 1111) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(model_config(shape, attention_config(variant)), shape["vocab"])


def memory_worker(variant: str, shape: dict, bf16: bool, seed: int, device: torch.device = torch.device("cpu")) -> dict:
    """Runs in a fresh subprocess (see the module docstring)."""
    torch.manual_seed(seed)
    data = [to_device(b, device) for b in streams(shape, 3, seed)]
    net = build(variant, shape, seed).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    measure = cuda_peak_over if device.type == "cuda" else peak_over
    net.eval()
    eval_peak = measure(lambda: eval_step(net, data[0], bf16))
    net.train()
    train_step(net, data[0], opt, bf16)  # Adam state now resident
    step_peak = measure(lambda: train_step(net, data[1], opt, bf16))
    total = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else hwm_mb()
    return {"variant": variant, "eval_peak_mb": round(eval_peak, 1), "train_step_peak_mb": round(step_peak, 1),
            "train_total_peak_mb": round(total, 1), "rss_after_mb": round(rss_mb(), 1),
            "params": sum(p.numel() for p in net.parameters())}


def measure_memory(variant: str, shape_name: str, shape: dict, bf16: bool, seed: int, timeout: float = 600,
                   device: torch.device = torch.device("cpu")) -> dict:
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", variant, "--shape", shape_name,
           "--batch", str(shape["batch"]), "--tgt-len", str(shape["tgt_len"]),
           "--precision", "bf16" if bf16 else "32", "--seed", str(seed), "--threads", str(torch.get_num_threads()), "--device", str(device)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"memory worker timed out after {timeout}s"}
    if p.returncode != 0:
        return {"variant": variant, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    shape = dict(SHAPES[args.shape])
    if args.batch:
        shape["batch"] = args.batch
    if args.tgt_len:
        shape["tgt_len"] = args.tgt_len
    bf16 = args.precision == "bf16"
    variants = registered_variants() if args.variants in (None, "all") else args.variants.split(",")
    unknown = [v for v in variants if v not in ATTENTION]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; registered: {sorted(ATTENTION)}")
    if "softmax" not in variants:
        variants = ["softmax", *variants]
    load_before = loadavg()
    t_start = time.perf_counter()

    n_train = args.warmup + args.steps * args.rounds
    data = [to_device(b, args.device) for b in streams(shape, n_train + args.eval_steps * args.rounds + 1, args.seed)]
    train_data, eval_data = data[:n_train], data[n_train:]
    tokens = shape["batch"] * shape["tgt_len"]
    nets, opts = {}, {}
    for v in variants:
        nets[v] = build(v, shape, args.seed).to(args.device)
        opts[v] = torch.optim.Adam(nets[v].parameters(), lr=1e-4)
    # warm-up: first calls allocate, pick kernels, create Adam state
    for v in variants:
        nets[v].train()
        for i in range(args.warmup):
            train_step(nets[v], train_data[i], opts[v], bf16)
        nets[v].eval()
        eval_step(nets[v], eval_data[0], bf16)
    train_tps = {v: [] for v in variants}
    eval_tps = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            net = nets[v]
            net.train()
            t0 = time.perf_counter()
            for i in range(args.steps):
                train_step(net, train_data[args.warmup + r * args.steps + i], opts[v], bf16)
            train_tps[v].append(args.steps * tokens / (time.perf_counter() - t0))
            net.eval()
            t0 = time.perf_counter()
            for i in range(args.eval_steps):
                eval_step(net, eval_data[r * args.eval_steps + i], bf16)
            eval_tps[v].append(args.eval_steps * tokens / (time.perf_counter() - t0))
    load_mid = loadavg()
    del nets, opts

    results = []
    for v in variants:
        row = {"variant": v, "train_tokens_per_s": round(statistics.median(train_tps[v]), 1),
               "eval_tokens_per_s": round(statistics.median(eval_tps[v]), 1),
               "train_tokens_per_s_rounds": [round(x, 1) for x in train_tps[v]],
               "eval_tokens_per_s_rounds": [round(x, 1) for x in eval_tps[v]]}
        if not args.no_memory:
            mem = measure_memory(v, args.shape, shape, bf16, args.seed, device=args.device)
            row.update({k: mem[k] for k in mem if k != "variant"})
        results.append(row)
    base = results[0]
    for row in results:
        for key in ("train_tokens_per_s", "eval_tokens_per_s", "train_step_peak_mb", "eval_peak_mb"):
            if isinstance(row.get(key), (int, float)) and isinstance(base.get(key), (int, float)) and base[key]:
                row[f"{key}_vs_softmax"] = round(row[key] / base[key], 3)

    targets = {}
    for v in ("elliptical", "quest"):
        row = next((r for r in results if r["variant"] == v), None)
        if row is None:
            continue
        targets[v] = {
            "train_throughput_ge_0.95x": row.get("train_tokens_per_s_vs_softmax", 0) >= 0.95,
            "eval_throughput_ge_0.95x": row.get("eval_tokens_per_s_vs_softmax", 0) >= 0.95,
            "train_memory_le_1.05x": (row["train_step_peak_mb_vs_softmax"] <= 1.05
                                      if "train_step_peak_mb_vs_softmax" in row else None),
        }
    return {
        "schema": SCHEMA,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine_info(), **device_info(args.device), "loadavg_before": load_before, "loadavg_after_timing": load_mid,
                    "loadavg_after": loadavg()},
        "settings": {"threads": torch.get_num_threads(), "threads_reason": args.threads_reason, "shape": args.shape, **shape, "precision": "bf16-autocast" if bf16 else "fp32",
                     "device": str(args.device), "tokens_per_step": tokens, "warmup_steps": args.warmup, "steps_per_round": args.steps,
                     "eval_steps_per_round": args.eval_steps, "rounds": args.rounds, "seed": args.seed,
                     "quick": args.quick, "token_distribution": "zipf a=1.1 over the frequency-sorted vocabulary",
                     "optimizer": "Adam + grad-norm clip 0.25", "dropout": 0.1},
        "method": {
            "throughput": "median over rounds of tokens/s; variants round-robin in one process, order rotated "
                          "every round; train = fwd + NLL + bwd + clip + Adam; eval = no_grad fwd + NLL",
            "memory": "CUDA: fresh subprocess per variant; torch.cuda.max_memory_allocated over the allocation at "
                      "the start of the measured phase. CPU: fresh subprocess per variant with MALLOC_MMAP_THRESHOLD_=65536; peak RSS (VmHWM, reset via "
                      "/proc/self/clear_refs) over the RSS at the reset. train_step_peak_mb: a training step after "
                      "the first (activations + gradients + workspace); eval_peak_mb: one eval forward",
        },
        "results": results,
        "targets": targets,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"\nAttention variants, {s['shape']} shape ({s['n_layer']} layers, d {s['d_model']}, "
          f"{s['n_head']}x{s['d_head']}, batch {s['batch']} x {s['tgt_len']}), {s['precision']}, "
          f"{report['machine'].get('gpu', report['machine']['cpu'])}, "
          f"load {report['machine']['loadavg_before']} -> {report['machine']['loadavg_after']}\n")
    print(markdown_table(report["results"], [
        ("variant", "variant", ""), ("train_tokens_per_s", "train tok/s", ".0f"),
        ("train_tokens_per_s_vs_softmax", "× softmax", ".2f"), ("eval_tokens_per_s", "eval tok/s", ".0f"),
        ("eval_tokens_per_s_vs_softmax", "× softmax", ".2f"), ("train_step_peak_mb", "train step peak MiB", ".0f"),
        ("train_step_peak_mb_vs_softmax", "× softmax", ".2f"), ("eval_peak_mb", "eval peak MiB", ".0f"),
        ("eval_peak_mb_vs_softmax", "× softmax", ".2f"),
    ]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="all", help="comma-separated registry names, or 'all' (default)")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=None, help="timed training steps per round (default 4; quick 1)")
    p.add_argument("--eval-steps", type=int, default=None, help="timed eval batches per round (default 4; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 2; quick 1)")
    p.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    p.add_argument("--tgt-len", type=int, default=None, help="override the shape's segment length")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 2 x 32, 1 step, 1 round")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads, or 'auto' (default): all cores if idle, 1 if the machine is busy")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--out", default="results/bench_attention.json")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    n_threads, args.threads_reason = choose_threads(args.threads)
    torch.set_num_threads(n_threads)
    if args.memory_worker:
        shape = dict(SHAPES[args.shape])
        shape.update({k: v for k, v in (("batch", args.batch), ("tgt_len", args.tgt_len)) if v})
        print(json.dumps(memory_worker(args.memory_worker, shape, args.precision == "bf16", args.seed, args.device)))
        return 0
    q = args.quick
    args.steps = args.steps or (1 if q else 4)
    args.eval_steps = args.eval_steps or (1 if q else 4)
    args.rounds = args.rounds or (1 if q else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    if q:
        args.batch, args.tgt_len = args.batch or 2, args.tgt_len or 32
    report = run(args)
    write_json(args.out, report)
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
