"""Data pipeline: corpora, vocabulary, token cache, ordered streams, resumption, the data module.

Expectations are computed by hand (or from the published WikiText-2 statistics), not by the code
under test.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lm.config import EvalConfig
from lm.data.cache import TokenCache
from lm.data.corpora import find_corpus, resolve_roots
from lm.data.datamodule import LMDataModule
from lm.data.streams import OrderedStreams
from lm.data.tokenizer import Vocab
from lm.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_wikitext(root: Path, train: str, valid: str = " b a \n", test: str = " a b \n", name="wikitext-2"):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            (d / f"wiki.{split}.tokens").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return root


# ----- vocabulary ----------------------------------------------------------------------------------
HAND = " b a b \n \n c a b z \n d z \n"
# lines: ['b','a','b'], [], ['c','a','b','z'], ['d','z']  (+ <eos> each: 4)
# counts: <eos> 4, b 3, a 2, z 2, c 1, d 1 -> a before z and c before d by first occurrence;
# <eos> is id 0 regardless; <unk> is absent from the text, so it is appended last.
HAND_VOCAB = ["<eos>", "b", "a", "z", "c", "d", "<unk>"]


def test_vocab_order_and_ids(tmp_path):
    v = Vocab.build(HAND.split("\n")[:-1])
    assert [v.id_to_token(i) for i in range(v.size)] == HAND_VOCAB
    assert v.size == 7 and v.unit == "word" and v.eos_id == 0 and v.unk_id == 6
    f = tmp_path / "t.txt"
    f.write_text(HAND, encoding="utf-8")
    # b a b <eos> | <eos> | c a b z <eos> | d z <eos>
    assert v.encode_file(f).tolist() == [1, 2, 1, 0, 0, 4, 2, 1, 3, 0, 5, 3, 0]
    assert v.encode_lines([" b q ", "zz d"]) == [[1, 6], [6, 5]]  # OOV -> <unk>
    assert v.encode_lines(["a"], add_eos=True) == [[2, 0]]


def test_vocab_keeps_existing_unk_and_case(tmp_path):
    v = Vocab.build(["<unk> The the <unk>", "the"])
    # the 2... <unk> 2 first seen -> <unk> before the; The 1
    assert [v.id_to_token(i) for i in range(v.size)] == ["<eos>", "<unk>", "the", "The"]


def test_line_splitting_matches_python(tmp_path):
    # CRLF and lone CR end lines (universal newlines); \x1c splits words like str.split() but not lines.
    f = tmp_path / "t.txt"
    f.write_bytes(b"a b\r\nb\ra\x1cb\n")
    v = Vocab.build(["a b", "b", "a\x1cb"])
    assert v.encode_file(f).tolist() == [v.token_to_id("a"), v.token_to_id("b"), 0,
                                         v.token_to_id("b"), 0, v.token_to_id("a"), v.token_to_id("b"), 0]


def test_vocab_save_load_roundtrip(tmp_path):
    from tokenizers import Tokenizer

    v = Vocab.build(HAND.split("\n"))
    v.save(tmp_path / "tokenizer.json")
    Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # a standard tokenizers file
    w = Vocab.load(tmp_path / "tokenizer.json")
    assert w.sha256 == v.sha256 and w.size == v.size
    assert w.encode_lines(["d z q"]) == v.encode_lines(["d z q"])
    # plain-data state for checkpoints (loadable with weights_only=True)
    torch.save({"lm_vocab": v.state(), "b": Vocab.byte_level().state()}, tmp_path / "x.ckpt")
    ck = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert Vocab.from_state(ck["lm_vocab"]).sha256 == v.sha256 and Vocab.from_state(ck["b"]).unit == "byte"
    b = Vocab.byte_level()
    b.save(tmp_path / "bytes.json")
    assert Vocab.load(tmp_path / "bytes.json").unit == "byte"
    assert Vocab.build(["a b"]).sha256 != v.sha256


@pytest.mark.skipif(not (SHARED / "wikitext-2" / "wiki.train.tokens").exists(), reason="no WikiText-2")
def test_real_wikitext2_counts(tmp_path):
    dm = LMDataModule(root=str(SHARED), cache_dir=str(tmp_path))
    assert dm.vocab_size == 33278
    assert [dm.tokens(s).numel() for s in ("train", "valid", "test")] == [2088628, 217646, 245569]
    v = dm.vocab
    assert v.id_to_token(0) == "<eos>" and v.id_to_token(1) == "the"
    unk = v.unk_id
    assert [int((dm.tokens(s) == unk).sum()) for s in ("train", "valid", "test")] == [54625, 11718, 15218]


# ----- corpora -------------------------------------------------------------------------------------
def test_missing_corpus_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataError, match="does not exist"):  # an explicit root is never silently skipped
        find_corpus("wikitext-103", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()  # there, but without the corpus: the other places are searched and listed
    files = find_corpus("wikitext-103", str(tmp_path / "cfg"))
    with pytest.raises(DataError) as e:
        files.read_bytes("train")
    msg = str(e.value)
    for place in (tmp_path / "cfg", tmp_path / "env"):
        assert str(place / "wikitext-103" / "wiki.train.tokens") in msg
    assert "wikitext-103-v1.zip" in msg and "LM_DATA_DIR" in msg and "data.source: download" in msg
    roots = resolve_roots(str(tmp_path / "cfg"))
    assert roots[:2] == [tmp_path / "cfg", tmp_path / "env"]
    assert Path(__file__).resolve().parents[2] / "shared" / "data" in roots
    with pytest.raises(ConfigError, match="wikitext-2"):
        find_corpus("wikitext2", None)


def test_splits_never_mixed_across_roots(tmp_path, monkeypatch):
    write_wikitext(tmp_path / "mine", train=None)
    write_wikitext(tmp_path / "env", train=" a \n")
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path / "env"))
    files = find_corpus("wikitext-2", str(tmp_path / "mine"))
    assert files.path("valid") == tmp_path / "mine" / "wikitext-2" / "wiki.valid.tokens"
    with pytest.raises(DataError, match="never mixed across roots"):
        files.path("train")
    over = tmp_path / "over.tokens"
    over.write_text(" x \n")
    assert find_corpus("wikitext-2", str(tmp_path / "mine"), overrides={"test": str(over)}).path("test") == over


def test_empty_and_bad_utf8(tmp_path):
    write_wikitext(tmp_path, train="", valid=b" a \xff b \n")
    files = find_corpus("wikitext-2", str(tmp_path))
    with pytest.raises(DataError, match="wiki.train.tokens.*empty"):
        files.read_bytes("train")
    with pytest.raises(DataError, match=r"wiki\.valid\.tokens is not valid UTF-8: byte offset 3") as e:
        files.read_lines("valid")
    assert "iconv" in str(e.value)


def make_enwik8(n=2000) -> bytes:
    rng = np.random.default_rng(0)
    words = ["<page>", "<title>", "Zürich", "naïve", "&amp;", "日本", "</text>", "[[link]]", "\n"]
    out = bytearray()
    while len(out) < n:
        out += (words[rng.integers(len(words))] + " ").encode("utf-8")
    return bytes(out[:n])


@pytest.mark.parametrize("layout", ["plain", "zip", "flat"])
def test_enwik8_splits(tmp_path, layout):
    data = make_enwik8(2000)
    assert any(b > 127 for b in data)
    if layout == "plain":
        (tmp_path / "enwik8").mkdir()
        (tmp_path / "enwik8" / "enwik8").write_bytes(data)
    elif layout == "zip":
        (tmp_path / "enwik8").mkdir()
        with zipfile.ZipFile(tmp_path / "enwik8" / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("enwik8", data)
    else:
        (tmp_path / "enwik8").write_bytes(data)
    dm = LMDataModule(corpus="enwik8", root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert dm.unit == "byte" and dm.vocab_size == 256
    parts = [dm.tokens(s) for s in ("train", "valid", "test")]
    assert [p.numel() for p in parts] == [1800, 100, 100]
    assert bytes(torch.cat(parts).tolist()) == data  # round trip, nothing lost or reordered
    assert dm.vocab.decode(parts[1].tolist()) == data[1800:1900].decode("utf-8", errors="replace")
    # the test range as a file of its own, usable as a test_file override
    f = dm.split_file("test")
    assert f.read_bytes() == data[1900:]
    dm2 = LMDataModule(corpus="enwik8", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), test_file=str(f))
    assert torch.equal(dm2.tokens("test"), parts[2])


# ----- token cache ---------------------------------------------------------------------------------
def test_cache_hit_stale_and_corruption(tmp_path, caplog):
    calls = []

    def build(src):
        def f():
            calls.append(src)
            return np.frombuffer(src, np.uint8).astype(np.int32)
        return f

    c = TokenCache(tmp_path)
    a = c.load_or_build("x", b"abc", "v1", build(b"abc"))
    b = c.load_or_build("x", b"abc", "v1", build(b"abc"))
    assert calls == [b"abc"] and a.tolist() == b.tolist() == [97, 98, 99]
    # edited source: new content -> rebuilt, never the old tokens; the old content keeps its own entry (the
    # study evaluates many corrupted test files under one label: each is tokenized once, not once per use)
    assert c.load_or_build("x", b"abd", "v1", build(b"abd")).tolist() == [97, 98, 100]
    assert c.load_or_build("x", b"abc", "v1", build(b"abc")).tolist() == [97, 98, 99]
    assert len(calls) == 2 and len(list(tmp_path.glob("x.*.npy"))) == 2
    npy = next(p for p in tmp_path.glob("x.*.npy") if np.load(p).tolist() == [97, 98, 100])
    for damage in (lambda p: p.write_bytes(p.read_bytes()[:-4]),  # truncated
                   lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x07")):  # tampered, same size
        damage(npy)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lm.data.cache"):
            assert c.load_or_build("x", b"abd", "v1", build(b"abd")).tolist() == [97, 98, 100]
        assert "corrupted" in caplog.text
    assert len(calls) == 4
    # a different vocabulary is a different entry
    c.load_or_build("x", b"abd", "v2", build(b"abd"))
    assert len(calls) == 5 and len(list(tmp_path.glob("x.*.json"))) == 3


def test_datamodule_cache_follows_file_content(tmp_path):
    write_wikitext(tmp_path, train=" a b \n")
    dm = LMDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert dm.tokens("valid").tolist() == [2, 1, 0]  # vocab <eos> a b <unk>; " b a " -> b a <eos>
    (tmp_path / "wikitext-2" / "wiki.valid.tokens").write_text(" a a \n")
    dm2 = LMDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert dm2.tokens("valid").tolist() == [1, 1, 0]


# ----- ordered streams -----------------------------------------------------------------------------
def test_stream_order_hand_computed():
    # N=21, B=2: the odd tail token 20 is dropped; stream 0 = 0..9, stream 1 = 10..19.
    s = OrderedStreams(torch.arange(21), batch_size=2, tgt_len=3)
    batches = list(s)
    assert len(s) == len(batches) == 3  # (10 - 1) // 3 full segments; nothing partial
    for k, b in enumerate(batches):
        assert b["input"].tolist() == [list(range(3 * k, 3 * k + 3)), list(range(10 + 3 * k, 13 + 3 * k))]
        assert b["target"].tolist() == [list(range(3 * k + 1, 3 * k + 4)), list(range(11 + 3 * k, 14 + 3 * k))]
        assert b["first"] == (k == 0) and b["input"].dtype == torch.long
    assert [b["input"][0, 0].item() for b in s] == [0, 3, 6]  # re-iterable: a new epoch restarts


def test_stream_rank_sharding():
    toks = torch.arange(4 * 25)
    one = list(OrderedStreams(toks, 4, 5))
    ranks = [list(OrderedStreams(toks, 4, 5, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for k, b in enumerate(one):
        joined = torch.cat([ranks[0][k]["input"], ranks[1][k]["input"]])
        assert torch.equal(joined, b["input"])  # every stream exactly once, same order as one process
    with pytest.raises(ConfigError, match="batch_size=6.*world_size=4"):
        OrderedStreams(toks, 6, 5, rank=0, world_size=4)


def test_stream_state_dict_resumes_at_next_batch():
    toks = torch.arange(2 * 40)
    full = [b["input"][0, 0].item() for b in OrderedStreams(toks, 2, 4)]
    s = OrderedStreams(toks, 2, 4)
    it = iter(s)
    seen = [next(it)["input"][0, 0].item() for _ in range(3)]
    state = s.state_dict()
    assert state["position"] == 3
    t = OrderedStreams(toks, 2, 4)
    t.load_state_dict(state)
    assert t.state_dict()["position"] == 3
    assert seen + [b["input"][0, 0].item() for b in t] == full
    assert [b["input"][0, 0].item() for b in t] == full  # the next epoch starts over
    done = OrderedStreams(toks, 2, 4)
    done.load_state_dict({**state, "position": len(done)})  # saved after an epoch's last batch
    assert [b["input"][0, 0].item() for b in done] == full
    with pytest.raises(ConfigError, match="tgt_len"):
        OrderedStreams(toks, 2, 5).load_state_dict(state)


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((tuple(batch["input"].flatten().tolist()), batch["first"]))
        return self.w.sum() * batch["input"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm, max_steps, d, ckpt=None):
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(d), num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", devices=1,
        callbacks=[ModelCheckpoint(dirpath=str(d), filename="{step}", every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen


def test_lightning_resume_continues_at_next_batch(tmp_path):
    # 60 distinct words in 10 lines -> 70 tokens; B=2, T=4: streams of 35, 8 batches per epoch.
    words = [f"w{i}" for i in range(60)]
    write_wikitext(tmp_path, train="".join(" " + " ".join(words[i : i + 6]) + " \n" for i in range(0, 60, 6)))

    def dm():
        return LMDataModule(root=str(tmp_path), batch_size=2, tgt_len=4, cache_dir=str(tmp_path / "c"))

    assert len(dm().train_dataloader()) == 8
    n = 19
    full = _fit(dm(), n, tmp_path / "full")
    assert len(full) == n and [f for _, f in full] == [k % 8 == 0 for k in range(n)]
    for k in (3, 8, 11):  # mid-epoch, exactly at the end of an epoch, mid second epoch
        d = tmp_path / f"run{k}"
        first = _fit(dm(), k, d)
        ckpt = d / f"step={k}.ckpt"
        saved = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert saved[0]["position"] == (k - 1) % 8 + 1
        resumed = _fit(dm(), n, d, ckpt=str(ckpt))
        assert first + resumed == full, f"resume after step {k}"
    assert (tmp_path / "full" / "tokenizer.json").is_file()  # setup() writes the vocabulary into the run


# ----- data module ---------------------------------------------------------------------------------
def test_datamodule_tokenizer_reuse_and_override_file(tmp_path):
    write_wikitext(tmp_path, train=" the cat sat \n the dog \n", test=" the cat \n")
    dm = LMDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert dm.vocab_size == 6  # <eos> the cat sat dog <unk>
    dm.vocab.save(tmp_path / "tokenizer.json")
    swapped = tmp_path / "test.swapped.tokens"
    swapped.write_text(" the AAA \n")
    # reuse the vocabulary without any train split (as for WikiText-103 here)
    (tmp_path / "wikitext-2" / "wiki.train.tokens").unlink()
    dm2 = LMDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c"), tokenizer=str(tmp_path / "tokenizer.json"),
                       test_file=str(swapped))
    assert dm2.vocab.sha256 == dm.vocab.sha256
    assert dm2.tokens("test").tolist() == [1, 5, 0]  # AAA -> <unk>
    assert dm2.describe("test")["file_tag"] == "test.swapped"
    with pytest.raises(DataError, match="data.tokenizer"):
        LMDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c")).vocab_size


def test_datamodule_validate_scores_every_token(tmp_path):
    write_wikitext(tmp_path, train=" a b c \n" * 5, valid=" a b c d \n" * 7)  # valid: 35 tokens

    class Counter(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.scored = 0

        def validation_step(self, batch, batch_idx):
            self.scored += int(batch["mask"].sum())

    for protocol in ("segments", "memory", "sliding"):
        dm = LMDataModule(root=str(tmp_path), tgt_len=4, cache_dir=str(tmp_path / "c"),
                          eval=EvalConfig(protocol=protocol, batch_size=3, stride=3 if protocol == "sliding" else None))
        model = Counter()
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                  devices=1, default_root_dir=str(tmp_path)).validate(model, datamodule=dm)
        assert model.scored == 34, protocol


# ----- broken enwik8.zip ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["not-a-zip", "truncated-zip"])
def test_enwik8_corrupt_zip_is_a_clear_error(tmp_path, damage):
    (tmp_path / "enwik8").mkdir()
    z = tmp_path / "enwik8" / "enwik8.zip"
    if damage == "not-a-zip":
        z.write_bytes(make_enwik8(500))  # e.g. the raw file saved under the zip's name
    else:
        with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as f:
            f.writestr("enwik8", make_enwik8(2000))
        z.write_bytes(z.read_bytes()[:-30])  # an interrupted download: the central directory is cut
    with pytest.raises(DataError) as e:
        find_corpus("enwik8", root=str(tmp_path)).read_bytes("train")
    msg = str(e.value)
    assert str(z) in msg and "is not a valid zip file" in msg and "Re-download enwik8.zip" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one paragraph, no zipfile traceback
    # the same error through the data module (the path `lm fit` takes)
    with pytest.raises(DataError, match="is not a valid zip file"):
        LMDataModule(corpus="enwik8", root=str(tmp_path), cache_dir=str(tmp_path / "cache")).tokens("train")


def test_enwik8_zip_without_enwik8_member_is_a_clear_error(tmp_path):
    (tmp_path / "enwik8").mkdir()
    z = tmp_path / "enwik8" / "enwik8.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("enwik9", make_enwik8(500))
        f.writestr("readme.txt", "hello")
    with pytest.raises(DataError) as e:
        find_corpus("enwik8", root=str(tmp_path)).read_bytes("valid")
    msg = str(e.value)
    assert str(z) in msg and "has no member named 'enwik8'" in msg
    assert "enwik9" in msg and "readme.txt" in msg  # what it holds instead
    assert "original enwik8.zip from mattmahoney.net" in msg
    with pytest.raises(DataError, match="has no member named 'enwik8'"):
        LMDataModule(corpus="enwik8", root=str(tmp_path), cache_dir=str(tmp_path / "cache")).tokens("train")


# ----- byte-level evaluation reports bits per character --------------------------------------------
def test_byte_level_test_reports_bpc_from_the_models_own_nll(tmp_path):
    import json
    import math

    from lm.tasks.lm_module import LanguageModel

    data = make_enwik8(20_000)
    (tmp_path / "enwik8").mkdir()
    (tmp_path / "enwik8" / "enwik8").write_bytes(data)
    test_bytes = data[20_000 * 95 // 100:]  # the last 5%: 1000 bytes
    dm = LMDataModule(corpus="enwik8", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), tgt_len=16,
                      eval=EvalConfig(batch_size=3))
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=dm.vocab_size, unit=dm.unit, tgt_len=16, n_layer=1, d_model=16, n_head=2,
                          d_head=8, d_inner=32, dropout=0.0, adaptive=False, cutoffs=[], results_dir=str(tmp_path))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        devices=1, default_root_dir=str(tmp_path))
    trainer.test(model, datamodule=dm)
    result = json.loads((tmp_path / "results" / "test-segments.json").read_text())

    # Independently: the model's own per-byte NLL over every scored target of the test split.
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            nll = model.net.nll(model.net(batch["input"]).hidden, batch["target"])
            mask = batch.get("mask", torch.ones_like(nll, dtype=torch.bool))
            total += nll[mask].double().sum().item()
            count += int(mask.sum())
    assert count == len(test_bytes) - 1  # every byte after the first is predicted once
    assert result["tokens_scored"] == count
    mean_nll = total / count
    assert result["unit"] == "byte" and result["metric"] == "bpc" and "ppl" not in result
    assert result["protocol"]["normalised_by"] == "byte"
    assert result["nll"] == pytest.approx(mean_nll, rel=1e-5)
    assert result["bpc"] == pytest.approx(mean_nll / math.log(2), rel=1e-5)
    assert result["bpc"] == pytest.approx(result["nll"] / math.log(2), rel=1e-6)
    # an untrained model (init std 0.02) is close to uniform over 256 bytes: about 8 bits per byte
    assert 7.5 < result["bpc"] < 8.5
    logged = trainer.callback_metrics
    assert "test/bpc" in logged and "test/ppl" not in logged
    assert float(logged["test/bpc"]) == pytest.approx(result["bpc"], rel=1e-6)
