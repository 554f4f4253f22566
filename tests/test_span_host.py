"""The span host (``model.pos: span``, the MoE authors' adaptive-span Transformer), Elliptical in it, the
authors' ``full_eval`` protocol and the train+valid+test vocabulary (issue 29, points 5-7).

References are written independently of the implementation: a per-query loop over the span indexed by
distance (no skew trick), a naive m̂ over cache + block positions, the authors' evaluation loop transcribed
as a while loop, and hand-counted scored targets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import write_config, write_corpus
from lm.config import AttentionConfig, EvalConfig, ModelConfig
from lm.data.protocols import check_protocol, eval_batches
from lm.errors import ConfigError, DataError
from lm.model.adaptive import AdaptiveEmbedding
from lm.model.attention import AttnContext, LayerState, build_attention
from lm.model.positions import span_mask
from lm.model.transformer import TransformerLM

B, H, D, DM = 2, 2, 4, 8


def _span_reference(attn, h, mem, key_pe, m_hat=None):
    """Attention output, one query at a time: query i (index L+i in [cache; block]) reads the keys at
    distances 1..L, i.e. indices L+i-1 .. i, with position vector key_pe[:, L - distance]; the stretch
    m̂ (if any) multiplies the query of both terms; (q·k + q·pe)/sqrt(D)."""
    L, T = mem.size(1), h.size(1)
    x = torch.cat([mem, h], dim=1)
    q, k, v = attn.qkv(x).view(B, L + T, 3, H, D).permute(2, 0, 3, 1, 4)  # [B, H, L+T, D]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for hd in range(H):
            for i in range(T):
                qi = q[b, hd, L + i].double()
                if m_hat is not None:
                    qi = qi * m_hat[b, hd].double()
                logits, vals = [], []
                for dist in range(1, L + 1):
                    j = L + i - dist
                    logits.append((qi @ k[b, hd, j].double() + qi @ key_pe[0, :, L - dist].double()) / math.sqrt(D))
                    vals.append(v[b, hd, j].double())
                w = torch.softmax(torch.stack(logits), 0)
                out[b, hd, i] = (w[:, None] * torch.stack(vals)).sum(0)
    out = out.transpose(1, 2).reshape(B, T, H * D).to(h.dtype)
    return attn.o(out), v


@pytest.mark.parametrize("T, L", [(3, 5), (6, 4)])  # a block shorter and longer than the span
def test_span_attention_matches_a_per_query_loop(T, L):
    torch.manual_seed(0)
    attn = build_attention("softmax", d_model=DM, n_head=H, d_head=D, span=True).eval()
    h, mem, key_pe = torch.randn(B, T, DM), torch.randn(B, L, DM), torch.randn(1, D, L)
    out, state = attn(h, mem, AttnContext(mask=span_mask(T, L, "cpu"), key_pe=key_pe), None)
    ref, _ = _span_reference(attn, h, mem, key_pe)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not hasattr(attn, "r_net") and not hasattr(attn, "r_w_bias")  # no XL u/v biases, no W_R
    assert attn.qkv.bias is None and attn.o.bias is None


def test_span_excludes_the_current_token_and_sees_exactly_span_keys():
    mask = span_mask(3, 4, "cpu")  # [T, L+T]: query i at key index 4+i
    assert mask.sum(1).tolist() == [4, 4, 4]
    assert not mask[torch.arange(3), 4 + torch.arange(3)].any()  # never itself
    assert mask[0, :4].all() and mask[2, 2:6].all() and not mask[2, :2].any()


def test_elliptical_in_span_host_matches_naive_w_over_cache_and_block():
    """W = mean over all L + T positions (the zero cache included) of |v - v_prev|, max-normalised per
    (sequence, head); the stretched query multiplies both the content and the key_pe term, then 1/sqrt(D)."""
    torch.manual_seed(1)
    T, L = 3, 4
    attn = build_attention("elliptical", d_model=DM, n_head=H, d_head=D, layer_idx=1, span=True,
                           options={"stretch_position": True, "scale": "sqrt"}).eval()
    h, key_pe = torch.randn(B, T, DM), torch.randn(1, D, L)
    mem = torch.zeros(B, L, DM)  # the first block: the cache is zeros
    v_prev = torch.randn(B, H, L + T, D)
    v_prev[:, :, :L] = 0  # the previous layer's values on the zero cache are zero too (bias-free projections)
    out, state = attn(h, mem, AttnContext(mask=span_mask(T, L, "cpu"), key_pe=key_pe), LayerState(values=v_prev))
    v = state.values
    assert torch.count_nonzero(v[:, :, :L]) == 0
    m = torch.zeros(B, H, D)
    for b in range(B):
        for hd in range(H):
            total = torch.zeros(D)
            for n in range(L + T):
                total += (v[b, hd, n] - v_prev[b, hd, n]).abs()
            m[b, hd] = total / (L + T)
            m[b, hd] = m[b, hd] / m[b, hd].max()
    ref, _ = _span_reference(attn, h, mem, key_pe, m_hat=m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    plain, _ = _span_reference(attn, h, mem, key_pe)
    assert not torch.allclose(out, plain, atol=1e-4)  # the stretch changed something


def _span_cfg(**kw):
    base = dict(n_layer=3, d_model=DM, n_head=H, d_head=D, d_inner=16, dropout=0.0, pos="span", mem_len=5,
                adaptive=False, cutoffs=[], tie_weight=False, embed_scale=False)
    return ModelConfig(**{**base, **kw})


def test_span_decoder_starts_from_a_zero_cache_and_keeps_span_positions():
    torch.manual_seed(2)
    net = TransformerLM(_span_cfg(), vocab_size=30).eval()
    assert net.key_pe.shape == (1, D, 5)  # one table for every layer
    x = torch.randint(0, 30, (B, 7))
    zeros = [torch.zeros(B, 5, DM) for _ in range(3)]
    a, b = net(x), net(x, zeros)
    torch.testing.assert_close(a.hidden, b.hidden)  # no memory = the authors' zero cache
    assert [m.shape for m in a.mems] == [(B, 5, DM)] * 3
    inp0 = net.embed(x)  # layer 0's input, its last 5 positions become the cache
    torch.testing.assert_close(a.mems[0], inp0[:, -5:])
    c = net(x[:, :3])  # a block shorter than the span: the cache keeps zeros in front
    assert torch.count_nonzero(c.mems[0][:, :2]) == 0
    torch.testing.assert_close(net.embed(x[:, :1]), net.embed.emb_layers[0](x[:, :1]))  # unscaled embedding
    with pytest.raises(ConfigError, match="exactly model.mem_len=5"):
        net(x, mem_len=9)


def test_embed_scale_option():
    torch.manual_seed(3)
    scaled, plain = AdaptiveEmbedding(20, 8, 8, []), AdaptiveEmbedding(20, 8, 8, [], scale=False)
    plain.load_state_dict(scaled.state_dict())
    t = torch.tensor([[1, 5]])
    torch.testing.assert_close(scaled(t), plain(t) * math.sqrt(8))
    torch.testing.assert_close(plain(t), plain.emb_layers[0].weight[t])


@pytest.mark.parametrize("bad, words", [
    (dict(mem_len=0), "mem_len >= 1"),
    (dict(clamp_len=4), "clamp_len"),
    (dict(attention=AttentionConfig(name="mom")), "no key_pe position term"),
    (dict(abs_pos_order="down"), "abs_pos_order"),
])
def test_span_incompatible_settings_fail_at_construction(bad, words):
    # The config's own rules fail when it is built; a variant without key_pe when the model is (the registry
    # is the model's: lm.model.attention.check_config), before any weight is drawn.
    with pytest.raises(ConfigError, match=words):
        TransformerLM(_span_cfg(**bad), 10)


def test_protocol_checks():
    with pytest.raises(ConfigError, match="needs a model with memory"):
        check_protocol(EvalConfig(protocol="full_eval"), ModelConfig())
    with pytest.raises(ConfigError, match="eval.mem_len=9 cannot be used"):
        check_protocol(EvalConfig(protocol="memory", mem_len=9), _span_cfg())
    check_protocol(EvalConfig(protocol="full_eval"), _span_cfg())  # fine


def _authors_loop(n: int, columns: int, block: int) -> list[int]:
    """trainer.full_eval over data._batchify: the block starts it scores, transcribed."""
    C = n // columns
    starts, pos = [], 0
    for _ in range(math.ceil(C / block)):
        starts.append(pos)
        pos += block
        if pos >= C - block:
            break
    return starts


@pytest.mark.parametrize("n, columns, block", [(47, 3, 4), (50, 3, 4), (1000, 7, 16), (245569, 48, 512)])
def test_full_eval_batches_follow_the_authors_loop(n, columns, block):
    b = eval_batches(torch.arange(n), EvalConfig(protocol="full_eval", batch_size=columns), block)
    starts = _authors_loop(n, columns, block)
    C = n // columns
    assert len(b) == len(starts) and b.targets == n - 1 and b.scored == columns * block * len(starts)
    if n < 2000:
        got = list(b)
        for j, (batch, p) in enumerate(zip(got, starts)):
            assert batch["first"] == (j == 0) and batch["mask"].all() and batch["real"].all()
            want = torch.stack([torch.arange(i * C + p, i * C + p + block) for i in range(columns)])
            assert torch.equal(batch["input"], want) and torch.equal(batch["target"], want + 1)


def test_full_eval_scored_fraction_by_hand():
    # 47 tokens, 3 columns of 15 (tokens 45, 46 dropped), blocks of 4 at 0, 4, 8 (12 >= 15 - 4 stops):
    # targets 1..12 of each column scored: 36 of the 46 targets.
    b = eval_batches(torch.arange(47), EvalConfig(protocol="full_eval", batch_size=3), 4)
    assert (len(b), b.scored, b.targets) == (3, 36, 46)
    scored = sorted(int(t) for batch in b for t in batch["target"][batch["mask"]])
    assert scored == [c * 15 + k for c in range(3) for k in range(1, 13)]
    # WikiText-103 test (245,569 tokens), 48 columns, blocks of 512: 9 blocks of 5,116 -> 221,184 targets, 90.07%.
    w = eval_batches(torch.zeros(245569, dtype=torch.long), EvalConfig(protocol="full_eval", batch_size=48), 512)
    assert (len(w), w.scored) == (9, 221184) and round(w.scored / w.targets, 4) == 0.9007
    with pytest.raises(DataError, match="nothing whole can be scored"):
        eval_batches(torch.arange(20), EvalConfig(protocol="full_eval", batch_size=4), 5)


def test_vocabulary_counted_on_train_valid_test(tmp_path):
    from lm.data.datamodule import LMDataModule

    d = tmp_path / "wikitext-2"
    d.mkdir()
    for split, text in (("train", " a b a \n"), ("valid", " c a \n"), ("test", " d \n")):
        (d / f"wiki.{split}.tokens").write_text(text)
    kw = dict(root=str(tmp_path), source="local", cache_dir=str(tmp_path / "cache"))
    train_only = LMDataModule(**kw).vocab
    allsplits = LMDataModule(**kw, vocab_splits=["train", "valid", "test"]).vocab
    assert train_only.token_to_id("c") is None and train_only.token_to_id("d") is None
    assert all(allsplits.token_to_id(w) is not None for w in "abcd")
    with pytest.raises(ConfigError, match="vocab_splits"):
        LMDataModule(**kw, vocab_splits=["test"])


@pytest.mark.slow
def test_tiny_span_model_trains_through_lm_fit_and_tests_under_full_eval(tmp_path, monkeypatch):
    from lm.cli import main

    monkeypatch.chdir(tmp_path)  # lm evaluate's token cache (./.cache) stays in the test's folder
    data = write_corpus(tmp_path / "data")
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data, tmp_path / "cache", pos="span", mem_len=6,
                       tie_weight=False, embed_scale=False,
                       attention={"name": "elliptical", "layers": "1:", "options": {"stretch_position": True}})
    assert main(["fit", "--config", str(cfg), "--data.vocab_splits", "[train, valid, test]"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.vocab_splits", "[train, valid, test]",
                 "--data.eval.protocol", "full_eval", "--data.eval.batch_size", "3",
                 "--trainer.limit_test_batches", "1.0"]) == 0
    result = json.loads((tmp_path / "run" / "results" / "test-full_eval.json").read_text())
    n = result["data"]["tokens"]
    C = n // 3
    blocks = math.ceil((C - 8) / 8)
    assert result["targets_in_split"] == n - 1 and result["tokens_scored"] == 3 * 8 * blocks
    assert result["scored_fraction"] == round(3 * 8 * blocks / (n - 1), 6) < 1
    assert math.isfinite(result["ppl"])
    # lm evaluate under the same protocol: the same number, and the table says how much was scored
    assert main(["evaluate", "--ckpts", str(ckpt), "--corruptions", "", "--root", str(data), "--source", "local",
                 "--protocol", "full_eval", "--batch_size", "3", "--out", str(tmp_path / "ev")]) == 0
    clean = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"][0]["results"]["clean"]
    assert clean["tokens_scored"] == result["tokens_scored"] and clean["nll"] == pytest.approx(result["nll"], rel=1e-6)
    assert f"of {n - 1} targets ({100 * result['scored_fraction']:.2f}%)" in (tmp_path / "ev" / "table.md").read_text()


@pytest.mark.parametrize("span", [1, 2, 6])  # the window inside the pads, reaching the cache, longer than the row
@pytest.mark.parametrize("attention", ["softmax", "elliptical"])
def test_span_left_padded_row_equals_the_row_alone(span, attention):
    """The classifier's left padding: the span and its key_pe distances count real positions only, so a
    padded row (next to an unpadded one) gives what the sentence gives alone, and pad rows stay finite."""
    torch.manual_seed(4)
    att = AttentionConfig(name=attention, layers="1:", options={"stretch_position": True} if attention != "softmax" else {})
    net = TransformerLM(_span_cfg(mem_len=span, attention=att), vocab_size=30, lm_head=False).eval()
    real = torch.randint(1, 30, (1, 4))
    alone = net(real, mem_len=0).hidden
    other = torch.randint(1, 30, (1, 8))
    batch = torch.cat([torch.cat([torch.full((1, 4), 7), real], 1), other])
    keys = torch.tensor([[False] * 4 + [True] * 4, [True] * 8])
    out = net(batch, mem_len=0, key_mask=keys)
    assert torch.isfinite(out.hidden).all() and out.mems is None
    torch.testing.assert_close(out.hidden[:1, 4:], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.hidden[1:], net(other, mem_len=0).hidden, rtol=1e-5, atol=1e-6)


MOE_RECIPES = ["wikitext103/switch_medium", "wikitext103/switch_medium_softmax", "wikitext103/switch_large",
               "wikitext103/glam_small", "wikitext103/glam_medium", "enwik8/switch_medium"]


def _resolved(capsys, *configs):
    import yaml

    from lm.cli import main

    with pytest.raises(SystemExit):
        main(["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", MOE_RECIPES)
def test_moe_recipes_use_the_span_host_and_full_eval(recipe, capsys):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = _resolved(capsys, configs / f"{recipe}.yaml")
    m, d = cfg["model"], cfg["data"]
    assert (m["pos"], m["same_length"], m["adaptive"], m["tie_weight"], m["embed_scale"]) == ("span", False, False,
                                                                                               False, False)
    assert m["mem_len"] in (1024, 2048)  # their --attn-span
    assert d["eval"]["protocol"] == "full_eval" and d["eval"]["batch_size"] == d["batch_size"]
    assert d["vocab_splits"] == (["train", "valid", "test"] if recipe.startswith("wikitext103") else None)
    # the overlay gives the former Transformer-XL host back
    xl = _resolved(capsys, configs / f"{recipe}.yaml", configs / "moe" / "xl_host.yaml")
    assert (xl["model"]["pos"], xl["model"]["same_length"], xl["model"]["tie_weight"]) == ("relative", True, True)
    assert xl["data"]["eval"]["protocol"] == "memory" and xl["data"]["vocab_splits"] == ["train"]
