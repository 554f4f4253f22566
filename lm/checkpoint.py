"""Checkpoint files: one reader, one set of messages, one answer to "does this state dict fit".

Every place that opens a ``.ckpt`` (``--ckpt_path`` before LightningCLI loads it, Lightning's own restore
through ``AtomicCheckpointIO``, ``lm evaluate``, ``lm analyze``, ``lm export``/``generate``, ``lm.load``,
``model.pretrained`` of ``lm finetune`` for its vocabulary and weights, the quickstart table) reads it with
``read``, so a missing, truncated, unsafe or foreign file gets the same one-paragraph ``CheckpointError``
everywhere.

Untrusted files: a checkpoint is a pickle, and unpickling can run code. ``read`` is the only ``torch.load``
in the package and always passes ``weights_only=True`` (tensors and plain containers only; a pickled object
is refused, never built). ``local_path`` refuses URLs: Lightning would download an ``http(s)://`` path
itself and unpickle it without weights_only (its default for URLs, ``lightning.fabric.utilities.cloud_io._load``).

Every model that loads a state dict checks it with ``check_fits``, which lists every missing, unexpected and
mis-shaped tensor at once.

This module imports only the package's errors (torch when a file is read), so every layer may use it and the
command line's entry point stays quick.
"""

from __future__ import annotations

import inspect
import pickle
import re
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.errors import CheckpointError

if TYPE_CHECKING:
    from torch import Tensor

LM_FIT_CKPT = "a .ckpt written by `lm fit` (e.g. runs/<name>/checkpoints/last.ckpt)"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(path: str | Path, given_as: str = "Checkpoint") -> Path:
    """``path`` as a local file path: ``file:///x`` becomes ``/x``; any other URL (``http(s)://``, ``s3://``,
    Lightning's ``registry:``) is refused. Nothing is downloaded: a downloaded checkpoint is a file the user
    chose to fetch and can look at, and the reader then opens it like any other local file."""
    s = str(path)
    if s.startswith("file://"):
        url = urllib.parse.urlparse(s)
        if url.netloc in ("", "localhost"):
            return Path(urllib.request.url2pathname(url.path))
    if _URL.match(s) or s == "registry" or s.startswith("registry:"):  # Lightning's model-registry download
        raise CheckpointError(
            f"{given_as} {s} is not a local file. `lm` reads checkpoints only from local files (Lightning would "
            f"fetch a URL itself and unpickle it without torch.load's weights_only protection, which lets the file "
            f"run code on this machine). Download it first, from a source you trust (e.g. `curl -L -o model.ckpt "
            f"'{s}'`), and pass the local path: it is then read with weights_only=True, tensors and plain values only."
        )
    return Path(s)


def read(path: str | Path, given_as: str = "Checkpoint", hint: str = f"Pass {LM_FIT_CKPT}.",
         mmap: bool = True) -> dict[str, Any]:
    """The checkpoint's contents (with ``mmap``, tensors memory-mapped: only what is used is read from disk;
    without, read into memory, as a training restore wants its optimizer state).

    ``given_as`` names where the path came from (``--ckpt_path``, ``model.pretrained``, ...), ``hint`` what
    to pass instead; both go into the error of a missing file.
    """
    import torch

    p = local_path(path, given_as)
    if not p.is_file():
        raise CheckpointError(f"{given_as} {path} does not exist (no such file). {hint}")
    try:
        with warnings.catch_warnings():  # torch's note on a raw pickle's protocol: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:  # mmap: only the pickled structure is read now, tensor data when it is used
                ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if "_use_new_zipfile_serialization" not in str(e):  # a legacy (non-zip) file cannot be mmapped
                    raise
                ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        # torch < 2.6: "Unsupported global: GLOBAL x"; 2.6+ (2.13 too): "... unsupported GLOBAL x whose module ..."
        # (garbage bytes also fail as "Weights only load failed", with another reason: that is "cannot read")
        if isinstance(e, pickle.UnpicklingError) and "unsupported global" in str(e).lower():
            # (LightningCLI itself reads the file's hyper-parameters with weights_only=True, whatever
            # --weights_only says, so there is no switch to offer.)
            raise CheckpointError(
                f"Checkpoint {path} holds pickled Python objects (torch: \"unsupported GLOBAL\" {_global(e)}), not "
                f"only tensors and plain containers, so it cannot be loaded safely: unpickling it could run code. It "
                f"was NOT loaded. `lm` reads the checkpoints written by `lm fit` and `lm finetune fit`; if you trust "
                f"this file's origin, re-save it as a plain state (tensors, numbers, strings, dicts)."
            ) from None
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            # e.g. a pickle.dump()'d file (protocol 4+ opcodes): refused before any GLOBAL is reached
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise CheckpointError(
                f"Cannot read checkpoint {path}: torch's safe (weights_only) loader refused it"
                f"{f' ({why.group(1).strip()[:120]})' if why else ''} and it was NOT unpickled. The file is truncated "
                f"(an interrupted copy or download), not a checkpoint, or a raw pickle rather than a torch.save file; "
                f"use a checkpoint written by `lm fit` or `lm finetune fit`, e.g. last.ckpt or the best-by-validation "
                f"file in the same checkpoints folder."
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


def _global(e: Exception) -> str:
    """The refused global's name in torch's weights_only message ("unsupported GLOBAL posix.system ...")."""
    m = re.search(r"GLOBAL:?\s+([\w.]+)", str(e))
    return m.group(1) if m else ""


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


DIVERGED = ("it was saved after training diverged, and it would give NaN scores and no text. Use an earlier checkpoint "
            "of the run (its checkpoints folder) or retrain with a lower learning rate.")


def non_finite(named_tensors) -> list[str]:
    """The names, among ``(name, tensor)`` pairs, of the floating-point tensors that hold a NaN or an inf."""
    import torch

    return [n for n, t in named_tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refuse_non_finite(module, source: str | Path, why: str = DIVERGED) -> None:
    """Non-finite weights give NaN everywhere: ``lm export``, ``lm generate``/``lm.load`` and ``lm analyze`` refuse
    them in one paragraph (``lm test``/``evaluate`` find them behind a NaN loss, ``LanguageModel._write_result``)."""
    bad = non_finite(module.state_dict().items())
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. {bad[0]}): "
                              f"{why}")
