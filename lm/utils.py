"""Small shared helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of one:
    a temporary file in the same directory, fsync, then ``os.replace`` (atomic on POSIX). The file
    gets the usual permissions (0666 minus the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def cpu_bf16_native(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies bf16 matrices in hardware: True with x86 AVX512-BF16 or AMX-BF16 (or an
    Arm core with BF16), False when ``cpuinfo`` lists the CPU's flags and none of those is among them, None
    when it cannot tell (no /proc/cpuinfo). Without them PyTorch runs bf16 matmuls in a scalar fallback
    that measured 0.2-3 GFLOP/s against float32's 10-17 on an AVX2-only AMD EPYC (one core): bf16-mixed
    training there is many times SLOWER than float32, the opposite of what the recipes' bf16 is for."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 / Arm
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
