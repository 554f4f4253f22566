"""The GPU check: everything that can only be proven on a GPU, in one run of under 8 minutes.

    bash scripts/gpu_check.sh                         # on a machine with a CUDA GPU
    python scripts/gpu_check.py --device cpu --smoke  # every step in about a minute on a CPU (tests)

Steps (each in its own subprocess, each with a time limit; a failed step does not stop the others):

- ``device``: torch/CUDA versions, the GPU's name, memory and capability.
- ``tests``: the tests marked ``gpu`` (``pytest -m gpu``): CUDA vs CPU forward of every attention
  variant, bf16 vs fp32 loss, the flash SDPA kernel on the model's shapes.
- ``bench``: ``scripts/bench.py --quick`` on the device (bf16 and fp32, MFU against the GPU's own matmul
  peak measured in the same run) -> ``bench.json``; ``bench_compile``: the same with ``--compile`` for the
  softmax model (compile on/off) -> ``bench_compile.json``.
- ``sliding``: the batched stride-1 sliding-window evaluator against the naive one-window-per-token loop
  (the paper's protocol), same total NLL asserted -> ``sliding.json``.
- ``wt103_pass``: one full WikiText-103 test pass at window 256, stride 1 (245,568 windows) through the
  framework's evaluator, the paper's small shape with the WikiText-103 vocabulary size, random weights
  (a timing: the weights do not change the work) -> ``wt103_pass.json``.
- ``lm_run``: a short WikiText-2 ``lm fit`` + ``lm test`` + ``lm evaluate`` (clean and word swap) on the
  device -> ``lm_run.json``.
- ``ddp`` / ``fsdp``: ``lm fit`` smoke runs with ``--trainer.strategy ddp`` / ``fsdp`` on every visible GPU.

Everything lands in ``--out`` (default results/gpu/) with the device named; ``summary.json`` lists each
step's status, wall time and, on failure, the tail of its output. ``--smoke`` shrinks every step to
seconds so the whole script runs in the CPU test suite (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))


def sh(cmd: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def lm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lm.cli", *args]


# ------------------------------------------------------------------------------------------------
# steps that run in this process's children (``--step NAME``)
# ------------------------------------------------------------------------------------------------
def step_device(a) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "requested": a.device}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, device_count=torch.cuda.device_count(), name=p.name,
                    memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
    else:
        import platform

        info.update(name=platform.processor() or platform.machine(), device_count=0)
    return info


def wt103_tokens(limit: int | None):
    """The WikiText-103 test split as ids (frequency rank among its own types; ``<eos>`` per line)."""
    from collections import Counter

    import torch

    from lm.data.corpora import find_corpus

    path = find_corpus("wikitext-103").paths["test"]
    if path is None:
        raise SystemExit("wt103_pass: wiki.test.tokens of WikiText-103 was not found (put it under ./data or "
                         "../shared/data as wikitext-103/wiki.test.tokens)")
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words.extend(line.split() + ["<eos>"])
    if limit:
        words = words[:limit]
    rank = {w: i for i, (w, _) in enumerate(Counter(words).most_common())}
    return torch.tensor([rank[w] for w in words]), str(path)


def step_wt103_pass(a) -> dict:
    import tempfile
    import warnings

    import torch
    import yaml

    import bench
    from lm.config import EvalConfig
    from lm.data.protocols import eval_batches

    warnings.filterwarnings("ignore")
    device = torch.device(a.device)
    recipe = yaml.safe_load((ROOT / "configs/wikitext103/small.yaml").read_text())["model"]
    window = 16 if a.smoke else 256
    shape = {k: recipe[k] for k in ("n_layer", "d_model", "n_head", "d_head", "d_inner", "cutoffs")}
    shape.update(vocab=267735, tgt_len=window, batch=4)  # WikiText-103's vocabulary size: the real softmax
    if a.smoke:
        shape.update(n_layer=2, d_inner=64)
    toks, path = wt103_tokens(300 if a.smoke else None)
    model = bench.language_model(bench.MODELS["softmax"], shape, seed=1111)
    batch = 64 if a.smoke else a.wt103_batch
    model.eval_cfg = EvalConfig(protocol="sliding", tgt_len=window, stride=1, batch_size=batch)
    batches = eval_batches(toks, model.eval_cfg, window)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    with tempfile.TemporaryDirectory() as root:
        t = bench.eval_trainer(precision, root, device=device)
        t0 = time.perf_counter()
        t.validate(model, dataloaders=batches, verbose=False)
        wall = time.perf_counter() - t0
    res = model.last_result
    return {"file": path, "tokens": int(toks.numel()), "targets_scored": res["tokens_scored"], "window": window,
            "stride": 1, "batch": batch, "precision": precision, "wall_s": round(wall, 2),
            "targets_per_s": round(res["tokens_scored"] / wall, 1), "under_5_min": wall < 300,
            "model": "the paper's small shape (configs/wikitext103/small.yaml), vocabulary 267,735, random weights",
            "device": step_device(a).get("name")}


IN_PROCESS = {"device": step_device, "wt103_pass": step_wt103_pass}


# ------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------
def tiny_corpus(root: Path) -> Path:
    """A WikiText-2-shaped corpus of a few hundred lines (smoke runs only)."""
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    d = root / "wikitext-2"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 200), ("valid", 30), ("test", 30)):
        (d / f"wiki.{split}.tokens").write_text(
            "".join(" " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + " \n" for _ in range(n)))
    return root


def plan(a, work: Path) -> list[tuple[str, list[str] | None, float]]:
    py, out = sys.executable, Path(a.out)
    me = [py, str(Path(__file__).resolve()), "--device", a.device, "--out", str(out)] + (["--smoke"] if a.smoke else [])
    gpu = a.device.startswith("cuda")
    accel = ["--trainer.accelerator", "gpu" if gpu else "cpu", "--trainer.devices", "1"]
    if a.smoke:
        data = tiny_corpus(work / "data")
        size = ["--data.root", str(data), "--data.batch_size", "4", "--data.tgt_len", "16", "--model.n_layer", "2",
                "--model.d_model", "32", "--model.n_head", "2", "--model.d_head", "16", "--model.d_inner", "64",
                "--model.cutoffs", "[20, 40]", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                "--trainer.limit_val_batches", "2", "--trainer.precision", "32-true"]
        bench = ["--smoke", "--models", "softmax", "--no-memory", "--no-full-lightning", "--no-sliding"]
    else:
        size = ["--trainer.max_steps", "300", "--trainer.val_check_interval", "100",
                "--trainer.precision", "bf16-mixed", "--data.batch_size", "32"]
        bench = ["--quick"]
    run = work / "run"
    common = ["--config", str(ROOT / "configs/wikitext2/tiny.yaml"), *size, "--trainer.default_root_dir"]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    lm_run = [
        lm_cmd("fit", *common, str(run), *accel),
        lm_cmd("test", *common, str(run), *accel, "--ckpt_path", ckpt),
        lm_cmd("evaluate", "--ckpts", ckpt, "--corruptions", "word_swap:0.015", "--out", str(out / "evaluate"),
               "--accelerator", "gpu" if gpu else "cpu", *(["--root", str(work / "data")] if a.smoke else [])),
    ]
    n_gpu = "1"
    if gpu:
        import torch

        n_gpu = str(max(1, torch.cuda.device_count()))
    par = common[:-1]  # the same recipe and size, its own run directory, fewer steps
    steps = [
        ("device", [*me, "--step", "device"], 60),
        # (smoke: only the gpu module, to skip collecting the whole suite; they all skip on a CPU anyway)
        ("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                   str(ROOT / "tests" / ("test_gpu.py" if a.smoke else ""))], 300),
        ("bench", [py, str(SCRIPTS / "bench.py"), "--device", a.device, *bench, "--out", str(out / "bench.json")], 900),
        ("bench_compile", None if a.smoke and not gpu else [py, str(SCRIPTS / "bench.py"), "--device", a.device, *bench, "--compile", "--models",
                           "softmax", "--shapes", "tiny", "--precisions", "bf16" if gpu else "fp32", "--no-memory",
                           "--no-sliding", "--no-full-lightning", "--out", str(out / "bench_compile.json")], 600),
        ("sliding", [py, str(SCRIPTS / "bench.py"), "--device", a.device, "--worker", "sliding",
                     "--sliding-tokens", "60" if a.smoke else "3000", "--window", "8" if a.smoke else "256",
                     "--batch", "16" if a.smoke else "512"], 600),
        ("wt103_pass", [*me, "--step", "wt103_pass"], 600),
        ("lm_run", lm_run, 900),
        ("ddp", [lm_cmd("fit", *par, "--trainer.default_root_dir", str(work / "ddp"), *size, "--trainer.max_steps",
                        "4" if a.smoke else "20", "--trainer.strategy", "ddp", "--trainer.accelerator",
                        "gpu" if gpu else "cpu", "--trainer.devices", n_gpu if gpu else "2")], 600),
        ("fsdp", [lm_cmd("fit", *par, "--trainer.default_root_dir", str(work / "fsdp"), *size, "--trainer.max_steps",
                         "4" if a.smoke else "20", "--trainer.strategy", "fsdp", "--trainer.accelerator", "gpu",
                         "--trainer.devices", n_gpu)] if gpu else None, 600),
    ]
    return [s for s in steps if a.only is None or s[0] in a.only.split(",")]


SKIPPED = {"fsdp": "needs CUDA (FSDP's sharded training runs on GPUs only here)",
           "bench_compile": "CPU smoke run: compilation takes minutes; the CPU figures are in results/bench_compile.json"}


def run_step(name: str, cmds, timeout: float) -> dict:
    if cmds is None:
        return {"status": "skipped", "reason": SKIPPED[name]}
    cmds = cmds if isinstance(cmds[0], list) else [cmds]
    t0, rec = time.perf_counter(), {"commands": [" ".join(c) for c in cmds]}
    for c in cmds:
        try:
            p = sh(c, timeout)
        except subprocess.TimeoutExpired:
            rec.update(status="failed", reason=f"timed out after {timeout:.0f} s: {' '.join(c)}")
            break
        text = (p.stdout or "") + (p.stderr or "")
        jl = [x for x in p.stdout.splitlines() if x.startswith(("BENCH_JSON ", "STEP_JSON "))]
        if jl:
            rec["result"] = json.loads(jl[-1].split(" ", 1)[1])
        if p.returncode != 0:
            rec.update(status="failed", rc=p.returncode, tail=text[-3000:])
            break
        rec["last_line"] = (text.strip().splitlines() or [""])[-1][-300:]
    rec.setdefault("status", "ok")
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {rec['status']} ({rec['wall_s']} s)", flush=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke, for the tests)")
    p.add_argument("--smoke", action="store_true", help="every step in seconds; numbers mean nothing")
    p.add_argument("--only", default=None, help="comma-separated step names")
    p.add_argument("--out", default=str(ROOT / "results" / "gpu"))
    p.add_argument("--wt103-batch", type=int, default=512)
    p.add_argument("--step", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device is visible. On a CPU run `python scripts/gpu_check.py "
                             "--device cpu --smoke` (a quick check that every step works; numbers mean nothing).")
    if a.step:
        print("STEP_JSON " + json.dumps(IN_PROCESS[a.step](a)), flush=True)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    from benchlib import write_json  # the benchmarks' atomic JSON writer

    summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "smoke": a.smoke, "steps": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for name, cmds, timeout in plan(a, Path(work)):
            rec = summary["steps"][name] = run_step(name, cmds, timeout)
            if name in ("device", "sliding", "wt103_pass") and "result" in rec:
                write_json(out / f"{name}.json", rec["result"])
            summary["wall_s"] = round(time.perf_counter() - t0, 1)
            write_json(out / "summary.json", summary)  # after every step: a killed run keeps what it did
    failed = [n for n, r in summary["steps"].items() if r["status"] == "failed"]
    print(f"[gpu_check] {len(summary['steps'])} steps in {summary['wall_s']:.0f} s; failed: {failed or 'none'}; "
          f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
