"""``lm export``: a checkpoint as a small, framework-neutral folder, and ``lm generate``.

The folder holds ``model.safetensors`` (the decoder's weights only: no optimizer state, memories or RNG,
so it is a fraction of the ``.ckpt``), ``config.json`` (the model's hyper-parameters, its vocabulary's
size and sha256, the training data), ``tokenizer.json`` and a short model card (``README.md``).
``lm.load(folder)`` rebuilds the model and gives exactly the checkpoint's log-probabilities.
``--push_to owner/name`` uploads the folder with ``huggingface_hub`` (needs the network and a token);
``lm.load("hf://owner/name")`` downloads it again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lm.errors import CheckpointError
from lm.utils import atomic_write_text

FORMAT = "elliptical-lm"
FORMAT_VERSION = 1


def export(ckpt: str, out: str, push_to: str | None = None) -> Path:
    """Write ``ckpt`` (from ``lm fit``) as an exported folder ``out``.

    Args:
        ckpt: the checkpoint to export.
        out: the folder to write (created; files already there with these names are replaced).
        push_to: also upload the folder to this Hugging Face hub repository (``owner/name``).
    """
    from safetensors.torch import save_model

    from lm.tasks.pretrained import load_language_model

    module, vocab, raw = load_language_model(ckpt)
    hp = {k: v for k, v in dict(raw.get("hyper_parameters", {})).items() if not str(k).startswith("_")}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in module.net.parameters())
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hyper_parameters": hp,
        "vocab": {"unit": vocab.unit, "size": vocab.size, "sha256": vocab.sha256},
        "data": raw.get("lm_data") or {}, "parameters": n_params,
        "trained": {"checkpoint": Path(ckpt).name, "global_step": raw.get("global_step"), "epoch": raw.get("epoch")},
    }
    # Each file is written beside its final name and renamed into place: never half a file.
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".model.", suffix=".safetensors")
    os.close(fd)
    try:
        save_model(module.net, tmp)  # tied embedding/softmax tables are stored once
        os.replace(tmp, out_dir / "model.safetensors")
    finally:
        Path(tmp).unlink(missing_ok=True)
    vocab.save(out_dir / "tokenizer.json")
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2))
    atomic_write_text(out_dir / "README.md", model_card(config, module))
    print(f"lm export: {out_dir} ({n_params / 1e6:.2f}M parameters, "
          f"{(out_dir / 'model.safetensors').stat().st_size / 1e6:.1f} MB of weights)")
    if push_to:
        push(out_dir, push_to)
    return out_dir


def load_exported(folder: str | Path):
    """``(LanguageModel, Vocab)`` from an exported folder."""
    from safetensors.torch import load_model

    from lm.data.tokenizer import Vocab
    from lm.tasks.lm_module import LanguageModel

    folder = Path(folder)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not an exported model: {', '.join(missing)} missing. Write one with "
                              f"`lm export --ckpt <run>/checkpoints/last.ckpt --out {folder}`.")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'} is unreadable ({e}); export the model again.") from None
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} holds format {config.get('format')!r} version {config.get('format_version')}"
                              f", not {FORMAT} <= {FORMAT_VERSION}: export it with this version of lm.")
    vocab = Vocab.load(folder / "tokenizer.json")
    if vocab.sha256 != config.get("vocab", {}).get("sha256"):
        raise CheckpointError(f"{folder / 'tokenizer.json'} is not the vocabulary the weights were trained with "
                              f"(sha256 differs from config.json); export the model again.")
    module = LanguageModel(**config["hyper_parameters"])
    try:
        load_model(module.net, str(folder / "model.safetensors"))
    except Exception as e:  # truncated file, or weights of another architecture
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{folder / 'model.safetensors'} does not fit config.json ({type(e).__name__}: "
                              f"{gist}); export the model again.") from None
    return module.eval(), vocab


def model_card(config: dict, module) -> str:
    hp, cfg, data = config["hyper_parameters"], module.cfg, config.get("data", {})
    layers = cfg.attention_layers()
    attn = ", ".join(sorted(set(layers))) if len(set(layers)) > 1 else layers[0]
    ffn = cfg.ffn.name if cfg.ffn.name == "dense" else f"{cfg.ffn.name} MoE, {cfg.ffn.n_experts} experts"
    setting = {"relative": f"relative positions with memory {cfg.mem_len} (Transformer-XL)",
               "span": f"a fixed attention span of {cfg.mem_len} previous tokens with learned key_pe (adaptive-span host)",
               }.get(cfg.pos, "absolute positions, no memory")
    vocab = config["vocab"]
    return f"""# {config['trained']['checkpoint']} ({data.get('corpus', 'language model')})

A Transformer-XL-style decoder trained with elliptical-lm.

- Architecture: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads of {cfg.d_head}, attention per layer:
  {attn} ({layers}); feed-forward: {ffn}; {setting}; segment length {hp.get('tgt_len')}.
- Parameters: {config['parameters']:,}.
- Vocabulary: {vocab['unit']}-level, {vocab['size']:,} entries (`tokenizer.json`, sha256 {vocab['sha256'][:12]}).
- Training data: {data.get('corpus', 'unknown')}; exported after step {config['trained'].get('global_step')}.
- Files: `model.safetensors` (weights only), `config.json`, `tokenizer.json`.

## Use

```python
import lm
model = lm.load("path/to/this/folder")
print(model.score("The cat sat on the mat ."))
print(model.generate("The cat", max_new_tokens=30, temperature=0.8, top_k=40, seed=0))
```

or `lm generate --ckpt path/to/this/folder --prompt "The cat"`.
The weights carry the license terms of their training data (WikiText: CC BY-SA 3.0).
"""


def push(folder: Path, repo_id: str) -> None:
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as e:
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"Could not upload {folder} to hf://{repo_id} ({type(e).__name__}: {gist}). The folder "
                              f"is written; log in with `huggingface-cli login` where the hub is reachable and "
                              f"upload it with `huggingface-cli upload {repo_id} {folder}`.") from None
    print(f"lm export: uploaded to https://huggingface.co/{repo_id} (load it with lm.load('hf://{repo_id}'))")


def generate(ckpt: str, prompt: str = "", max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: int | None = 40, seed: int = 0, device: str = "cpu", cache: bool = True) -> str:
    """Continue a prompt with a trained model and print prompt + continuation.

    Args:
        ckpt: a checkpoint from ``lm fit``, a folder from ``lm export``, or hf://owner/name.
        prompt: the text to continue (word-level models: WikiText tokenisation, e.g. ``The cat @-@ like``).
        max_new_tokens: tokens (words or bytes) to generate.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens (0 or null: all).
        seed: sampling seed (the same seed gives the same text).
        device: cpu, cuda, cuda:1, ...
        cache: in the relative (Transformer-XL) setting, feed one token per step and reuse the memory.
    """
    from lm.api import load

    model = load(ckpt, device)
    text = model.generate(prompt, max_new_tokens, temperature, top_k, seed, cache)
    print(prompt + text)
    return text


def export_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(export, args=argv, as_positional=False, allow_abbrev=False)


def generate_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(generate, args=argv, as_positional=False, allow_abbrev=False)
