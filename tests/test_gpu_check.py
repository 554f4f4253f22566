"""scripts/gpu_check.py's CPU-safe parts: every step runs end to end in ``--device cpu --smoke`` mode and
writes its files; on a machine without CUDA the default ``--device cuda`` is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_without_a_gpu_the_default_is_a_clear_error(tmp_path):
    r = run("--out", str(tmp_path))
    assert r.returncode != 0 and "no CUDA device" in r.stderr and "--device cpu --smoke" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_every_step_runs_on_cpu_in_smoke_mode(tmp_path):
    r = run("--device", "cpu", "--smoke", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert set(steps) == {"device", "tests", "bench", "bench_compile", "sliding", "wt103_pass", "lm_run", "ddp", "fsdp"}
    failed = {n: s.get("tail", s.get("reason")) for n, s in steps.items() if s["status"] == "failed"}
    assert not failed, failed
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert steps["fsdp"]["status"] == "skipped" and "CUDA" in steps["fsdp"]["reason"]
    assert steps["bench_compile"]["status"] == "skipped"
    sliding = json.loads((tmp_path / "sliding.json").read_text())
    assert sliding["nll_match"] and sliding["targets_scored"] == 59  # 60 tokens, stride 1: every target once
    wt = json.loads((tmp_path / "wt103_pass.json").read_text())
    assert wt["targets_scored"] == wt["tokens"] - 1 == 299
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["results"] and bench["settings"]["device"] == "cpu"
    ev = list((tmp_path / "evaluate").glob("*.json"))
    assert ev, "lm evaluate wrote no result"
    assert json.loads((tmp_path / "device.json").read_text())["device_count"] == 0
