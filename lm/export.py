"""``lm export``: a checkpoint as a small, framework-neutral folder (the format is in docs/export.md).

The folder holds ``model.safetensors`` (the decoder's weights only: no optimizer state, memories or RNG,
so it is a fraction of the ``.ckpt``), ``config.json`` (the model's hyper-parameters, its vocabulary's
size and sha256, the training data), ``tokenizer.json`` and a model card (``README.md``, with Hub metadata).

An exported folder is untrusted input: ``load_exported`` checks ``config.json`` field by field and compares
every shape and dtype the config implies with the safetensors header (no tensor is read, and the model is
first built on torch's ``meta`` device, which allocates nothing) before it builds the model, so a mistyped or
hostile size fails in milliseconds instead of allocating gigabytes. Non-finite weights are refused on the way
out (``lm export``) and on the way in. This module sits below ``lm.api`` (it never imports it).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lm import checkpoint
from lm.checkpoint import refuse_non_finite
from lm.errors import CheckpointError, did_you_mean
from lm.utils import atomic_write_text, current_umask, unwritable

FORMAT = "elliptical-lm"
FORMAT_VERSION = 1
FILES = ("model.safetensors", "config.json", "tokenizer.json", "README.md")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a float32 parameter may be loaded from
SAFETENSORS_DTYPES = {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
# Hyper-parameters that do not shape the weights: an export is loaded for inference, never compiled.
LOAD_OVERRIDES = {"compile": False, "results_dir": None}
# The corpora's Hub datasets and licenses, for the model card's metadata.
CORPORA = {"wikitext-2": ("Salesforce/wikitext", "cc-by-sa-3.0"),
           "wikitext-103": ("Salesforce/wikitext", "cc-by-sa-3.0"), "enwik8": ("LTCB/enwik8", "other")}
AGAIN = "export the model again with `lm export --ckpt <run>/checkpoints/last.ckpt --out <folder>`"


def export(ckpt: str, out: str, push_to: str | None = None, force: bool = False) -> Path:
    """Write a checkpoint of ``lm fit`` as a folder: model.safetensors + config.json + tokenizer.json + README.md.

    Example: ``lm export --ckpt runs/wikitext2-tiny-elliptical/checkpoints/last.ckpt --out exported/tiny``

    Args:
        ckpt: the checkpoint to export.
        out: the folder to write: new, empty, or a previous export (whose four files are replaced).
        push_to: also upload the folder to this Hugging Face Hub repository (``owner/name``).
        force: also write into a non-empty folder that is not an export (only the four files are replaced).
    """
    from lm.tasks.pretrained import load_language_model

    module, vocab, raw = load_language_model(ckpt)
    folder = write(module, vocab, out, checkpoint_meta(raw, ckpt), force=force)
    print(f"lm export: {folder} ({sum(p.numel() for p in module.net.parameters()) / 1e6:.2f}M parameters, "
          f"{(folder / 'model.safetensors').stat().st_size / 1e6:.1f} MB of weights)")
    if push_to:
        push(folder, push_to)
    return folder


def checkpoint_meta(raw: dict, ckpt: str | Path) -> dict[str, Any]:
    """What an export records of where the weights came from, and the run's measured metrics."""
    p = Path(ckpt)
    run = p.parent.parent if p.parent.name == "checkpoints" else None
    return {"source": str(ckpt), "name": run.name if run else p.stem, "data": raw.get("lm_data") or {},
            "trained": {"checkpoint": p.name, "global_step": raw.get("global_step"), "epoch": raw.get("epoch")},
            "metrics": run_metrics(run / "results") if run else []}


def run_metrics(results: Path) -> list[dict[str, Any]]:
    """The run's ``lm test`` / ``lm validate`` results (``results/*.json``), as the model card lists them."""
    out = []
    for f in sorted(results.glob("*.json")) if results.is_dir() else []:
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
            metric = r["metric"]
            out.append({"file": f.name, "stage": r.get("stage"), "metric": metric, "value": float(r[metric]),
                        "tokens": r.get("tokens_scored"), "protocol": (r.get("protocol") or {}).get("protocol")})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not a result of `lm test`/`validate` (or a foreign file): the card lists only those
    return out


# ----- writing --------------------------------------------------------------------------------------
def is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: Path, force: bool) -> None:
    """Refuse an output folder whose unrelated files an export would replace."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder; pass a new folder such as exported/<name>.")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force and not is_export(out):
        shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
        raise CheckpointError(
            f"--out {out} is not empty and holds no previous export (it has {shown}); an export would replace any "
            f"{', '.join(FILES)} there. Pass a new or empty folder (e.g. exported/<name>), or add `--force true` to "
            f"write those four files into it anyway (nothing else is touched). Nothing was written.")


def write(module, vocab, out: str | Path, meta: dict[str, Any], force: bool = False) -> Path:
    """Write ``module`` (a ``LanguageModel``) and ``vocab`` as an exported folder ``out``.

    The four files are written into a temporary folder first (beside a new ``out``, inside an existing one); a
    new ``out`` is that folder renamed (it appears whole or not at all), an existing one gets each file renamed
    into place (atomic per file)."""
    from safetensors.torch import save_model

    out = Path(out).resolve()
    check_out(out, force)
    refuse_non_finite(module.net, meta.get("source", "the model"))
    hp = {k: v for k, v in dict(module.hparams).items() if not str(k).startswith("_")}
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hyper_parameters": hp,
        "vocab": {"unit": vocab.unit, "size": vocab.size, "sha256": vocab.sha256},
        "data": meta.get("data") or {}, "parameters": sum(p.numel() for p in module.net.parameters()),
        "trained": meta.get("trained") or {}, "name": meta.get("name") or "", "metrics": meta.get("metrics") or [],
    }
    try:  # (a path under /proc fails with ENOENT, which the CLI's write-error paragraph does not cover)
        out.parent.mkdir(parents=True, exist_ok=True)
        existing = out.is_dir()  # the temporary folder sits on the same filesystem, so every rename is atomic
        tmp = Path(tempfile.mkdtemp(dir=out if existing else out.parent, prefix=".lm-export.", suffix=".tmp"))
    except OSError as e:
        raise unwritable("--out", out, e, "exported/<name>") from None
    try:
        save_model(module.net, str(tmp / "model.safetensors"))  # tied embedding/softmax tables are stored once
        with open(tmp / "model.safetensors", "rb+") as f:
            os.fsync(f.fileno())
        vocab.save(tmp / "tokenizer.json")
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        atomic_write_text(tmp / "README.md", model_card(config, module))
        mask = current_umask()
        for f in FILES:  # the usual modes (0666/0777 minus the umask): mkdtemp's folder is private (0700)
            os.chmod(tmp / f, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if not existing:
            os.rename(tmp, out)
        else:
            for f in FILES:
                os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----- reading --------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    """``config.json``, checked field by field: one paragraph for each way it can be malformed."""
    from lm.tasks.lm_module import LanguageModel

    path = folder / "config.json"

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid export config: {what}; {AGAIN}.")

    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad(f"it is not UTF-8 text (byte {e.start})") from None
    except (OSError, ValueError) as e:
        raise bad(f"it is unreadable or not JSON ({e})") from None
    if not isinstance(config, dict):
        raise bad(f"it holds a JSON {type(config).__name__}, not an object")
    version = config.get("format_version")
    if config.get("format") != FORMAT or type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{folder} holds format {config.get('format')!r} version {version!r}, not {FORMAT!r} "
                              f"1..{FORMAT_VERSION}: it was not written by this version of `lm export`; {AGAIN}.")
    hp, vocab = config.get("hyper_parameters"), config.get("vocab")
    if not isinstance(hp, dict):
        raise bad(f"'hyper_parameters' is {type(hp).__name__ if hp is not None else 'missing'}, not an object")
    if not isinstance(vocab, dict) or type(vocab.get("size")) is not int or not isinstance(vocab.get("sha256"), str):
        raise bad("'vocab' is not an object with an integer 'size' and a string 'sha256'")
    known = set(inspect.signature(LanguageModel.__init__).parameters) - {"self"}
    unknown = sorted(str(k) for k in hp if not str(k).startswith("_") and k not in known)
    if unknown:
        raise bad(f"'hyper_parameters' has unknown keys {', '.join(unknown)}{did_you_mean(unknown[0], known)}")
    return config


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from the safetensors header alone: no tensor data is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for a truncated or foreign file
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {gist}); it is "
                              f"truncated (an interrupted copy or download) or not an export; {AGAIN}.") from None
    return header


def build(hp: dict[str, Any], path: Path):
    """``LanguageModel(**hp)``; a value of the wrong type (``"n_layer": "abc"``) as one paragraph."""
    from lm.errors import LMError
    from lm.tasks.lm_module import LanguageModel

    try:
        return LanguageModel(**hp)
    except LMError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path.parent / 'config.json'} has a hyper-parameter of the wrong type ({e}); "
                              f"{AGAIN}.") from None


def check_shapes(module_hp: dict[str, Any], header: dict, path: Path) -> None:
    """Every tensor the config implies, against the header, before anything is allocated."""
    from lm.tasks.lm_module import LanguageModel

    layers = {int(m.group(1)) for k in header if (m := re.match(r"layers\.(\d+)\.", k))}
    n_layer = module_hp.get("n_layer", inspect.signature(LanguageModel.__init__).parameters["n_layer"].default)
    if isinstance(n_layer, int) and n_layer != len(layers):  # checked first: building 10^5 layers takes minutes
        raise CheckpointError(f"{path.parent / 'config.json'} says n_layer {n_layer} but {path.name} holds "
                              f"{len(layers)} layers: the two files come from different models; {AGAIN}.")
    try:
        with torch.device("meta"):  # shapes only: a config asking for terabytes allocates nothing here
            net = build(module_hp, path).net
    except (RuntimeError, NotImplementedError):  # a module that reads a value at construction (Performer's seed)
        return check_sizes(module_hp, header, path)
    aliases: dict[int, list[str]] = {}  # tied tensors (embedding = softmax) are one tensor under two names
    state = net.state_dict(keep_vars=True)
    for k, v in state.items():
        aliases.setdefault(id(v), []).append(k)
    dst = {next((n for n in names if n in header), names[0]): state[names[0]] for names in aliases.values()}
    src = {k: torch.empty(shape, device="meta") for k, (_, shape) in header.items()}
    for k, t in dst.items():  # a float weight may come as any float; an integer buffer as exactly its type
        dtype = header.get(k, (None,))[0]
        if dtype and (dtype not in FLOAT_DTYPES if t.is_floating_point() else dtype != SAFETENSORS_DTYPES[t.dtype]):
            raise CheckpointError(f"{path} stores {k} as {dtype} where the model has {t.dtype}; `lm export` never "
                                  f"writes that, and `lm` will not cast it silently. {AGAIN[0].upper()}{AGAIN[1:]}.")
    checkpoint.check_fits(src, dst, f"{path} does not fit {path.parent / 'config.json'}",
                          f"The two files come from different models; {AGAIN}.")


def check_sizes(hp: dict[str, Any], header: dict, path: Path) -> None:
    """Where the model cannot be built on ``meta``: the sizes that scale its tensors against the header
    (every decoder has norms of width d_model, and d_model x d_inner / x n_head*d_head weights per layer),
    so the real build allocates at most about what the file holds; the strict load then checks every tensor."""
    total = sum(math.prod(shape) for _, shape in header.values())
    widths = {shape[0] for k, (_, shape) in header.items() if re.match(r"layers\.\d+\.norm\d\.weight$", k)}
    d_model, d_inner = hp.get("d_model", 128), hp.get("d_inner", 2048)
    heads = hp.get("n_head", 8) * hp.get("d_head", 16) if all(isinstance(hp.get(k, 1), int) for k in
                                                               ("n_head", "d_head")) else 0
    sizes = [d_model, d_inner, heads]
    if not all(isinstance(x, int) for x in sizes):
        return  # the model's own config check names a non-integer size
    if (widths and widths != {d_model}) or d_model * max(d_inner, heads) > total:
        raise CheckpointError(f"{path.parent / 'config.json'} says d_model {d_model}, d_inner {d_inner}, n_head x "
                              f"d_head {heads}, but {path.name} holds {total:,} numbers with layers of width "
                              f"{sorted(widths)}: the two files come from different models; {AGAIN}.")


def load_exported(folder: str | Path):
    """``(LanguageModel, Vocab, config)`` from an exported folder, every part checked before it is used."""
    from safetensors.torch import load_model

    from lm.data.tokenizer import Vocab

    folder = Path(folder)
    missing = [f for f in FILES[:3] if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not an exported model: {', '.join(missing)} missing. Write one with "
                              f"`lm export --ckpt <run>/checkpoints/last.ckpt --out {folder}`.")
    config = read_config(folder)
    header = read_header(folder / "model.safetensors")
    vocab = Vocab.load(folder / "tokenizer.json")
    hp = {**{k: v for k, v in config["hyper_parameters"].items() if not str(k).startswith("_")}, **LOAD_OVERRIDES}
    if vocab.sha256 != config["vocab"]["sha256"] or vocab.size != hp.get("vocab_size"):
        raise CheckpointError(f"{folder / 'tokenizer.json'} is not the vocabulary the weights were trained with "
                              f"(sha256 or size differs from config.json); {AGAIN}.")
    check_shapes(hp, header, folder / "model.safetensors")
    module = build(hp, folder / "model.safetensors")
    try:
        load_model(module.net, str(folder / "model.safetensors"))
    except Exception as e:  # the header was fine, the data is not (truncated after the header)
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{folder / 'model.safetensors'} is unreadable ({type(e).__name__}: {gist}); "
                              f"{AGAIN}.") from None
    refuse_non_finite(module.net, folder / "model.safetensors")
    return module.eval(), vocab, config


# ----- model card and the Hub -----------------------------------------------------------------------
def layer_list(names: list[str]) -> str:
    """``['softmax', 'softmax', 'elliptical']`` -> ``layers 0-1 softmax, layer 2 elliptical``."""
    runs, start = [], 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            span = f"layer {start}" if i - start == 1 else f"layers {start}-{i - 1}"
            runs.append(f"{span} {names[start]}")
            start = i
    return ", ".join(runs)


def model_card(config: dict, module) -> str:
    from huggingface_hub import ModelCardData

    hp, cfg, data, vocab = config["hyper_parameters"], module.cfg, config.get("data", {}), config["vocab"]
    corpus = data.get("corpus")
    dataset, license_ = CORPORA.get(corpus, (None, "other"))
    meta = ModelCardData(license=license_, datasets=[dataset] if dataset else None, library_name="elliptical-lm",
                         pipeline_tag="text-generation", tags=["language-modeling", "transformer-xl",
                                                               *sorted(set(cfg.attention_layers()))])
    attn = sorted(set(cfg.attention_layers()))
    ffn = "dense" if cfg.ffn.name == "dense" else f"{cfg.ffn.name} mixture of experts ({cfg.ffn.n_experts} experts)"
    setting = {"relative": f"relative positions with a memory of {cfg.mem_len} tokens (Transformer-XL)",
               "span": f"a fixed attention span of {cfg.mem_len} previous tokens with learned key_pe "
                       f"(adaptive-span host)"}.get(cfg.pos, "absolute positions, no memory")
    title = (f"{config.get('name') or 'elliptical-lm model'}: a language model with {' + '.join(attn)} attention, "
             f"trained on {corpus or 'unknown data'}")
    tied = "; the softmax shares the embedding's table" if cfg.tie_weight else ""
    metrics = "".join(f"| {m['stage']} | {m['metric']} | {m['value']:.4g} | {m['tokens']} | {m['protocol']} | "
                      f"`results/{m['file']}` |\n" for m in config.get("metrics", []))
    metrics = ("| split | metric | value | tokens scored | protocol | file |\n|---|---|---|---|---|---|\n" + metrics
               if metrics else "No `lm test` result was found beside the checkpoint (`<run>/results/*.json`).\n")
    return f"""---
{meta.to_yaml()}
---

# {title}

A {cfg.n_layer}-layer Transformer-XL-style decoder trained with elliptical-lm (`lm fit`), exported with
`lm export` after step {config['trained'].get('global_step')}.

- Attention: {layer_list(cfg.attention_layers())}.
- Size: d_model {cfg.d_model}, {cfg.n_head} heads of {cfg.d_head}, feed-forward {cfg.d_inner} ({ffn});
  {setting}; trained on segments of {hp.get('tgt_len')} tokens. {config['parameters']:,} parameters.
- Vocabulary: {vocab['unit']}-level, {vocab['size']:,} entries (`tokenizer.json`, sha256 {vocab['sha256'][:12]}).
- Files: `model.safetensors` (weights only{tied}), `config.json`,
  `tokenizer.json`; the format is described in elliptical-lm's docs/export.md.

## Measured

{metrics}
## Use

```python
import lm
model = lm.load("path/to/this/folder")        # or lm.Model.from_pretrained("owner/name")
print(model.score("The cat sat on the mat ."))
print(model.generate("The cat", max_new_tokens=30, temperature=0.8, top_k=40, seed=0))
```

or `lm generate --ckpt path/to/this/folder --prompt "The cat"`.
The weights carry the license terms of their training data ({license_}).
"""


def hub_error(action: str, repo_id: str, e: Exception, then: str) -> CheckpointError:
    gist = (str(e).strip().splitlines() or [""])[0][:200]
    return CheckpointError(f"Could not {action} hf://{repo_id} ({type(e).__name__}: {gist}). {then}")


def push(folder: Path, repo_id: str, token: str | None = None, endpoint: str | None = None,
         retry: str | None = None) -> str:
    """Upload an exported folder to the Hub with ``huggingface_hub``'s API; returns the commit's URL.
    ``retry``: how to try again, for the error (default: push the written folder from Python)."""
    retry = retry or f"The folder {folder} is written; upload it with lm.load('{folder}').push_to_hub('{repo_id}')"
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=list(FILES),
                                 commit_message="lm export")
    except Exception as e:
        raise hub_error("upload to", repo_id, e, f"Log in where the Hub is reachable (`hf auth login`, or set "
                        f"HF_TOKEN). {retry}.") from None
    print(f"lm export: uploaded to {repo_id} ({info.commit_url}); load it with lm.load('hf://{repo_id}')")
    return info.commit_url


def download(repo_id: str, revision: str | None = None, token: str | None = None, endpoint: str | None = None,
             cache_dir: str | None = None) -> Path:
    """An exported folder from the Hub (``huggingface_hub.snapshot_download``, into its cache)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
                                      allow_patterns=list(FILES)))
    except Exception as e:
        raise hub_error("download", repo_id, e, f"Check the name and the network, or download the folder where the Hub "
                        f"is reachable (`hf download {repo_id} --local-dir DIR`) and pass DIR.") from None


def export_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(export, args=argv, as_positional=False, allow_abbrev=False)
