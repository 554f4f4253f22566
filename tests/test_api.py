"""lm.load / score / generate, `lm generate`, `lm export`: on tiny models of every attention variant and MoE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import train_tiny

import lm
from lm.api import Model
from lm.cli import main
from lm.data.tokenizer import Vocab
from lm.errors import CheckpointError, ConfigError
from lm.model.attention import ATTENTION
from lm.tasks.lm_module import LanguageModel

WORDS = ["<eos>"] + [f"w{i}" for i in range(30)] + ["<unk>"]
TEXT = " w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 \n w3 w4 zzz w5 \n"  # zzz -> <unk>


def tiny(attention: str, pos: str = "absolute", ffn: str = "dense", seed: int = 0, **attn_options) -> LanguageModel:
    torch.manual_seed(seed)
    relative = pos == "relative"
    module = LanguageModel(
        vocab_size=len(WORDS), tgt_len=8, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0,
        pos=pos, mem_len=8 if relative else 0, adaptive=False, cutoffs=[],
        init_std=0.5,  # well-separated logits: greedy choices are not near-ties
        attention={"name": attention, "layers": "all", "options": attn_options},
        ffn={"name": ffn, "n_experts": 4, "capacity_factor": None, "eval_capacity_factor": None},
        eval={"protocol": "memory" if relative else "segments", "batch_size": 1})
    return module.eval()


def save_ckpt(module: LanguageModel, path: Path) -> Path:
    """What `lm fit` stores and `lm.load` reads: hyper-parameters, state_dict, vocabulary."""
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "lm_vocab": Vocab.from_words(WORDS).state(), "lm_data": {"corpus": "wikitext-2"}}, path)
    return path


# Variants with Transformer-XL's relative positions (and so memory); the others run absolute only.
RELATIVE = sorted(n for n, c in ATTENTION.items() if c.supports_relative)
CASES = [(n, "absolute", "dense") for n in sorted(ATTENTION)] + [(n, "relative", "dense") for n in RELATIVE] + \
        [("softmax", "relative", "switch"), ("elliptical", "absolute", "glam")]


def options(name: str) -> dict:
    # Elliptical's default estimator averages over the whole segment, later tokens included: only the
    # causal (prefix) estimator gives a token the same output whether the text comes at once or piecewise.
    return {"estimator": "causal"} if name.startswith("elliptical") else {}


@pytest.mark.parametrize("name, pos, ffn", CASES)
def test_score_generate_export_every_variant(name, pos, ffn, tmp_path):
    ckpt = save_ckpt(tiny(name, pos, ffn, **options(name)), tmp_path / "m.ckpt")
    model = lm.load(ckpt)
    s = model.score(TEXT)
    # 16 tokens incl. one <eos> per line; the preceding line break is context, never scored
    assert s.tokens == 16 == len(s.token_nll)
    assert s.nll == pytest.approx(sum(s.token_nll) / 16) and s.ppl == pytest.approx(math.exp(s.nll))
    assert s.bpc == pytest.approx(s.nll / math.log(2))
    # segments protocol, window 8: a naive per-window forward gives the same per-token NLLs
    if pos == "absolute":
        ids = [0] + model.encode(TEXT)
        naive = []
        for i in range(0, len(ids) - 1, 8):
            x, y = torch.tensor([ids[i:i + 8]]), torch.tensor([ids[i + 1:i + 9]])
            naive += model.net.nll(model.net(x[:, :y.size(1)]).hidden, y)[0].tolist()
        assert s.token_nll == pytest.approx(naive, abs=1e-5)
    a = model.generate("w1 w2", max_new_tokens=6, temperature=0.9, top_k=5, seed=3)
    assert a == model.generate("w1 w2", max_new_tokens=6, temperature=0.9, top_k=5, seed=3)  # seeded
    ids = model.generate_ids(model.encode("w1 w2", final_newline=False), 6, temperature=0.9, top_k=5, seed=3)
    assert len(ids) == 6 and a.strip() == model.decode(ids).strip()
    greedy = model.generate_ids(model.encode("w1 w2", final_newline=False), 10, temperature=0)
    assert greedy == model.generate_ids(model.encode("w1 w2", final_newline=False), 10, temperature=0, cache=False)
    # export -> load: the same log-probabilities, bit for bit
    model.lm.cpu()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exp")]) == 0
    again = lm.load(tmp_path / "exp")
    assert again.score(TEXT).token_nll == s.token_nll


@pytest.mark.parametrize("name", RELATIVE)
def test_incremental_decoding_equals_full_recompute(name):
    """The XL memory path, one token at a time, gives the full forward's hidden states (every position)."""
    module = tiny(name, "relative", **options(name))
    ids = torch.tensor([[0, 3, 5, 7, 2, 9, 11, 4, 6, 8, 1, 12]])  # 12 tokens > tgt_len: memory is used
    full = module.net(ids, None, mem_len=0).hidden
    mems, steps = None, []
    for t in range(ids.size(1)):
        out = module.net(ids[:, t:t + 1], mems, mem_len=ids.size(1))
        mems = out.mems
        steps.append(out.hidden)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    m = Model(module, Vocab.from_words(WORDS))
    prompt = [3, 5, 7]
    assert m.generate_ids(prompt, 9, temperature=0) == m.generate_ids(prompt, 9, temperature=0, cache=False)


def test_cached_generation_does_not_recompute(monkeypatch):
    """Relative setting: after the prompt, each new token is one forward of ONE position."""
    m = Model(tiny("softmax", "relative"), Vocab.from_words(WORDS))
    lengths = []
    forward = m.net.forward

    def spy(tokens, *a, **k):
        lengths.append(tokens.size(1))
        return forward(tokens, *a, **k)

    monkeypatch.setattr(m.net, "forward", spy)
    m.generate_ids([3, 5, 7, 9], 5, temperature=0)
    assert lengths == [5, 1, 1, 1, 1]  # <eos> + 4 prompt tokens, then one per new token (not after the last)


def test_encode_decode_roundtrip_and_prompt_continuation():
    m = Model(tiny("softmax"), Vocab.from_words(WORDS))
    assert m.encode(" w1 w2 \n w3 ") == [2, 3, 0, 4, 0]
    assert m.encode("w1 w2", final_newline=False) == [2, 3]
    assert m.decode([2, 3, 0, 4]) == "w1 w2\nw3 "


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("api"), adaptive=True, cutoffs=[10])["ckpt"]


def test_export_of_a_fit_checkpoint_is_weights_only_and_exact(fitted, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(fitted), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "model.safetensors").stat().st_size < fitted.stat().st_size / 2  # no optimizer state
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hyper_parameters"]["cutoffs"] == [10] and cfg["data"]["corpus"] == "wikitext-2"
    assert "lm.load(" in (out / "README.md").read_text()
    text = " w1 w2 w3 \n w4 w5 w6 w7 w8 w9 w10 w11 w12 \n"
    a, b = lm.load(fitted).score(text), lm.load(out).score(text)
    assert a.token_nll == b.token_nll and a.tokens == b.tokens == 14


def test_generate_cli_prints_prompt_and_continuation(fitted, capsys):
    assert main(["generate", "--ckpt", str(fitted), "--prompt", "w1 w2", "--max_new_tokens", "5", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    expected = lm.load(fitted).generate("w1 w2", max_new_tokens=5, seed=1)  # the same defaults
    assert printed == "w1 w2" + expected + "\n" and len(expected.split()) >= 1


def test_bad_paths_are_one_paragraph(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such checkpoint or folder"):
        lm.load(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert main(["generate", "--ckpt", str(tmp_path / "half"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors, tokenizer.json missing" in err and "lm export" in err and "Traceback" not in err


# ----- issue 30: generation and scoring edges, one set of defaults, top-p, samples, batched scores ---------
def test_empty_generation_and_texts_with_nothing_to_score():
    m = Model(tiny("softmax"), Vocab.from_words(WORDS))
    assert m.generate("w1 w2", max_new_tokens=0) == ""  # was ' '
    for text in ("", "   ", " \n \n"):
        with pytest.raises(ConfigError, match="nothing to score") as e:
            m.score(text)
        assert "split" not in str(e.value)
    assert m.score("w1").tokens == 2  # w1 and its <eos>
    assert m.generate(b"w1 w2", max_new_tokens=3, seed=1) == m.generate("w1 w2", max_new_tokens=3, seed=1)  # UTF-8


def test_cli_and_python_share_one_set_of_generation_defaults():
    import inspect

    from lm.generate import generate

    cli = inspect.signature(generate).parameters
    py = inspect.signature(Model.generate).parameters
    shared = ["max_new_tokens", "temperature", "top_k", "top_p", "seed", "cache", "stop_at_eos"]
    assert {k: cli[k].default for k in shared} == {k: py[k].default for k in shared}
    assert py["top_k"].default is None and py["seed"].default == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)
    draws = [Model._sample(logp, 1.0, None, 0.7, gen) for _ in range(4000)]
    # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1 remain, renormalised to 0.5/0.8 and 0.3/0.8
    assert set(draws) == {0, 1}
    assert draws.count(0) / len(draws) == pytest.approx(0.625, abs=0.03)
    assert {Model._sample(logp, 1.0, None, 0.4, gen) for _ in range(200)} == {0}  # the first token alone reaches p
    assert len({Model._sample(logp, 1.0, None, 1.0, gen) for _ in range(400)}) == 4  # 1.0: no limit


def test_stop_at_eos_and_several_samples(monkeypatch):
    m = Model(tiny("softmax"), Vocab.from_words(WORDS))
    script = iter([3, 4, 0, 5, 6] * 4)
    monkeypatch.setattr(Model, "_sample", staticmethod(lambda *a: next(script)))
    assert m.generate("w1", max_new_tokens=5) == " w2 w3\nw4 w5"
    assert m.generate("w1", max_new_tokens=5, stop_at_eos=True) == " w2 w3"
    monkeypatch.undo()
    samples = m.generate("w1 w2", max_new_tokens=6, temperature=1.0, seed=5, num_samples=3)
    assert isinstance(samples, list) and len(samples) == 3 and len(set(samples)) > 1
    assert samples[0] == m.generate("w1 w2", max_new_tokens=6, temperature=1.0, seed=5)
    assert samples == m.generate("w1 w2", max_new_tokens=6, temperature=1.0, seed=5, num_samples=3)


def test_generate_cli_prompt_file_and_samples(tmp_path, capsys):
    ckpt = save_ckpt(tiny("softmax"), tmp_path / "m.ckpt")
    (tmp_path / "prompt.txt").write_text("w1 w2", encoding="utf-8")
    base = ["generate", "--ckpt", str(ckpt), "--max_new_tokens", "4", "--seed", "2"]
    assert main(base + ["--prompt_file", str(tmp_path / "prompt.txt")]) == 0
    expected = lm.load(ckpt).generate("w1 w2", max_new_tokens=4, seed=2)
    assert capsys.readouterr().out == "w1 w2" + expected + "\n"
    assert main(base + ["--prompt", "w1 w2", "--num_samples", "2", "--top_p", "0.9"]) == 0
    out = capsys.readouterr().out
    two = lm.load(ckpt).generate("w1 w2", max_new_tokens=4, seed=2, top_p=0.9, num_samples=2)
    assert out == "".join(f"--- sample {i + 1} of 2 ---\nw1 w2{t}\n" for i, t in enumerate(two))


@pytest.mark.parametrize("name, pos", [("softmax", "relative"), ("elliptical", "absolute")])
def test_score_many_equals_one_text_at_a_time(name, pos):
    m = Model(tiny(name, pos), Vocab.from_words(WORDS))  # elliptical: the default (whole-segment) estimator
    texts = [TEXT, "w1 w2", " ".join(f"w{i % 30}" for i in range(27)), "w5 \n w6 w7 \n"]
    batched = m.score_many(texts, batch_size=3)
    assert [s.tokens for s in batched] == [16, 3, 28, 5]
    for s, text in zip(batched, texts):
        assert s.token_nll == pytest.approx(m.score(text).token_nll, abs=1e-5)
    with pytest.raises(ConfigError, match="list of texts"):
        m.score_many("w1 w2")


def test_score_keeps_padding_out_of_the_last_segment():
    """A short last segment is padded; the padding must not change the real tokens (the key mask `lm test` uses):
    with Elliptical's whole-segment estimator the scores equal a forward over the unpadded text."""
    m = Model(tiny("elliptical"), Vocab.from_words(WORDS))
    ids = [0] + m.encode("w1 w2 w3")  # 4 ids, 3 targets: one segment of 3 < tgt_len 8
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    naive = m.net.nll(m.net(x).hidden, y)[0].tolist()
    assert m.score("w1 w2 w3").token_nll == pytest.approx(naive, abs=1e-5)


def test_byte_level_stream_completes_characters_and_stops_at_the_line_end(monkeypatch):
    torch.manual_seed(0)
    module = LanguageModel(vocab_size=256, unit="byte", tgt_len=8, n_layer=1, d_model=16, n_head=2, d_head=8,
                           d_inner=32, dropout=0.0, adaptive=False, cutoffs=[],
                           attention={"name": "softmax", "layers": "all", "options": {}})
    m = Model(module, Vocab.byte_level())
    script = iter(list("aé€\n".encode()) * 2)
    monkeypatch.setattr(Model, "_sample", staticmethod(lambda *a: next(script)))
    # 'é' is two bytes and '€' three: each comes out whole, once its last byte is sampled
    assert list(m.stream("x", max_new_tokens=7)) == ["a", "é", "€", "\n"]
    assert m.generate("x", max_new_tokens=7, stop_at_eos=True) == "aé€"
    with pytest.raises(ConfigError, match="nothing to score"):
        m.score("")
    assert m.score("  ").tokens == 3  # bytes are tokens: two spaces and the line break
