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
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lm.config import AttentionConfig, FFNConfig, ModelConfig  # noqa: E402
from lm.data.streams import OrderedStreams  # noqa: E402
from lm.model.attention import ATTENTION  # noqa: E402
from lm.model.transformer import TransformerLM  # noqa: E402

SCHEMA = "bench_attention/1"
WT2_VOCAB, WT103_VOCAB = 33278, 267735  # the corpora's vocabularies (data, not recipe settings)
TINY_RECIPE = ROOT / "configs" / "wikitext2" / "tiny.yaml"
VARIANT_OVERLAYS = ROOT / "configs" / "wikitext2" / "variants"


def recipe_shape(path: Path, vocab: int, batch: int | None = None) -> dict:
    """The benchmark shape of a recipe file: its model dimensions, cutoffs, batch and segment length."""
    r = yaml.safe_load(path.read_text())
    m, d = r["model"], r["data"]
    return dict(n_layer=m["n_layer"], d_model=m["d_model"], n_head=m["n_head"], d_head=m["d_head"],
                d_inner=m["d_inner"], batch=batch or d["batch_size"], tgt_len=d["tgt_len"], vocab=vocab,
                cutoffs=list(m["cutoffs"]))


SHAPES = {
    # the tiny WikiText-2 recipe
    "tiny": recipe_shape(TINY_RECIPE, WT2_VOCAB),
    # the paper's WikiText-103 small (REFERENCE §3a); batch 96 in the paper, reduced on CPU
    "small": recipe_shape(ROOT / "configs" / "wikitext103" / "small.yaml", WT103_VOCAB, batch=8),
}
PAPER_ORDER = ["softmax", "elliptical", "quest", "qknorm", "elliptical_quest",
               "performer", "mgk", "fourier", "rkde", "spkde", "mom"]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ------------------------------------------------------------------------------------------------
# helpers shared with scripts/bench.py
# ------------------------------------------------------------------------------------------------
def attention_config(variant: str) -> AttentionConfig:
    """The attention block of the variant's tiny recipe (tiny.yaml + variants/<variant>.yaml, merged field by
    field as LightningCLI does; tests/test_recipes.py checks that composition against the CLI)."""
    block = dict(yaml.safe_load(TINY_RECIPE.read_text())["model"].get("attention") or {})
    overlay = VARIANT_OVERLAYS / f"{variant}.yaml"
    if overlay.is_file():
        block.update((yaml.safe_load(overlay.read_text()).get("model") or {}).get("attention") or {})
    else:  # a variant without a tiny overlay yet: every layer, default options
        block = dict(name=variant, layers="all")
    return AttentionConfig(**block)


def model_config(shape: dict, attention: AttentionConfig, ffn: FFNConfig | None = None,
                 dropout: float = 0.1) -> ModelConfig:
    keys = ("n_layer", "d_model", "n_head", "d_head", "d_inner")
    return ModelConfig(**{k: shape[k] for k in keys}, dropout=dropout, pos="absolute", norm="post",
                       adaptive=True, cutoffs=list(shape["cutoffs"]), attention=attention,
                       ffn=ffn or FFNConfig())


def zipf_tokens(n: int, vocab: int, a: float = 1.1, seed: int = 1111) -> torch.Tensor:
    """``n`` token ids drawn from p(r) ~ 1/(r+1)^a over the frequency-sorted vocabulary."""
    p = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** a
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice(vocab, size=n, p=p / p.sum())).long()


def streams(shape: dict, n_batches: int, seed: int = 1111, batch: int | None = None) -> OrderedStreams:
    b = batch or shape["batch"]
    n = b * (shape["tgt_len"] * n_batches + 1)
    return OrderedStreams(zipf_tokens(n, shape["vocab"], seed=seed), b, shape["tgt_len"])


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def resolve_device(spec: str) -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is a clear error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {spec}: no CUDA device is visible to torch {torch.__version__} "
                         "(a CPU build, or no GPU); run with --device cpu (or auto)")
    if spec != "cpu" and not spec.startswith("cuda"):
        raise SystemExit(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(spec)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"device": str(device), "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def choose_threads(spec: str | int | None) -> tuple[int, str]:
    """``auto``: every core when the machine is idle, 1 when other work already keeps the cores busy
    (1-minute load average >= cores - 0.5): with oversubscribed cores, OpenMP's spinning barriers make a
    2-thread step 3-15x slower on this 2-core machine, while 1 thread degrades only by its CPU share."""
    cores = os.cpu_count() or 1
    if spec in (None, "auto"):
        load = os.getloadavg()[0]
        if load >= cores - 0.5:
            return 1, f"auto: load {load:.2f} >= {cores} cores - 0.5, so 1 thread"
        return cores, f"auto: load {load:.2f} < {cores} cores - 0.5, so {cores} threads"
    return int(spec), "given"


def _status_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_over(fn) -> float:
    """Peak RSS growth (MiB) while ``fn()`` runs, over the RSS when it starts."""
    import gc

    gc.collect()
    if not reset_hwm():
        return float("nan")
    base = rss_mb()
    fn()
    return hwm_mb() - base


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5, device: str | torch.device = "cpu") -> float:
    """Best sustained GFLOP/s of an n x n x n ``torch.matmul`` in ``dtype`` on ``device`` (best of runs)."""
    device = torch.device(device)
    if device.type == "cuda":
        n = max(n, 8192)  # a 2048^3 GEMM is too short to time on a GPU
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # A small product first sizes the measurement: where a dtype has no fast kernel (bf16 on a CPU without
    # bf16 matrix instructions runs a scalar fallback at ~0.2 GFLOP/s), one 2048^3 product takes over a
    # minute; there n shrinks until a product takes at most a quarter of ``seconds`` (never below 256).
    m = 256
    x = torch.randn(m, m, dtype=dtype, device=device)
    torch.matmul(x, x)
    sync()
    t0 = time.perf_counter()
    torch.matmul(x, x)
    sync()
    rate = 2 * m**3 / max(time.perf_counter() - t0, 1e-9)
    while n > m and 2 * n**3 / rate > seconds / 4:
        n //= 2
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)
    sync()
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == math.inf:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter():
    """``FlopCounterMode`` that also counts the CPU fused attention kernels (PyTorch registers only the
    CUDA ones). Convention as PyTorch's: matmul-class FLOPs, attention counted over the full T x S score
    matrix (causal masking not subtracted); elementwise ops are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
    })


def clip_and_step(params, opt, clip: float = 0.25) -> None:
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _device_type(net) -> str:
    return next(net.parameters()).device.type


def train_step(net, batch, opt, bf16: bool) -> float:
    with torch.autocast(_device_type(net), dtype=torch.bfloat16, enabled=bf16):
        out = net(batch["input"])
        loss = net.nll(out.hidden, batch["target"]).mean()
        total = loss if out.aux_loss is None else loss + out.aux_loss
    total.backward()
    clip_and_step(net.parameters(), opt)
    return loss.item()


@torch.no_grad()
def eval_step(net, batch, bf16: bool) -> float:
    with torch.autocast(_device_type(net), dtype=torch.bfloat16, enabled=bf16):
        out = net(batch["input"])
        return net.nll(out.hidden, batch["target"]).sum().item()


def markdown_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """``cols``: (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def registered_variants() -> list[str]:
    known = [v for v in PAPER_ORDER if v in ATTENTION]
    return known + sorted(v for v in ATTENTION if v not in known)


def build(variant: str, shape: dict, seed: int = 1111) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(model_config(shape, attention_config(variant)), shape["vocab"])


def cuda_peak_over(fn) -> float:
    """Peak CUDA allocation growth (MiB) while ``fn()`` runs, over the allocation when it starts."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


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
