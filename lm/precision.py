"""``precision: auto``: the numeric precision that fits this machine, resolved before the Trainer is built.

bf16-mixed is what the recipes want where it is fast: a CUDA GPU with native bf16 (Ampere or newer) and CPUs
with bf16 matrix instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16; ``lm.utils.cpu_bf16_native``). Anywhere
else, most commonly an AVX2-only x86 CPU, PyTorch multiplies bf16 in a scalar fallback that made a tiny
recipe's training step ~50x slower than float32, so ``auto`` means 32-true there.

Evaluating or continuing a checkpoint, ``auto`` means the precision the checkpoint was trained in (recorded
by ``lm.tasks.precision_check.PrecisionCheck`` as ``lm_precision``, else the run's ``config.yaml``), except
bf16 where this machine has no fast bf16: a bf16-mixed model keeps float32 weights, so 32-true is the same
model, computed exactly. An explicit precision is always used as given.

The machine probes are the module attributes ``cpu_bf16`` (reading ``CPUINFO``) and ``cuda_bf16``; tests replace
them or point ``CPUINFO`` at a fake file. This module imports no Lightning, and torch only when it must ask
about a GPU, so the command line stays quick.
"""

from __future__ import annotations

from pathlib import Path

from lm import utils

AUTO, BF16, FP32 = "auto", "bf16-mixed", "32-true"
CPUINFO = "/proc/cpuinfo"  # where ``cpu_bf16`` reads the CPU's flags (tests point it at a fake one)
# Lightning's aliases for the same settings: compared by what they mean, recorded as the canonical name.
_CANONICAL = {"32": FP32, "bf16": BF16, "16": "16-mixed", "64": "64-true", "transformer-engine": "transformer-engine"}


def canonical(precision) -> str:
    p = str(precision).strip()
    return _CANONICAL.get(p, p)


def cpu_bf16() -> bool | None:
    """True/False: this CPU has / lacks bf16 matrix instructions; None: cannot tell (treated as lacking)."""
    return utils.cpu_bf16_native(CPUINFO)


def cuda_bf16() -> bool:
    """Whether CUDA device 0 computes bf16 natively (not the emulation older GPUs offer)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword (< 2.3) reports native support only
        return bool(torch.cuda.is_bf16_supported())


def device_type(accelerator) -> str:
    """``cuda``, ``cpu`` or another device name, for a Trainer's ``accelerator`` setting (a name or an
    Accelerator object); ``auto``/None is what Lightning picks: CUDA when there is one, else the CPU (an Apple
    GPU counts as "other": no bf16 there)."""
    if accelerator is None or isinstance(accelerator, str):
        name = (accelerator or AUTO).lower()
    else:  # CUDAAccelerator, CPUAccelerator, MPSAccelerator, ...
        name = type(accelerator).__name__.lower().removesuffix("accelerator")
    if name == "gpu":
        return "cuda"
    if name == AUTO:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return name


def fast_bf16(device: str) -> bool:
    if device == "cuda":
        return cuda_bf16()
    if device == "cpu":
        return cpu_bf16() is True
    return False


def why(device: str) -> str:
    """A few words on the machine, for the one line that reports the resolved precision."""
    if device == "cpu":
        return ("this CPU has bf16 matrix instructions" if cpu_bf16() is True else
                "this CPU has no bf16 matrix instructions (no avx512_bf16/amx_bf16 in /proc/cpuinfo)")
    if device == "cuda":
        return "this GPU computes bf16 natively" if cuda_bf16() else "this GPU has no native bf16"
    return f"no bf16 on {device}"


def resolve(precision, accelerator=AUTO, trained: str | None = None) -> tuple[str, str]:
    """(the precision to run, why) for a ``trainer.precision`` setting. Only ``auto`` (or None, Lightning's
    unset default, which stays 32-true) is resolved; ``trained`` is the checkpoint's training precision when a
    checkpoint is evaluated, resumed or finetuned."""
    if precision is None:
        return FP32, "Lightning's default"
    if canonical(precision) != AUTO:
        return canonical(precision), "as given"
    device = device_type(accelerator)
    fast = fast_bf16(device)
    if trained:
        t = canonical(trained)
        if "bf16" in t and not fast:
            return FP32, (f"the checkpoint trained in {t}, but {why(device)}: 32-true computes with its float32 "
                          f"weights, without bf16 rounding")
        return t, "the precision the checkpoint was trained in"
    return (BF16 if fast else FP32), why(device)


def trained_precision(ckpt: dict | None, path: str | Path | None) -> str | None:
    """The precision a checkpoint was trained in: its ``lm_precision`` entry (written since `auto` exists),
    else ``trainer.precision`` in the run's ``config.yaml`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``,
    older runs), else None."""
    found = (ckpt or {}).get("lm_precision")
    if found:
        return canonical(found)
    if path is None:
        return None
    config = Path(path).resolve().parent.parent / "config.yaml"
    import yaml

    try:
        value = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("precision")
    except (OSError, AttributeError, yaml.YAMLError):  # no config, or not ours: no record, not an error
        return None
    return canonical(value) if value not in (None, AUTO) else None
