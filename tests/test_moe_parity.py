"""Issue 29, points 1-4: the MoE authors' network (lazizcodes/smoe_expertcount, models.py, custom_layers.py,
custom_transformer.py) as options of the one decoder, each against an independent expectation.

- ``ffn.layout`` presets against the authors' ``TransformerSeq`` loop, re-derived here from their letters.
- ``ffn.nested_norm``: a block's output against ``LN2(h + LN_m(h + MoE(h)))`` composed by hand.
- ``model.dropout_placement: authors``: the dropout masks replayed by hand (dense FFN and MoE); everything
  outside the FFNs is deterministic in training mode.
- ``ffn.expert_init: fmoe`` / ``model.weight_init: torch``: the bounds worked out from torch's documented formulas.
- ``lm summary`` on a tiny recipe against hand counts; the authors' parameter count (a formula written from
  their module shapes) against the table in docs/parity.md.
- slow: a tiny GLaM-S-shaped and a tiny Switch-shaped model of the authors' kind through ``lm fit`` and
  ``lm finetune`` (the paper's SST-2 recipe).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import write_corpus
from lm.cli import main
from lm.config import FFNConfig, ModelConfig
from lm.errors import ConfigError
from lm.model.moe import DenseFFN, MoEFFN
from lm.model.transformer import TransformerLM
from lm.summary import corpus_vocab_size, model_config, resolve_recipe, summarize

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ------------------------------------------------------------------------------------------------ layout
def authors_layers(arch: str, nlayers: int, base_arch: str) -> list[str]:
    """The FFN kind of each layer ``TransformerSeq.__init__`` builds (their letters: 'g' (and the other gate
    letters) = MoE in the ``g`` slot, 'f' = dense FFN in the ``f`` slot; anything else there = none)."""
    if base_arch == "transformer":  # one layer per i: s=arch[2i], g=arch[2i+1], f=None
        return ["moe" if arch[2 * i + 1] == "g" else "none" for i in range(nlayers)]
    kinds = []
    for i in range(nlayers):  # "glam": two layers per i, the second one's letters overlap the next pair's
        kinds.append("moe" if arch[2 * i + 1] == "g" else "none")  # g=arch[2i+1], f=None
        kinds.append("dense" if arch[2 * (i + 1) + 1] == "f" else "none")  # g=None, f=arch[2(i+1)+1]
    return kinds


# (script, --architecture, --nlayers, --base_arch): the pretraining and SST-2 scripts of the authors' repository
SCRIPTS = [
    ("wikitext-103/glam/small/smoe-s.sh", "sgsfsgsfsgsf", 3, "glam"),
    ("wikitext-103/glam/small/ellattention-smoe-s.sh", "rgefegefegef", 3, "glam"),
    ("wikitext-103/glam/medium/glam-smoe-m.sh", "sgsf" * 6, 6, "glam"),
    ("finetuning/sst2/glam/medium/smoe-ellattention-m-wikipre.sh", "rgef" * 6, 6, "glam"),
    ("wikitext-103/transformers/medium/smoe-m.sh", "sgsgsgsgsgsg", 6, "transformer"),
    ("enwik8/transformers/medium/smoe-ellattention-m.sh", "rgegegegegegegeg", 8, "transformer"),
]


@pytest.mark.parametrize("script,arch,nlayers,base", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_layout_presets_are_the_authors_loop(script, arch, nlayers, base):
    preset = "glam_authors" if base == "glam" else "all_moe"
    n_layer = 2 * nlayers if base == "glam" else nlayers
    assert FFNConfig(name="glam", layout=preset).layer_kinds(n_layer) == authors_layers(arch, nlayers, base)


def test_glam_layouts_by_hand():
    glam = FFNConfig(name="glam", layout="glam_authors")
    assert glam.layer_kinds(6) == ["moe", "dense", "none", "none", "moe", "dense"]  # GLaM-S (issue 29)
    kinds = glam.layer_kinds(12)  # GLaM-M
    assert [i for i, k in enumerate(kinds) if k == "moe"] == [0, 4, 8]
    assert [i for i, k in enumerate(kinds) if k == "dense"] == [1, 5, 9]
    assert [i for i, k in enumerate(kinds) if k == "none"] == [2, 3, 6, 7, 10, 11]
    assert glam.moe_layers(12) == [0, 4, 8]
    assert FFNConfig(name="glam", layout="glam_alternating").layer_kinds(4) == ["dense", "moe", "dense", "moe"]
    assert FFNConfig(name="glam").layer_kinds(4) == ["dense", "moe", "dense", "moe"]  # the project's default
    assert FFNConfig(name="switch", layout=["none", "moe", "dense"]).layer_kinds(3) == ["none", "moe", "dense"]


def test_model_builds_the_layout():
    cfg = ModelConfig(n_layer=6, d_model=8, n_head=2, d_head=4, d_inner=8, cutoffs=[10],
                      ffn=FFNConfig(name="glam", layout="glam_authors", n_experts=4, nested_norm=True))
    net = TransformerLM(cfg, 30)
    assert [type(b.ffn).__name__ for b in net.layers] == ["MoEFFN", "DenseFFN", "NoneType", "NoneType", "MoEFFN",
                                                          "DenseFFN"]
    # attention-only layers have one LayerNorm; only the MoE layers have the inner one
    assert [b.norm2 is not None for b in net.layers] == [True, True, False, False, True, True]
    assert [b.norm_ffn is not None for b in net.layers] == [True, False, False, False, True, False]
    out = net(torch.randint(0, 30, (2, 5)))
    assert torch.isfinite(out.hidden).all() and out.aux_loss is not None


@pytest.mark.parametrize("ffn,model,match", [
    (dict(name="glam", layout="glam_authors", layers="even"), {}, "keep one"),
    (dict(name="glam", layout="glam_paper"), {}, "ffn.layout"),
    (dict(name="glam", layout=["moe", "dens"]), {}, "ffn.layout entry"),
    (dict(name="glam", layout=["moe", "dense"]), dict(n_layer=3), "lists 2 FFN kinds"),
    (dict(name="glam", layout="glam_authors"), dict(n_layer=5), "must be even"),
    (dict(name="dense", layout=["dense", "moe"]), dict(n_layer=2), "ffn.name: dense"),
    (dict(name="dense", layout="all_moe"), dict(n_layer=2), "ffn.name: dense"),
    (dict(name="switch", nested_norm=True), dict(norm="pre"), "nested_norm"),
    (dict(name="switch", expert_init="kaiming"), {}, "expert_init"),
    ({}, dict(dropout_placement="none"), "dropout_placement"),
    ({}, dict(weight_init="xavier"), "weight_init"),
])
def test_incompatible_or_unknown_options_fail_at_construction(ffn, model, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{"n_layer": 4, **model}, ffn=FFNConfig(**ffn))


# ------------------------------------------------------------------------------------------ nested block
def tiny_cfg(**over) -> ModelConfig:
    ffn = dict(name="switch", n_experts=4, top_k=2, capacity_factor=None, eval_capacity_factor=None, router_bias=True)
    ffn.update(over.pop("ffn", {}))
    base = dict(n_layer=1, d_model=8, n_head=2, d_head=4, d_inner=8, dropout=0.0, cutoffs=[10], pos="relative",
                mem_len=0, ffn=FFNConfig(**ffn))
    return ModelConfig(**{**base, **over})


def randomize_norms(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


@pytest.mark.parametrize("nested", [True, False])
def test_block_is_the_authors_composition(nested):
    torch.manual_seed(0)
    net = TransformerLM(tiny_cfg(ffn=dict(nested_norm=nested)), 30).eval()
    randomize_norms(net)
    blk = net.layers[0]
    seen = {}
    blk.register_forward_hook(lambda mod, args, out: seen.update(h=args[0], out=out[0]))
    with torch.no_grad():
        net(torch.randint(0, 30, (2, 6)))
        h = seen["h"]
        a, _ = blk.attn(h, None, *blk_ctx(net, h))
        ln = lambda x, m: F.layer_norm(x, (8,), m.weight, m.bias)  # noqa: E731
        h1 = ln(h + a, blk.norm1)
        moe = blk.ffn(h1)
        inner = ln(h1 + moe, blk.norm_ffn) if nested else moe  # LN_m(h + drop(MoE(h))), dropout 0 here
        want = ln(h1 + inner, blk.norm2)
    torch.testing.assert_close(seen["out"], want)
    assert (blk.norm_ffn is not None) == nested


def blk_ctx(net, h):
    from lm.model.attention import AttnContext
    from lm.model.positions import attention_mask, relative_positions, sinusoid

    T = h.shape[1]
    ctx = AttnContext(mask=attention_mask(T, 0, "cpu", False, 0),
                      rel_pos=sinusoid(relative_positions(T, -1, "cpu"), net.cfg.d_model))
    return ctx, None


# ---------------------------------------------------------------------------------------- dropout sites
@pytest.mark.parametrize("placement", ["authors", "xl"])
def test_no_dropout_outside_the_ffns_with_the_authors_placement(placement):
    """Attention-only layers and dropatt 0: with the authors' placement nothing is random in training mode
    (embeddings, position embeddings, attention output and final states are not dropped); with XL's it is."""
    cfg = tiny_cfg(n_layer=2, dropout=0.5, dropout_placement=placement,
                   ffn=dict(name="dense", layout=["none", "none"]))
    net = TransformerLM(cfg, 30).train()
    x = torch.randint(0, 30, (2, 6))
    same = torch.equal(net(x).hidden, net(x).hidden)
    assert same == (placement == "authors")


@pytest.mark.parametrize("placement", ["authors", "xl"])
def test_dense_ffn_dropout_replayed(placement):
    torch.manual_seed(0)
    net = TransformerLM(tiny_cfg(dropout=0.3, dropout_placement=placement, ffn=dict(name="dense")), 30)
    ffn: DenseFFN = net.layers[0].ffn.train()
    fc1, fc2 = ffn.net[0], ffn.net[3]
    x = torch.randn(3, 5, 8)
    torch.manual_seed(7)
    got = ffn(x)
    torch.manual_seed(7)
    want = fc2(F.dropout(F.relu(fc1(x)), 0.3, training=True))
    if placement == "xl":
        want = F.dropout(want, 0.3, training=True)  # Transformer-XL's PositionwiseFF drops its output too
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dropout_at", ["output", "expert"])
def test_moe_dropout_replayed(dropout_at):
    """Two experts, top-2: every token reaches both. Each expert sees its tokens first-choices-first (the
    dispatch order), drops after its ReLU; then 'expert' drops each expert's output, 'output' (FastMoE as the
    authors call it, then CustomizedMoEPositionwiseFF's dropout) drops the weighted sum once."""
    torch.manual_seed(0)
    p = 0.4
    moe = MoEFFN(6, 5, p, n_experts=2, top_k=2, capacity_factor=None, eval_capacity_factor=None,
                 dropout_at=dropout_at).train()
    x = torch.randn(7, 6)
    _, top_idx, weights = moe.route(x)
    torch.manual_seed(3)
    got = moe(x)
    torch.manual_seed(3)
    out = torch.zeros(7, 6)
    for e in range(2):
        rows = [(s, t) for s in range(2) for t in range(7) if top_idx[t, s] == e]  # slot-major, token order
        xs = x[[t for _, t in rows]]
        hid = F.dropout(F.relu(xs @ moe.w1[e] + moe.b1[e]), p, training=True)
        y = hid @ moe.w2[e] + moe.b2[e]
        if dropout_at == "expert":
            y = F.dropout(y, p, training=True)
        for r, (s, t) in enumerate(rows):
            out[t] += weights[t, s] * y[r]
    if dropout_at == "output":
        out = F.dropout(out, p, training=True)
    torch.testing.assert_close(got, out)


def test_authors_placement_wires_the_modules():
    cfg = tiny_cfg(n_layer=2, dropout=0.1, dropout_placement="authors",
                   ffn=dict(name="glam", layout=["moe", "dense"]))
    net = TransformerLM(cfg, 30)
    assert isinstance(net.drop, torch.nn.Identity) and all(isinstance(b.drop, torch.nn.Identity) for b in net.layers)
    assert net.layers[0].ffn.dropout_at == "output" and isinstance(net.layers[1].ffn.net[-1], torch.nn.Identity)
    xl = TransformerLM(tiny_cfg(n_layer=2, dropout=0.1, ffn=dict(name="glam", layout=["moe", "dense"])), 30)
    assert isinstance(xl.drop, torch.nn.Dropout) and xl.layers[0].ffn.dropout_at == "expert"
    assert set(net.state_dict()) == set(xl.state_dict())  # dropout placement changes no parameter


# ------------------------------------------------------------------------------------------------- init
def test_fmoe_expert_init_and_torch_linear_init():
    """kaiming_uniform_(a) draws U(-b, b), b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)): for a = sqrt(5),
    b = 1 / sqrt(fan_in). FastMoE's weight is [E, out, in], and torch's fan-in of a 3-D tensor is
    size(1) * size(2) = out * in: b = 1 / sqrt(d_model * d_expert) for both expert matrices (1/352 at width 352)."""
    torch.manual_seed(0)
    d, de, E = 32, 48, 16
    cfg = ModelConfig(n_layer=2, d_model=d, n_head=2, d_head=16, d_inner=40, cutoffs=[10], weight_init="torch",
                      ffn=FFNConfig(name="glam", layout=["moe", "dense"], n_experts=E, d_expert=de,
                                    expert_init="fmoe", router_bias=True))
    net = TransformerLM(cfg, 30)
    moe = net.layers[0].ffn
    b = 1 / math.sqrt(d * de)
    for w in (moe.w1, moe.w2):
        assert w.abs().max() <= b and w.abs().max() > 0.99 * b  # 24,576 uniform draws reach the bound
        assert w.std().item() == pytest.approx(b / math.sqrt(3), rel=0.03)
    assert torch.count_nonzero(moe.b1) == 0 and torch.count_nonzero(moe.b2) == 0
    # nn.Linear keeps PyTorch's default: U(+-1/sqrt(in)) for the weight and the bias (not N(0, 0.02), bias 0)
    for lin, fan_in in ((moe.router, d), (net.layers[1].ffn.net[0], d), (net.layers[1].ffn.net[3], 40),
                        (net.layers[0].attn.qkv, d)):
        bound = 1 / math.sqrt(fan_in)
        assert lin.weight.abs().max() <= bound
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
        if lin.bias is not None:
            assert lin.bias.abs().max() <= bound and torch.count_nonzero(lin.bias) == lin.bias.numel()
    # the project's default: N(0, init_std), zero biases, experts included
    normal = TransformerLM(dataclasses.replace(cfg, weight_init="normal", ffn=FFNConfig(
        name="glam", layout=["moe", "dense"], n_experts=E, d_expert=de, router_bias=True)), 30)
    assert normal.layers[0].ffn.w1.std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.count_nonzero(normal.layers[0].ffn.router.bias) == 0


def test_fmoe_bound_is_torchs_fan_in_of_the_authors_shape():
    """The authors' own tensor shape [E, out, in] through torch's fan computation gives the same bound."""
    from torch.nn.init import _calculate_fan_in_and_fan_out

    fan_in, _ = _calculate_fan_in_and_fan_out(torch.empty(16, 352, 352))
    assert fan_in == 352 * 352 and 1 / math.sqrt(fan_in) == pytest.approx(1 / 352)


# ----------------------------------------------------------------------------------------------- summary
def write_recipe(path: Path, **ffn) -> Path:
    recipe = {"model": {"n_layer": 4, "d_model": 8, "n_head": 2, "d_head": 4, "d_inner": 6, "pos": "relative",
                        "adaptive": False, "cutoffs": [], "tie_weight": False, "dropout_placement": "authors",
                        "weight_init": "torch",
                        "ffn": {"name": "glam", "layout": "glam_authors", "n_experts": 3, "d_expert": 5,
                                "router_bias": True, "nested_norm": True, "expert_init": "fmoe", **ffn}},
              "data": {"corpus": "wikitext-2", "root": str(path.parent / "nowhere")}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_summary_counts_by_hand(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    assert main(["summary", "--config", str(recipe), "--vocab_size", "50"]) == 0
    out = capsys.readouterr().out
    H, Hi, E, De, V = 8, 6, 3, 5, 50
    attn = 5 * H * H + 2 * H + 2 * H  # qkv + o + r_net (no biases), u and v, norm1
    moe = attn + (H * E + E) + E * (H * De + De + De * H + H) + 2 * 2 * H  # router, experts, norm2, norm_ffn
    dense = attn + (H * Hi + Hi + Hi * H + H) + 2 * H
    rows = {int(m[0]): (m[1], int(m[2].replace(",", ""))) for m in re.findall(r"^\s+(\d+)\s+\S+\s+(\S+).*?([\d,]+)$",
                                                                            out, re.M)}
    assert rows == {0: ("moe", moe), 1: ("dense", dense), 2: ("none", attn), 3: ("none", attn)}
    total = int(re.search(r"^total\s+([\d,]+)", out, re.M)[1].replace(",", ""))
    assert total == V * H + (H * V + V) + moe + dense + 2 * attn  # untied: embedding + softmax
    assert total == sum(p.numel() for p in TransformerLM(model_config(resolve_recipe([str(recipe)])["model"]),
                                                          V).parameters())


def test_summary_without_corpus_or_vocab_size_is_one_paragraph(tmp_path, capsys):
    assert main(["summary", "--config", str(write_recipe(tmp_path / "r.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "--vocab_size" in err and "Traceback" not in err


def test_summary_counts_the_vocabulary_of_a_corpus_on_disk(tmp_path, capsys):
    data = write_corpus(tmp_path / "data", n_words=40)
    recipe = write_recipe(tmp_path / "r.yaml")
    words = {w for split in ("train",) for w in (data / "wikitext-2" / f"wiki.{split}.tokens").read_text().split()}
    with pytest.raises(SystemExit):  # lm summary takes --config and --vocab_size only: the data root is recipe text
        main(["summary", "--config", str(recipe), "--data.root", str(data)])
    capsys.readouterr()
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"data": {"root": str(data), "cache_dir": str(tmp_path / "cache")}}))
    assert main(["summary", "--config", str(recipe), "--config", str(over)]) == 0
    out = capsys.readouterr().out
    size = int(re.search(r"vocabulary ([\d,]+) \(counted on wikitext-2\)", out)[1].replace(",", ""))
    assert size > len(words)  # the training words plus <eos>/<unk> and the like (the data module's Vocab)
    assert size == corpus_vocab_size({"corpus": "wikitext-2", "root": str(data), "cache_dir": str(tmp_path / "c2")})


def test_summary_of_an_overlay_stack(tmp_path, capsys):
    recipe = CONFIGS / "wikitext103" / "glam_small.yaml"
    s_authors = summarize(model_config(resolve_recipe([str(recipe)])["model"]), 267735)
    s_xl = summarize(model_config(resolve_recipe([str(recipe), str(CONFIGS / "moe" / "xl_blocks.yaml"),
                                                  str(CONFIGS / "moe" / "glam_alternating.yaml")])["model"]), 267735)
    assert [r["kind"] for r in s_authors["layers"]] == ["moe", "dense", "none", "none", "moe", "dense"]
    assert [r["kind"] for r in s_xl["layers"]] == ["dense", "moe"] * 3
    assert s_authors["layers"][0]["params"] - s_xl["layers"][1]["params"] == 2 * 144  # the inner LayerNorm


# -------------------------------------------------- the authors' parameter count vs docs/parity.md's table
def authors_params(V: int, H: int, inner: int, heads: int, span: int, kinds: list[str], E: int = 16) -> int:
    """``sum(p.numel())`` of their ``TransformerSeq`` (models.py at the commit read), from its module shapes:
    ``in_emb`` Embedding(V, H); ``out_emb`` Linear(H, V) with bias; ``key_pe`` [1, H/heads, span]; every layer
    ``MultiHeadSeqAttention`` (4 bias-free Linear(H, H)) and norm1, norm2, norm3 (all three built in every layer);
    a ``g`` layer ``CustomizedMoEPositionwiseFF``: gate Linear(H, E) with bias, ``_Expert`` = FMoELinear
    [E, inner, H] + bias [E, inner] and [E, H, inner] + bias [E, H], and its own LayerNorm; an ``f`` layer
    ``FeedForwardLayer``: Linear(H, inner) + Linear(inner, H), biases."""
    total = V * H + (H * V + V) + (H // heads) * span
    for kind in kinds:
        total += 4 * H * H + 3 * 2 * H
        if kind == "moe":
            total += (H * E + E) + E * (inner * H + inner) + E * (H * inner + H) + 2 * H
        elif kind == "dense":
            total += (H * inner + inner) + (inner * H + H)
    return total


WT103_VOCAB = 267735  # their Corpus counts train + valid + test (docs/parity.md)
# recipe -> (H, inner, heads, span, layout of their script, vocabulary)
AUTHORS_SHAPES = {
    "wikitext103/switch_medium": (352, 352, 8, 1024, authors_layers("sgegegegegeg", 6, "transformer"), WT103_VOCAB),
    "wikitext103/switch_medium_softmax": (352, 352, 8, 1024, authors_layers("sgsgsgsgsgsg", 6, "transformer"),
                                          WT103_VOCAB),
    "wikitext103/switch_large": (512, 512, 8, 2048, authors_layers("rgeg" * 6, 12, "transformer"), WT103_VOCAB),
    "wikitext103/glam_small": (144, 144, 8, 2048, authors_layers("rgefegefegef", 3, "glam"), WT103_VOCAB),
    "wikitext103/glam_medium": (352, 352, 8, 2048, authors_layers("rgef" * 6, 6, "glam"), WT103_VOCAB),
    "enwik8/switch_medium": (352, 352, 8, 2048, authors_layers("rgeg" * 4, 8, "transformer"), None),
}


def parity_table() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "parity.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `configs/([\w/]+)\.yaml` \|(.*)\|\s*$", line)
        if m:
            rows[m[1]] = [c.strip() for c in m[2].split("|")]
    return rows


def number(cell: str) -> int:
    return int(re.sub(r"[^\d]", "", cell))


@pytest.mark.parametrize("recipe", sorted(AUTHORS_SHAPES))
def test_docs_table_parameter_counts(recipe):
    """The table's authors' column is the formula above; its project column is ``lm summary``'s total."""
    H, inner, heads, span, kinds, vocab = AUTHORS_SHAPES[recipe]
    row = parity_table()[recipe]  # script | layout | authors' params | project params
    cfg = model_config(resolve_recipe([str(CONFIGS / f"{recipe}.yaml")])["model"])
    assert cfg.ffn.layer_kinds(cfg.n_layer) == kinds  # the recipe builds their layout
    if vocab is None:  # EnWik8: their vocabulary is the symbols of their prepared files (not known here); ours: bytes
        assert row[2].startswith("—")
        assert number(row[3].split("(")[0]) == summarize(cfg, corpus_vocab_size({"corpus": "enwik8"}))["total"]
        return
    assert number(row[2]) == authors_params(vocab, H, inner, heads, span, kinds)
    assert number(row[3]) == summarize(cfg, vocab)["total"]


# ------------------------------------------------------------------------------------ end to end (slow)
SHRINK = ["--model.d_model", "16", "--model.n_head", "2", "--model.d_head", "8", "--model.d_inner", "16",
          "--model.ffn.d_expert", "8", "--model.ffn.n_experts", "4", "--model.mem_len", "8", "--model.cutoffs", "[20]",
          "--data.corpus", "wikitext-2", "--data.batch_size", "2", "--data.tgt_len", "8",
          "--data.eval.batch_size", "2", "--trainer.max_steps", "3", "--trainer.precision", "32-true",
          "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.val_check_interval", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,kinds", [
    ("wikitext103/glam_small", ["moe", "dense", "none", "none", "moe", "dense"]),
    ("wikitext103/switch_medium", ["moe"] * 6),
])
def test_authors_network_fits_and_finetunes(recipe, kinds, tmp_path, monkeypatch):
    from test_sst2 import sentences, write_tsv

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "data", n_words=60, lines=(80, 10, 10), min_len=4, max_len=12)
    run = tmp_path / "run"
    assert main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), *SHRINK, "--data.root", str(corpus),
                 "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(run)]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp = state["hyper_parameters"]
    assert hp["dropout_placement"] == "authors" and hp["weight_init"] == "torch"
    nested = {int(k.split(".")[2]) for k in state["state_dict"] if ".norm_ffn." in k}
    assert nested == {i for i, k in enumerate(kinds) if k == "moe"}
    with_ffn = {int(k.split(".")[2]) for k in state["state_dict"] if re.match(r"net\.layers\.\d+\.ffn\.", k)}
    assert with_ffn == {i for i, k in enumerate(kinds) if k != "none"}

    sst = tmp_path / "sst"
    write_tsv(sst / "glue" / "SST-2" / "train.tsv", sentences(48, 0))
    write_tsv(sst / "glue" / "SST-2" / "dev.tsv", sentences(16, 1))
    ft = tmp_path / "ft"
    assert main(["finetune", "fit", "--config", str(CONFIGS / "sst2" / "paper.yaml"), "--data.root", str(sst),
                 "--model.pretrained", str(ckpt), "--trainer.default_root_dir", str(ft), "--trainer.max_epochs", "1",
                 "--trainer.enable_progress_bar", "false"]) == 0
    result = json.loads((ft / "results" / "sst2-dev.json").read_text())
    assert result["history"] and result["history"][-1]["dev_scored"] == 16
    fstate = torch.load(ft / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    # the classifier's decoder is the same authors' network: the inner LayerNorms came across from pretraining
    for i in nested:
        key = f"layers.{i}.norm_ffn.weight"
        got = [v for k, v in fstate.items() if k.endswith(key)]
        assert len(got) == 1
    none = [i for i, k in enumerate(kinds) if k == "none"]
    assert not any(re.search(rf"layers\.{i}\.(ffn|norm2)\.", k) for k in fstate for i in none)


def test_finetuning_decoder_drops_same_length_with_the_memory():
    """The MoE recipes pretrain with same_length (every query sees mem_len keys); the classifier's decoder has no
    memory, and ModelConfig refuses same_length without one: decoder_config must drop both together."""
    from lm.tasks.pretrained import decoder_config

    cfg = ModelConfig(n_layer=2, pos="relative", mem_len=16, same_length=True, cutoffs=[10])
    out = decoder_config(cfg, fresh_vocab=True, dropout=None, dropless_moe=True)
    assert out.mem_len == 0 and out.same_length is False
