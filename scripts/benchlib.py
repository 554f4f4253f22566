"""What scripts/bench.py, scripts/bench_attention.py and scripts/profile_step.py share: the benchmark shapes
(read from the recipe files), synthetic Zipf batches, device/thread choice, machine description, timing
(the matmul peak, FLOP counting, one plain training/evaluation step), memory (peak RSS / CUDA allocation
over a phase) and the JSON/markdown output. One definition each, so the three report comparable numbers."""

from __future__ import annotations

import json
import math
import os
import platform
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
from lm.utils import atomic_write_text  # noqa: E402

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
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


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


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


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
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            # the flags that decide float32/bf16 matmul speed; docs/performance.md names them per table
            "cpu_flags": [f for f in VECTOR_FLAGS if f in flags.split()]}


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
    """The report, written atomically (a killed run never leaves half a JSON file)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2))


def cuda_peak_over(fn) -> float:
    """Peak CUDA allocation growth (MiB) while ``fn()`` runs, over the allocation when it starts."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
