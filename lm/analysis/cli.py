"""``lm analyze``: collapse, head redundancy, attention entropy and heat maps of a checkpoint.

Runs the model on the math attention path (``need_weights=True``) over ``n_sequences`` windows of a
split and writes PNG plots (if matplotlib is installed), TensorBoard scalars and, last, ``analysis.json``
with ``complete: true`` (a stopped run writes none: no ``analysis.json`` means no finished analysis).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lm import checkpoint
from lm.analysis.metrics import attention_entropy, collapse, head_redundancy
from lm.errors import ConfigError
from lm.utils import atomic_write_text, check_writable_dir

ANALYZE_BATCH = 4  # windows per forward pass


@torch.no_grad()
def analyze_model(model, tokens: torch.Tensor, seq_len: int, n_sequences: int, batch_size: int = 4) -> dict:
    """Metrics of ``model`` (a LanguageModel) over ``n_sequences`` consecutive windows of ``tokens``."""
    net = model.net.eval()
    n_windows = min(n_sequences, (tokens.numel() - 1) // seq_len)
    if n_windows < 1:
        raise ConfigError(f"the split has {tokens.numel()} tokens: too few for one window of seq_len={seq_len}.")
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)
    per_layer_collapse, redundancy, entropy = [], [], []
    moe: dict[int, dict[str, torch.Tensor]] = {}  # layer -> summed expert assignments, dropped, tokens
    for start in range(0, n_windows, batch_size):
        batch = windows[start:start + batch_size]
        out = net(batch, need_weights=True, output_hidden_states=True)
        for i, blk in enumerate(net.layers):
            stats = getattr(blk.ffn, "stats", None)
            if stats:  # expert_load = fraction of this batch's assignments per expert (eval capacity)
                acc = moe.setdefault(i, {"load": 0.0, "dropped": 0.0, "n": 0})
                acc["load"] = acc["load"] + stats["expert_load"].double() * batch.numel()
                acc["dropped"] += float(stats["dropped_fraction"]) * batch.numel()
                acc["n"] += batch.numel()
        per_layer_collapse.append(torch.stack([collapse(h) for h in out.hidden_states], dim=1))  # [b, L]
        redundancy.append(torch.stack([head_redundancy(w) for w in out.attentions], dim=1))  # [b, L]
        entropy.append(torch.stack([attention_entropy(w) for w in out.attentions], dim=1))  # [b, L, H]
    col = torch.cat(per_layer_collapse).mean(0)
    red = torch.cat(redundancy).mean(0)
    ent = torch.cat(entropy).mean(0)
    return {
        "n_sequences": n_windows, "seq_len": seq_len,
        "collapse_per_layer": col.tolist(), "head_redundancy_per_layer": red.tolist(),
        "head_redundancy": float(red.mean()), "entropy_per_layer_head": ent.tolist(),
        "attention_per_layer": model.cfg.attention_layers(),
        "moe": [_moe_summary(i, a) for i, a in sorted(moe.items())],
    }


def _moe_summary(layer: int, acc: dict) -> dict:
    """Expert load balance of one MoE layer: the token-weighted share of assignments per expert, its
    max/mean (1 = perfectly balanced, E = collapsed onto one expert) and coefficient of variation."""
    load = acc["load"] / acc["n"]
    return {"layer": layer, "expert_load": [round(x, 5) for x in load.tolist()],
            "load_max_over_mean": float(load.max() / load.mean()), "load_cv": float(load.std(unbiased=False) / load.mean()),
            "dropped_fraction": acc["dropped"] / acc["n"]}


@torch.no_grad()
def attention_maps(model, passage: torch.Tensor) -> list[torch.Tensor]:
    out = model.net.eval()(passage[None], need_weights=True)
    return [w[0].float() for w in out.attentions]  # per layer [H, T, S]


def analyze(
    ckpt: str,
    split: str = "test",
    root: str | None = None,
    source: str = "auto",
    base_url: str | None = None,
    seq_len: int = 128,
    n_sequences: int = 32,
    passage_start: int = 0,
    passage_len: int = 48,
    out: str | None = None,
) -> dict:
    """Representation collapse, head redundancy, attention entropy and heat maps of a checkpoint.

    Args:
        ckpt: checkpoint written by ``lm fit``.
        split: ``valid`` or ``test``.
        root: data directory (see ``data.root``).
        source: ``auto`` (local files, else download them once), ``local`` or ``download`` (``data.source``).
        base_url: where EnWik8's zip is downloaded from (``data.base_url``).
        seq_len: window length (tokens) per analysed sequence.
        n_sequences: number of consecutive windows analysed.
        passage_start: token offset of the passage whose attention maps are plotted.
        passage_len: length of that passage.
        out: output folder (default: ``<run dir>/analysis``).
    """
    import tempfile

    from lm.data.datamodule import LMDataModule
    from lm.tasks.pretrained import load_language_model

    for name, value in (("seq_len", seq_len), ("n_sequences", n_sequences), ("passage_len", passage_len)):
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}.")
    if passage_start < 0:
        raise ConfigError(f"--passage_start must be >= 0, got {passage_start}.")
    model, vocab, ckpt_dict = load_language_model(ckpt)
    checkpoint.refuse_non_finite(model, ckpt, "it was saved after training diverged, and every metric would be "
                                 "NaN. Analyze an earlier checkpoint (a best-* file, or one saved before the loss "
                                 "became NaN). Nothing was written.")
    _check_windows(model, seq_len, n_sequences, passage_len)
    p = Path(ckpt).resolve()
    out_dir = Path(out) if out else (p.parent.parent if p.parent.name == "checkpoints" else p.parent) / "analysis"
    check_writable_dir(out_dir, "--out", "results/analysis")  # an unusable --out fails now, before the work
    corpus = ckpt_dict.get("lm_data", {}).get("corpus", "wikitext-2")
    # The data module reads the checkpoint's vocabulary from a file: a scratch copy, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="lm-analyze-") as scratch:
        tok = Path(scratch) / "tokenizer.json"
        vocab.save(tok)
        tokens = LMDataModule(corpus=corpus, root=root, source=source, base_url=base_url,
                              tokenizer=str(tok)).tokens(split)
    if passage_start >= tokens.numel():  # an empty passage plotted as blank panels, with exit 0
        raise ConfigError(f"--passage_start {passage_start} is beyond the {split} split, which has {tokens.numel():,} "
                          f"tokens: give an offset below {tokens.numel():,} (default 0). Nothing was written.")
    result = analyze_model(model, tokens, seq_len, n_sequences, batch_size=ANALYZE_BATCH)
    result.update({"checkpoint": ckpt, "split": split, "corpus": corpus})
    passage = tokens[passage_start:passage_start + passage_len]
    maps = attention_maps(model, passage)
    words = [vocab.id_to_token(int(i)) for i in passage]
    result["plots"] = _plots(out_dir, result, maps, words)
    _tensorboard(out_dir, result)
    # analysis.json is written last, in one atomic step, so it exists (with ``complete: true``) only when every
    # output is written: a stop (SIGTERM raises StopRequested here, Ctrl-C KeyboardInterrupt) leaves none, or the
    # earlier run's file untouched. Strict JSON: a NaN/inf metric (a degenerate window) is null, never `NaN`.
    result["complete"] = True
    atomic_write_text(out_dir / "analysis.json", json.dumps(_finite_or_null(result), indent=2, allow_nan=False))
    print(json.dumps(_finite_or_null({k: v for k, v in result.items() if k != "entropy_per_layer_head"}), indent=2,
                     allow_nan=False))  # the printed summary is strict JSON too (`lm analyze ... | jq`)
    return result


def _check_windows(model, seq_len: int, n_sequences: int, passage_len: int) -> None:
    """The window-memory guard of every command (``lm.data.window_memory``): here every layer's attention
    weights are kept at once (``need_weights``), for ``--seq_len`` windows and for the ``--passage_len`` map."""
    from lm.data.window_memory import Window, check_windows

    n_layer = model.cfg.n_layer
    check_windows([Window("--seq_len", f"--n_sequences ({ANALYZE_BATCH} windows per batch)", seq_len,
                          min(ANALYZE_BATCH, n_sequences), 0, n_layer),
                   Window("--passage_len", "", passage_len, 1, 0, n_layer)],
                  model.cfg.n_head, next(model.parameters()).device)


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _plots(out_dir: Path, result: dict, maps: list[torch.Tensor], words: list[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    layers = range(len(result["collapse_per_layer"]))
    ax[0].plot(layers, result["collapse_per_layer"], marker="o")
    ax[0].set(xlabel="layer", ylabel="mean token cosine similarity", title="representation collapse")
    ax[1].plot(layers, result["head_redundancy_per_layer"], marker="o")
    ax[1].set(xlabel="layer", ylabel="mean L2 between heads", title="head redundancy")
    fig.tight_layout()
    fig.savefig(out_dir / "collapse_redundancy.png", dpi=110)
    plt.close(fig)
    paths.append(str(out_dir / "collapse_redundancy.png"))
    n_layers, n_heads = len(maps), maps[0].size(0)
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.2 * n_heads, 2.2 * n_layers), squeeze=False)
    for i, w in enumerate(maps):
        for h in range(n_heads):
            axes[i][h].imshow(w[h].numpy(), cmap="viridis", aspect="auto")
            axes[i][h].set_xticks([])
            axes[i][h].set_yticks([])
            axes[i][h].set_title(f"L{i} H{h} ({result['attention_per_layer'][i]})", fontsize=7)
    fig.suptitle(" ".join(words[:24]) + (" ..." if len(words) > 24 else ""), fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "attention_maps.png", dpi=110)
    plt.close(fig)
    paths.append(str(out_dir / "attention_maps.png"))
    return paths


def _tensorboard(out_dir: Path, result: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(out_dir / "tb"))
    for i, (c, r) in enumerate(zip(result["collapse_per_layer"], result["head_redundancy_per_layer"])):
        w.add_scalar("analysis/collapse", c, i)
        w.add_scalar("analysis/head_redundancy", r, i)
    w.close()


def analyze_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(analyze, args=argv, as_positional=False, allow_abbrev=False)  # a typo is an error, not a prefix match
