"""Framework performance against plain PyTorch and against the machine's own matmul peak.

    .venv/bin/python scripts/bench.py --quick          # < 5 min on a 2-core CPU
    .venv/bin/python scripts/bench.py                  # the README numbers (~25 min on a 2-core CPU)
    .venv/bin/python scripts/bench.py --compile        # also torch.compile (minutes of compilation)
    .venv/bin/python scripts/bench.py --versus         # framework vs reference vs itself before issue 32, one
                                                       # process, quickstart recipe (scripts/bench_versus.py)

For softmax, Elliptical, QUEST and a Switch MoE model, at the tiny (WikiText-2 recipe) and small (the
paper's WikiText-103 small) shapes, fp32 and bf16-mixed, it measures in one invocation:

- **training tokens/s** three ways, on identical weights and identical batches:
  ``reference``: ``scripts/reference_decoder.py``, a plain-PyTorch decoder of the same architecture and
  the same adaptive softmax in a plain loop (forward, NLL, backward, clip 0.25, Adam, LR schedule);
  ``lightning``: the framework's ``LanguageModel`` through a real ``lightning.Trainer.fit`` with logger,
  checkpointing, progress bar and model summary OFF;
  ``lightning_full``: the same with them ON, as ``lm fit`` runs it (TensorBoard logger writing EVERY
  step, the CLI's RunCheckpoint and TokenThroughput callbacks, progress bar, model summary); the
  checkpoint is written after the last step, outside the timed window, so its write time is reported
  separately (``checkpoint_write_s``).
  Time = from the end of the warm-up steps to the end of the last step, i.e. everything the loop does
  between optimizer steps (data, hooks, logging) is included. Reference and framework alternate over
  ``rounds``; each figure is the best round.
- **evaluation tokens/s**: the framework's evaluator (``Trainer.validate``, segments protocol) and the
  reference's ``no_grad`` forward + NLL.
- **peak memory**: peak RSS growth during a short training run (2 steps) over the RSS with the model
  built (so gradients + Adam state + activations + workspace), and during an evaluation pass. Measured
  in a SEPARATE worker process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (every buffer >= 64 KiB is
  its own mmap, so freed tensors leave the resident set) with VmHWM reset via ``/proc/self/clear_refs``
  before each phase. That allocator setting costs page faults on every allocation (about 2x slower
  training on this CPU), so nothing is timed in the memory worker.
- **MFU**: model FLOPs per training step (forward + backward, counted once with
  ``torch.utils.flop_counter.FlopCounterMode`` on a real step, CPU fused attention included; optimizer
  and elementwise FLOPs not counted) x steps/s, over the best sustained ``torch.matmul`` GFLOP/s of
  this CPU in the step's matmul dtype (fp32 or bf16), measured in the same worker process right before.
- **sliding-window evaluation** (REFERENCE §6, stride 1): the framework's batched evaluator
  (``lm.data.protocols`` sliding windows through ``Trainer.validate``) against a naive loop, one
  window per scored token at batch 1 (the paper's protocol); the total NLL must agree (asserted).

On a GPU (``--device cuda``; ``auto``, the default, picks it when one is visible) everything above runs
there: Lightning with ``accelerator="gpu"``, the reference on the same device, bf16 autocast on CUDA,
step times taken after ``torch.cuda.synchronize()``, memory from ``torch.cuda.max_memory_allocated``,
the matmul peak measured on the GPU, and the device named in the JSON.

Each (shape, precision) runs in a fresh worker subprocess; the JSON (``--out``, default
results/bench.json) records machine, load averages, settings and every number.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402  (shared with bench_attention.py and profile_step.py)
import reference_decoder as refdec  # noqa: E402

from lm.config import EvalConfig, FFNConfig, OptimConfig  # noqa: E402
from lm.model.attention import ATTENTION  # noqa: E402

SCHEMA = "bench/1"
MODELS = {
    "softmax": dict(attention="softmax"),
    "elliptical": dict(attention="elliptical"),
    "quest": dict(attention="quest"),
    # Switch (top-1, every layer): the same FLOPs per token as the dense model.
    "moe_switch": dict(attention="softmax", ffn=dict(name="switch", n_experts=8, top_k=1, capacity_factor=1.25,
                                                     eval_capacity_factor=2.0)),
}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def ffn_config(spec: dict) -> FFNConfig:
    return FFNConfig(**spec["ffn"]) if "ffn" in spec else FFNConfig()


def language_model(spec: dict, shape: dict, seed: int = 1111):
    from lm.tasks.lm_module import LanguageModel

    torch.manual_seed(seed)
    att = bl.attention_config(spec["attention"])
    keys = ("n_layer", "d_model", "n_head", "d_head", "d_inner")
    return LanguageModel(vocab_size=shape["vocab"], tgt_len=shape["tgt_len"], **{k: shape[k] for k in keys},
                         dropout=0.1, cutoffs=list(shape["cutoffs"]), attention=att, ffn=ffn_config(spec),
                         optim=OptimConfig(lr=1e-3, warmup_steps=200),
                         eval=EvalConfig(protocol="segments", batch_size=shape["batch"]))


def reference_model(spec: dict, shape: dict, state_dict: dict) -> refdec.ReferenceDecoder:
    att = bl.attention_config(spec["attention"])
    moe = None
    if "ffn" in spec:
        f = ffn_config(spec)
        moe = dict(n_experts=f.n_experts, top_k=f.resolved_top_k, capacity_factor=f.capacity_factor,
                   eval_capacity_factor=f.eval_capacity_factor, balance_loss_weight=f.balance_loss_weight,
                   z_loss_weight=f.z_loss_weight, jitter=f.jitter)
    first = 1 if att.layers == "1:" else 0
    scale = getattr(ATTENTION[att.name].parse_options(att.options), "scale", "sqrt")  # the variant's default
    ref = refdec.ReferenceDecoder(shape["vocab"], shape["n_layer"], shape["d_model"], shape["n_head"],
                                  shape["d_head"], shape["d_inner"], list(shape["cutoffs"]), kind=att.name,
                                  first_variant_layer=first, scale=scale, dropout=0.1,
                                  moe=moe)
    ref.load_state_dict(state_dict, strict=True)  # identical weights (names mirror TransformerLM's)
    return ref


class StepTimer(Callback):
    """perf_counter() at the end of every training batch (after the optimizer step)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":  # kernels are asynchronous: the step ends when the GPU is done
            torch.cuda.synchronize(pl_module.device)
        self.ends.append(time.perf_counter())


def tokens_per_s(ends: list[float], warmup: int, tokens: int) -> float:
    n = len(ends) - warmup
    return n * tokens / (ends[-1] - ends[warmup - 1]) if n > 0 and warmup >= 1 else float("nan")


def accelerator(device: torch.device) -> dict:
    return dict(accelerator="gpu", devices=[device.index or 0]) if device.type == "cuda" else dict(accelerator="cpu", devices=1)


def trainer(precision: str, max_steps: int, root: str, full: bool, timer, extra_callbacks=(),
            device: torch.device = torch.device("cpu")):
    import lightning as L

    kw = dict(**accelerator(device), precision=precision, max_steps=max_steps, gradient_clip_val=0.25,
              limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=root)
    if full:
        # What `lm fit` installs (lm/lightning_cli.py): TensorBoard logger, RunCheckpoint, TokenThroughput; plus the
        # progress bar and model summary, and logging EVERY step (the recipes log every 50: worst case).
        from lightning.pytorch.loggers import TensorBoardLogger

        from lm.tasks.callbacks import RunCheckpoint, TokenThroughput

        cbs = [timer, RunCheckpoint(dirpath=os.path.join(root, "checkpoints")), TokenThroughput(), *extra_callbacks]
        return L.Trainer(**kw, logger=TensorBoardLogger(root, name="tb"), log_every_n_steps=1,
                         enable_checkpointing=True, enable_progress_bar=True, enable_model_summary=True,
                         callbacks=cbs)
    return L.Trainer(**kw, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[timer, *extra_callbacks])


def eval_trainer(precision: str, root: str, device: torch.device = torch.device("cpu")):
    import lightning as L

    return L.Trainer(**accelerator(device), precision=precision, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


def count_train_flops(net, batch, bf16: bool) -> int:
    net.train()
    with bl.flop_counter() as fc:
        with torch.autocast(batch["input"].device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(batch["input"])
            loss = net.nll(out.hidden, batch["target"]).mean()
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        loss.backward()
    net.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def count_eval_flops(net, batch, bf16: bool) -> int:
    net.eval()
    with bl.flop_counter() as fc, torch.no_grad(), torch.autocast(batch["input"].device.type, dtype=torch.bfloat16, enabled=bf16):
        net.nll(net(batch["input"]).hidden, batch["target"])
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------------------------
# worker: one (shape, precision), all models, in a fresh process
# ------------------------------------------------------------------------------------------------
def run_worker(a) -> list[dict]:
    """Timing (``a.memory`` False; the default allocator) or memory (``a.memory``; run with
    ``MALLOC_MMAP_THRESHOLD_``, which makes every large allocation a fresh mmap and so costs page faults:
    never time in that mode) for every model at one (shape, precision)."""
    import lightning as L  # noqa: F401

    warnings.filterwarnings("ignore")
    shape = dict(bl.SHAPES[a.shape], batch=a.batch, tgt_len=a.tgt_len)
    bf16 = a.precision == "bf16"
    tokens = shape["batch"] * shape["tgt_len"]
    warmup, steps, rounds = (1, 1, 1) if a.memory else (a.warmup, a.steps, a.rounds)
    n_steps = warmup + steps
    data = bl.streams(shape, n_steps, a.seed)
    evb = Batches(bl.streams(shape, a.eval_steps, a.seed + 2))
    dev = a.device
    peak = None if a.memory else bl.matmul_peak(torch.bfloat16 if bf16 else torch.float32, device=dev)
    measure = (bl.cuda_peak_over if dev.type == "cuda" else bl.peak_over) if a.memory else (lambda fn: fn())
    rows = []
    for name in a.models.split(","):
        spec = MODELS[name]
        row = {"model": name, "shape": a.shape, "precision": a.precision}
        if not a.memory:
            row.update({"batch": shape["batch"], "tgt_len": shape["tgt_len"], "tokens_per_step": tokens,
                        "matmul_peak_gflops": round(peak, 1), "threads": torch.get_num_threads(),
                        "loadavg_start": bl.loadavg()})
        master = language_model(spec, shape, a.seed)
        state = copy.deepcopy(master.net.state_dict())
        if not a.memory:
            row["params"] = sum(p.numel() for p in master.parameters())
            b0 = bl.to_device(evb.batches[0], dev)
            master.net.to(dev)
            row["train_flops_per_step"] = count_train_flops(master.net, b0, bf16)
            row["eval_flops_per_step"] = count_eval_flops(master.net, b0, bf16)
        del master

        def fresh_lm():
            m = language_model(spec, shape, a.seed)
            m.net.load_state_dict(state)
            return m

        res = {"reference": [], "lightning": [], "lightning_full": []}
        with tempfile.TemporaryDirectory() as root:
            for r in range(rounds):
                # --- reference: plain loop ---
                ref = reference_model(spec, shape, state).to(dev)
                gc.collect()
                ends = []
                mem = measure(lambda: ends.extend(refdec.train_steps(ref, data, n_steps, lr=1e-3, bf16=bf16)))
                res["reference"].append(tokens_per_s(ends, warmup, tokens))
                if a.memory:
                    row["reference_train_peak_mb"] = round(mem, 1)
                del ref
                # --- framework through Lightning, bare and full ---
                for mode in ("lightning", "lightning_full"):
                    if mode == "lightning_full" and (a.memory or not a.full_lightning):
                        continue
                    model, timer = fresh_lm(), StepTimer()
                    t = trainer(PRECISIONS[a.precision], n_steps, os.path.join(root, f"{mode}{r}"),
                                mode == "lightning_full", timer, device=dev)
                    gc.collect()
                    mem = measure(lambda: t.fit(model, train_dataloaders=data))
                    res[mode].append(tokens_per_s(timer.ends, warmup, tokens))
                    if a.memory:
                        row["lightning_train_peak_mb"] = round(mem, 1)
                    if r == 0 and mode == "lightning_full":
                        t0 = time.perf_counter()
                        t.save_checkpoint(os.path.join(root, "probe.ckpt"))
                        row["checkpoint_write_s"] = round(time.perf_counter() - t0, 3)
                    del model, t
            # --- evaluation: the framework's evaluator (Trainer.validate) vs the reference forward ---
            model = fresh_lm()
            t = eval_trainer(PRECISIONS[a.precision], os.path.join(root, "eval"), device=dev)
            t.validate(model, dataloaders=evb, verbose=False)  # warm-up
            gc.collect()
            mem = measure(lambda: t.validate(model, dataloaders=evb, verbose=False))
            if a.memory:
                row["lightning_eval_peak_mb"] = round(mem, 1)
            else:
                row["lightning_eval_tokens_per_s"] = model.last_result["tokens_per_s"]
                ref = reference_model(spec, shape, state).to(dev).eval()
                evd = [bl.to_device(b, dev) for b in evb]
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    ref(evd[0]["input"], evd[0]["target"])
                    t0 = time.perf_counter()
                    for b in evd:
                        ref(b["input"], b["target"])[0].item()
                    row["reference_eval_tokens_per_s"] = round(len(evb) * tokens / (time.perf_counter() - t0), 1)
                del ref
            del model, t
            gc.collect()
        if a.memory:
            rows.append(row)
            continue
        for mode, vals in res.items():
            if vals:
                row[f"{mode}_train_tokens_per_s"] = round(max(vals), 1)
                row[f"{mode}_train_tokens_per_s_rounds"] = [round(v, 1) for v in vals]
        ref_tps = row["reference_train_tokens_per_s"]
        for mode in ("lightning", "lightning_full"):
            if f"{mode}_train_tokens_per_s" in row:
                row[f"{mode}_vs_reference"] = round(row[f"{mode}_train_tokens_per_s"] / ref_tps, 3)
        for mode in ("reference", "lightning"):
            steps_per_s = row[f"{mode}_train_tokens_per_s"] / tokens
            row[f"{mode}_mfu"] = round(row["train_flops_per_step"] * steps_per_s / (peak * 1e9), 4)
        row["model_gflops_per_s"] = round(row["train_flops_per_step"] * row["lightning_train_tokens_per_s"]
                                          / tokens / 1e9, 2)
        row["loadavg_end"] = bl.loadavg()
        rows.append(row)
        gc.collect()
    if a.compile and not a.memory:
        rows.append(compile_probe(a, shape, bf16, data, tokens))
    return rows


def compile_probe(a, shape, bf16, data, tokens) -> dict:
    """torch.compile on this CPU build: the softmax model, reference loop and framework (Lightning bare)."""
    out = {"model": "softmax", "shape": a.shape, "precision": a.precision, "compile": True}
    spec = MODELS["softmax"]
    try:
        n_steps = a.warmup + 2 + a.steps  # compilation happens in the first steps
        master = language_model(spec, shape, a.seed)
        state = master.net.state_dict()
        ref = reference_model(spec, shape, state).to(a.device)
        t0 = time.perf_counter()
        cref = torch.compile(ref)
        ends = refdec.train_steps(cref, data_cycle(data, n_steps), n_steps, lr=1e-3, bf16=bf16)
        out["reference_compile_wall_s"] = round(time.perf_counter() - t0, 1)
        out["reference_train_tokens_per_s"] = round(tokens_per_s(ends, a.warmup + 2, tokens), 1)
        model = language_model(spec, shape, a.seed)
        model.net.load_state_dict(state)
        for blk in model.net.layers:  # what `model.compile: true` does
            blk.compile()
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as root:
            t = trainer(PRECISIONS[a.precision], n_steps, root, False, timer, device=a.device)
            t.fit(model, train_dataloaders=data_cycle(data, n_steps))
        out["lightning_train_tokens_per_s"] = round(tokens_per_s(timer.ends, a.warmup + 2, tokens), 1)
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        out["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return out


class Batches:
    """A fixed list of batches as one loader (Lightning reads a bare list as a list of loaders)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def data_cycle(data, n) -> Batches:
    batches = list(data)
    return Batches(batches[i % len(batches)] for i in range(n))


# ------------------------------------------------------------------------------------------------
# sliding-window evaluation: batched vs naive
# ------------------------------------------------------------------------------------------------
def sliding_eval(n_tokens: int, window: int, batch: int, seed: int = 1111, shape_name: str = "tiny",
                 device: torch.device = torch.device("cpu")) -> dict:
    """Total NLL and wall time of stride-1 sliding evaluation, batched (framework) vs naive (batch 1)."""
    from lm.data.protocols import eval_batches

    warnings.filterwarnings("ignore")
    shape = dict(bl.SHAPES[shape_name], tgt_len=window, batch=batch)
    model = language_model(MODELS["softmax"], shape, seed)
    model.eval_cfg = EvalConfig(protocol="sliding", tgt_len=window, stride=1, batch_size=batch)
    toks = bl.zipf_tokens(n_tokens, shape["vocab"], seed=seed + 3)
    batches = eval_batches(toks, model.eval_cfg, window)
    with tempfile.TemporaryDirectory() as root:
        t = eval_trainer("32-true", root, device=device)
        load0 = bl.loadavg()
        t.validate(model, dataloaders=batches, verbose=False)
    res = model.last_result
    batched_total = res["nll"] * res["tokens_scored"]
    batched_s = res["wall_s"]

    net = model.net.to(device).eval()
    toks = toks.to(device)
    total, n = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(1, n_tokens):  # one window per scored token, batch 1: context tokens[i-W : i]
            ctx = toks[max(0, i - window): i][None]
            h = net(ctx).hidden[:, -1:]
            total += net.nll(h, toks[i: i + 1][None]).sum().item()
            n += 1
    naive_s = time.perf_counter() - t0
    rel = abs(batched_total - total) / abs(total)
    ok = rel < 1e-4 and n == res["tokens_scored"]
    return {"window": window, "stride": 1, "tokens": n_tokens, "targets_scored": n, "batch": batch,
            "batched_total_nll": round(batched_total, 4), "naive_total_nll": round(total, 4),
            "relative_difference": rel, "nll_match": ok, "batched_wall_s": round(batched_s, 3),
            "naive_wall_s": round(naive_s, 3), "batched_tokens_per_s": round(n / batched_s, 1),
            "naive_tokens_per_s": round(n / naive_s, 1), "speedup": round(naive_s / batched_s, 2),
            "loadavg": [load0, bl.loadavg()], "model": "softmax, tiny shape, random weights, fp32",
            "device": str(device)}


# ------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------
def spawn(argv: list[str], timeout: float, memory: bool = False) -> list[dict] | dict:
    env = {**os.environ, "PYTHONPATH": str(bl.ROOT)}
    if memory:
        env.update(bl.MALLOC_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=bl.ROOT)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"worker {' '.join(argv)} failed:\n{tail}")
    line = [x for x in p.stdout.strip().splitlines() if x.startswith("BENCH_JSON ")][-1]
    return json.loads(line[len("BENCH_JSON "):])


def plan(args) -> dict:
    if args.smoke:  # every code path in seconds (tests/test_bench.py); the numbers mean nothing
        return {"models": args.models if args.models != ",".join(MODELS) else "softmax,moe_switch",
                "shapes": args.shapes.split(",") if args.shapes != "tiny,small" else ["tiny"],
                "precisions": args.precisions.split(",") if args.precisions != "fp32,bf16" else ["fp32"],
                "batch": {"tiny": 2, "small": 1}, "tgt_len": {"tiny": 16, "small": 16}, "warmup": 1, "steps": 1,
                "rounds": 1, "eval_steps": 1, "sliding": {"tokens": 40, "window": 8, "batch": 16},
                "memory_precisions": ["fp32", "bf16"], "full_lightning_precisions": ["fp32", "bf16"]}
    q = args.quick
    return {
        "models": args.models,
        "shapes": args.shapes.split(","),
        "precisions": args.precisions.split(","),
        "batch": {"tiny": args.batch_tiny or (4 if q else 16), "small": args.batch_small or (2 if q else 8)},
        "tgt_len": {"tiny": 128 if not q else 64, "small": 256 if not q else 128},
        "warmup": args.warmup if args.warmup is not None else (1 if q else 2),
        "steps": args.steps or (2 if q else 5),
        "rounds": args.rounds or (1 if q else 2),
        "eval_steps": 2 if q else 4,
        "sliding": {"tokens": args.sliding_tokens or (300 if q else 2000), "window": 32 if q else 128,
                    "batch": 64},
        # quick: memory and the logger/checkpoint run only where they cost least (fp32)
        "memory_precisions": ["fp32"] if q else args.precisions.split(","),
        "full_lightning_precisions": ["fp32"] if q else args.precisions.split(","),
    }


def summarize(results: list[dict], sliding: dict | None) -> dict:
    """The issue's ratios in one place: framework vs plain-PyTorch reference (target >= 0.9), each model
    vs softmax at the same shape and precision (Elliptical target >= 0.95), and the sliding speed-up."""
    rows = [r for r in results if not r.get("compile")]
    by = {(r["model"], r["shape"], r["precision"]): r for r in rows}
    vs_ref = {f"{m}/{sh}/{p}": r["lightning_vs_reference"] for (m, sh, p), r in by.items()}
    vs_softmax = {}
    for (m, sh, p), r in by.items():
        base = by.get(("softmax", sh, p))
        if base and m != "softmax":
            vs_softmax[f"{m}/{sh}/{p}"] = {
                "train": round(r["lightning_train_tokens_per_s"] / base["lightning_train_tokens_per_s"], 3),
                "eval": round(r["lightning_eval_tokens_per_s"] / base["lightning_eval_tokens_per_s"], 3)}
    ell = [v["train"] for k, v in vs_softmax.items() if k.startswith("elliptical/")]
    return {
        "framework_vs_reference": vs_ref,
        "framework_vs_reference_min": min(vs_ref.values()) if vs_ref else None,
        "framework_vs_reference_target_met": bool(vs_ref) and min(vs_ref.values()) >= 0.9,
        "vs_softmax": vs_softmax,
        "elliptical_vs_softmax_train_min": min(ell) if ell else None,
        "elliptical_vs_softmax_target_met": bool(ell) and min(ell) >= 0.95,
        "sliding_speedup": sliding["speedup"] if sliding else None,
        "sliding_target_met": bool(sliding) and sliding["speedup"] >= 20,
    }


def print_tables(report: dict) -> None:
    rows = [r for r in report["results"] if not r.get("compile")]
    print(f"\nTraining/evaluation throughput (tokens/s), load {report['machine']['loadavg_before']} -> "
          f"{report['machine']['loadavg_after']}\n")
    print(bl.markdown_table(rows, [
        ("model", "model", ""), ("shape", "shape", ""), ("precision", "precision", ""), ("batch", "B", "d"),
        ("tgt_len", "T", "d"), ("reference_train_tokens_per_s", "reference train", ".0f"),
        ("lightning_train_tokens_per_s", "Lightning train", ".0f"), ("lightning_vs_reference", "× ref", ".2f"),
        ("lightning_full_train_tokens_per_s", "Lightning+logging", ".0f"),
        ("lightning_full_vs_reference", "× ref", ".2f"), ("lightning_eval_tokens_per_s", "eval", ".0f"),
        ("lightning_train_peak_mb", "train peak MiB", ".0f"), ("reference_train_peak_mb", "ref peak MiB", ".0f"),
        ("lightning_mfu", "MFU", ".1%"), ("matmul_peak_gflops", "matmul peak GFLOP/s", ".0f"),
    ]))
    comp = [r for r in report["results"] if r.get("compile")]
    if comp:
        print("\ntorch.compile:")
        for r in comp:
            print(" ", json.dumps(r))
    s = report.get("sliding")
    if s:
        print(f"\nSliding-window evaluation, stride 1, window {s['window']}, {s['targets_scored']} targets: "
              f"batched {s['batched_tokens_per_s']:.0f} tok/s vs naive batch-1 {s['naive_tokens_per_s']:.0f} tok/s "
              f"-> {s['speedup']:.1f}x; total NLL {s['batched_total_nll']:.3f} vs {s['naive_total_nll']:.3f} "
              f"(match: {s['nll_match']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced batches, 2 timed steps, 1 round (< 5 min)")
    p.add_argument("--smoke", action="store_true", help="seconds: exercise every code path (tests); numbers meaningless")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--shapes", default="tiny,small")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--batch-tiny", type=int, default=None)
    p.add_argument("--batch-small", type=int, default=None)
    p.add_argument("--sliding-tokens", type=int, default=None)
    p.add_argument("--no-sliding", action="store_true")
    p.add_argument("--no-full-lightning", action="store_true", help="skip the logger/checkpoint/progress-bar run")
    p.add_argument("--compile", action="store_true", help="also try torch.compile (softmax model)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory workers")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads, or 'auto' (default): all cores if idle, 1 if the machine is busy")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--timeout", type=float, default=3600, help="per worker, seconds")
    p.add_argument("--out", default="results/bench.json")
    p.add_argument("--versus", action="store_true", help="framework vs reference vs the framework before issue 32, "
                   "on the quickstart recipe, interleaved in one process (scripts/bench_versus.py)")
    p.add_argument("--versus-data", default="wikitext-2", choices=["wikitext-2", "synthetic"])
    p.add_argument("--chunk", type=int, default=5, help="--versus: steps per turn")
    p.add_argument("--eval-every", type=int, default=100, help="--versus: validation PPL every N steps")
    p.add_argument("--val-batches", type=int, default=10, help="--versus: validation batches scored")
    p.add_argument("--target-ppl", type=float, default=None, help="--versus: default the lowest PPL all reached")
    # worker-only
    p.add_argument("--worker", choices=["train", "sliding"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tgt-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--eval-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--full-lightning", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = bl.resolve_device(a.device)
    n_threads, threads_reason = bl.choose_threads(a.threads)
    torch.set_num_threads(n_threads)
    a.threads = str(n_threads)  # workers get the number decided here

    if a.versus:
        import bench_versus

        return bench_versus.main(a, threads_reason)
    if a.worker == "train":
        print("BENCH_JSON " + json.dumps(run_worker(a)))
        return 0
    if a.worker == "sliding":
        print("BENCH_JSON " + json.dumps(sliding_eval(a.sliding_tokens, a.window, a.batch, a.seed, device=a.device)))
        return 0

    pl = plan(a)
    unknown = [m for m in pl["models"].split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    t_start = time.perf_counter()
    load_before = bl.loadavg()
    peaks = {k: round(bl.matmul_peak(dt, device=a.device), 1) for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    results = []
    for shape in pl["shapes"]:
        for prec in pl["precisions"]:
            argv_w = ["--worker", "train", "--shape", shape, "--precision", prec, "--models", pl["models"],
                      "--batch", str(pl["batch"][shape]), "--tgt-len", str(pl["tgt_len"][shape]),
                      "--warmup", str(pl["warmup"]), "--steps", str(pl["steps"]), "--rounds", str(pl["rounds"]),
                      "--eval-steps", str(pl["eval_steps"]), "--seed", str(a.seed),
                      "--full-lightning", str(int(not a.no_full_lightning and prec in pl["full_lightning_precisions"]))]
            argv_w += ["--threads", a.threads, "--device", str(a.device)]
            if a.compile:
                argv_w.append("--compile")
            t0 = time.perf_counter()
            rows = spawn(argv_w, a.timeout)
            t1 = time.perf_counter()
            if not a.no_memory and prec in pl["memory_precisions"]:
                mem = {(r["model"], r["shape"], r["precision"]): r for r in spawn([*argv_w, "--memory"], a.timeout, True)}
                for r in rows:
                    r.update({k: v for k, v in mem.get((r["model"], r["shape"], r["precision"]), {}).items()
                              if k.endswith("_mb")})
            print(f"[bench] {shape} {prec}: timing {t1 - t0:.0f} s, memory {time.perf_counter() - t1:.0f} s "
                  f"(load {bl.loadavg()[0]})", file=sys.stderr, flush=True)
            results.extend(rows)
    sliding = None
    if not a.no_sliding:
        s = pl["sliding"]
        t0 = time.perf_counter()
        sliding = spawn(["--worker", "sliding", "--sliding-tokens", str(s["tokens"]), "--window", str(s["window"]),
                         "--batch", str(s["batch"]), "--seed", str(a.seed), "--threads", a.threads,
                         "--device", str(a.device)], a.timeout)
        print(f"[bench] sliding: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report = {
        "schema": SCHEMA,
        "summary": summarize(results, sliding),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**bl.machine_info(), **bl.device_info(a.device), "loadavg_before": load_before, "loadavg_after": bl.loadavg(),
                    "matmul_peak_gflops_main_process": peaks},
        "settings": {**pl, "quick": a.quick, "smoke": a.smoke, "threads": n_threads, "threads_reason": threads_reason,
                     "device": str(a.device), "shapes_def": {k: bl.SHAPES[k] for k in pl["shapes"]},
                     "models_def": {k: MODELS[k] for k in pl["models"].split(",")},
                     "token_distribution": "zipf a=1.1 over the frequency-sorted vocabulary", "dropout": 0.1,
                     "optimizer": "Adam lr 1e-3, warm-up 200 then cosine, grad-norm clip 0.25",
                     "notes": ["small shape: the paper's batch is 96; reduced on CPU",
                               "small shape uses the WikiText-103 vocabulary size and cutoffs (random tokens)",
                               "lightning_full logs to TensorBoard every step (log_every_n_steps=1, worst case)"]},
        "results": results,
        "sliding": sliding,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if sliding is not None and not sliding["nll_match"]:
        bl.write_json(a.out, report)
        raise SystemExit(f"sliding evaluation: batched and naive total NLL differ ({sliding})")
    bl.write_json(a.out, report)
    print_tables(report)
    print("\nsummary: " + json.dumps(report["summary"]))
    print(f"\nwrote {a.out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
