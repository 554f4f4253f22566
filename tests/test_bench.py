"""The benchmark scripts: a seconds-long smoke run of each (JSON schema), the reference decoder against
the framework on identical weights, and the batched sliding-window evaluator against the naive loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"  # on sys.path via tests/conftest.py

import bench
import benchlib
from reference_decoder import ReferenceDecoder

from lm.tasks.lm_module import LanguageModel


def run_script(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------------
# smoke runs (one thread: robust on a loaded machine; the numbers are not looked at)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs the script end to end: training and evaluation of every listed variant
def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "ba.json"
    p = run_script([str(SCRIPTS / "bench_attention.py"), "--quick", "--variants", "elliptical,quest",
                    "--threads", "1", "--out", str(out)])
    assert "| softmax |" in p.stdout and "| elliptical |" in p.stdout  # the markdown table
    r = json.loads(out.read_text())
    assert r["schema"] == "bench_attention/1"
    assert {"cpu", "torch", "torch_threads", "loadavg_before", "loadavg_after"} <= set(r["machine"])
    assert r["settings"]["precision"] == "fp32" and r["settings"]["quick"] is True
    assert [row["variant"] for row in r["results"]] == ["softmax", "elliptical", "quest"]  # softmax added
    for row in r["results"]:
        for key in ("train_tokens_per_s", "eval_tokens_per_s", "train_step_peak_mb", "eval_peak_mb",
                    "train_total_peak_mb", "train_tokens_per_s_vs_softmax", "eval_tokens_per_s_vs_softmax",
                    "train_step_peak_mb_vs_softmax"):
            assert is_number(row[key]), (row["variant"], key, row.get(key))
        assert row["train_tokens_per_s"] > 0 and row["train_step_peak_mb"] > 0
    assert r["results"][0]["train_tokens_per_s_vs_softmax"] == 1.0
    assert set(r["targets"]) == {"elliptical", "quest"}


@pytest.mark.slow  # runs the script end to end (Lightning fits included)
def test_bench_smoke(tmp_path):
    out = tmp_path / "b.json"
    p = run_script([str(SCRIPTS / "bench.py"), "--smoke", "--models", "softmax,elliptical", "--threads", "1",
                    "--out", str(out)])
    assert "Sliding-window evaluation" in p.stdout
    r = json.loads(out.read_text())
    assert r["schema"] == "bench/1"
    assert {"fp32", "bf16"} == set(r["machine"]["matmul_peak_gflops_main_process"])
    row, ell = r["results"]
    assert (row["model"], row["shape"], row["precision"]) == ("softmax", "tiny", "fp32")
    assert ell["model"] == "elliptical"
    summ = r["summary"]  # the ratios, recomputed from the rows
    assert summ["framework_vs_reference"]["softmax/tiny/fp32"] == row["lightning_vs_reference"]
    assert summ["vs_softmax"]["elliptical/tiny/fp32"]["train"] == pytest.approx(
        ell["lightning_train_tokens_per_s"] / row["lightning_train_tokens_per_s"], abs=1e-3)
    assert summ["sliding_speedup"] == r["sliding"]["speedup"]
    for key in ("reference_train_tokens_per_s", "lightning_train_tokens_per_s", "lightning_full_train_tokens_per_s",
                "lightning_vs_reference", "lightning_full_vs_reference", "lightning_eval_tokens_per_s",
                "reference_eval_tokens_per_s", "train_flops_per_step", "eval_flops_per_step", "matmul_peak_gflops",
                "lightning_mfu", "reference_mfu", "lightning_train_peak_mb", "reference_train_peak_mb",
                "lightning_eval_peak_mb", "checkpoint_write_s"):
        assert is_number(row[key]), (key, row.get(key))
    assert 0 < row["lightning_mfu"] < 1.5
    s = r["sliding"]
    assert s["nll_match"] is True and s["targets_scored"] == s["tokens"] - 1 and s["stride"] == 1


# ------------------------------------------------------------------------------------------------
# the reference decoder is the same model as the framework's
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["softmax", "elliptical", "quest", "elliptical_quest", "moe"])
def test_reference_decoder_matches_framework(variant):
    V, shape = 600, dict(n_layer=3, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[100, 300])
    name = "softmax" if variant == "moe" else variant
    spec = dict(bench.MODELS["moe_switch"]) if variant == "moe" else {"attention": name}
    att = benchlib.attention_config(name)
    ffn = bench.ffn_config(spec)
    torch.manual_seed(0)
    lm = LanguageModel(vocab_size=V, tgt_len=16, dropout=0.0, attention=att, ffn=ffn, **shape)
    full = dict(shape, vocab=V, batch=2, tgt_len=16)
    ref = bench.reference_model(spec, full, lm.net.state_dict())  # strict load: names and shapes map 1:1
    ref.drop.p = 0.0
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.multinomial(1.0 / torch.arange(1.0, V + 1), 2 * 17, replacement=True).view(2, 17)
    inp, tgt = x[:, :-1], x[:, 1:]
    lm.train()
    ref.train()
    out = lm.net(inp)
    loss_fw = lm.net.nll(out.hidden, tgt).mean() + (out.aux_loss if out.aux_loss is not None else 0)
    nll, aux = ref(inp, tgt)
    loss_ref = nll + (aux if aux is not None else 0)
    assert torch.allclose(loss_fw, loss_ref, rtol=1e-5, atol=1e-6), (loss_fw.item(), loss_ref.item())
    loss_fw.backward()
    loss_ref.backward()
    g_fw = dict(lm.net.named_parameters())
    for n, p in ref.named_parameters():
        assert torch.allclose(p.grad, g_fw[n].grad, rtol=1e-4, atol=1e-7), n


def test_reference_decoder_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        ReferenceDecoder(100, 1, 8, 1, 8, 16, [50], kind="performer")


# ------------------------------------------------------------------------------------------------
# sliding-window evaluation: batched framework evaluator == naive one-window-per-token loop
# ------------------------------------------------------------------------------------------------
def test_sliding_batched_equals_naive(monkeypatch):
    small = dict(benchlib.SHAPES["tiny"], n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                 vocab=500, cutoffs=[100, 300])
    monkeypatch.setitem(benchlib.SHAPES, "test", small)
    r = bench.sliding_eval(n_tokens=70, window=12, batch=8, shape_name="test")
    assert r["targets_scored"] == 69
    assert r["nll_match"], r
    assert r["relative_difference"] < 1e-5


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(2, 4, 32, 16, requires_grad=True)
    with benchlib.flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    fwd = 2 * (2 * 2 * 4 * 32 * 32 * 16)  # QK^T and PV, full T x S
    assert fc.get_total_flops() == fwd + 2.5 * fwd  # backward: 5 matmuls of the same size


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("script", ["bench.py", "bench_attention.py"])
def test_cuda_without_a_gpu_is_a_clear_error(script):
    r = subprocess.run([sys.executable, str(SCRIPTS / script), "--device", "cuda",
                        "--smoke" if script == "bench.py" else "--quick", "--out", os.devnull],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no CUDA device" in r.stderr and "--device cpu" in r.stderr


def test_device_resolution():
    ba = benchlib
    assert ba.resolve_device("cpu") == torch.device("cpu")
    assert ba.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit, match="expected auto, cpu, cuda"):
        ba.resolve_device("tpu")
