"""The one window-memory guard of every command that builds attention windows.

``lm fit/validate/test`` (``lm.rundir.check_window_memory``), ``lm evaluate`` and ``lm analyze`` all refuse,
before any data is read or anything is written, a window whose attention scores alone exceed the machine:
one layer's scores take ``batch x heads x T x (T + memory) x 4`` bytes (float32), and ``lm analyze`` keeps
every layer's weights (``need_weights``), so there it is that times the number of layers. ``--tgt_len
10000000`` once scored a whole split as one window and grew to 10.7 GB before it was stopped; ``lm analyze
--seq_len 200000`` asked for 1.3 TB. Only a need above the whole device is refused: the estimate is a lower
bound for the materialised path (fused kernels may need less), so anything it refuses cannot run anyway.
The message names the option and the largest value that fits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lm.errors import ConfigError

BYTES_PER_SCORE = 4  # float32 scores/weights (mixed precision still accumulates softmax in float32)


@dataclass(frozen=True)
class Window:
    """One kind of window a command builds: its length ``T`` (option ``t_name``), ``batch`` rows of it
    (option ``b_name``), ``mem`` extra keys (Transformer-XL memory) and ``layers`` whose scores are held
    at once (1 in training/evaluation, every layer where attention weights are returned)."""

    t_name: str
    b_name: str
    T: int
    batch: int
    mem: int = 0
    layers: int = 1


def eval_window(t_name: str, b_name: str, e, model_cfg, train_tgt_len: int) -> Window:
    """The evaluation window of ``e`` (an ``EvalConfig``) for a model of ``model_cfg``: ``e.tgt_len`` (default: the
    training segment) x ``e.batch_size`` rows, with the memory the ``memory`` protocol carries (``e.mem_len``,
    default the model's). One place for ``lm fit/validate/test`` and ``lm evaluate``."""
    mem = (e.mem_len if e.mem_len is not None else model_cfg.mem_len) if e.protocol == "memory" else 0
    return Window(t_name, b_name, e.tgt_len or train_tgt_len, e.batch_size, mem)


def device_memory(device=None) -> tuple[int, str]:
    """Bytes of memory on the device a run uses, and its name (GPU memory for CUDA, else physical RAM)."""
    if getattr(device, "type", device) == "cuda" or str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        return int(torch.cuda.get_device_properties(dev).total_memory), f"GPU {dev}"
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"


def resolve_device(accelerator: str | None) -> str:
    """The device an ``--accelerator`` choice runs on, for the guard (``auto`` takes a GPU when there is one)."""
    if str(accelerator) in ("auto", "gpu", "cuda"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def scores_bytes(w: Window, heads: int) -> int:
    return int(w.layers) * int(w.batch) * int(heads) * int(w.T) * (int(w.T) + int(w.mem)) * BYTES_PER_SCORE


def largest_fitting(w: Window, heads: int, have: int) -> int:
    """The largest T with layers x batch x heads x T x (T + mem) x 4 <= ``have`` (0 if none)."""
    per = int(w.layers) * int(w.batch) * int(heads) * BYTES_PER_SCORE
    m = int(w.mem)
    t = int((-m + math.isqrt(m * m + 4 * (have // max(per, 1)))) // 2)
    while t > 0 and t * (t + m) * per > have:
        t -= 1
    return max(t, 0)


def check_windows(windows: list[Window], heads: int, device=None, have: int | None = None) -> None:
    """Raise one ``ConfigError`` paragraph for the first window whose scores exceed the device."""
    where = "of memory"
    if have is None:
        have, where = device_memory(device)
    for w in windows:
        need = scores_bytes(w, heads)
        if need <= have:
            continue
        what = "one layer's attention scores" if w.layers == 1 else f"the attention weights of all {w.layers} layers"
        layers = "" if w.layers == 1 else f"{w.layers} layers x "
        safe = largest_fitting(w, heads, have // 2)  # half the device: the model, activations and data need room too
        or_batch = f", or lower {w.b_name}" if w.b_name else ""
        raise ConfigError(
            f"A window of {w.T:,} tokens needs at least {need / 2**30:,.1f} GiB for {what} ({layers}"
            f"{w.b_name or 'batch'} {w.batch} x {heads} heads x {w.T} x {w.T + w.mem} keys x {BYTES_PER_SCORE} "
            f"bytes), more than this machine's {have / 2**30:,.1f} GiB {where}. Lower {w.t_name} to at most "
            f"{safe:,} (the paper uses 256-512){or_batch}. Nothing was written."
        )


__all__ = ["Window", "check_windows", "device_memory", "eval_window", "largest_fitting", "resolve_device", "scores_bytes"]
