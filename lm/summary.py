"""``lm summary``: a recipe's decoder, layer by layer, with parameter counts, built without data or training.

    lm summary --config configs/wikitext103/glam_small.yaml --vocab_size 267735
    lm summary --config configs/wikitext103/glam_small.yaml --config configs/moe/xl_blocks.yaml --vocab_size 267735

The recipe is resolved exactly as ``lm fit`` resolves it (the same parser: overlays merged in order, defaults
filled in, every option validated), then the decoder is built on PyTorch's ``meta`` device, so even a
WikiText-103-sized vocabulary costs no memory and no time. The vocabulary size comes from ``--vocab_size`` or,
without it, from the recipe's corpus on disk (never downloaded): WikiText-103's train split is not needed when
the size is given (267,735 words; EnWik8 is byte-level, 256 + specials, and needs no corpus either way).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
from typing import Any

import torch
import yaml

from lm.config import AttentionConfig, FFNConfig, ModelConfig, coerce
from lm.errors import ConfigError, LMError
from lm.model.moe import MoEFFN
from lm.model.transformer import TransformerLM


def resolve_recipe(configs: list[str]) -> dict[str, Any]:
    """The recipe as ``lm fit --config ... --print_config`` prints it (a dict with ``model``, ``data``, ...)."""
    from lm.lightning_cli import lm_cli

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            lm_cli(["fit", *(a for c in configs for a in ("--config", c)), "--print_config"])
    except SystemExit as exc:  # --print_config ends the parser with exit 0; a bad recipe exits 2 (message printed)
        if exc.code not in (0, None):
            raise ConfigError(f"the recipe {' + '.join(configs)} does not parse (the parser's message is above); "
                              f"`lm fit --config ... --print_config` shows the same.") from None
    return yaml.safe_load(out.getvalue())


def model_config(model: dict[str, Any]) -> ModelConfig:
    """The ``model`` section of a resolved recipe as the decoder's ``ModelConfig`` (task options dropped)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    arch = {k: v for k, v in model.items() if k in fields and v is not None}
    arch["attention"] = coerce(AttentionConfig, model.get("attention") or {})
    arch["ffn"] = coerce(FFNConfig, model.get("ffn") or {})
    return ModelConfig(**arch)


def corpus_vocab_size(data: dict[str, Any]) -> int:
    """The vocabulary ``lm fit`` would count for the recipe's data section, from local files only."""
    from lm.data.datamodule import LMDataModule

    keep = ("corpus", "root", "cache_dir", "tokenizer", "vocab_splits")  # the MoE recipes count train+valid+test
    try:
        return LMDataModule(**{k: data[k] for k in keep if data.get(k) is not None}, source="local").vocab_size
    except LMError as e:  # the data layer's message explains how to fetch a corpus; here one line of it is enough
        first = str(e).strip().splitlines()[0].split(" Looked in")[0].rstrip(":. ")
        raise ConfigError(f"{first} (lm summary counts the vocabulary on it unless told its size). Pass "
                          f"--vocab_size N (WikiText-103: 267735, WikiText-2: 33278) to summarise the recipe "
                          f"without the corpus.") from None


def summarize(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """Per-layer composition and parameter counts of ``TransformerLM(cfg, vocab_size)`` (built on ``meta``).

    Shared tensors (a softmax tied to the embedding) are counted once, under the embedding."""
    with torch.device("meta"):
        net = TransformerLM(cfg, vocab_size)
    kinds, names = cfg.ffn.layer_kinds(cfg.n_layer), cfg.attention_layers()
    seen: set[int] = set()

    def count(module: torch.nn.Module | None) -> int:
        n = 0
        for p in ([] if module is None else module.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    embedding, head = count(net.embed), count(net.head)
    layers = []
    for i, blk in enumerate(net.layers):
        if kinds[i] == "moe":
            moe: MoEFFN = blk.ffn
            ffn = (f"moe {moe.n_experts} x {moe.d_expert}, top-{moe.top_k}"
                   + (", own residual + LayerNorm" if blk.norm_ffn is not None else ""))
        else:
            ffn = f"dense {cfg.d_inner}" if kinds[i] == "dense" else "none"
        layers.append({"layer": i, "attention": names[i], "ffn": ffn, "kind": kinds[i],
                       "attention_params": count(blk.attn), "ffn_params": count(blk.ffn), "params": 0})
        layers[-1]["params"] = layers[-1]["attention_params"] + layers[-1]["ffn_params"] + count(blk)  # + norms
    rest = count(net)
    return {"vocab_size": vocab_size, "layers": layers, "embedding": embedding, "head": head, "other": rest,
            "total": embedding + head + sum(r["params"] for r in layers) + rest}


def format_summary(s: dict[str, Any], cfg: ModelConfig, vocab_note: str) -> str:
    lines = [f"decoder: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads x {cfg.d_head}, pos {cfg.pos}, "
             f"norm {cfg.norm}, dropout placement {cfg.dropout_placement}, weight init {cfg.weight_init}; "
             f"vocabulary {s['vocab_size']:,} ({vocab_note})",
             f"{'layer':>5}  {'attention':<12} {'ffn':<48} {'params':>12}"]
    for r in s["layers"]:
        lines.append(f"{r['layer']:>5}  {r['attention']:<12} {r['ffn']:<48} {r['params']:>12,}")
    tied = " (tied: the softmax shares it)" if cfg.tie_weight else ""
    lines += [f"{'embedding' + tied:<68} {s['embedding']:>12,}",
              f"{'softmax head (its own parameters)':<68} {s['head']:>12,}"]
    if s["other"]:
        lines.append(f"{'other (final LayerNorm)':<68} {s['other']:>12,}")
    lines.append(f"{'total':<68} {s['total']:>12,}")
    return "\n".join(lines) + "\n"


def summary_cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="lm summary", allow_abbrev=False,
                                 description="Per-layer composition and parameter counts of a recipe's model, "
                                             "without data or training.")
    ap.add_argument("--config", action="append", required=True, help="a recipe YAML; repeat for overlays, in order")
    ap.add_argument("--vocab_size", type=int, default=None,
                    help="vocabulary size (default: counted from the recipe's corpus on disk)")
    args = ap.parse_args(argv)
    recipe = resolve_recipe(args.config)
    cfg = model_config(recipe["model"])
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise ConfigError(f"--vocab_size must be >= 1, got {args.vocab_size}.")
        vocab, note = args.vocab_size, "--vocab_size"
    else:
        data = recipe.get("data") or {}
        vocab = corpus_vocab_size(data)
        note = "bytes" if data.get("corpus") == "enwik8" else f"counted on {data.get('corpus')}"
    print(format_summary(summarize(cfg, vocab), cfg, note), end="")
