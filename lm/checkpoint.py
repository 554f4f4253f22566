"""Checkpoint files: one reader, one set of messages, one answer to "does this state dict fit".

Every place that opens a ``.ckpt`` (``--ckpt_path`` before LightningCLI loads it, ``lm evaluate``,
``lm analyze``, ``model.pretrained`` of ``lm finetune`` for its vocabulary and weights, the quickstart
table) reads it with ``read``, so a missing, truncated, unsafe or foreign file gets the same
one-paragraph ``CheckpointError`` everywhere. Every model that loads a state dict checks it with
``check_fits``, which lists every missing, unexpected and mis-shaped tensor at once.

This module imports only torch and the package's errors, so every layer may use it.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lm.errors import CheckpointError

LM_FIT_CKPT = "a .ckpt written by `lm fit` (e.g. runs/<name>/checkpoints/last.ckpt)"


def read(path: str | Path, given_as: str = "Checkpoint", hint: str = f"Pass {LM_FIT_CKPT}.") -> dict[str, Any]:
    """The checkpoint's contents (tensors memory-mapped: only what is used is read from disk).

    ``given_as`` names where the path came from (``--ckpt_path``, ``model.pretrained``, ...), ``hint`` what
    to pass instead; both go into the error of a missing file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{given_as} {path} does not exist (no such file). {hint}")
    try:
        try:  # mmap: only the pickled structure is read now, tensor data when it is used
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):  # a legacy (non-zip) file cannot be mmapped
                raise
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            # (LightningCLI itself reads the file's hyper-parameters with weights_only=True, whatever
            # --weights_only says, so there is no switch to offer.)
            raise CheckpointError(
                f"Checkpoint {path} holds pickled Python objects, not only tensors and plain containers, so it "
                f"cannot be loaded safely (torch.load weights_only). `lm` reads the checkpoints written by `lm fit` "
                f"and `lm finetune fit`; re-save this one as a plain state (tensors, numbers, strings, dicts)."
            ) from None
        raise CheckpointError(
            f"Cannot read checkpoint {path} ({type(e).__name__}: {gist}). The file is truncated (an interrupted "
            f"copy or download) or not a checkpoint; use another one, e.g. last.ckpt or the best-by-validation "
            f"file in the same checkpoints folder."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds no state_dict). Pass a .ckpt written "
                              f"by `lm fit` or `lm finetune fit`.")
    return ckpt


def vocab_state(ckpt: dict[str, Any], path: str | Path, hint: str = "") -> dict[str, Any]:
    """The vocabulary a language-model checkpoint carries (``lm_vocab``, see ``Vocab.from_state``)."""
    state = ckpt.get("lm_vocab")
    if not state:
        raise CheckpointError(f"Checkpoint {path} holds no vocabulary (lm_vocab); it was not written by `lm fit`."
                              + (f" {hint}" if hint else ""))
    return state


def check_model_class(ckpt: dict[str, Any], path: str | Path, model_class: type) -> None:
    """Refuse a checkpoint whose hyper-parameters are not ``model_class``'s (an LM vs a classifier)."""
    hparams = ckpt.get("hyper_parameters") or {}
    if not hparams:
        return
    params = inspect.signature(model_class.__init__).parameters
    if any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()):
        return
    foreign = sorted(k for k in hparams if not str(k).startswith("_") and k not in params)
    if foreign:
        raise CheckpointError(
            f"{path} was written by another kind of model than {model_class.__name__} (its hyper-parameters "
            f"{', '.join(foreign[:4])} are not {model_class.__name__}'s). A language-model checkpoint (from "
            f"`lm fit`) goes to `lm fit/validate/test --ckpt_path` or `lm finetune fit --model.pretrained`; an "
            f"SST-2 classifier checkpoint (from `lm finetune fit`) goes to `lm finetune validate --ckpt_path`."
        )


def mismatches(src: dict[str, Tensor], dst: dict[str, Tensor], keys: list[str] | None = None,
               limit: int = 12) -> list[str]:
    """Human-readable differences between a source state dict and the destination's (over ``keys``;
    unexpected source tensors are reported only for a whole-model load, ``keys`` None)."""
    unexpected = [k for k in src if k not in dst] if keys is None else []
    keys = list(dst) if keys is None else keys
    missing = [k for k in keys if k not in src]
    shape = [k for k in keys if k in src and tuple(src[k].shape) != tuple(dst[k].shape)]

    def listing(names, fmt=str):
        more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
        return ", ".join(fmt(k) for k in names[:limit]) + more

    out = []
    if missing:
        out.append(f"{len(missing)} missing tensors ({listing(missing)})")
    if shape:
        def fmt(k):
            return f"{k}: checkpoint {tuple(src[k].shape)} vs model {tuple(dst[k].shape)}"

        out.append(f"{len(shape)} shape mismatches ({listing(shape, fmt)})")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected tensors ({listing(unexpected)})")
    return out


def check_fits(src: dict[str, Tensor], dst: dict[str, Tensor], what: str, fix: str,
               keys: list[str] | None = None, also: list[str] | None = None) -> None:
    """Raise one ``CheckpointError`` "``what``: <every problem>. ``fix``" unless ``src`` fits ``dst``.
    ``also``: problems the caller found itself (a vocabulary mismatch), listed first."""
    problems = list(also or []) + mismatches(src, dst, keys)
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems) + f". {fix}")
